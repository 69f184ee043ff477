"""The execution plan: the notebooks of a grading run, handed between nbgrader and the pool.

nbgrader autogrades one notebook after the other, in the grading process; the grader runs
notebooks on a pool of sandboxed runs.  :class:`ExecutionPlan` is how the two meet, through a
folder named in the nbgrader config (``SandboxedExecute.plan``), never through state shared
in memory.  Kept free of nbgrader imports, so that the grader can start work before it loads
nbgrader.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

from .sandbox import RunResult

REPORT_DIR = "grader"  # under the course directory: runs/, answers/, verdicts/


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

    def load(self, key: tuple, kind: str = "notebook") -> PlannedRun | None:
        """The collected run of ``key``, if any."""
        try:
            with open(self._path("jobs", key, kind)) as f:
                data = json.load(f)
            return PlannedRun(tuple(data["key"]), data["notebook"], data["answers"],
                              data["kind"], data["code"], data["digest"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

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


def execute(plan: ExecutionPlan, sandbox: Any, run: PlannedRun,
            codes: dict[str, Any] | None = None) -> RunResult:
    """Run one planned notebook in ``sandbox`` and store its result in ``plan``: what each
    worker of the pool does.  ``codes``: copies of the course code by name (default: the
    sandbox's own).  Never raises: a failure is the run's result."""
    try:
        result = sandbox.run(run.notebook, answers_dest=run.answers,
                             code=(codes or {}).get(run.code))
    except Exception as e:  # noqa: BLE001 - Sandbox.run does not raise; belt and braces
        result = RunResult(status="error", reason=f"{type(e).__name__}: {e}")
    plan.store(run, result)
    return result


def run_plan(plan: ExecutionPlan, sandbox: Any, jobs: int,
             codes: dict[str, Any] | None = None) -> None:
    """Run every pending notebook of ``plan`` on a pool of ``jobs`` threads (each run is a
    process tree of its own)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for run in plan.pending():
            pool.submit(execute, plan, sandbox, run, codes)
