"""``python -m autograder grade``: grade a class of submissions with nbgrader, in a sandbox,
with every test re-checked outside the student's kernel.

Phases, for a folder or zip laid out ``<student>/<assignment>/<notebook>.ipynb``:

1. the course's sources are converted and released into the working course directory
   ``OUT/course`` (an nbgrader course: gradebook, ``submitted/``, ``autograded/``, ...);
2. each submission is read and repaired (:mod:`autograder.submissions`) and autograded by
   nbgrader in this process, its notebook running in :mod:`autograder.sandbox`;
3. the recorded answers of all submissions are re-checked in one fresh process per
   assignment (``python -m autograder.verify``), and each test cell's score in the
   gradebook is set from that clean verdict;
4. feedback HTML is generated (hidden tests and traceback frames removed) and copied to
   ``OUT/feedback/<student>/<assignment>/<notebook>.html``;
5. ``OUT/grades.csv`` is rewritten from the gradebook and the status file, so re-running
   (the same or another batch) replaces a student's row and never duplicates it.
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
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

from . import pages
from . import submissions as subs
from .course import (Course, CourseError, NbgraderFailure, Workdir, autograded_cells,
                     quiet_logs, run_converter, source_cells, validate_assignment)
from .preprocessors import REPORT_DIR, report_path
from .sandbox import DEFAULT_SANDBOX_UID, Limits, Sandbox, list_processes

STATUS_FILE = "status.json"
CSV_COLUMNS = ["student", "assignment", "score", "max_score", "status"]
VERIFY_MEMORY_MB = 4096


@dataclass
class GradeOptions:
    course_root: str
    out: str
    sandbox: str = "auto"          # auto | bwrap | none
    limits: Limits = field(default_factory=Limits)
    sandbox_uid: int = DEFAULT_SANDBOX_UID
    progress: bool = True
    jobs: int = 1                  # notebooks running at the same time
    warn: Callable[[str], None] = field(default=lambda m: print(m, file=sys.stderr))


@dataclass
class Entry:
    """One (student, assignment) of this run."""

    student: str
    assignment: str
    status: str = "graded"
    notes: list[str] = field(default_factory=list)
    notebooks: dict[str, str] = field(default_factory=dict)   # name -> submitted file
    graded: bool = False      # nbgrader autograded it (scores come from the gradebook)
    runs: dict[str, dict] = field(default_factory=dict)       # name -> sandbox report
    overturned: int = 0
    elapsed: float = 0.0
    single: bool = True       # the assignment has a single notebook

    @property
    def key(self) -> str:
        return f"{self.student}/{self.assignment}"

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
            if os.path.isfile(submissions):
                if not submissions.lower().endswith(".zip"):
                    raise GradingError(f"{submissions} is neither a folder nor a .zip file")
                try:
                    for w in subs.extract_zip(submissions, tmp):
                        options.warn(f"warning: {w}")
                except subs.InputError as e:
                    raise GradingError(str(e)) from None
                root = tmp
            else:
                root = submissions
            with warnings.catch_warnings():
                # nbgrader's gradebook code trips SQLAlchemy warnings that mean nothing here
                warnings.filterwarnings("ignore", module=r"nbgrader\..*")
                warnings.filterwarnings("ignore", message=r".*not in session.*")
                return _grade_folder(course, subs.class_root(root, assignments), out,
                                     options)
    finally:
        lock.close()


def _grade_folder(course: Course, root: str, out: str, options: GradeOptions) -> list[Entry]:
    workdir = Workdir(course, os.path.join(out, "course"))
    os.makedirs(workdir.root, exist_ok=True)
    _write_course_config(workdir.root, course)
    known = course.assignments()
    # what to expect of each assignment
    expected = {a: list(course.sources(a)) for a in known}
    found, warnings = subs.discover(root, expected, {})
    for w in warnings:
        options.warn(f"warning: {w}")
    needed = sorted({f.assignment for f in found if f.assignment in known})
    box = Sandbox.create(options.sandbox, options.limits, None, options.sandbox_uid,
                         warn=options.warn)
    cfg = workdir.config(**_overrides(course, options))
    releases: dict[str, dict[str, Any]] = {}
    cells: dict[str, dict[str, list[dict]]] = {}
    modules = {}
    for a in needed:
        try:
            validate_assignment(course, a)
            modules[a] = course.check_module(a)
            workdir.generate(a, cfg)
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
        cells[a] = {n: source_cells(p) for n, p in course.sources(a).items()}
    # match notebooks again, now that the releases are known (renamed notebooks)
    found, _ = subs.discover(root, expected, releases)
    entries = [Entry(f.student, f.assignment) for f in found]
    started = time.monotonic()
    todo = []
    for item, entry in zip(found, entries):
        if item.assignment not in known:
            entry.status = f"unknown assignment folder (expected one of: {', '.join(known)})"
        elif _prepare(item, entry, workdir, releases[item.assignment]):
            todo.append(entry)
    if options.jobs > 1 and len(todo) > 1:
        _autograde_parallel(todo, workdir, cfg, course, options)
    else:
        bar = _bar(len(todo), "grading", options.progress)
        try:
            for entry in todo:
                bar.set_postfix_str(entry.key, refresh=False)
                t0 = time.monotonic()
                _autograde(entry, workdir, cfg)
                entry.elapsed = time.monotonic() - t0
                bar.update(1)
        finally:
            bar.close()
    graded = [e for e in entries if e.graded]
    _run_probes(graded, workdir, modules, course, options)
    by_assignment: dict[str, list[Entry]] = {}
    for e in graded:
        by_assignment.setdefault(e.assignment, []).append(e)
    for a, group in sorted(by_assignment.items()):
        verdicts = _verify(course, a, group, workdir.root, options)
        _apply_verdicts(group, verdicts, workdir, cells[a])
    bar = _bar(len(graded), "feedback", options.progress)
    has_mathjax = pages.install_mathjax(os.path.join(out, "feedback", pages.MATHJAX_DIR))
    titles = {(a, n): pages.question_titles(cells[a][n], modules[a].GRADE_CELLS)
              for a in cells for n in cells[a]}
    try:
        for e in graded:
            _feedback(e, workdir, cfg, out, titles, has_mathjax)
            bar.update(1)
    finally:
        bar.close()
    for e in entries:
        if not e.graded:
            _status_feedback(e, out)
    _sweep_strays()
    _save_status(workdir.root, entries)
    export_grades(out)
    _log_run(workdir.root, entries, time.monotonic() - started, box.mode)
    return entries


def _overrides(course: Course, options: GradeOptions) -> dict[str, Any]:
    lim = options.limits
    return {
        "Execute.timeout": int(lim.cell_timeout) if lim.cell_timeout else None,
        "SandboxedExecute.sandbox": options.sandbox,
        "SandboxedExecute.notebook_timeout": float(lim.notebook_timeout),
        "SandboxedExecute.interrupt_grace": float(lim.interrupt_grace),
        "SandboxedExecute.memory_mb": int(lim.memory_mb),
        "SandboxedExecute.max_procs": int(lim.max_procs),
        "SandboxedExecute.cpu_seconds": int(lim.cpu_seconds),
        "SandboxedExecute.file_size_mb": int(lim.file_size_mb),
        "SandboxedExecute.max_cell_output": int(lim.max_cell_output),
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
    return tqdm(total=total, desc=desc, unit="sub", file=sys.stderr, dynamic_ncols=True)


# ---------------------------------------------------------------------------------------
# One submission


def _prepare(item: subs.Found, entry: Entry, workdir: Workdir,
             releases: dict[str, Any]) -> bool:
    """Read, repair and place the submission in submitted/; False when there is nothing
    nbgrader can grade (the entry then has its final status and a zero grade)."""
    import nbformat

    a, student = item.assignment, item.student
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
            others = ", ".join(item.extra[:3]) or "no notebook"
            problems.append(f"{prefix}missing notebook ({name}.ipynb not found; found "
                            f"{others})")
            continue
        path = item.notebooks[name]
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
    """nbgrader's autograde of one submission (``final``: then read the run reports)."""
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


