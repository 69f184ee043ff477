"""The course's layout, its nbgrader configuration, and the generated student release.

A course root (the repository, or any directory laid out the same way) holds

* ``solutions/<assignment>/<notebook>.pct.py``: the nbgrader sources as jupytext percent
  text (solution regions, visible and hidden tests, points in the cell headers);
* ``assignments/<assignment>/<notebook>.ipynb``: the student notebooks generated from them
  (committed, never edited by hand);
* ``autograder/checks/<assignment>.py``: the assignment's checks (``CHECKS``,
  ``GRADE_CELLS``), used by the test cells and by the clean re-check.

nbgrader itself works on ``.ipynb`` sources, so every command first converts the text
sources into a *working course directory* (a temporary one for ``generate``, ``OUT/course``
for ``grade``) and drives nbgrader there, in-process.  The conversion is deterministic
(cell ids come from the grade_id or the position), so regenerating the release is
byte-stable and ``check-release`` can compare it with what is committed.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, Iterator

PCT_SUFFIX = ".pct.py"
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
_JUPYTEXT_CELL_KEYS = ("lines_to_next_cell", "lines_to_end_of_cell_marker", "cell_marker",
                       "region_name", "title")
_CELL_ID = re.compile(r"[^A-Za-z0-9_-]")
MARKERS = ("BEGIN SOLUTION", "END SOLUTION", "BEGIN HIDDEN TESTS", "END HIDDEN TESTS")
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class CourseError(Exception):
    """Something a course author must fix (missing checks, a test cell without
    GRADE_CELLS entry, an unknown assignment); the message says what."""


@dataclass
class Course:
    root: str
    # what a check module declares, known without importing it (e.g. from the clean
    # re-check process that has it loaded): assignment -> object with its attributes
    described: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.root = os.path.abspath(self.root)

    @property
    def solutions_dir(self) -> str:
        return os.path.join(self.root, "solutions")

    @property
    def assignments_dir(self) -> str:
        return os.path.join(self.root, "assignments")

    @property
    def checks_dir(self) -> str:
        return os.path.join(self.root, "autograder", "checks")

    def extra_checks_dirs(self) -> list[str]:
        """Check-module directories besides this package's own (for a course root that
        is not this repository)."""
        own = os.path.join(PACKAGE_DIR, "checks")
        if os.path.isdir(self.checks_dir) and os.path.realpath(self.checks_dir) != \
                os.path.realpath(own):
            return [self.checks_dir]
        return []

    def assignments(self) -> list[str]:
        if not os.path.isdir(self.solutions_dir):
            return []
        return sorted(a for a in os.listdir(self.solutions_dir)
                      if not a.startswith(".") and self.sources(a))

    def sources(self, assignment: str) -> dict[str, str]:
        """notebook name -> path of its text source."""
        folder = os.path.join(self.solutions_dir, assignment)
        if not os.path.isdir(folder):
            return {}
        return {f[:-len(PCT_SUFFIX)]: os.path.join(folder, f) for f in sorted(os.listdir(folder))
                if f.endswith(PCT_SUFFIX)}

    def require(self, assignments: list[str] | None) -> list[str]:
        known = self.assignments()
        if not assignments:
            if not known:
                raise CourseError(f"no assignment sources (solutions/<assignment>/*{PCT_SUFFIX}) "
                                  f"under {self.root}")
            return known
        unknown = [a for a in assignments if a not in known]
        if unknown:
            raise CourseError(f"unknown assignment(s) {', '.join(unknown)}; the course has: "
                              f"{', '.join(known) or 'none'}")
        return list(assignments)

    def release_files(self, assignment: str) -> list[str]:
        """Non-notebook files of solutions/<assignment>/ that belong in the release, as
        listed by RELEASE_FILES in the assignment's check module (default: none)."""
        module = self.check_module(assignment, required=False)
        return list(getattr(module, "RELEASE_FILES", [])) if module is not None else []

    def check_module(self, assignment: str, required: bool = True):
        """The assignment's check module, from this course's ``autograder/checks`` (or what
        :attr:`described` says of it)."""
        if assignment in self.described:
            return self.described[assignment]
        import sys
        from autograder import checks
        from autograder.verify import CourseError as VerifyError, load_module
        for d in self.extra_checks_dirs():
            checks.add_path(d)
        loaded = sys.modules.get(f"autograder.checks.{assignment}")
        wanted = os.path.join(self.checks_dir, assignment + ".py")
        if loaded is not None and os.path.exists(wanted) and \
                os.path.realpath(getattr(loaded, "__file__", "") or "") != os.path.realpath(wanted):
            del sys.modules[f"autograder.checks.{assignment}"]  # another course's module
        try:
            return load_module(assignment)
        except VerifyError as e:
            if required:
                raise CourseError(str(e)) from None
            return None


