"""Checks shared by a notebook's test cells and the grader's clean re-check.

A test cell records the student's answer and checks it::

    from autograder.checks import hw1_tensor_parallel as checks
    checks.check("t_total", t_total)

``check`` (made by :func:`make_checker`) appends the answer to the file named by
``$PARALAB_ANSWERS`` (nothing happens when it is unset, e.g. on a student's laptop), runs
the check right away for feedback, prints one line and raises ``AssertionError`` with the
check's message when it fails.  The student's code runs in the same kernel and could
replace any of this, so the grader does not trust the kernel's verdict: it re-runs the
same checks on the recorded answers in a fresh process (``python -m autograder.verify``).
The kernel check runs on the answer as decoded from its recorded form, so both verdicts
agree unless something in the kernel was tampered with.

An assignment's module ``autograder/checks/<assignment>.py`` defines

* ``CHECKS``: answer key -> function(decoded value) -> :class:`Verdict`;
* ``GRADE_CELLS``: nbgrader ``grade_id`` of each autograded test cell -> the keys that
  cell must record (and pass) to earn its points;
* ``SYMBOLS`` (optional): names allowed in SymPy answers (strings or Symbols);
* ``check = make_checker(CHECKS, symbols=SYMBOLS)``.

Keep this package light: it is imported inside the grading sandbox and by every test cell.
"""

from __future__ import annotations

import os
import sys
from fractions import Fraction
from typing import Any, Callable, Iterable, NamedTuple

from . import expr  # noqa: F401 - imported now, before a course directory joins __path__
from .codec import DecodeError, Decoder, dumps_record, encode, read_records

ANSWERS_ENV = "PARALAB_ANSWERS"
CHECKS_PATH_ENV = "PARALAB_CHECKS_PATH"

__all__ = ["ANSWERS_ENV", "Verdict", "answer", "make_checker", "decode", "encode",
           "DecodeError", "read_records", "add_path",
           "equals", "close", "same_expression", "tensor_close", "same_schedule"]


def add_path(directory: str) -> None:
    """Look for assignment check modules in ``directory`` first (a course root other than
    this repository keeps them in ``<root>/autograder/checks``)."""
    directory = os.path.abspath(directory)
    if os.path.isdir(directory):
        if directory in __path__:
            __path__.remove(directory)
        __path__.insert(0, directory)


for _extra in filter(None, os.environ.get(CHECKS_PATH_ENV, "").split(os.pathsep)):
    add_path(_extra)


class Verdict(NamedTuple):
    """The result of one check: whether it passed and what to tell the student."""

    passed: bool
    message: str


def answer(key: str, value: Any) -> None:
    """Record ``value`` as the answer ``key`` for the clean re-check (no-op when
    ``$PARALAB_ANSWERS`` is unset)."""
    path = os.environ.get(ANSWERS_ENV)
    if not path:
        return
    line = dumps_record(key, value)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")


def decode(encoded: Any, symbols: Iterable[Any] = (), functions: Any = None) -> Any:
    """Rebuild a value from its recorded form (raises :class:`DecodeError`)."""
    return Decoder(symbols, functions).decode(encoded)


def run_check(checks: dict, key: str, encoded: Any, symbols: Iterable[Any] = (),
              functions: Any = None) -> Verdict:
    """Decode ``encoded`` and apply ``checks[key]``; never raises."""
    if key not in checks:
        return Verdict(False, f"{key}: no check with this name (course error: add it to "
                              f"CHECKS)")
    try:
        value = decode(encoded, symbols, functions)
    except DecodeError as e:
        return Verdict(False, f"{key}: {e}")
    try:
        verdict = checks[key](value)
    except Exception as e:  # noqa: BLE001 - an unexpected value must fail, not crash
        return Verdict(False, f"{key}: the answer could not be checked "
                              f"({type(e).__name__}: {str(e)[:200]})")
    if not isinstance(verdict, tuple) or len(verdict) != 2:
        return Verdict(False, f"{key}: the check returned {type(verdict).__name__}, not a "
                              f"Verdict (course error)")
    return Verdict(bool(verdict[0]), str(verdict[1]))


def make_checker(checks: dict[str, Callable[[Any], Verdict]], *, symbols: Iterable[Any] = (),
                 functions: Any = None) -> Callable[[str, Any], None]:
    """``check(key, value)`` for test cells: record, check, print, raise on failure."""
    symbols = tuple(symbols)

    def check(key: str, value: Any) -> None:
        answer(key, value)
        verdict = run_check(checks, key, encode(value), symbols, functions)
        if not verdict.passed:
            print(f"\u2717 {key}: failed", file=sys.stdout, flush=True)
            raise AssertionError(verdict.message)
        print(f"\u2713 {key}: {verdict.message}", flush=True)

    check.checks = checks  # type: ignore[attr-defined]
    return check