def _autograde_parallel(todo: list[Entry], workdir: Workdir, cfg: Any, course: Course,
                        options: GradeOptions) -> None:
    """Autograde with ``options.jobs`` notebooks running at once (see ExecutionPlan)."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from .preprocessors import ExecutionPlan, SandboxedExecute
    from .sandbox import CourseView

    plan = ExecutionPlan("collect")
    SandboxedExecute.plan = plan
    try:
        ready = [e for e in todo if _autograde(e, workdir, cfg, final=False)]
        view = CourseView.default(course.extra_checks_dirs())
        # each run leases its own unused uid (RLIMIT_NPROC and the clean-up are per uid)
        box = Sandbox.create(options.sandbox, options.limits, view, options.sandbox_uid)

        def run(key: tuple) -> tuple:
            digest, data = plan.jobs[key]
            answers = report_path(workdir.root, "answers", key[0], key[1], key[2], ".jsonl")
            return key, (digest, box.run(data, answers_dest=answers), box.mode)

        bar = _bar(len(plan.jobs), "grading", options.progress)
        elapsed: dict[tuple, float] = {}
        try:
            with ThreadPoolExecutor(max_workers=options.jobs) as pool:
                futures = [pool.submit(run, key) for key in plan.jobs]
                for future in as_completed(futures):
                    key, done = future.result()
                    plan.results[key] = done
                    elapsed[key[:2]] = elapsed.get(key[:2], 0.0) + done[1].elapsed
                    bar.set_postfix_str(f"{key[0]}/{key[1]}", refresh=False)
                    bar.update(1)
        finally:
            bar.close()
        plan.mode = "replay"
        for entry in ready:
            _autograde(entry, workdir, cfg)
            entry.elapsed = elapsed.get((entry.student, entry.assignment), 0.0)
    finally:
        SandboxedExecute.plan = None


def _sweep_strays() -> None:
    """Kill any descendant of the grader still carrying a run's marker (without
    bubblewrap an orphan could outlive its run); with bubblewrap there are none."""
    import signal
    from .sandbox import MARKER_ENV, descendants
    procs = list_processes()
    me = os.getpid()
    marker = f"{MARKER_ENV}=".encode()
    for pid in descendants(procs, [me]):
        if pid == me:
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if marker not in f.read():
                    continue
            os.kill(pid, signal.SIGKILL)
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
            else:
                stops.append(f"{prefix}{status}: {reason} in {where}")
        for index in run.get("interrupted", []):
            if status != "timed out" or index != run.get("running"):
                entry.notes.append(f"{prefix}{_cell_name(run, index)} interrupted at the "
                                   f"cell time limit")
        if run.get("survivors"):
            entry.notes.append(f"{prefix}{run['survivors']} process(es) had to be killed "
                               f"after the run")
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
# Originality probes (see autograder/probes.py)


def _run_probes(graded: list[Entry], workdir: Workdir, modules: dict, course: Course,
                options: GradeOptions) -> None:
    """Run each graded submission's probe notebook (its assignment's PROBES) in the
    sandbox, against a copy of the library without the reference implementations."""
    import dataclasses
    from concurrent.futures import ThreadPoolExecutor

    from . import probes
    from .sandbox import CourseView

    todo = [(e, name) for e in graded
            if getattr(modules.get(e.assignment), "PROBES", None) for name in e.runs]
    if not todo:
        return
    root = workdir.root
    base = CourseView.default(course.extra_checks_dirs())
    with tempfile.TemporaryDirectory(prefix="paralab-probes-") as tmp:
        boxes = {}
        for a in sorted({e.assignment for e, _ in todo}):
            try:
                stripped = probes.strip_library(base.paralab_dir,
                                                probes.unavailable_names(modules[a]),
                                                os.path.join(tmp, a))
            except probes.ProbeError as err:
                raise GradingError(f"course error: PROBES of autograder/checks/{a}.py: "
                                   f"{err}") from None
            view = dataclasses.replace(base, paralab_dir=stripped)
            box = Sandbox.create(options.sandbox, options.limits, view, options.sandbox_uid)
            if box.mode == "none":  # no mount namespace: put the copy first on the path
                box.extra_env["PYTHONPATH"] = os.path.dirname(stripped)
            boxes[a] = box

        def run(item: tuple[Entry, str]) -> None:
            e, name = item
            nb = probes.read_notebook(os.path.join(root, "autograded", e.student,
                                                   e.assignment, name + ".ipynb"))
            if nb is None:
                return
            notebook = probes.probe_notebook(nb, e.assignment, modules[e.assignment].PROBES)
            dest = report_path(root, "answers", e.student, e.assignment, name,
                               ".probe.jsonl")
            boxes[e.assignment].run(notebook, answers_dest=dest)

        bar = _bar(len(todo), "originality", options.progress)
        try:
            with ThreadPoolExecutor(max_workers=max(1, options.jobs)) as pool:
                for _ in pool.map(run, todo):
                    bar.update(1)
        finally:
            bar.close()


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
        status[e.key] = {"student": e.student, "assignment": e.assignment,
                         "status": e.full_status(), "graded_at": time.strftime(
                             "%Y-%m-%dT%H:%M:%S"), "seconds": round(e.elapsed, 1)}
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
            seen.add((student, assignment))
            score, max_score = 0.0, 0.0
            if assignment in assignments:
                max_score = assignments[assignment].max_score
                try:
                    score = gb.find_submission(assignment, student).score
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


def _log_run(root: str, entries: list[Entry], seconds: float, mode: str) -> None:
    path = os.path.join(root, REPORT_DIR, "runs.log")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} sandbox={mode} submissions="
                f"{len(entries)} seconds={seconds:.1f}\n")
        for e in entries:
            f.write(f"  {e.key}: {e.full_status()} ({e.elapsed:.1f} s)\n")
