"""Command line of the course's autograder; see ``autograder/README.md``.

    python -m autograder generate [ASSIGNMENT ...]
    python -m autograder check-release [ASSIGNMENT ...]
    python -m autograder grade SUBMISSIONS --out OUT [--no-sandbox] [limits ...]
    python -m autograder export --out OUT
    python -m autograder sources [ASSIGNMENT ...]

Every command takes ``--course-root DIR`` (default: this repository).
Exit status: 0 when the command did its job (grading ran, even if students failed),
1 when check-release found problems, 2 on a usage or course error (one line on stderr).
"""

from __future__ import annotations

import argparse
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parser() -> argparse.ArgumentParser:
    from .limits import describe_fields, option_name
    from .processes import DEFAULT_SANDBOX_UID

    top = argparse.ArgumentParser(prog="python -m autograder",
                                  description="Generate, check and grade the course's "
                                              "nbgrader assignments.")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--course-root", default=REPO_ROOT,
                       help="course directory with solutions/, assignments/ and "
                            "autograder/checks/ (default: this repository)")

    p = sub.add_parser("generate", help="regenerate assignments/<a>/ from solutions/<a>/")
    p.add_argument("assignments", nargs="*", metavar="ASSIGNMENT")
    common(p)

    p = sub.add_parser("check-release",
                       help="fail if assignments/ drifted from the sources or leaks anything")
    p.add_argument("assignments", nargs="*", metavar="ASSIGNMENT")
    common(p)

    p = sub.add_parser("sources", help="write solutions/<a>/<nb>.ipynb from the text "
                                       "sources, for the plain nbgrader command (do not "
                                       "commit them)")
    p.add_argument("assignments", nargs="*", metavar="ASSIGNMENT")
    common(p)

    p = sub.add_parser("grade", help="grade a folder or .zip of "
                                     "<student>/<assignment>/<notebook>.ipynb")
    p.add_argument("submissions", help="folder or .zip of submissions")
    p.add_argument("--out", required=True, help="output folder (grades.csv, feedback/, "
                                                "course/); safe to reuse across runs")
    common(p)
    box = p.add_mutually_exclusive_group()
    box.add_argument("--no-sandbox", action="store_true",
                     help="run notebooks without bubblewrap, silently (limits still apply)")
    box.add_argument("--require-sandbox", action="store_true",
                     help="fail instead of running without bubblewrap")
    limits = p.add_argument_group("limits of each notebook (0 disables one)")
    for name, kind, default, text, unit in describe_fields():
        shown = f"{default:g}" if isinstance(default, float) else str(default)
        limits.add_argument(option_name(name), type=kind, default=default, metavar="N",
                            help=f"{text} ({shown}{' ' + unit if unit else ''})")
    p.add_argument("--sandbox-uid", type=int, default=DEFAULT_SANDBOX_UID,
                   help=f"as root, notebooks run as the first uid from this one on that no "
                        f"process uses and no other grading run holds ({DEFAULT_SANDBOX_UID})")
    p.add_argument("--jobs", "-j", type=int, default=0,
                   help="notebooks run at the same time (default: one per core, as many "
                        "as fit in the available memory at their limits)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("export", help="rewrite OUT/grades.csv from OUT's gradebook (e.g. "
                                      "after manual grading in formgrader)")
    p.add_argument("--out", required=True)
    return top


def _skip_iri_parser() -> None:
    """jsonschema checks the "iri" formats with rfc3987-syntax when it is installed, which
    builds a parser when imported: 3 to 4 s of this command's start, before nbformat can
    validate a notebook.  No notebook schema uses those formats: keep it out."""
    if "jsonschema" not in sys.modules:
        sys.modules.setdefault("rfc3987_syntax", None)  # importing it raises ImportError


def main(argv: list[str] | None = None) -> int:
    _skip_iri_parser()
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except _UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


class _UsageError(Exception):
    pass


def status_kind(status: str) -> str:
    """The first words of a status: "graded", "timed out", "malformed notebook"..."""
    import re
    return re.match(r"[a-z ]*[a-z]", status).group(0) if re.match(r"[a-z]", status) else status


def _run(args: argparse.Namespace) -> int:
    from .course import Course, CourseError, NbgraderFailure

    if args.command == "export":
        from .grading import GradingError, export_grades
        try:
            print(export_grades(args.out))
        except GradingError as e:
            raise _UsageError(str(e)) from None
        return 0
    root = os.path.abspath(args.course_root)
    if not os.path.isdir(root):
        raise _UsageError(f"course root {root} is not a directory")
    course = Course(root)
    try:
        if args.command == "generate":
            from .course import generate
            for path in generate(course, args.assignments):
                print(os.path.relpath(path, root))
            return 0
        if args.command == "sources":
            from .course import read_source, write_notebook
            for a in course.require(args.assignments):
                for name, path in course.sources(a).items():
                    target = os.path.join(course.solutions_dir, a, name + ".ipynb")
                    write_notebook(read_source(path), target)
                    print(os.path.relpath(target, root))
            return 0
        if args.command == "check-release":
            from .course import check_release
            problems = check_release(course, args.assignments)
            for line in problems:
                print(line)
            if problems:
                print(f"{len(problems)} problem(s)", file=sys.stderr)
                return 1
            print("release up to date, no leaks")
            return 0
        if args.command == "grade":
            return _grade(args, root)
    except (CourseError, NbgraderFailure) as e:
        raise _UsageError(str(e).splitlines()[0]) from None
    raise _UsageError(f"unknown command {args.command}")


def _grade(args: argparse.Namespace, root: str) -> int:
    from .grading import GradeOptions, GradingError, grade
    from .limits import Limits, describe_fields, option_name

    for name in ("cell_timeout", "notebook_timeout"):
        if getattr(args, name) <= 0:
            raise _UsageError(f"{option_name(name)} must be positive")
    if args.jobs < 0:
        raise _UsageError("--jobs must be positive (or 0: as many as the machine can run)")
    try:
        limits = Limits(**{name: getattr(args, name) for name, *_ in describe_fields()})
    except ValueError as e:
        raise _UsageError(str(e)) from None
    mode = "none" if args.no_sandbox else ("bwrap" if args.require_sandbox else "auto")
    options = GradeOptions(course_root=root, out=args.out, sandbox=mode, limits=limits,
                           sandbox_uid=args.sandbox_uid, progress=not args.no_progress,
                           jobs=args.jobs)
    try:
        entries = grade(args.submissions, options)
    except GradingError as e:
        raise _UsageError(str(e)) from None
    except RuntimeError as e:  # e.g. --require-sandbox without a working bubblewrap
        raise _UsageError(str(e)) from None
    counts: dict[str, int] = {}
    for e in entries:
        kind = status_kind(e.status)
        counts[kind] = counts.get(kind, 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    print(f"{len(entries)} submission(s): {summary or 'none'}; "
          f"grades in {os.path.join(args.out, 'grades.csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
