"""The clean verdict: re-check a notebook's recorded answers in a fresh process.

    python -m autograder.verify ASSIGNMENT ANSWERS_JSONL
    python -m autograder.verify ASSIGNMENT --batch FILE [FILE ...]

prints JSON ``{grade_id: {"passed": bool, "message": str}}`` (with ``--batch``:
``{file: {grade_id: ...}}``).  A grade cell passes iff every key its ``GRADE_CELLS`` entry
lists was recorded (the last record of a key wins) and passes its check.  The grader runs
this after the notebook ran, outside the student's kernel, so that nothing the student's
code replaced (assert helpers, ``numpy.isclose``, ``sympy.simplify``, paralab, the checks
themselves) can change the verdict: the references are imported fresh here and the answers
are read with :mod:`autograder.checks.codec`, which never evaluates text.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import resource
import signal
import sys
from typing import Any

ASSIGNMENT_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
CHECK_TIMEOUT_S = 20
MAX_FILE = 64 * 2**20


class CourseError(Exception):
    """The assignment's check module is missing or inconsistent (a course author's bug)."""


def load_module(assignment: str):
    if not ASSIGNMENT_NAME.match(assignment):
        raise CourseError(f"{assignment!r} is not a valid assignment name for a check module "
                          f"(letters, digits and _)")
    name = f"autograder.checks.{assignment}"
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name in (name, "autograder.checks"):
            raise CourseError(f"no check module for assignment {assignment!r}: create "
                              f"autograder/checks/{assignment}.py with CHECKS and "
                              f"GRADE_CELLS") from None
        raise
    problems = module_problems(module)
    if problems:
        raise CourseError(f"autograder/checks/{assignment}.py: " + "; ".join(problems))
    return module


def module_problems(module) -> list[str]:
    """What is wrong with a check module's CHECKS / GRADE_CELLS (empty when fine)."""
    checks = getattr(module, "CHECKS", None)
    cells = getattr(module, "GRADE_CELLS", None)
    problems = []
    if not isinstance(checks, dict):
        problems.append("CHECKS must be a dict {answer key: function(value) -> Verdict}")
        checks = {}
    if not isinstance(cells, dict):
        problems.append("GRADE_CELLS must be a dict {grade_id: [answer keys]}")
        cells = {}
    for grade_id, keys in cells.items():
        if not isinstance(keys, (list, tuple)) or not keys:
            problems.append(f"GRADE_CELLS[{grade_id!r}] must be a non-empty list of keys")
            continue
        for key in keys:
            if key not in checks:
                problems.append(f"GRADE_CELLS[{grade_id!r}] lists {key!r}, which is not in "
                                f"CHECKS")
    for key, fn in checks.items():
        if not callable(fn):
            problems.append(f"CHECKS[{key!r}] is not callable")
    return problems


class _CheckTimeout(Exception):
    pass


def _on_alarm(signum, frame):
    raise _CheckTimeout()


def verify_records(module, records: dict[str, Any], file_problems: list[str] | None = None
                   ) -> dict[str, dict]:
    """Clean verdict per grade cell from ``records`` (key -> encoded value)."""
    from autograder.checks import Verdict, run_check

    symbols = tuple(getattr(module, "SYMBOLS", ()))
    functions = getattr(module, "FUNCTIONS", None)
    verdicts: dict[str, Verdict] = {}
    use_alarm = hasattr(signal, "SIGALRM")
    if use_alarm:
        old = signal.signal(signal.SIGALRM, _on_alarm)
    try:
        for key in {k for keys in module.GRADE_CELLS.values() for k in keys}:
            if key not in records:
                verdicts[key] = Verdict(False, f"{key}: no answer was recorded (the test cell "
                                               f"stopped before it checked {key})")
                continue
            try:
                if use_alarm:
                    signal.alarm(CHECK_TIMEOUT_S)
                verdicts[key] = run_check(module.CHECKS, key, records[key], symbols, functions)
            except _CheckTimeout:
                verdicts[key] = Verdict(False, f"{key}: checking the answer took longer than "
                                               f"{CHECK_TIMEOUT_S} s")
            finally:
                if use_alarm:
                    signal.alarm(0)
    finally:
        if use_alarm:
            signal.signal(signal.SIGALRM, old)
    out = {}
    for grade_id, keys in module.GRADE_CELLS.items():
        failed = [verdicts[k].message for k in keys if not verdicts[k].passed]
        if failed:
            out[grade_id] = {"passed": False, "message": "\n".join(failed)}
        else:
            out[grade_id] = {"passed": True,
                             "message": "; ".join(f"{k}: {verdicts[k].message}" for k in keys)}
    return out


def verify_file(module, path: str) -> dict[str, dict]:
    from autograder.checks import read_records

    try:
        size = os.path.getsize(path)
    except OSError:
        size = 0
        lines: list[str] = []
    else:
        with open(path, "r", encoding="utf-8", errors="replace") as f:
            lines = f.read(MAX_FILE).splitlines()
    records, problems = read_records(lines)
    result = verify_records(module, records, problems)
    if size > MAX_FILE:
        for v in result.values():
            if not v["passed"]:
                v["message"] += " (the answers file was too large and was cut)"
    return result


def _limit_memory(mb: int) -> None:
    if mb > 0:
        limit = mb * 2**20
        for res in (getattr(resource, "RLIMIT_DATA", None), getattr(resource, "RLIMIT_AS", None)):
            if res is not None:
                try:
                    soft, hard = resource.getrlimit(res)
                    if hard == resource.RLIM_INFINITY or hard > limit:
                        resource.setrlimit(res, (limit, limit if hard == resource.RLIM_INFINITY
                                                 else min(hard, limit)))
                except (ValueError, OSError):
                    pass
                break


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m autograder.verify",
                                     description="Re-check recorded answers in a clean process.")
    parser.add_argument("assignment")
    parser.add_argument("answers", nargs="+", help="answers file(s) (JSON lines)")
    parser.add_argument("--batch", action="store_true",
                        help="several files: print {file: verdicts}")
    parser.add_argument("--checks-path", action="append", default=[],
                        help="extra directory with assignment check modules")
    parser.add_argument("--memory-mb", type=int, default=0,
                        help="address-space limit for this process (0: none)")
    args = parser.parse_args(argv)
    if len(args.answers) > 1 and not args.batch:
        parser.error("several answers files need --batch")
    _limit_memory(args.memory_mb)
    import autograder.checks as checks_pkg
    for d in args.checks_path:
        checks_pkg.add_path(d)
    try:
        module = load_module(args.assignment)
    except CourseError as e:
        print(f"course error: {e}", file=sys.stderr)
        return 2
    if args.batch:
        out = {path: verify_file(module, path) for path in args.answers}
    else:
        out = verify_file(module, args.answers[0])
    json.dump(out, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
