"""nbgrader preprocessors of the course (registered in ``autograder/nbgrader_config.py``).

* :class:`SandboxedExecute` replaces nbgrader's ``Execute`` in ``Autograde``: the notebook
  runs in :mod:`autograder.sandbox` instead of a kernel of the grading process, and the
  answers it recorded are kept for the clean re-check.
* :class:`FeedbackCleanup` runs after ``ClearHiddenTests`` in ``GenerateFeedback``: test
  cells keep only their final error message (no traceback frames quoting test code), hidden
  test cells show only the clean verdict, and any line of hidden test source that still
  shows up in an output is removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import Any

from nbgrader.preprocessors import NbGraderPreprocessor
from nbgrader.preprocessors.execute import Execute
from traitlets import Dict, Integer, List, Unicode

from .limits import Limits
from .outputs import apply_results
from .processes import DEFAULT_SANDBOX_UID
from .sandbox import RunResult

REPORT_DIR = "grader"  # under the course directory: runs/, answers/, verdicts/
HIDDEN_BEGIN, HIDDEN_END = "BEGIN HIDDEN TESTS", "END HIDDEN TESTS"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def report_path(root: str, kind: str, student: str, assignment: str, notebook: str,
                ext: str) -> str:
    return os.path.join(root, REPORT_DIR, kind, student, assignment, notebook + ext)


def notebook_digest(nb: dict) -> str:
    return hashlib.sha256(json.dumps(nb, sort_keys=True).encode()).hexdigest()


@dataclass
class PlannedRun:
    """One notebook to run: what nbgrader would execute, and where its answers go."""

    key: tuple[str, str, str]       # (student, assignment, notebook)
    notebook: dict
    answers: str                    # answers file (JSON lines)
    kind: str = "notebook"          # notebook | probe
    code: str = "main"              # which copy of the course code it imports
    digest: str = ""

    def __post_init__(self) -> None:
        self.digest = self.digest or notebook_digest(self.notebook)

    @property
    def name(self) -> str:
        return "/".join(self.key) + ("" if self.kind == "notebook" else f" ({self.kind})")


class ExecutionPlan:
    """The notebooks of a grading run, handed between nbgrader and the grader's pool
    through a folder (named in the config as ``SandboxedExecute.plan``).

    nbgrader autogrades one notebook after the other, in this process; the grader runs
    them on a pool.  So ``grade`` lets nbgrader run twice.  In the first pass
    :class:`SandboxedExecute` finds no result for a notebook: it writes the notebook,
    exactly as nbgrader would execute it, to ``jobs/`` (and leaves it failing, so that the
    gradebook never holds scores of an unexecuted notebook).  The grader runs every job
    (:meth:`pending`) and stores each result in ``results/``.  In the second pass each
    notebook finds its result (same content) and gets its outputs.  A notebook without a
    result stays failing, with status "error", and so is never graded on stale outputs."""

    def __init__(self, folder: str):
        self.folder = folder

    def _path(self, kind: str, key: tuple, suffix: str = "") -> str:
        name = hashlib.sha256(json.dumps(list(key) + [suffix]).encode()).hexdigest()[:32]
        return os.path.join(self.folder, kind, name + ".json")

    def collect(self, run: PlannedRun) -> None:
        path = self._path("jobs", run.key, run.kind)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        _write_json(path, {"key": list(run.key), "notebook": run.notebook,
                           "answers": run.answers, "kind": run.kind, "code": run.code,
                           "digest": run.digest})

    def pending(self) -> list[PlannedRun]:
        """Collected runs without a result, in a stable order."""
        folder = os.path.join(self.folder, "jobs")
        out = []
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            try:
                with open(os.path.join(folder, name)) as f:
                    data = json.load(f)
                run = PlannedRun(tuple(data["key"]), data["notebook"], data["answers"],
                                 data["kind"], data["code"], data["digest"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if not os.path.exists(self._path("results", run.key, run.kind)):
                out.append(run)
        return sorted(out, key=lambda r: (r.kind != "notebook", r.key))

    def store(self, run: PlannedRun, result: RunResult) -> None:
        path = self._path("results", run.key, run.kind)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        _write_json(path, {"digest": run.digest, "result": result.to_dict()})

    def result(self, key: tuple, notebook: dict, kind: str = "notebook") -> RunResult | None:
        """The result of running exactly ``notebook``, if there is one."""
        try:
            with open(self._path("results", key, kind)) as f:
                data = json.load(f)
            if data.get("digest") != notebook_digest(notebook):
                return None
            return RunResult.from_dict(data["result"])
        except (OSError, ValueError, KeyError, TypeError):
            return None


def _write_json(path: str, data: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def run_plan(plan: ExecutionPlan, sandbox: Any, jobs: int, codes: dict[str, Any] | None = None,
             done: Any = None) -> None:
    """Run every pending notebook of ``plan`` on a pool of ``jobs`` threads (each run is a
    process tree of its own), storing each result as soon as it is known.  ``codes``:
    the copies of the course code by name (default: the sandbox's own); ``done(run,
    result)`` is called after each run.  One run's failure never stops the others."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    runs = plan.pending()
    codes = codes or {}

    def one(run: PlannedRun) -> tuple[PlannedRun, RunResult]:
        try:
            result = sandbox.run(run.notebook, answers_dest=run.answers,
                                 code=codes.get(run.code))
        except Exception as e:  # noqa: BLE001 - Sandbox.run does not raise; belt and braces
            result = RunResult(status="error", reason=f"{type(e).__name__}: {e}")
        plan.store(run, result)
        return run, result

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = [pool.submit(one, run) for run in runs]
        for future in as_completed(futures):
            run, result = future.result()
            if done is not None:
                done(run, result)


