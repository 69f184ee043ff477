"""``python -m autograder grade``: grade a class of submissions with nbgrader, in a sandbox,
with every test re-checked outside the student's kernel.

Phases, for a folder or zip laid out ``<student>/<assignment>/<notebook>.ipynb``:

1. the course's sources are converted and released into the working course directory
   ``OUT/course`` (an nbgrader course: gradebook, ``submitted/``, ``autograded/``, ...), and
   the course code a notebook imports is copied once for the whole run
   (:mod:`autograder.coursecode`);
2. each submission is read and repaired (:mod:`autograder.submissions`);
3. nbgrader autogrades every submission once to *collect* what it would execute into an
   execution plan (:class:`autograder.preprocessors.ExecutionPlan`, a folder named in the
   nbgrader config); the probes of the assignments are added to it
   (:mod:`autograder.probes`);
4. the plan runs on a pool of ``--jobs`` sandboxed runs (:class:`autograder.sandbox.Sandbox`;
   ``--jobs 1`` is a pool of one); as soon as every run of an assignment is done its clean
   re-check starts (one fresh process per assignment, ``python -m autograder.verify``);
5. nbgrader autogrades every submission again, now *replaying* each result, and each test
   cell's score in the gradebook is set from its clean verdict;
6. feedback HTML is generated (hidden tests and traceback frames removed) and copied to
   ``OUT/feedback/<student>/<assignment>/<notebook>.html``;
7. ``OUT/grades.csv`` is rewritten from the gradebook and the status file, so re-running
   (the same or another batch) replaces a student's row and never duplicates it.

Whatever goes wrong with one submission (its notebook, its files, nbgrader on it) becomes
that submission's status; the others are graded as if it were not there.
"""

from __future__ import annotations

import csv
import fcntl
import html
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

from . import pages
from . import probes as probing
from . import submissions as subs
from .course import (Course, CourseError, NbgraderFailure, Workdir, autograded_cells,
                     quiet_logs, run_converter, source_cells, validate_assignment)
from .coursecode import CourseCode
from .limits import Limits
from .plan import REPORT_DIR, ExecutionPlan, PlannedRun, execute, report_path
from .processes import DEFAULT_SANDBOX_UID, sweep_strays
from .sandbox import MAX_ANSWERS_BYTES, Sandbox

STATUS_FILE = "status.json"
CSV_COLUMNS = ["student", "assignment", "score", "max_score", "status"]
VERIFY_MEMORY_MB = 4096
GRADER_RESERVE_MB = 1536   # memory this process and a clean re-check need besides the jobs


@dataclass
class GradeOptions:
    course_root: str
    out: str
    sandbox: str = "auto"          # auto | bwrap | none
    limits: Limits = field(default_factory=Limits)
    sandbox_uid: int = DEFAULT_SANDBOX_UID
    progress: bool = True
    jobs: int = 0                  # notebooks running at the same time (0: default_jobs)
    warn: Callable[[str], None] = field(default=lambda m: print(m, file=sys.stderr))


