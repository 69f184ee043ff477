"""The event protocol between the runner in the sandbox and the grader outside it.

The runner (:mod:`autograder.execute`) reports what happens to a notebook as it happens, so
that the grader keeps every finished cell even when it has to kill the whole sandbox
halfway (wall clock, memory, processes).  The channel is a pipe (``--progress-fd``) that
only the runner holds: the kernel and everything the student's code starts never inherit
it.  Each event is one JSON object on one line (UTF-8, no newline inside); a line longer
than :data:`MAX_EVENT_BYTES` or that is not an object is dropped.

``{"type": "start", "index": i}``
    code cell ``i`` (its index in the notebook's cell list) is about to run.

``{"type": "cell", "index": i, "outputs": [...], "execution_count": n, "interrupted": b}``
    cell ``i`` finished; ``outputs`` are nbformat outputs as the runner kept them (already
    cut to the output limits; the grader still treats them as untrusted, see
    :mod:`autograder.outputs`); ``interrupted``: the cell ran past the cell time limit and
    the kernel was interrupted.

``{"type": "end", "status": s, "index": i, "reason": "..."}``
    the last event of a run.  ``status`` is one of

    * ``"completed"``: every code cell ran (``index`` is null);
    * ``"unresponsive"``: cell ``index`` ignored the interrupt at the cell time limit;
    * ``"kernel died"``: the kernel process ended while cell ``index`` ran (``reason``
      says how: an exit code, a signal, the CPU-time limit);
    * ``"work dir full"``: the files of the work directory reached their limit while cell
      ``index`` ran;
    * ``"error"``: the runner could not do its job (unreadable notebook, no kernel); the
      grader's fault, not the student's.

A run without an ``end`` event was stopped from outside (by the grader at a limit) or its
runner died; the grader tells which (see :class:`autograder.sandbox.Sandbox`).

This module is imported inside the sandbox: keep it to the standard library.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

MAX_EVENT_BYTES = 8 * 2**20
END_STATUSES = ("completed", "unresponsive", "kernel died", "work dir full", "error")


class Emitter:
    """The runner's end of the channel."""

    def __init__(self, fd: int | None):
        self.stream = os.fdopen(fd, "w", buffering=1, encoding="utf-8") if fd is not None \
            else None

    def _send(self, event: dict) -> None:
        if self.stream is None:
            return
        try:
            self.stream.write(json.dumps(event, separators=(",", ":")) + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def start(self, index: int) -> None:
        self._send({"type": "start", "index": index})

    def cell(self, index: int, outputs: list, execution_count: int | None,
             interrupted: bool) -> None:
        self._send({"type": "cell", "index": index, "outputs": outputs,
                    "execution_count": execution_count, "interrupted": interrupted})

    def end(self, status: str, index: int | None = None, reason: str = "") -> None:
        assert status in END_STATUSES, status
        self._send({"type": "end", "status": status, "index": index, "reason": reason})


@dataclass
class Progress:
    """What the grader learnt from the events of one run."""

    cells: dict[int, dict] = field(default_factory=dict)  # index -> {"outputs", ...}
    running: int | None = None     # the cell that started and has not finished
    interrupted: list[int] = field(default_factory=list)
    end: str | None = None         # the end status, None while (or if never) ended
    end_index: int | None = None
    reason: str = ""


class Reader:
    """The grader's end: feed it bytes as they come, it fills a :class:`Progress`."""

    def __init__(self) -> None:
        self.progress = Progress()
        self._buffer = b""

    def feed(self, chunk: bytes) -> None:
        self._buffer += chunk
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            self._line(line)
        if len(self._buffer) > MAX_EVENT_BYTES:
            self._buffer = b""  # an oversized event is dropped, not accumulated

    def _line(self, line: bytes) -> None:
        if len(line) > MAX_EVENT_BYTES:
            return
        try:
            event = json.loads(line)
        except ValueError:
            return
        if not isinstance(event, dict):
            return
        p = self.progress
        kind, index = event.get("type"), event.get("index")
        if isinstance(index, bool) or not isinstance(index, int):
            index = None
        if kind == "start" and index is not None:
            p.running = index
        elif kind == "cell" and index is not None:
            outputs = event.get("outputs")
            count = event.get("execution_count")
            p.cells[index] = {"outputs": outputs if isinstance(outputs, list) else [],
                              "execution_count": count if isinstance(count, int) else None}
            if event.get("interrupted"):
                p.interrupted.append(index)
            if p.running == index:
                p.running = None
        elif kind == "end" and p.end is None:
            status = event.get("status")
            p.end = status if status in END_STATUSES else "error"
            p.end_index = index
            p.reason = str(event.get("reason") or "")[:500]
            if index is not None:
                p.running = index