# ---------------------------------------------------------------------------------------
# Text source -> notebook


def read_source(path: str) -> Any:
    """The nbgrader source notebook of a ``.pct.py`` file, deterministic byte for byte."""
    import jupytext
    import nbformat

    nb = jupytext.read(path, fmt="py:percent")
    nb.metadata.pop("jupytext", None)
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    nb.metadata["language_info"] = {"name": "python"}
    nb.nbformat, nb.nbformat_minor = 4, 5
    used: set[str] = set()
    for index, cell in enumerate(nb.cells):
        for key in _JUPYTEXT_CELL_KEYS:
            cell.metadata.pop(key, None)
        grade_id = cell.metadata.get("nbgrader", {}).get("grade_id")
        base = _CELL_ID.sub("-", grade_id)[:60] if grade_id else f"cell-{index}"
        cell_id, n = base, 1
        while cell_id in used:
            n += 1
            cell_id = f"{base}-{n}"
        used.add(cell_id)
        cell["id"] = cell_id
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    nbformat.validate(nb)
    return nb


def write_notebook(nb: Any, path: str) -> None:
    import nbformat
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(nbformat.writes(nb))
        f.write("\n")


def source_cells(path: str) -> list[dict]:
    """The nbgrader cells of a source: [{grade_id, grade, solution, locked, points,
    cell_type, source}] in order."""
    nb = read_source(path)
    out = []
    for cell in nb.cells:
        meta = cell.metadata.get("nbgrader")
        if meta and meta.get("grade_id"):
            out.append({"grade_id": meta["grade_id"], "grade": bool(meta.get("grade")),
                        "solution": bool(meta.get("solution")),
                        "locked": bool(meta.get("locked")),
                        "points": float(meta.get("points", 0) or 0),
                        "cell_type": cell.cell_type, "source": cell.source})
    return out


def autograded_cells(cells: list[dict]) -> list[dict]:
    """Test cells graded automatically (grade cells that are not written answers)."""
    return [c for c in cells if c["grade"] and not c["solution"] and c["cell_type"] == "code"]


# ---------------------------------------------------------------------------------------
# nbgrader, in-process


def ensure_tools_on_path() -> None:
    """nbgrader runs the ``alembic`` command of this environment when it creates a
    gradebook: make the environment's bin directory findable even when it is not active."""
    import sys
    bindir = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if bindir not in path.split(os.pathsep):
        os.environ["PATH"] = bindir + (os.pathsep + path if path else "")


def _fast_alembic_version() -> None:
    """nbgrader stamps every new gradebook with the alembic head of its migrations, which
    it learns by running ``alembic heads`` in a subprocess (~2.5 s here, each time).  The
    head is a constant of the installed nbgrader: read it once, in-process."""
    import nbgrader.api as api

    if getattr(api.get_alembic_version, "_cached", False):
        return
    original = api.get_alembic_version
    cache: dict[str, str] = {}

    def cached() -> str:
        if "head" not in cache:
            try:
                from alembic.config import Config as AlembicConfig
                from alembic.script import ScriptDirectory
                cfg = AlembicConfig()
                cfg.set_main_option("script_location",
                                    os.path.join(os.path.dirname(api.__file__), "alembic"))
                cache["head"] = ScriptDirectory.from_config(cfg).get_current_head()
            except Exception:  # noqa: BLE001 - fall back to nbgrader's own way
                cache["head"] = original()
        return cache["head"]

    cached._cached = True  # type: ignore[attr-defined]
    api.get_alembic_version = cached