def default_jobs(limits: Limits) -> int:
    """As many notebooks at once as the machine can run: one per core, and no more than
    fit in the memory available, each at its limits (processes, /tmp and work directory)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    available = _available_mb()
    if available is None or not limits.memory_mb:
        return max(1, cores)
    fit = (available - GRADER_RESERVE_MB) // max(1, limits.ram_mb())
    return max(1, min(cores, fit))


def _available_mb() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


@dataclass
class Entry:
    """One (student, assignment) of this run."""

    student: str              # the student's id in nbgrader (submissions.student_id)
    assignment: str
    name: str = ""            # the student's folder name, as grades.csv shows it
    status: str = "graded"
    notes: list[str] = field(default_factory=list)
    notebooks: dict[str, str] = field(default_factory=dict)   # name -> submitted file
    graded: bool = False      # nbgrader autograded it (scores come from the gradebook)
    runs: dict[str, dict] = field(default_factory=dict)       # name -> sandbox report
    overturned: int = 0
    elapsed: float = 0.0
    single: bool = True       # the assignment has a single notebook
    problems: dict[str, str] = field(default_factory=dict)    # file -> its status

    def __post_init__(self) -> None:
        self.name = self.name or self.student

    @property
    def key(self) -> str:
        return f"{subs.display_name(self.name)}/{self.assignment}"

    def full_status(self) -> str:
        return "; ".join([self.status] + self.notes)


class GradingError(Exception):
    """A usage or course error: nothing was graded."""


# ---------------------------------------------------------------------------------------


def grade(submissions: str, options: GradeOptions) -> list[Entry]:
    """Grade ``submissions`` (folder or .zip) into ``options.out``; returns this run's
    entries (the CSV also keeps earlier runs' rows)."""
    course = Course(options.course_root)
    assignments = course.assignments()
    if not assignments:
        raise GradingError(f"no assignment sources under {course.solutions_dir}")
    if not os.path.exists(submissions):
        raise GradingError(f"{submissions} does not exist")
    out = os.path.abspath(options.out)
    source = os.path.realpath(submissions)
    if os.path.isdir(source) and (os.path.realpath(out) + os.sep).startswith(source + os.sep):
        raise GradingError("--out must not be inside the submissions folder")
    os.makedirs(out, exist_ok=True)
    lock = open(os.path.join(out, ".grading.lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise GradingError(f"another grading run is using {out}") from None
    try:
        with tempfile.TemporaryDirectory(prefix="paralab-submissions-") as tmp:
            problems: dict[str, str] = {}
            if os.path.isfile(submissions):
                if not submissions.lower().endswith(".zip"):
                    raise GradingError(f"{submissions} is neither a folder nor a .zip file")
                try:
                    extracted = subs.extract_zip(submissions, tmp)
                except subs.InputError as e:
                    raise GradingError(str(e)) from None
                for w in extracted.warnings:
                    options.warn(f"warning: {w}")
                problems = extracted.problems
                root = tmp
            else:
                root = submissions
            with warnings.catch_warnings():
                # nbgrader's gradebook code trips SQLAlchemy warnings that mean nothing here
                warnings.filterwarnings("ignore", module=r"nbgrader\..*")
                warnings.filterwarnings("ignore", message=r".*not in session.*")
                return _grade_folder(course, subs.class_root(root, assignments), out,
                                     options, problems)
    finally:
        lock.close()


@dataclass
class _Run:
    """What one grading run holds besides the entries."""

    course: Course
    workdir: Workdir
    out: str
    options: GradeOptions
    cfg: Any = None
    box: Sandbox | None = None
    plan: ExecutionPlan | None = None
    codes: dict[str, CourseCode] = field(default_factory=dict)
    cells: dict[str, dict[str, list[dict]]] = field(default_factory=dict)
    modules: dict[str, Any] = field(default_factory=dict)
    rechecks: dict[str, "_Recheck"] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase
    _mark: float = field(default_factory=time.monotonic)

    def phase(self, name: str) -> None:
        """The time since the last phase ended was spent in ``name``."""
        now = time.monotonic()
        self.phases[name] = self.phases.get(name, 0.0) + now - self._mark
        self._mark = now


def _grade_folder(course: Course, root: str, out: str, options: GradeOptions,
                  problems: dict[str, str] | None = None) -> list[Entry]:
    workdir = Workdir(course, os.path.join(out, "course"))
    os.makedirs(workdir.root, exist_ok=True)
    _write_course_config(workdir.root, course)
    # what to expect of each assignment
    expected = {a: list(course.sources(a)) for a in course.assignments()}
    found, warnings = subs.discover(root, expected, {})
    for w in warnings:
        options.warn(f"warning: {w}")
    needed = sorted({f.assignment for f in found if f.assignment in expected})
    with tempfile.TemporaryDirectory(prefix="paralab-grading-") as scratch:
        run = _Run(course, workdir, out, options)
        try:
            # first of all, so that the clean re-checks get ready while everything else
            # happens (nbgrader is not even imported yet)
            for a in needed:
                run.rechecks[a] = _Recheck(course, a, scratch)
            run.plan = ExecutionPlan(os.path.join(scratch, "plan"))
            run.codes["main"] = CourseCode.build(os.path.join(scratch, "code", "main"),
                                                 course.extra_checks_dirs())
            run.box = Sandbox.create(options.sandbox, options.limits, run.codes["main"],
                                     options.sandbox_uid, warn=options.warn)
            run.cfg = workdir.config(**_overrides(course, options, run.plan.folder))
            started = time.monotonic()
            entries = _setup_and_grade(run, root, expected, needed, problems or {}, scratch)
        finally:
            for helper in run.rechecks.values():
                helper.close()
        sweep_strays()
        _save_status(workdir.root, entries)
        export_grades(out)
        run.phase("csv")
        _log_run(workdir.root, entries, time.monotonic() - started, run.box.mode, run.phases)
        return entries


def _setup_and_grade(run: _Run, root: str, expected: dict[str, list[str]], needed: list[str],
                     problems: dict[str, str], scratch: str) -> list[Entry]:
    course, workdir, options = run.course, run.workdir, run.options
    known = list(expected)
    releases: dict[str, dict[str, Any]] = {}
    for a in needed:
        described = run.rechecks[a].module() if a in run.rechecks else None
        if described is not None:  # the grader need not import the check module itself
            course.described[a] = described
        try:
            validate_assignment(course, a)
            run.modules[a] = course.check_module(a)
            workdir.generate(a, run.cfg)
        except (CourseError, NbgraderFailure) as e:
            raise GradingError(f"course error: {e}") from None
        import nbformat
        releases[a] = {n: nbformat.read(workdir.release_path(a, n), as_version=4)
                       for n in expected[a]}
        for n in expected[a]:
            committed = os.path.join(course.assignments_dir, a, n + ".ipynb")
            with open(workdir.release_path(a, n), "rb") as f:
                fresh = f.read()
            if not os.path.exists(committed) or open(committed, "rb").read() != fresh:
                options.warn(f"warning: assignments/{a}/{n}.ipynb is not what solutions/{a}/ "
                             f"generates (run `python -m autograder generate {a}`); grading "
                             f"follows the sources")
        run.cells[a] = {n: source_cells(p) for n, p in course.sources(a).items()}
    run.phase("setup")
    # match notebooks again, now that the releases are known (renamed notebooks)
    found, _ = subs.discover(root, expected, releases)
    entries = [Entry(f.sid or f.student, f.assignment, name=f.student) for f in found]
    todo = []
    for item, entry in zip(found, entries):
        entry.problems = {p: why for p, why in problems.items()
                          if (p + os.sep).startswith(item.folder + os.sep)}
        if item.assignment not in known:
            entry.status = f"unknown assignment folder (expected one of: {', '.join(known)})"
        elif _guarded(entry, workdir, _prepare, item, entry, workdir,
                      releases[item.assignment]):
            todo.append(entry)
    run.phase("read")
    _execute(run, todo, scratch)
    graded = [e for e in entries if e.graded]
    by_assignment: dict[str, list[Entry]] = {}
    for e in graded:
        by_assignment.setdefault(e.assignment, []).append(e)
    for a, group in sorted(by_assignment.items()):
        verdicts = _recheck(run, a, group)
        _apply_verdicts(group, verdicts, workdir, run.cells[a])
    run.phase("verify")
    bar = _bar(len(graded), "feedback", options.progress)
    has_mathjax = pages.install_mathjax(os.path.join(run.out, "feedback",
                                                     pages.MATHJAX_DIR))
    titles = {(a, n): pages.question_titles(run.cells[a][n], run.modules[a].GRADE_CELLS)
              for a in run.cells for n in run.cells[a]}
    try:
        for e in graded:
            _guarded(e, workdir, _feedback_for, e, workdir, run.cfg, run.out, titles,
                     has_mathjax)
            bar.update(1)
    finally:
        bar.close()
    for e in entries:
        if not e.graded:
            try:
                _status_feedback(e, run.out)
                _feedback_folder(e, run.out)
            except Exception as err:  # noqa: BLE001 - a page for one, never the run
                e.notes.append(f"no feedback: {type(err).__name__}: {err}")
    run.phase("feedback")
    return entries


def _guarded(entry: Entry, workdir: Workdir, step: Callable, *args: Any) -> Any:
    """``step(*args)``; an unexpected error becomes the entry's status ("grading error")
    instead of ending the run for everyone."""
    try:
        return step(*args)
    except Exception as e:  # noqa: BLE001
        entry.status = f"grading error ({type(e).__name__}: {str(e)[:200]})"
        entry.graded = False
        try:
            _zero_submission(workdir, entry.assignment, entry.student)
        except Exception:  # noqa: BLE001 - the status already says it
            pass
        return False


def _execute(run: _Run, todo: list[Entry], scratch: str) -> None:
    """Collect, run on the pool, replay (see the module's docstring), as a stream: a
    submission's runs start as soon as nbgrader has collected it, it is replayed as soon
    as they are done, and an assignment's clean re-check starts as soon as its last run
    is done."""
    from concurrent.futures import FIRST_COMPLETED, wait

    options, workdir = run.options, run.workdir
    jobs = options.jobs or default_jobs(options.limits)
    bar = _bar(0, "grading", options.progress)
    waiting: dict[Any, tuple[Entry, PlannedRun]] = {}
    left: dict[int, int] = {}                  # id(entry) -> runs not done
    by_assignment: dict[str, list[Entry]] = {}
    pool = _started_pool(max(1, jobs))

    def finished(future: Any) -> None:
        e, planned = waiting.pop(future)
        e.elapsed += future.result().elapsed
        bar.set_postfix_str(planned.name, refresh=False)
        bar.update(1)
        left[id(e)] -= 1
        if left[id(e)] == 0:  # all its runs are done: nbgrader can replay it
            _guarded(e, workdir, _autograde, e, workdir, run.cfg, True)
            group = by_assignment[e.assignment]
            if all(left[id(x)] == 0 for x in group) and collecting_done:
                _recheck_go(run, e.assignment, group)

    collecting_done = False
    restore = _share_with_notebooks()
    try:
        for e in todo:
            if not _guarded(e, workdir, _autograde, e, workdir, run.cfg, False):
                continue
            planned = _planned_runs(run, e)
            if e.assignment in run.rechecks:
                run.rechecks[e.assignment].watch([p.answers for p in planned])
            by_assignment.setdefault(e.assignment, []).append(e)
            left[id(e)] = len(planned)
            for p in sorted(planned, key=lambda p: p.kind != "notebook"):
                if p.code not in run.codes:  # made while the first notebooks run
                    _probe_library(run, e.assignment, scratch)
                waiting[pool.submit(execute, run.plan, run.box, p, run.codes)] = (e, p)
            if hasattr(bar, "total"):
                bar.total += len(planned)
                bar.refresh()
            for future in [f for f in list(waiting) if f.done()]:
                finished(future)
        collecting_done = True
        run.phase("collect")
        for a, group in by_assignment.items():
            if all(left[id(x)] == 0 for x in group):
                _recheck_go(run, a, group)
        while waiting:
            done, _ = wait(list(waiting), return_when=FIRST_COMPLETED)
            for future in done:
                finished(future)
    finally:
        pool.shutdown(wait=True)
        bar.close()
        restore()
    run.phase("notebooks")


def _started_pool(jobs: int) -> Any:
    """A pool whose threads all exist already (a thread starts with the priority of the
    thread that starts it: see _share_with_notebooks)."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=jobs)
    barrier = threading.Barrier(jobs + 1)
    for _ in range(jobs):
        pool.submit(barrier.wait)
    barrier.wait()
    return pool


def _share_with_notebooks() -> Callable[[], None]:
    """While notebooks run, this thread's nbgrader work (collecting and replaying the
    other submissions) runs at the notebooks' priority, not above it; the pool's threads,
    which watch the notebooks' limits, keep theirs.  Returns how to undo it (possible as
    root only)."""
    tid = threading.get_native_id()
    try:
        before = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, max(before, 10))
    except (AttributeError, OSError):
        return lambda: None

    def restore() -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, before)
        except OSError:
            pass
    return restore


def _planned_runs(run: _Run, e: Entry) -> list[PlannedRun]:
    """The runs nbgrader collected for ``e``, and its probe runs."""
    out = []
    for name in e.notebooks:
        main = run.plan.load((e.student, e.assignment, name))
        if main is None:
            continue
        out.append(main)
        module = run.modules.get(e.assignment)
        if getattr(module, "PROBES", None):
            nb = probing.probe_notebook(main.notebook, e.assignment, module.PROBES)
            answers = report_path(run.workdir.root, "answers", e.student, e.assignment, name,
                                  ".probe.jsonl")
            probe = PlannedRun(main.key, nb, answers, kind="probe",
                               code=_probe_code(e.assignment))
            run.plan.collect(probe)
            out.append(probe)
    return out


# ---------------------------------------------------------------------------------------
# The clean re-check, started early (autograder/recheck.py)


class _Recheck:
    """``python -m autograder.recheck``: the clean re-check of one assignment, getting
    ready while the notebooks run; :meth:`go` hands it the answers files."""

    def __init__(self, course: Course, assignment: str, scratch: str):
        self.assignment = assignment
        self.args = [assignment, "--batch", "--memory-mb", str(VERIFY_MEMORY_MB)]
        for d in course.extra_checks_dirs():
            self.args += ["--checks-path", d]
        env = {k: v for k, v in os.environ.items() if k != "PARALAB_ANSWERS"}
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        # what torch caches in the temporary folder goes with the grading run's own
        env["TMPDIR"] = tempfile.mkdtemp(prefix=f"recheck-{assignment}-", dir=scratch)
        self.stderr = tempfile.TemporaryFile(dir=scratch)
        self.proc = subprocess.Popen([sys.executable, "-m", "autograder.recheck"] + self.args,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, text=True, env=env)
        self.files: list[str] | None = None
        self._module: Any = False

    def module(self) -> Any:
        """What the check module declares (GRADE_CELLS, RELEASE_FILES, PROBES), as the
        re-check process loaded it; None when it could not."""
        if self._module is False:
            self._module = None
            try:
                line = self.proc.stdout.readline()
                data = json.loads(line).get("module") if line else None
            except (OSError, ValueError, AttributeError):
                data = None
            if isinstance(data, dict):
                from types import SimpleNamespace

                from .checks import Probe
                self._module = SimpleNamespace(
                    __name__=f"autograder.checks.{self.assignment}",
                    GRADE_CELLS=data["GRADE_CELLS"], RELEASE_FILES=data["RELEASE_FILES"],
                    PROBES={k: Probe(tuple(p["cells"]), p["call"], tuple(p["unavailable"]))
                            for k, p in data["PROBES"].items()})
        return self._module

    def _send(self, command: dict) -> None:
        if self.proc.stdin is None:
            return
        try:
            self.proc.stdin.write(json.dumps(command) + "\n")
            self.proc.stdin.flush()
        except OSError:
            pass

    def watch(self, files: list[str]) -> None:
        """Answers files that runs are about to write: checked as they grow."""
        self._send({"watch": files})

    def go(self, files: list[str]) -> None:
        if self.files is not None:
            return
        self.files = files
        self._send({"verify": files})
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        self.proc.stdin = None  # closed: communicate() must not touch it

    def result(self) -> dict | None:
        """Like the re-check the grader runs itself: the parsed output, None when it
        failed; a course error ends the grading run."""
        if not self.files:
            return None
        try:
            out, _ = self.proc.communicate(timeout=120 + 30 * len(self.files))
        except subprocess.TimeoutExpired:
            self.close()
            return None
        self.stderr.seek(0)
        err = self.stderr.read().decode("utf-8", "replace")
        if self.proc.returncode != 0:
            if self.proc.returncode == 2 and "course error" in err:
                raise GradingError(err.strip().splitlines()[-1])
            return None
        try:
            return json.loads(out)
        except ValueError:
            return None

    def close(self) -> None:
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            self.proc.stdin = None
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()


def _answers_files(root: str, assignment: str, group: list[Entry]) -> dict[str, tuple]:
    """answers file -> (student, notebook), as the clean re-check takes them."""
    return {report_path(root, "answers", e.student, assignment, name, ".jsonl"):
            (e.student, name) for e in group for name in e.notebooks}


def _recheck_go(run: _Run, assignment: str, group: list[Entry]) -> None:
    helper = run.rechecks.get(assignment)
    files = _answers_files(run.workdir.root, assignment, group)
    if helper is not None and files:
        helper.go(sorted(files))


def _recheck(run: _Run, assignment: str, group: list[Entry]) -> dict[tuple[str, str], dict]:
    """The clean verdicts of ``group``: from the re-check started early when it got
    exactly these files and succeeded, otherwise from :func:`_verify`."""
    helper = run.rechecks.pop(assignment, None)
    files = _answers_files(run.workdir.root, assignment, group)
    results = None
    if helper is not None:
        try:
            if helper.files is not None and set(files) <= set(helper.files):
                results = helper.result()
        finally:
            helper.close()
    if results is None or not all(p in results for p in files):
        return _verify(run.course, assignment, group, run.workdir.root, run.options)
    return {files[p]: results[p] for p in files}


def _overrides(course: Course, options: GradeOptions, plan: str) -> dict[str, Any]:
    return {
        "SandboxedExecute.plan": plan,
        "SandboxedExecute.sandbox": options.sandbox,
        "SandboxedExecute.limits": options.limits.to_dict(),
        "SandboxedExecute.sandbox_uid": int(options.sandbox_uid),
        "SandboxedExecute.checks_path": course.extra_checks_dirs(),
        "Autograde.create_student": True,
    }


def _write_course_config(root: str, course: Course) -> None:
    """An nbgrader_config.py in OUT/course, so that the plain ``nbgrader`` command works
    there too (``nbgrader export``, ``nbgrader db student import``, formgrader)."""
    from .course import PACKAGE_DIR
    extra = course.extra_checks_dirs()
    text = (
        "# Written by `python -m autograder grade`: the course's nbgrader settings, for\n"
        "# running the plain nbgrader command in this working course directory.\n"
        f"load_subconfig({os.path.join(PACKAGE_DIR, 'nbgrader_config.py')!r})\n"
        "c = get_config()  # noqa: F821\n"
        f"c.CourseDirectory.root = {root!r}\n"
        f"c.SandboxedExecute.checks_path = {extra!r}\n")
    path = os.path.join(root, "nbgrader_config.py")
    if not os.path.exists(path) or open(path).read() != text:
        with open(path, "w") as f:
            f.write(text)


def _bar(total: int, desc: str, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency of the course
        enabled = False
    if not enabled:
        class _Null:
            def update(self, n=1): pass
            def set_postfix_str(self, s, refresh=True): pass
            def close(self): pass
        return _Null()
    return tqdm(total=total, desc=desc, unit="run", file=sys.stderr, dynamic_ncols=True)


# ---------------------------------------------------------------------------------------
# Originality probes (autograder/probes.py): runs of their own, on the same pool


def _probe_library(run: _Run, assignment: str, scratch: str) -> None:
    """The copy of the course code whose library lacks the reference implementations that
    the assignment's PROBES make unavailable (made once per grading run)."""
    from .coursecode import paralab_dir
    module = run.modules[assignment]
    try:
        stripped = probing.strip_library(paralab_dir(), probing.unavailable_names(module),
                                         os.path.join(scratch, "stripped", assignment))
    except probing.ProbeError as err:
        raise GradingError(f"course error: PROBES of autograder/checks/{assignment}.py: "
                           f"{err}") from None
    run.codes[_probe_code(assignment)] = CourseCode.build(
        os.path.join(scratch, "code", _probe_code(assignment)), run.course.extra_checks_dirs(),
        library=stripped)


def _probe_code(assignment: str) -> str:
    return f"probe:{assignment}"


# ---------------------------------------------------------------------------------------
# One submission


def _prepare(item: subs.Found, entry: Entry, workdir: Workdir,
             releases: dict[str, Any]) -> bool:
    """Read, repair and place the submission in submitted/; False when there is nothing
    nbgrader can grade (the entry then has its final status and a zero grade)."""
    import nbformat

    a, student = item.assignment, entry.student
    root = workdir.root
    submitted = os.path.join(root, "submitted", student, a)
    for kind in ("runs", "answers", "verdicts"):
        subs.clear_dir(os.path.join(root, REPORT_DIR, kind, student, a))
    subs.clear_dir(submitted)
    subs.clear_dir(os.path.join(root, "originals", student, a))
    single = len(releases) == 1
    usable = {}
    problems = []
    for name in releases:
        prefix = "" if single else f"{name}: "
        if name not in item.notebooks:
            unusable = [why for path, why in entry.problems.items()]
            if unusable:
                problems.append(f"{prefix}{unusable[0]}")
                continue
            others = ", ".join(item.extra[:3]) or "no notebook"
            problems.append(f"{prefix}missing notebook ({name}.ipynb not found; found "
                            f"{others})")
            continue
        path = item.notebooks[name]
        if path in entry.problems:  # a zip member that could not be used
            problems.append(f"{prefix}{entry.problems[path]}")
            continue
        subs.copy_original(path, os.path.join(root, "originals", student, a,
                                              os.path.relpath(path, item.folder)))
        if name in item.renamed:
            entry.notes.append(f"{prefix}renamed notebook: graded {item.renamed[name]!r} as "
                               f"{name}.ipynb")
        try:
            nb = subs.read_submission(path)
        except subs.Malformed as e:
            problems.append(f"{prefix}malformed notebook ({e})")
            continue
        repair = subs.restore(nb, releases[name])
        entry.notes += repair.notes(prefix)
        usable[name] = nb
    if problems and not usable:
        entry.status = problems[0] if len(problems) == 1 else "; ".join(problems)
        _zero_submission(workdir, a, student)
        _clear_outputs(root, student, a)
        return False
    entry.notes = problems + entry.notes
    os.makedirs(submitted, exist_ok=True)
    for name, nb in usable.items():
        nbformat.write(nb, os.path.join(submitted, name + ".ipynb"))
        entry.notebooks[name] = os.path.join(submitted, name + ".ipynb")
    entry.single = single
    return True


def _autograde(entry: Entry, workdir: Workdir, cfg: Any, final: bool = True) -> bool:
    """nbgrader's autograde of one submission: the collecting pass (``final`` False) or
    the replaying one (then the run reports are read)."""
    from nbgrader.converters import Autograde

    a, student, root = entry.assignment, entry.student, workdir.root
    log: list[str] = []
    try:
        run_converter(Autograde, cfg, a, student, log=log, force=True)
    except NbgraderFailure as e:
        entry.status = f"grading error (see {os.path.join('course', 'logs')}): " \
                       f"{str(e).splitlines()[0][:200]}"
        entry.graded = False
        _zero_submission(workdir, a, student)
        _write_log(root, student, a, e.log)
        return False
    _write_log(root, student, a, "\n".join(log))
    if not final:
        return True
    entry.graded = True
    for name in entry.notebooks:
        path = report_path(root, "runs", student, a, name, ".json")
        try:
            with open(path) as f:
                entry.runs[name] = json.load(f)
        except (OSError, ValueError):
            entry.runs[name] = {"status": "error", "reason": "no run report"}
    _run_status(entry, entry.single)
    return True


def _feedback_for(e: Entry, workdir: Workdir, cfg: Any, out: str,
                  titles: dict[tuple[str, str], dict[str, str]], has_mathjax: bool) -> None:
    _feedback(e, workdir, cfg, out, titles, has_mathjax)
    _feedback_folder(e, out)


def _feedback_folder(e: Entry, out: str) -> None:
    """Feedback goes to the student's folder name (nbgrader knows the student by id)."""
    if e.name == e.student:
        return
    src = os.path.join(out, "feedback", e.student, e.assignment)
    dest = os.path.join(out, "feedback", e.name, e.assignment)
    subs.clear_dir(dest)
    if os.path.isdir(src):
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.move(src, dest)
        try:
            os.rmdir(os.path.dirname(src))
        except OSError:
            pass


def _run_status(entry: Entry, single: bool) -> None:
    """Status and notes from the sandbox reports of the entry's notebooks."""
    stops = []
    for name, run in entry.runs.items():
        prefix = "" if single else f"{name}: "
        where = _cell_name(run, run.get("running"))
        status, reason = run.get("status"), run.get("reason", "")
        if status in ("timed out", "killed", "kernel died", "error"):
            if status == "error":
                stops.append(f"{prefix}grading error: {reason}")
            elif status == "kernel died":
                stops.append(f"{prefix}kernel died in {where} ({reason})")
            elif isinstance(run.get("running"), int):
                stops.append(f"{prefix}{status}: {reason} in {where}")
            else:  # stopped with no cell running (before the first one, or between two)
                stops.append(f"{prefix}{status}: {reason}")
        for index in run.get("interrupted", []):
            if status != "timed out" or index != run.get("running"):
                entry.notes.append(f"{prefix}{_cell_name(run, index)} interrupted at the "
                                   f"cell time limit")
        if run.get("survivors"):
            entry.notes.append(f"{prefix}{run['survivors']} process(es) had to be killed "
                               f"after the run")
        if run.get("leftovers"):
            entry.notes.append(f"{prefix}{len(run['leftovers'])} file(s) of the run could "
                               f"not be removed from the grading machine")
        if run.get("answers_truncated"):
            entry.notes.append(f"{prefix}recorded answers cut at "
                               f"{MAX_ANSWERS_BYTES // 2**20} MiB")
    if stops:
        entry.status = "; ".join(stops)


def _cell_name(run: dict, index: Any) -> str:
    if not isinstance(index, int):
        return "the notebook"
    cells = run.get("cells", [])
    gid = cells[index].get("grade_id") if 0 <= index < len(cells) else None
    return f"cell {index + 1}" + (f" ({gid})" if gid else "")


def _zero_submission(workdir: Workdir, assignment: str, student: str) -> None:
    """Record the submission with every grade at 0, replacing earlier grades."""
    from nbgrader.api import Gradebook

    with quiet_logs(), Gradebook(workdir.config().CourseDirectory.db_url) as gb:
        gb.update_or_create_student(student)
        submission = gb.update_or_create_submission(assignment, student)
        for notebook in submission.notebooks:
            for grade in notebook.grades:
                grade.auto_score = 0
                grade.manual_score = None
                grade.needs_manual_grade = False
        gb.db.commit()


def _clear_outputs(root: str, student: str, assignment: str) -> None:
    subs.clear_dir(os.path.join(root, "autograded", student, assignment))
    subs.clear_dir(os.path.join(root, "feedback", student, assignment))


def _write_log(root: str, student: str, assignment: str, text: str) -> None:
    path = os.path.join(root, "logs", student, f"{assignment}.log")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


# ---------------------------------------------------------------------------------------
# Clean verdict


def _verify(course: Course, assignment: str, group: list[Entry], root: str,
            options: GradeOptions) -> dict[tuple[str, str], dict]:
    """{(student, notebook): {grade_id: verdict}} from a fresh process."""
    files = {}
    for e in group:
        for name in e.runs:
            files[report_path(root, "answers", e.student, assignment, name, ".jsonl")] = \
                (e.student, name)
    if not files:
        return {}
    bar = _bar(1, f"re-checking {assignment}", options.progress)
    try:
        results = _run_verify(course, assignment, list(files), len(files))
        if results is None:  # one bad file must not cost the others their verdict
            results = {}
            for path in files:
                one = _run_verify(course, assignment, [path], 1)
                results[path] = (one or {}).get(path)
        bar.update(1)
    finally:
        bar.close()
    return {files[p]: v for p, v in results.items() if p in files}


def _run_verify(course: Course, assignment: str, paths: list[str], count: int
                ) -> dict | None:
    cmd = [sys.executable, "-m", "autograder.verify", assignment, "--batch",
           "--memory-mb", str(VERIFY_MEMORY_MB)]
    for d in course.extra_checks_dirs():
        cmd += ["--checks-path", d]
    env = {k: v for k, v in os.environ.items() if k != "PARALAB_ANSWERS"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    try:
        proc = subprocess.run(cmd + paths, capture_output=True, text=True, env=env,
                              timeout=120 + 30 * count)
    except subprocess.TimeoutExpired:
        return None
    if proc.returncode != 0:
        if proc.returncode == 2 and "course error" in proc.stderr:
            raise GradingError(proc.stderr.strip().splitlines()[-1])
        return None
    try:
        return json.loads(proc.stdout)
    except ValueError:
        return None


def _apply_verdicts(group: list[Entry], verdicts: dict, workdir: Workdir,
                    cells: dict[str, list[dict]]) -> None:
    """Set each autograded test cell's score from its clean verdict: the cell's points
    times the weight of its checks that passed (see :mod:`autograder.verify`)."""
    from nbgrader.api import Gradebook

    root = workdir.root
    with quiet_logs(), Gradebook(workdir.config().CourseDirectory.db_url) as gb:
        for e in group:
            for name in e.runs:
                tests = {c["grade_id"]: c for c in autograded_cells(cells[name])}
                clean = verdicts.get((e.student, name))
                if clean is None:
                    clean = {gid: {"score": 0.0, "passed": False, "checks": [],
                                   "message": "the answers could not be re-checked outside "
                                              "the notebook"} for gid in tests}
                    e.notes.append("re-check failed: test cells scored 0")
                kernel = kernel_results(os.path.join(root, "autograded", e.student,
                                                     e.assignment, name + ".ipynb"))
                out = {}
                for gid, cell in tests.items():
                    verdict = clean.get(gid) or {"score": 0.0, "passed": False, "checks": [],
                                                 "message": "no verdict for this test"}
                    said = kernel.get(gid, {})
                    overturned = [c["key"] for c in verdict.get("checks", [])
                                  if c["key"] in said and said[c["key"]] != c["passed"]]
                    e.overturned += len(overturned)
                    out[gid] = dict(verdict, kernel=said, overturned=overturned)
                    try:
                        grade = gb.find_grade(gid, name, e.assignment, e.student)
                    except Exception:  # noqa: BLE001 - a cell nbgrader did not record
                        continue
                    grade.auto_score = cell_score(cell["points"], verdict)
                    grade.needs_manual_grade = grade.manual_score is not None
                path = report_path(root, "verdicts", e.student, e.assignment, name, ".json")
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w") as f:
                    json.dump(out, f, indent=1)
            if e.overturned:
                s = "s" if e.overturned > 1 else ""
                e.notes.append(f"{e.overturned} check{s} re-checked outside the notebook: "
                               f"kernel result not trusted")
        gb.db.commit()


def cell_score(points: float, verdict: dict) -> float:
    """Points a test cell earns: its points times the fraction its passing checks weigh,
    rounded to 1/1000 of a point (so that 2/3 of 3 points is exactly 2)."""
    try:
        fraction = min(1.0, max(0.0, float(verdict.get("score", 0.0))))
    except (TypeError, ValueError):
        fraction = 0.0
    return round(float(points) * fraction, 3)


def kernel_results(path: str) -> dict[str, dict[str, bool]]:
    """grade_id -> {answer key: passed} as the student's kernel reported it: the
    ``✓ key: ...`` / ``✗ key: ...`` lines a test cell printed."""
    from .checks import FAIL, PASS

    try:
        with open(path) as f:
            nb = json.load(f)
    except (OSError, ValueError):
        return {}
    out: dict[str, dict[str, bool]] = {}
    for cell in nb.get("cells", []):
        meta = cell.get("metadata", {}).get("nbgrader", {})
        if not (meta.get("grade") and not meta.get("solution")
                and cell.get("cell_type") == "code"):
            continue
        said: dict[str, bool] = {}
        for o in cell.get("outputs", []):
            if o.get("output_type") != "stream":
                continue
            text = o.get("text", "")
            for line in ("".join(text) if isinstance(text, list) else str(text)).splitlines():
                mark, _, rest = line.partition(" ")
                key = rest.split(":", 1)[0]
                if mark in (PASS, FAIL) and key:
                    said[key] = mark == PASS
        out[str(meta.get("grade_id"))] = said
    return out


# ---------------------------------------------------------------------------------------
# Feedback, status, CSV


def _feedback(e: Entry, workdir: Workdir, cfg: Any, out: str,
              titles: dict[tuple[str, str], dict[str, str]], has_mathjax: bool) -> None:
    from nbgrader.converters import GenerateFeedback

    dest = os.path.join(out, "feedback", e.student, e.assignment)
    subs.clear_dir(dest)
    try:
        run_converter(GenerateFeedback, cfg, e.assignment, e.student, force=True)
    except NbgraderFailure as err:
        e.notes.append(f"no feedback: {str(err).splitlines()[0][:120]}")
        return
    src = os.path.join(workdir.root, "feedback", e.student, e.assignment)
    os.makedirs(dest, exist_ok=True)
    local = pages.relative_mathjax(dest, os.path.join(out, "feedback")) if has_mathjax \
        else None
    if os.path.isdir(src):
        for f in os.listdir(src):
            if f.endswith(".html"):
                html_path = os.path.join(dest, f)
                shutil.copyfile(os.path.join(src, f), html_path)
                pages.rewrite(html_path, status=e.full_status(),
                              titles=titles.get((e.assignment, f[:-len(".html")]), {}),
                              mathjax_src=local)


def _status_feedback(e: Entry, out: str) -> None:
    """A short feedback page for a submission that could not be graded."""
    dest = os.path.join(out, "feedback", e.student, e.assignment)
    subs.clear_dir(dest)
    os.makedirs(dest, exist_ok=True)
    name = "submission" if e.status.startswith("unknown assignment") else e.assignment
    with open(os.path.join(dest, f"{name}.html"), "w", encoding="utf-8") as f:
        f.write(f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(e.key)}"
                f"</title></head><body style='font-family:sans-serif'><h1>{html.escape(e.key)}"
                f"</h1><p>This submission could not be graded: "
                f"<b>{html.escape(e.full_status())}</b>.</p><p>Score: 0.</p></body></html>\n")


def _status_path(root: str) -> str:
    return os.path.join(root, REPORT_DIR, STATUS_FILE)


def load_status(root: str) -> dict[str, dict]:
    try:
        with open(_status_path(root)) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_status(root: str, entries: list[Entry]) -> None:
    status = load_status(root)
    for e in entries:
        status[e.key] = {"student": subs.display_name(e.name), "id": e.student,
                         "assignment": e.assignment, "status": e.full_status(),
                         "graded_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                         "seconds": round(e.elapsed, 1)}
    path = _status_path(root)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(status, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def export_grades(out: str) -> str:
    """Rewrite ``OUT/grades.csv`` from the gradebook and the status file; returns its path.

    One row per (student, assignment) ever graded into ``OUT``, plus a "no submission" row
    for every student of the gradebook (e.g. an imported roster) who has none."""
    from nbgrader.api import Gradebook, MissingEntry

    root = os.path.join(os.path.abspath(out), "course")
    status = load_status(root)
    rows = []
    db = os.path.join(root, "gradebook.db")
    if not os.path.exists(db):
        raise GradingError(f"no gradebook in {root}: grade something first")
    with quiet_logs(), Gradebook("sqlite:///" + db) as gb:
        assignments = {a.name: a for a in gb.assignments}
        students = [s.id for s in gb.students]
        seen = set()
        for key, info in sorted(status.items()):
            student, assignment = info["student"], info["assignment"]
            sid = info.get("id", student)  # the name, for rows written before ids
            seen.add((sid, assignment))
            score, max_score = 0.0, 0.0
            if assignment in assignments:
                max_score = assignments[assignment].max_score
                try:
                    score = gb.find_submission(assignment, sid).score
                except MissingEntry:
                    score = 0.0
            rows.append([student, assignment, _num(score), _num(max_score), info["status"]])
        for student in students:
            for name, a in assignments.items():
                if (student, name) not in seen:
                    rows.append([student, name, "0", _num(a.max_score), "no submission"])
    rows.sort(key=lambda r: (r[0], r[1]))
    path = os.path.join(os.path.abspath(out), "grades.csv")
    tmp = path + ".tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        writer.writerows(rows)
    os.replace(tmp, path)
    return path


def _num(x: float) -> str:
    return f"{float(x):g}"


def _log_run(root: str, entries: list[Entry], seconds: float, mode: str,
             phases: dict[str, float] | None = None) -> None:
    path = os.path.join(root, REPORT_DIR, "runs.log")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} sandbox={mode} submissions="
                f"{len(entries)} seconds={seconds:.1f}")
        if phases:
            f.write(" phases=" + ",".join(f"{k}:{v:.1f}" for k, v in phases.items()))
        f.write("\n")
        for e in entries:
            f.write(f"  {e.key}: {e.full_status()} ({e.elapsed:.1f} s)\n")
