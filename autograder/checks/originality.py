"""Run a student's function and notice if it calls the library's reference implementation.

The course library contains the answers to the coding exercises (that is what makes it a
reference).  A hidden test runs the student's function once under a profiler hook that
watches for calls into those reference functions; the outcome is recorded as data (the
result, or a note that the reference was called) and checked like any other answer.
Watching code objects rather than names catches aliases made before the test
(``ref = schedules.one_f_one_b``) too.  This stops honest shortcuts, not a determined copy
of the library's source.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Iterable

REFERENCE_USED = "called the library's reference implementation"


def without(functions: Iterable[Callable], call: Callable[[], Any]) -> Any:
    """``call()``'s result, or the text :data:`REFERENCE_USED` if it called any of
    ``functions`` (directly or through any alias)."""
    watched = {f.__code__ for f in functions}
    used = []

    def profile(frame, event, arg):
        if event == "call" and frame.f_code in watched:
            used.append(frame.f_code.co_name)

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        result = call()
    finally:
        sys.setprofile(previous)
    return REFERENCE_USED if used else result
