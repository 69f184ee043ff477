"""nbgrader preprocessors of the course (registered in ``autograder/nbgrader_config.py``).

* :class:`SandboxedExecute` replaces nbgrader's ``Execute`` in ``Autograde``: the notebook
  runs in :mod:`autograder.sandbox` instead of a kernel of the grading process, through the
  execution plan of :mod:`autograder.plan` (collected, run on the grader's pool, replayed),
  and the answers it recorded are kept for the clean re-check.
* :class:`FeedbackCleanup` runs after ``ClearHiddenTests`` in ``GenerateFeedback``: test
  cells keep only their final error message (no traceback frames quoting test code), hidden
  test cells show only the clean verdict, and any line of hidden test source that still
  shows up in an output is removed.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from nbgrader.preprocessors import NbGraderPreprocessor
from nbgrader.preprocessors.execute import Execute
from traitlets import Dict, Integer, List, Unicode

from .limits import Limits
from .outputs import apply_results
from .plan import ExecutionPlan, PlannedRun, report_path, run_plan
from .processes import DEFAULT_SANDBOX_UID
from .sandbox import RunResult

HIDDEN_BEGIN, HIDDEN_END = "BEGIN HIDDEN TESTS", "END HIDDEN TESTS"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


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