class SandboxedExecute(Execute):
    """Execute the notebook in the sandbox (bubblewrap when available) with limits.

    With ``plan`` set (``python -m autograder grade`` sets it), notebooks are collected
    into that execution plan and given the results the grader stored there (see
    :class:`ExecutionPlan`).  Without it (a plain ``nbgrader autograde``), each notebook
    goes through the same plan, in a temporary folder, on a pool of one."""

    plan = Unicode("", help="folder of the execution plan of the grading run (empty: run "
                            "each notebook when nbgrader asks)").tag(config=True)
    sandbox = Unicode("auto", help="auto (bubblewrap if it works, else none with a "
                                   "warning), bwrap, or none").tag(config=True)
    limits = Dict(help="resource limits by name (autograder/limits.py: cell_timeout, "
                       "notebook_timeout, memory_mb, ...); the default for each one not "
                       "given").tag(config=True)
    sandbox_uid = Integer(DEFAULT_SANDBOX_UID, help="unused uid the notebooks run as when "
                                                   "grading as root").tag(config=True)
    checks_path = List(Unicode(), help="extra directories with assignment check modules"
                       ).tag(config=True)

    def preprocess(self, nb: Any, resources: dict) -> tuple[Any, dict]:
        info = resources["nbgrader"]
        student, assignment, notebook = info["student"], info["assignment"], info["notebook"]
        root = os.getcwd()  # nbgrader's converters run from the course directory
        key = (student, assignment, notebook)
        data = json.loads(json.dumps(nb))
        answers = report_path(root, "answers", student, assignment, notebook, ".jsonl")
        run = PlannedRun(key, data, answers)
        if self.plan:
            plan = ExecutionPlan(self.plan)
            result = plan.result(key, data)
            if result is None:  # the first pass: set it aside for the grader's pool
                plan.collect(run)
                apply_results(nb, RunResult(status="error", reason="not run yet"))
                return nb, resources
        else:
            result = self._run_here(run)
        apply_results(nb, result)
        report = {
            "status": result.status, "reason": result.reason,
            "running": result.running, "interrupted": result.interrupted,
            "elapsed": round(result.elapsed, 2), "peak_memory_mb": round(result.peak_memory_mb),
            "peak_tasks": result.peak_tasks, "survivors": result.survivors,
            "sandbox": result.mode, "answers": answers, "marker": result.marker,
            "uid": result.uid, "leftovers": result.leftovers[:20],
            "answers_truncated": result.answers_truncated,
            "cells": [{"index": i, "grade_id": c.metadata.get("nbgrader", {}).get("grade_id")}
                      for i, c in enumerate(nb.cells)],
            "log": result.log[-2000:],
        }
        path = report_path(root, "runs", student, assignment, notebook, ".json")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
        if result.survivors:
            self.log.error("%d process(es) of %s/%s survived the sandbox", result.survivors,
                           student, assignment)
        return nb, resources

    def _run_here(self, run: PlannedRun) -> RunResult:
        """A plain nbgrader command: the same plan, run at once on a pool of one."""
        import tempfile

        from .coursecode import CourseCode
        from .sandbox import Sandbox

        with tempfile.TemporaryDirectory(prefix="paralab-plan-") as folder:
            plan = ExecutionPlan(folder)
            plan.collect(run)
            code = CourseCode.build(os.path.join(folder, "course"), self.checks_path)
            box = Sandbox.create(self.sandbox, Limits.from_dict(dict(self.limits)), code,
                                 self.sandbox_uid, warn=self.log.warning)
            run_plan(plan, box, 1)
            return plan.result(run.key, run.notebook) or \
                RunResult(status="error", reason="the notebook did not run")


class ShieldMarkers(NbGraderPreprocessor):
    """Runs before ``ClearHiddenTests`` in ``GenerateFeedback``: the text
    ``BEGIN HIDDEN TESTS`` in a student's own cell (a comment, a string) must not make
    nbgrader cut that cell or fail on it ("No end hidden tests statement found")."""

    def preprocess_cell(self, cell: Any, resources: dict, index: int) -> tuple[Any, dict]:
        meta = cell.metadata.get("nbgrader", {})
        is_test = bool(meta.get("grade")) and not meta.get("solution")
        if not is_test and (HIDDEN_BEGIN in cell.source or HIDDEN_END in cell.source):
            cell.source = cell.source.replace(HIDDEN_BEGIN, "BEGIN-HIDDEN-TESTS").replace(
                HIDDEN_END, "END-HIDDEN-TESTS")
        return cell, resources