def _fast_gradebook() -> None:
    """The gradebook commits dozens of times per notebook, and SQLite syncs the disk at
    every commit (~20 ms each here, seconds per grading run).  In write-ahead-log mode with
    ``synchronous=NORMAL`` a commit survives the grader crashing; only a power cut can lose
    the last commits, never the file's integrity.  (SQLAlchemy's "connect" event: applied
    to every SQLite connection this process opens, i.e. nbgrader's gradebooks.)"""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    if getattr(_fast_gradebook, "installed", False):
        return

    @event.listens_for(Engine, "connect")
    def _pragmas(connection, _record):  # noqa: ANN001 - DBAPI connection
        module = type(connection).__module__
        if not module.startswith(("sqlite3", "pysqlite")):
            return
        cursor = connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
        finally:
            cursor.close()

    _fast_gradebook.installed = True  # type: ignore[attr-defined]


def nbgrader_config(root: str, **overrides: Any) -> Any:
    """The course's nbgrader Config, rooted at ``root`` (a working course directory)."""
    from traitlets.config.loader import Config, PyFileConfigLoader

    ensure_tools_on_path()
    _fast_alembic_version()
    _fast_gradebook()
    with _quiet_logs():
        cfg = PyFileConfigLoader("nbgrader_config.py", path=PACKAGE_DIR).load_config()
    cfg.CourseDirectory.root = os.path.abspath(root)
    cfg.CourseDirectory.db_url = "sqlite:///" + os.path.join(os.path.abspath(root),
                                                             "gradebook.db")
    extra = Config()
    for dotted, value in overrides.items():
        section, _, name = dotted.rpartition(".")
        extra[section][name] = value
    cfg.merge(extra)
    return cfg


@contextlib.contextmanager
def _quiet_logs() -> Iterator[io.StringIO]:
    """Capture what nbgrader and traitlets log (it goes to the run's log file instead)."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(logging.Formatter("[%(levelname)s] %(message)s"))
    loggers = [logging.getLogger(n) for n in ("traitlets", "nbgrader", "NbGraderAPI", "")]
    saved = [(lg, lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.handlers = [handler]
        lg.propagate = False
        lg.setLevel(logging.INFO)
    try:
        yield buffer
    finally:
        for lg, handlers, level, propagate in saved:
            lg.handlers, lg.level, lg.propagate = handlers, level, propagate


quiet_logs = _quiet_logs


def run_converter(cls: type, cfg: Any, assignment: str, student: str = ".",
                  log: list[str] | None = None, **attrs: Any) -> None:
    """Run an nbgrader converter (GenerateAssignment, Autograde, GenerateFeedback) for one
    assignment (and student) in this process; raises with nbgrader's log on failure."""
    from nbgrader.coursedir import CourseDirectory

    with _quiet_logs() as buffer:
        coursedir = CourseDirectory(config=cfg)
        coursedir.assignment_id = assignment
        coursedir.student_id = student
        converter = cls(coursedir=coursedir, config=cfg)
        for name, value in attrs.items():
            setattr(converter, name, value)
        try:
            converter.start()
        except BaseException as e:
            if log is not None:
                log.append(buffer.getvalue())
            raise NbgraderFailure(f"nbgrader {cls.__name__} failed for {student}/{assignment}: "
                                  f"{type(e).__name__}: {e}", buffer.getvalue()) from e
        if log is not None:
            log.append(buffer.getvalue())


class NbgraderFailure(Exception):
    def __init__(self, message: str, log: str):
        super().__init__(message)
        self.log = log


# ---------------------------------------------------------------------------------------
# Working course directory and the release


