"""The clean re-check of an assignment, started before its answers exist.

    python -m autograder.recheck ASSIGNMENT [options of autograder.verify]

The re-check (``python -m autograder.verify``) of a submission costs seconds before it reads
a single answer (importing SymPy, torch, the library and the check module) and seconds
more for the checks that run real processes.  ``grade`` starts this process as soon as it
knows which assignments it grades, at the notebooks' priority, so that all of this happens
while the notebooks run:

1. it gets ready as the re-check would (memory limit first, then the imports, and the
   launcher's forkserver when the check module says ``STARTS_WORLDS = True``) and prints
   one line, the check module's ``GRADE_CELLS``,
   ``RELEASE_FILES`` and ``PROBES`` as JSON (``{"module": null}`` when it cannot load it),
   so that the grader itself need not import the check module;
2. it reads JSON lines on stdin: ``{"watch": [file, ...]}`` names answers files as the
   runs write them; it checks each answer as it appears, and keeps the verdict when it is
   a pass (a check is a function of the answer: the same answer passes again; a failure
   may come from the notebooks taking the CPU, so it is not kept);
3. ``{"verify": [file, ...]}``, once every run is done, ends the input: it calls
   :func:`autograder.verify.main` with the arguments it was started with plus those files,
   exactly as ``python -m autograder.verify`` would, except that a check of an answer that
   already passed, byte for byte the same, gives the verdict it kept.

Anything that goes wrong while getting ready is left for :func:`autograder.verify.main` to
report as it always does.  This process never runs anything of a submission: it reads
answers as data, with the codec, like the re-check.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
from typing import Any

POLL_S = 0.25


def _option(argv: list[str], name: str) -> list[str]:
    values = []
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            values.append(argv[i + 1])
        elif arg.startswith(name + "="):
            values.append(arg.split("=", 1)[1])
    return values


def prepare(argv: list[str]) -> Any:
    """What the re-check does before it reads answers, done now; the check module (None
    when it cannot be loaded here)."""
    from autograder import verify

    memory = _option(argv, "--memory-mb")
    limit = getattr(verify, "_limit_memory", None)
    if memory and limit is None:
        return None  # the limit could not be applied first: get nothing ready ahead of it
    if memory:  # first, as the re-check does: the processes its checks start inherit it
        limit(int(memory[-1]))
    import autograder.checks as checks
    for directory in _option(argv, "--checks-path"):
        checks.add_path(directory)
    try:
        module = verify.load_module(argv[0])
    except Exception:  # noqa: BLE001 - verify.main reports it
        return None
    if getattr(module, "STARTS_WORLDS", False):
        # its checks run worlds: the process they fork from imports torch now, while
        # the notebooks run, not when the first answer that needs a world is checked
        from paralab import launch
        launch.warm_up()
    return module


def describe(module: Any) -> dict | None:
    """What the grader needs of the check module, as data."""
    if module is None:
        return None
    probes = getattr(module, "PROBES", None) or {}
    return {"GRADE_CELLS": {k: list(v) for k, v in module.GRADE_CELLS.items()},
            "RELEASE_FILES": list(getattr(module, "RELEASE_FILES", []) or []),
            "PROBES": {k: {"cells": list(p.cells), "call": p.call,
                           "unavailable": list(p.unavailable)} for k, p in probes.items()}}


class _Timeout(Exception):
    pass


class Ahead:
    """Checks answers as the runs write them, and keeps the verdicts."""

    def __init__(self, module: Any):
        from autograder import checks, verify

        self.module = module
        self.run_check = checks.run_check
        self.timeout = getattr(verify, "CHECK_TIMEOUT_S", 20)
        self.symbols = tuple(getattr(module, "SYMBOLS", ()))
        self.functions = getattr(module, "FUNCTIONS", None)
        self.graded = {k for keys in module.GRADE_CELLS.values() for k in keys}
        self.probed = set(getattr(module, "PROBES", None) or {})
        self.verdicts: dict[tuple[str, str], Any] = {}
        self.files: dict[str, list] = {}  # path -> [offset, unfinished line]

    def watch(self, paths: list[str]) -> None:
        for path in paths:
            self.files.setdefault(path, [0, b""])

    def poll(self) -> None:
        """Check the answers written since the last look."""
        from autograder.checks import read_records

        for path, state in self.files.items():
            try:
                with open(path, "rb") as f:
                    f.seek(state[0])
                    data = f.read(4 * 2**20)
            except OSError:
                continue
            if not data:
                continue
            state[0] += len(data)
            text = state[1] + data
            complete, _, state[1] = text.rpartition(b"\n")
            if not complete:
                continue
            records, _ = read_records(complete.decode("utf-8", "replace").splitlines())
            probe = path.endswith(".probe.jsonl")
            for key, encoded in records.items():
                if key in self.graded and (key in self.probed) == probe:
                    self.check(key, encoded)

    def check(self, key: str, encoded: Any) -> None:
        same = _canonical(encoded)
        if (key, same) in self.verdicts:
            return
        old = signal.signal(signal.SIGALRM, _on_alarm)
        try:
            signal.alarm(self.timeout)
            verdict = self.run_check(self.module.CHECKS, key, encoded, self.symbols,
                                     self.functions)
        except _Timeout:
            return  # the re-check will take its own time over it, and say so
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
        # only a pass is kept: a check that runs processes can fail here for want of CPU
        # (the notebooks run at the same time), never pass for that reason; a failure is
        # checked again by the re-check proper
        if verdict.passed:
            self.verdicts[(key, same)] = verdict

    def install(self) -> None:
        """From now on, a check of an answer already checked gives its kept verdict."""
        import autograder.checks as checks

        original, kept, module = self.run_check, self.verdicts, self.module

        def run_check(table, key, encoded, symbols=(), functions=None):
            if table is module.CHECKS and tuple(symbols) == self.symbols and \
                    functions is self.functions:
                verdict = kept.get((key, _canonical(encoded)))
                if verdict is not None:
                    return verdict
            return original(table, key, encoded, symbols, functions)

        checks.run_check = run_check


def _on_alarm(signum, frame):
    raise _Timeout()


def _canonical(encoded: Any) -> str:
    return json.dumps(encoded, sort_keys=True, separators=(",", ":"))


def _commands(ahead: Ahead | None) -> list[str] | None:
    """Read stdin until the "verify" line; meanwhile check answers ahead."""
    buffer = b""
    fd = sys.stdin.fileno()
    while True:
        ready, _, _ = select.select([fd], [], [], POLL_S)
        if ready:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return None
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                try:
                    command = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(command, dict):
                    continue
                files = [f for f in command.get("watch", []) or [] if isinstance(f, str)]
                if ahead is not None and files:
                    ahead.watch(files)
                if "verify" in command:
                    files = command["verify"]
                    if isinstance(files, list) and all(isinstance(f, str) for f in files):
                        return files
                    return None
        elif ahead is not None:
            ahead.poll()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print("usage: python -m autograder.recheck ASSIGNMENT [verify options]",
              file=sys.stderr)
        return 2
    niceness = os.getpriority(os.PRIO_PROCESS, 0)
    try:  # work ahead at the priority of the notebooks it waits for...
        os.nice(10)
    except OSError:
        pass
    module = prepare(argv)
    print(json.dumps({"module": describe(module)}), flush=True)  # the grader waits for it
    ahead = Ahead(module) if module is not None else None
    files = _commands(ahead)
    if not files:
        print("no answers files given", file=sys.stderr)
        return 3
    if ahead is not None:
        ahead.install()
    try:  # ...and the re-check proper at the grader's (possible as root only)
        os.setpriority(os.PRIO_PROCESS, 0, niceness)
    except OSError:
        pass
    from autograder import verify
    return verify.main(argv + files)


if __name__ == "__main__":
    sys.exit(main())