class FeedbackCleanup(NbGraderPreprocessor):
    """Reduce test cells of the feedback to what a student should see."""

    def preprocess(self, nb: Any, resources: dict) -> tuple[Any, dict]:
        from nbgrader.api import Gradebook

        info = resources["nbgrader"]
        self.hidden_ids: set[str] = set()
        self.hidden_lines: set[str] = set()
        with Gradebook(info["db_url"]) as gb:
            notebook = gb.find_notebook(info["notebook"], info["assignment"])
            for cell in notebook.source_cells:
                if HIDDEN_BEGIN in (cell.source or ""):
                    self.hidden_ids.add(cell.name)
                    self.hidden_lines |= _hidden_lines(cell.source)
        root = os.getcwd()
        path = report_path(root, "verdicts", info["student"], info["assignment"],
                           info["notebook"], ".json")
        try:
            with open(path) as f:
                self.verdicts = json.load(f)
        except (OSError, ValueError):
            self.verdicts = {}
        return super().preprocess(nb, resources)

    def preprocess_cell(self, cell: Any, resources: dict, index: int) -> tuple[Any, dict]:
        if cell.cell_type != "code":
            return cell, resources
        meta = cell.metadata.get("nbgrader", {})
        grade_id = meta.get("grade_id")
        is_test = bool(meta.get("grade")) and not meta.get("solution")
        verdict = self.verdicts.get(grade_id) if grade_id else None
        if is_test and grade_id in self.hidden_ids:
            # the hidden tests' own output could quote them: show the clean verdict only
            if verdict is not None:
                cell.outputs = _check_lines(verdict.get("checks", []))
            else:
                errors = [o for o in cell.outputs if o.output_type == "error"]
                cell.outputs = [_error(errors[-1].ename, "a hidden test failed")] if errors \
                    else []
        elif is_test:
            kept = [_error(o.ename, o.evalue) if o.output_type == "error" else o
                    for o in cell.outputs]
            if verdict is not None:
                # every check gets its line: the ones the kernel did not report (the cell
                # stopped early) and the ones the clean re-check decided otherwise
                said = verdict.get("kernel", {})
                missing = [c for c in verdict.get("checks", []) if c["key"] not in said]
                overturned = [c for c in verdict.get("checks", [])
                              if c["key"] in verdict.get("overturned", [])]
                if missing:
                    kept += _check_lines(missing)
                if overturned:
                    kept += _check_lines(overturned, "re-checked outside the notebook: ")
            cell.outputs = kept
        if self.hidden_lines:
            for output in cell.outputs:
                _redact(output, self.hidden_lines)
        return cell, resources


def _check_lines(checks: list[dict], prefix: str = "") -> list[Any]:
    """One output line per check, as the test cell prints them: passes on stdout,
    failures on stderr."""
    from nbformat.v4 import new_output

    from .checks import FAIL, PASS

    out = []
    for c in checks:
        ok = bool(c.get("passed"))
        out.append(new_output("stream", name="stdout" if ok else "stderr",
                              text=f"{prefix}{PASS if ok else FAIL} {c.get('key')}: "
                                   f"{c.get('message', '')}\n"))
    return out


def _hidden_lines(source: str, min_chars: int = 8) -> set[str]:
    lines, inside = set(), False
    for raw in source.splitlines():
        line = raw.strip()
        if HIDDEN_BEGIN in line:
            inside = True
        elif HIDDEN_END in line:
            inside = False
        elif inside and len(line.replace(" ", "")) >= min_chars:
            lines.add(line)
    return lines


def _error(ename: str, evalue: str) -> Any:
    from nbformat.v4 import new_output
    evalue = _ANSI.sub("", str(evalue))
    return new_output("error", ename=str(ename), evalue=evalue,
                      traceback=[f"{ename}: {evalue}"])


def _redact_text(text: str, secrets: set[str]) -> str:
    if not any(s in text for s in secrets):
        return text
    return "\n".join("[hidden test text removed]" if any(s in line for s in secrets) else line
                     for line in text.split("\n"))


def _redact(output: Any, secrets: set[str]) -> None:
    if output.get("output_type") == "stream":
        output["text"] = _redact_text(output.get("text", ""), secrets)
    elif output.get("output_type") == "error":
        output["evalue"] = _redact_text(str(output.get("evalue", "")), secrets)
        output["traceback"] = [_redact_text(str(t), secrets) for t in output.get("traceback", [])]
    else:
        data = output.get("data", {})
        for mime, value in list(data.items()):
            if isinstance(value, str):
                data[mime] = _redact_text(value, secrets)
            elif isinstance(value, list):
                data[mime] = _redact_text("".join(map(str, value)), secrets)