@dataclass
class Workdir:
    """A working nbgrader course directory for ``course``."""

    course: Course
    root: str
    generated: list[str] = field(default_factory=list)

    def config(self, **overrides: Any) -> Any:
        return nbgrader_config(self.root, **overrides)

    def source_path(self, assignment: str, notebook: str) -> str:
        return os.path.join(self.root, "solutions", assignment, notebook + ".ipynb")

    def release_path(self, assignment: str, notebook: str) -> str:
        return os.path.join(self.root, "assignments", assignment, notebook + ".ipynb")

    def prepare_sources(self, assignment: str) -> None:
        """solutions/<assignment>/ of the working directory: the converted notebooks and
        the files RELEASE_FILES allows, nothing else."""
        target = os.path.join(self.root, "solutions", assignment)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.makedirs(target)
        for name, path in self.course.sources(assignment).items():
            write_notebook(read_source(path), os.path.join(target, name + ".ipynb"))
        src_dir = os.path.join(self.course.solutions_dir, assignment)
        for rel in self.course.release_files(assignment):
            src = os.path.normpath(os.path.join(src_dir, rel))
            if not src.startswith(src_dir + os.sep) or not os.path.isfile(src):
                raise CourseError(f"RELEASE_FILES of {assignment} lists {rel!r}, which is not "
                                  f"a file of solutions/{assignment}/")
            dest = os.path.join(target, rel)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.copy(src, dest)

    def generate(self, assignment: str, cfg: Any | None = None) -> str:
        """Run nbgrader's generate_assignment; returns the release folder."""
        from nbgrader.converters import GenerateAssignment

        self.prepare_sources(assignment)
        cfg = cfg or self.config()
        run_converter(GenerateAssignment, cfg, assignment, force=True)
        self.generated.append(assignment)
        return os.path.join(self.root, "assignments", assignment)


def generate(course: Course, assignments: list[str] | None = None,
             into: str | None = None) -> list[str]:
    """Regenerate the student notebooks of ``assignments`` (all by default) into
    ``into/<assignment>/`` (default: the course's ``assignments/``); returns the files
    written.  Every other file in those folders is removed."""
    assignments = course.require(assignments)
    for a in assignments:
        validate_assignment(course, a)
    into = into or course.assignments_dir
    written = []
    with tempfile.TemporaryDirectory(prefix="paralab-generate-") as tmp:
        work = Workdir(course, tmp)
        for a in assignments:
            release = work.generate(a)
            dest = os.path.join(into, a)
            if os.path.isdir(dest):
                shutil.rmtree(dest)
            os.makedirs(dest)
            for dirpath, _, files in os.walk(release):
                for f in sorted(files):
                    src = os.path.join(dirpath, f)
                    out = os.path.join(dest, os.path.relpath(src, release))
                    os.makedirs(os.path.dirname(out), exist_ok=True)
                    shutil.copyfile(src, out)
                    written.append(out)
    return written


def validate_assignment(course: Course, assignment: str) -> list[dict]:
    """Check that every autograded test cell has a GRADE_CELLS entry and vice versa;
    returns the autograded cells."""
    module = course.check_module(assignment)
    cells: list[dict] = []
    for notebook, path in course.sources(assignment).items():
        cells += [dict(c, notebook=notebook) for c in autograded_cells(source_cells(path))]
    ids = [c["grade_id"] for c in cells]
    problems = []
    for c in cells:
        if c["grade_id"] not in module.GRADE_CELLS:
            problems.append(f"test cell {c['grade_id']!r} ({c['notebook']}{PCT_SUFFIX}) has no "
                            f"GRADE_CELLS entry in autograder/checks/{assignment}.py: list the "
                            f"answer keys it records")
        else:
            probes = getattr(module, "PROBES", {}) or {}
            for key in module.GRADE_CELLS[c["grade_id"]]:
                if key in probes:  # recorded by the grader's separate run, not the cell
                    continue
                if f'"{key}"' not in c["source"] and f"'{key}'" not in c["source"]:
                    problems.append(f"test cell {c['grade_id']!r} must record {key!r} "
                                    f"(GRADE_CELLS) but its source never mentions it")
    for grade_id in module.GRADE_CELLS:
        if grade_id not in ids:
            problems.append(f"GRADE_CELLS lists {grade_id!r}, which is not an autograded test "
                            f"cell of solutions/{assignment}/")
    if problems:
        raise CourseError(f"{assignment}: " + "; ".join(problems))
    return cells


# ---------------------------------------------------------------------------------------
# check-release: drift and leaks


