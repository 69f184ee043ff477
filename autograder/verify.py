"""The clean verdict: re-check a notebook's recorded answers in a fresh process.

    python -m autograder.verify ASSIGNMENT ANSWERS_JSONL
    python -m autograder.verify ASSIGNMENT --batch FILE [FILE ...]

prints JSON ``{grade_id: verdict}`` (with ``--batch``: ``{file: {grade_id: verdict}}``)
where a cell's verdict is ``{"score": fraction of the cell's points earned, "passed": every
check passed, "checks": [{"key", "passed", "message", "weight"}, ...], "message": ...}``.
Each key the cell's ``GRADE_CELLS`` entry lists is checked on its last record (a key never
recorded fails: "no answer was recorded"); the cell earns the weights of the checks that
pass.  Keys of the module's ``PROBES`` are read only from the probe file next to the
answers file (``X.probe.jsonl`` beside ``X.jsonl``), written by a separate run of the
student's code with the library's reference implementations unavailable; what the
notebook's kernel recorded for them is ignored.  The grader runs
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
    """What is wrong with a check module's CHECKS / GRADE_CELLS / PROBES (empty when fine)."""
    from autograder.checks import Probe

    checks = getattr(module, "CHECKS", None)
    cells = getattr(module, "GRADE_CELLS", None)
    probes = getattr(module, "PROBES", {})
    problems = []
    if not isinstance(checks, dict):
        problems.append("CHECKS must be a dict {answer key: function(value) -> Verdict}")
        checks = {}
    if not isinstance(cells, dict):
        problems.append("GRADE_CELLS must be a dict {grade_id: [answer keys]} or "
                        "{grade_id: {answer key: weight}}")
        cells = {}
    seen: dict[str, str] = {}
    for grade_id, keys in cells.items():
        if not isinstance(keys, (list, tuple, dict)) or not keys:
            problems.append(f"GRADE_CELLS[{grade_id!r}] must be a non-empty list of keys or a "
                            f"dict of key -> weight")
            continue
        if isinstance(keys, dict) and not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and w > 0
                for w in keys.values()):
            problems.append(f"GRADE_CELLS[{grade_id!r}]: weights must be positive numbers")
        for key in keys:
            if key not in checks:
                problems.append(f"GRADE_CELLS[{grade_id!r}] lists {key!r}, which is not in "
                                f"CHECKS")
            if key in seen:
                problems.append(f"{key!r} is listed by both {seen[key]!r} and {grade_id!r}: "
                                f"a key belongs to one test cell")
            seen[key] = grade_id
    for key, fn in checks.items():
        if not callable(fn):
            problems.append(f"CHECKS[{key!r}] is not callable")
    if not isinstance(probes, dict):
        problems.append("PROBES must be a dict {answer key: Probe(...)}")
        probes = {}
    for key, probe in probes.items():
        if not isinstance(probe, Probe):
            problems.append(f"PROBES[{key!r}] must be a Probe")
        elif key not in seen:
            problems.append(f"PROBES lists {key!r}, which no GRADE_CELLS entry lists")
    return problems


class _CheckTimeout(Exception):
    pass


def _on_alarm(signum, frame):
    raise _CheckTimeout()


def verify_records(module, records: dict[str, Any], probe_records: dict[str, Any] | None = None
                   ) -> dict[str, dict]:
    """Clean verdict per grade cell from ``records`` (key -> encoded value) and, for the
    module's PROBES keys, ``probe_records``."""
    from autograder.checks import FAIL, PASS, Verdict, cell_weights, run_check

    symbols = tuple(getattr(module, "SYMBOLS", ()))
    functions = getattr(module, "FUNCTIONS", None)
    probes = getattr(module, "PROBES", {}) or {}
    verdicts: dict[str, Verdict] = {}
    use_alarm = hasattr(signal, "SIGALRM")
    if use_alarm:
        old = signal.signal(signal.SIGALRM, _on_alarm)
    try:
        for key in {k for keys in module.GRADE_CELLS.values() for k in keys}:
            source = (probe_records or {}) if key in probes else records
            if key not in source:
                why = ("the separate run of your code without the library did not finish"
                       if key in probes else
                       f"the test cell stopped before it checked {key}")
                verdicts[key] = Verdict(False, f"no answer was recorded ({why})")
                continue
            try:
                if use_alarm:
                    signal.alarm(CHECK_TIMEOUT_S)
                verdicts[key] = run_check(module.CHECKS, key, source[key], symbols, functions)
            except _CheckTimeout:
                verdicts[key] = Verdict(False, f"checking the answer took longer than "
                                               f"{CHECK_TIMEOUT_S} s")
            finally:
                if use_alarm:
                    signal.alarm(0)
    finally:
        if use_alarm:
            signal.signal(signal.SIGALRM, old)
    out = {}
    for grade_id, keys in module.GRADE_CELLS.items():
        weights = cell_weights(keys)
        total = sum(weights.values())
        checks = [{"key": k, "passed": verdicts[k].passed, "message": verdicts[k].message,
                   "weight": w} for k, w in weights.items()]
        earned = sum(c["weight"] for c in checks if c["passed"])
        out[grade_id] = {
            "score": earned / total if total else 0.0,
            "passed": all(c["passed"] for c in checks),
            "checks": checks,
            "message": "\n".join(f"{PASS if c['passed'] else FAIL} {c['key']}: {c['message']}"
                                 for c in checks),
        }
    return out


def probe_path(answers_path: str) -> str:
    """Where the probe run's answers lie, next to the notebook's answers file."""
    base = answers_path[:-len(".jsonl")] if answers_path.endswith(".jsonl") else answers_path
    return base + ".probe.jsonl"


def _read(path: str) -> tuple[dict[str, Any], bool]:
    """(records, whether the file was cut at MAX_FILE)."""
    from autograder.checks import read_records

    try:
        size = os.path.getsize(path)
    except OSError:
        return {}, False
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        lines = f.read(MAX_FILE).splitlines()
    records, _problems = read_records(lines)
    return records, size > MAX_FILE


def verify_file(module, path: str) -> dict[str, dict]:
    records, cut = _read(path)
    probe_records, probe_cut = _read(probe_path(path)) if getattr(module, "PROBES", None) \
        else ({}, False)
    result = verify_records(module, records, probe_records)
    if cut or probe_cut:
        for v in result.values():
            for c in v["checks"]:
                if not c["passed"]:
                    c["message"] += " (the answers file was too large and was cut)"
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