# ---------------------------------------------------------------------------------------
# Ready-made checks.  Each returns a function(value) -> Verdict.  ``hint`` replaces the
# default failure message (use it to name the misconception); ``reveal=False`` keeps the
# expected value out of the message (for hidden tests).


def _fail(hint: str | None, default: str) -> Verdict:
    return Verdict(False, hint or default)


def equals(expected: Any, hint: str | None = None, reveal: bool = True):
    """Exact equality (``1 == 1.0``; lists and tuples compared item by item)."""
    def check(value: Any) -> Verdict:
        if _plain(value) == _plain(expected):
            return Verdict(True, "correct")
        shown = f"expected {expected!r}, got {value!r}" if reveal else \
            f"got {_short(value)}, which is not the expected answer"
        return _fail(hint, shown)
    return check


def close(expected: float, rel: float = 1e-9, abs_tol: float = 0.0, hint: str | None = None,
          reveal: bool = True):
    """A number within ``rel`` (relative) or ``abs_tol`` of ``expected``."""
    import math

    def check(value: Any) -> Verdict:
        if isinstance(value, bool) or not isinstance(value, (int, float, Fraction)):
            return _fail(hint, f"expected a number, got {type(value).__name__}")
        if math.isclose(float(value), float(expected), rel_tol=rel, abs_tol=abs_tol):
            return Verdict(True, "correct")
        shown = f"expected {expected!r}, got {value!r}" if reveal else \
            f"{value!r} is not the expected value"
        return _fail(hint, shown)
    return check


def same_expression(expected: Any, hint: str | None = None, reveal: bool = True):
    """A SymPy expression equivalent to ``expected``: ``simplify(value - expected) == 0``.
    Floats in the answer are read as exact rationals (0.5 is 1/2)."""
    import sympy

    def check(value: Any) -> Verdict:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = sympy.nsimplify(value, rational=True)
        if not isinstance(value, sympy.Basic):
            return _fail(hint, f"expected a SymPy expression, got {type(value).__name__}")
        value = sympy.nsimplify(value, rational=True) if value.has(sympy.Float) else value
        extra = value.free_symbols - sympy.sympify(expected).free_symbols
        if sympy.simplify(value - expected) == 0:
            return Verdict(True, "correct")
        if extra:
            names = ", ".join(sorted(map(str, extra)))
            return _fail(hint, f"your expression depends on {names}, the expected one does not")
        shown = f"expected an expression equal to {expected}, got {value}" if reveal else \
            f"{value} is not equivalent to the expected expression"
        return _fail(hint, shown)
    return check


def tensor_close(expected: Any, rtol: float = 1e-5, atol: float = 1e-8, hint: str | None = None,
                 reveal: bool = True):
    """A tensor with ``expected``'s shape and values within tolerance (dtype may differ)."""
    def check(value: Any) -> Verdict:
        import torch
        if not isinstance(value, torch.Tensor):
            return _fail(hint, f"expected a tensor, got {type(value).__name__}")
        if tuple(value.shape) != tuple(expected.shape):
            return _fail(hint, f"expected shape {tuple(expected.shape)}, got "
                               f"{tuple(value.shape)}")
        if value.is_complex() != expected.is_complex():
            return _fail(hint, "complex and real tensors differ")
        a = value.to(torch.complex128 if value.is_complex() else torch.float64)
        b = expected.to(a.dtype)
        if torch.allclose(a, b, rtol=rtol, atol=atol, equal_nan=False):
            return Verdict(True, "correct")
        diff = (a - b).abs().max().item()
        shown = f"values differ from the expected tensor (largest difference {diff:.3g})"
        if reveal:
            shown += f"; expected {expected.tolist()}"[:400]
        return _fail(hint, shown)
    return check


def same_schedule(expected: Any, hint: str | None = None, reveal: bool = True):
    """A schedule whose per-rank action lists equal ``expected``'s."""
    def check(value: Any) -> Verdict:
        if not hasattr(value, "to_strings"):
            return _fail(hint, f"expected a schedule, got {type(value).__name__}")
        got, want = value.to_strings(), expected.to_strings()
        if got == want:
            return Verdict(True, "correct")
        if len(got) != len(want):
            return _fail(hint, f"expected {len(want)} ranks, got {len(got)}")
        for r, (g, w) in enumerate(zip(got, want)):
            if g != w:
                step = next((i for i, (a, b) in enumerate(zip(g, w)) if a != b),
                            min(len(g), len(w)))
                detail = f"rank {r} differs first at step {step}"
                if reveal and step < len(w):
                    seen = g[step] if step < len(g) else "nothing"
                    detail += f": expected {w[step]}, got {seen}"
                return _fail(hint, detail)
        return _fail(hint, "the schedules differ")
    return check


def _plain(x: Any) -> Any:
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    return x


def _short(x: Any) -> str:
    text = repr(x)
    return text if len(text) <= 80 else text[:77] + "..."