def check_release(course: Course, assignments: list[str] | None = None) -> list[str]:
    """Problems with the committed release (empty when it is exactly what the sources
    generate and nothing leaks)."""
    problems: list[str] = []
    known = course.assignments()
    try:
        wanted = course.require(assignments)
    except CourseError as e:
        return [str(e)]
    if not assignments and os.path.isdir(course.assignments_dir):
        for a in sorted(os.listdir(course.assignments_dir)):
            if a not in known and not a.startswith("."):
                problems.append(f"assignments/{a}/ has no source in solutions/{a}/")
    with tempfile.TemporaryDirectory(prefix="paralab-check-") as tmp:
        try:
            generate(course, wanted, into=tmp)
        except CourseError as e:
            return problems + [str(e)]
        for a in wanted:
            fresh = _files(os.path.join(tmp, a))
            committed = _files(os.path.join(course.assignments_dir, a))
            for rel in sorted(set(fresh) - set(committed)):
                problems.append(f"assignments/{a}/{rel} is missing: run "
                                f"`python -m autograder generate {a}`")
            for rel in sorted(set(committed) - set(fresh)):
                problems.append(f"assignments/{a}/{rel} is not generated from the sources "
                                f"(stale or hand-made): remove it or regenerate")
            for rel in sorted(set(fresh) & set(committed)):
                if fresh[rel] != committed[rel]:
                    problems.append(f"assignments/{a}/{rel} differs from what the sources "
                                    f"generate: run `python -m autograder generate {a}`")
    for a in wanted:
        problems += scan_leaks(course, a)
    return problems


# What editors and Jupyter leave next to an opened notebook: never part of a release, never
# a reason for the release check to fail.
EDITOR_DIRS = {".ipynb_checkpoints", "__pycache__", ".virtual_documents", ".jupyter"}


def _editor_dropping(name: str) -> bool:
    return (name in (".DS_Store", "Thumbs.db", "desktop.ini") or name.endswith("~")
            or (name.startswith(".") and name.endswith((".swp", ".swo")))
            or (name.startswith(".~") or name.startswith("~$")))


def _files(folder: str) -> dict[str, bytes]:
    out = {}
    if not os.path.isdir(folder):
        return out
    for dirpath, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d not in EDITOR_DIRS]
        for f in files:
            if _editor_dropping(f):
                continue
            path = os.path.join(dirpath, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, folder)] = fh.read()
    return out


def secret_lines(source_text: str, min_chars: int = 12) -> set[str]:
    """Lines inside solution and hidden-test regions that are specific enough to recognise
    (at least ``min_chars`` non-blank characters, not comments) and never appear outside
    those regions."""
    inside, outside = set(), set()
    depth = 0
    for raw in source_text.splitlines():
        line = raw.strip()
        if "BEGIN SOLUTION" in line or "BEGIN HIDDEN TESTS" in line:
            depth += 1
            continue
        if "END SOLUTION" in line or "END HIDDEN TESTS" in line:
            depth = max(0, depth - 1)
            continue
        (inside if depth else outside).add(line)
    return {ln for ln in inside - outside
            if len(ln.replace(" ", "")) >= min_chars and not ln.startswith("#")}


def scan_leaks(course: Course, assignment: str) -> list[str]:
    """Solution or hidden-test text, or unexpected files, in assignments/<assignment>/."""
    import json

    folder = os.path.join(course.assignments_dir, assignment)
    if not os.path.isdir(folder):
        return []
    secrets_: set[str] = set()
    for path in course.sources(assignment).values():
        with open(path, encoding="utf-8") as f:
            secrets_ |= secret_lines(f.read())
    allowed = set(course.release_files(assignment))
    problems = []
    for rel, data in sorted(_files(folder).items()):
        where = f"assignments/{assignment}/{rel}"
        if not rel.endswith(".ipynb") and rel not in allowed:
            problems.append(f"{where}: only notebooks (and files listed in RELEASE_FILES) may "
                            f"be released")
        text = data.decode("utf-8", "replace")
        if rel.endswith(".ipynb"):
            try:
                nb = json.loads(text)
                text = "\n".join("".join(c.get("source", "")) if isinstance(c.get("source"), list)
                                 else c.get("source", "") for c in nb.get("cells", []))
                if any(c.get("outputs") for c in nb.get("cells", [])):
                    problems.append(f"{where}: has outputs (a release must not)")
            except ValueError:
                problems.append(f"{where}: not valid JSON")
        for marker in MARKERS:
            if marker in text:
                problems.append(f"{where}: contains the marker {marker!r}")
        lines = {ln.strip() for ln in text.splitlines()}
        for secret in sorted(secrets_ & lines):
            problems.append(f"{where}: contains a line of a solution or hidden test: "
                            f"{secret[:60]!r}")
    return problems
