"""What grading costs beyond nbgrader itself: ``python -m autograder grade`` against a bare
``nbgrader autograde`` of the same notebooks, paired, in one run.

    python bench/bench_grading.py [--assignment hw2_pipeline_bubbles] [--pairs 3]
                                  [--class-size 4] [--jobs 0]

Both sides start from the same state: a working course where the assignment is already
released and the submissions sit in ``submitted/``.  The bare side is the plain nbgrader
command with nbgrader's own preprocessors (the notebook runs in a kernel of nbgrader's
process tree, nothing re-checked, no sandbox, no feedback).  Our side is the whole ``grade``
command into a fresh output folder: it also converts and releases the sources, runs every
notebook in the sandbox, runs the assignment's probes, re-checks every answer in a clean
process, and writes the feedback and the CSV.

Runs alternate (ours, bare, ours, bare, ...) so that a change in the machine's load hits
both sides; the ratio printed is the median of the pairs' ratios (goal: <= 1.2, for one
submission and for a class of ``--class-size`` copies of it).  Each of our runs also prints
where its time went (``OUT/course/grader/runs.log``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BIN = os.path.dirname(sys.executable)
ENV = dict(os.environ, PATH=BIN + os.pathsep + os.environ.get("PATH", ""))  # alembic, nbgrader
BARE_CONFIG = """\
c = get_config()  # noqa: F821
c.CourseDirectory.root = {root!r}
c.CourseDirectory.ignore = [".ipynb_checkpoints", "*.pyc", "__pycache__", "*.pct.py", ".*"]
c.ExecutePreprocessor.timeout = {timeout}
c.Execute.timeout = {timeout}
c.OverwriteCells.add_missing_cells = True
c.Autograde.create_student = True
"""


def prepare_bare(base: str, assignment: str, students: list[str], notebook: bytes,
                 timeout: int) -> str:
    """A plain nbgrader course with ``assignment`` released and the submissions in place."""
    from autograder.course import Course, read_source, write_notebook

    course = Course(ROOT)
    root = os.path.join(base, "bare")
    for name, path in course.sources(assignment).items():
        write_notebook(read_source(path), os.path.join(root, "source", assignment,
                                                       name + ".ipynb"))
    with open(os.path.join(root, "nbgrader_config.py"), "w") as f:
        f.write(BARE_CONFIG.format(root=root, timeout=timeout))
    nbgrader = os.path.join(BIN, "nbgrader")
    subprocess.run([nbgrader, "generate_assignment", assignment, "--force"], cwd=root,
                   check=True, capture_output=True, env=ENV)
    for student in students:
        folder = os.path.join(root, "submitted", student, assignment)
        os.makedirs(folder)
        with open(os.path.join(folder, assignment + ".ipynb"), "wb") as f:
            f.write(notebook)
    return root


def bare_run(root: str, assignment: str) -> float:
    nbgrader = os.path.join(BIN, "nbgrader")
    shutil.rmtree(os.path.join(root, "autograded"), ignore_errors=True)
    t0 = time.monotonic()
    proc = subprocess.run([nbgrader, "autograde", assignment, "--force"], cwd=root,
                          capture_output=True, text=True, env=ENV)
    seconds = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"nbgrader autograde failed:\n{proc.stderr[-3000:]}")
    return seconds


def our_run(base: str, klass: str, timeout: int, jobs: int, index: int) -> tuple[float, str]:
    out = os.path.join(base, f"out-{index}")
    cmd = [sys.executable, "-m", "autograder", "grade", klass, "--out", out, "--no-progress",
           "--cell-timeout", str(timeout)]
    if jobs:
        cmd += ["--jobs", str(jobs)]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=ENV)
    seconds = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"grade failed:\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "course", "grader", "runs.log")) as f:
        first = f.readline()
    phases = first.split("phases=")[-1].strip() if "phases=" in first else ""
    with open(os.path.join(out, "grades.csv")) as f:
        rows = f.read().strip().splitlines()[1:]
    if any(",graded" not in r for r in rows):
        raise SystemExit("a submission was not graded:\n" + "\n".join(rows))
    shutil.rmtree(out)
    return seconds, phases


def measure(label: str, base: str, assignment: str, size: int, notebook: bytes, pairs: int,
            timeout: int, jobs: int) -> float:
    students = [f"student{i}" for i in range(size)]
    work = tempfile.mkdtemp(prefix=f"bench-{label}-", dir=base)
    klass = os.path.join(work, "class")
    for student in students:
        folder = os.path.join(klass, student, assignment)
        os.makedirs(folder)
        with open(os.path.join(folder, assignment + ".ipynb"), "wb") as f:
            f.write(notebook)
    bare = prepare_bare(work, assignment, students, notebook, timeout)
    ratios = []
    for i in range(pairs):
        ours, phases = our_run(work, klass, timeout, jobs, i)
        theirs = bare_run(bare, assignment)
        ratios.append(ours / theirs)
        print(f"  {label}: grade {ours:6.1f} s   nbgrader autograde {theirs:6.1f} s   "
              f"ratio {ours / theirs:.2f}   ({phases})", flush=True)
    ratio = statistics.median(ratios)
    print(f"{label}: median ratio grade / bare nbgrader = {ratio:.2f} (goal <= 1.2)",
          flush=True)
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--assignment", default="hw2_pipeline_bubbles")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--class-size", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=0, help="--jobs of grade (0: default)")
    parser.add_argument("--cell-timeout", type=int, default=120)
    parser.add_argument("--only", choices=["one", "class"], default=None)
    args = parser.parse_args()

    from autograder import corpus
    from autograder.course import Course, read_source

    course = Course(ROOT)
    (name, source), = course.sources(args.assignment).items()
    release = corpus.load(os.path.join(course.assignments_dir, args.assignment,
                                       name + ".ipynb"))
    notebook = corpus.dumps(corpus.solved_notebook(release, read_source(source)))
    print(f"{args.assignment}: a correct submission; {os.cpu_count()} cores, load "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="paralab-bench-grading-") as base:
        if args.only in (None, "one"):
            measure("one submission", base, args.assignment, 1, notebook, args.pairs,
                    args.cell_timeout, args.jobs)
        if args.only in (None, "class"):
            measure(f"class of {args.class_size}", base, args.assignment, args.class_size,
                    notebook, args.pairs, args.cell_timeout, args.jobs)


if __name__ == "__main__":
    main()
