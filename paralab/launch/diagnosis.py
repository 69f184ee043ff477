"""Why a world failed, told from the culprit's side.

When one rank raises, its peers fail too, with "Connection closed by peer": a victim's
message that hides the real error.  When one rank hangs, its peers time out inside a
collective, and the hung rank says nothing at all.  This module turns what the ranks left
in their files (see :mod:`paralab.launch.worker`) into one message that a student can act
on:

* the rank that failed *first on its own* is blamed, with its own traceback; ranks that
  only failed because a peer had gone are summarised in one line;
* hung ranks are asked for their Python stacks (faulthandler, on SIGUSR1) before they are
  killed, and the message names the line of the user's code where each one is stuck, and
  whether it waits inside torch.distributed for a peer that never came.
"""

from __future__ import annotations

import linecache
import os
import re
import signal
import sys
import sysconfig
import time

import torch

from .errors import WorkerError, WorkerTimeout
from .rendezvous import PHASE, JoinAborted

DUMP_WAIT_S = 1.0   # after SIGUSR1, how long a hung rank gets to write its stacks
OUTPUT_TAIL = 20    # lines of a rank's output quoted in an error message

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_TORCH_DIST_DIR = os.path.join(_TORCH_DIR, "distributed") + os.sep
_STDLIB_DIRS = tuple({os.path.abspath(sysconfig.get_paths()[k]) + os.sep
                      for k in ("stdlib", "platstdlib")})

_VICTIM_PATTERNS = re.compile(
    r"Connection closed by peer|Connection reset by peer|Broken pipe|Socket Timeout|"
    r"[Tt]imed out|[Tt]imeout|ECONNRESET|ECONNREFUSED|Connection refused|"
    r"NCCL communicator was aborted|has been aborted|the remote peer")
_VICTIM_TYPES = {"RuntimeError", "DistError", "DistBackendError", "DistNetworkError",
                 "DistStoreError", "OSError", "ConnectionError", "ConnectionResetError",
                 "BrokenPipeError", "TimeoutError"}


def read_text(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "backslashreplace")
    except OSError:
        return ""


def diagnose(procs, d: str, errors: dict, exit_seen: dict, elapsed: float, timeout: float,
             timed_out: bool, notes=()) -> WorkerError:
    """The exception to raise for a world that did not return a result from every rank.

    ``errors``: rank -> error record; ``exit_seen``: rank -> wall time at which it was seen
    exiting without a record; ``timed_out``: the world ran into its timeout (as opposed to
    being stopped after a failure); ``notes``: lines to add after the summary."""
    n = len(procs)
    path = lambda r, kind: os.path.join(d, f"rank{r}.{kind}")  # noqa: E731
    codes = [p.exitcode for p in procs]
    # Ranks neither finished nor failed: ask them where they are before they are killed.
    stuck = [r for r in range(n) if codes[r] is None and r not in errors
             and not os.path.exists(path(r, "result"))]
    stacks = dump_stacks(procs, stuck, d)
    outputs = {r: read_text(path(r, "log")) for r in range(n)}
    tracebacks = {r: e["traceback"] for r, e in errors.items()}
    culprits = [(_is_victim(e), e["time"], r, e) for r, e in errors.items()]
    for r, t in exit_seen.items():
        culprits.append((False, t, r, None))
    culprits.sort(key=lambda c: c[:3])
    if stuck and (not culprits or culprits[0][0]):
        # Nothing failed on its own: ranks are hung (and any failures only waited for them).
        return _timeout_error(stuck, stacks, elapsed, timeout, errors, tracebacks, outputs,
                              timed_out, notes)
    if not culprits:  # not reachable as far as we know; never hide a failure though
        return WorkerError("the world ended without results from every rank", 0, tracebacks,
                           outputs)
    _, _, rank, rec = culprits[0]
    if rec is None:
        return WorkerError(_exit_message(rank, codes[rank], d, outputs, errors, stuck, stacks,
                                         notes), rank, tracebacks, outputs)
    finished = [r for r in range(n) if os.path.exists(path(r, "result"))]
    return WorkerError(_error_message(rank, rec, errors, stuck, stacks, outputs, finished,
                                      notes), rank, tracebacks, outputs)


def _is_victim(rec: dict) -> bool:
    """Did this rank fail only because a peer vanished or never came (a consequence)?"""
    if rec["type"] == JoinAborted.__name__:
        return True
    if rec.get("phase") == PHASE:
        # its own join failed: that is what the others' JoinAborted follows, even when the
        # message reads like a vanished peer ("Connection reset by peer")
        return False
    return rec["type"] in _VICTIM_TYPES and bool(_VICTIM_PATTERNS.search(rec["message"]))


def _tail(text: str, lines: int = OUTPUT_TAIL) -> str:
    rows = text.rstrip("\n").splitlines()
    return "\n".join(rows[-lines:])


def _others_summary(culprit: int, errors: dict, stuck: list, stacks: dict) -> list[str]:
    out = []
    victims = sorted(r for r, e in errors.items() if r != culprit and _is_victim(e))
    own = sorted(r for r, e in errors.items() if r != culprit and not _is_victim(e))
    if victims:
        out.append(f"{ranks_text(victims)} then failed waiting for a peer that had gone "
                   f"(a consequence; their tracebacks are in .tracebacks).")
    for r in own:
        out.append(f"rank {r} also raised {errors[r]['type']}: "
                   f"{first_line(errors[r]['message'])}")
    for r in stuck:
        out.append(f"rank {r} was still running and was stopped at: {where(stacks.get(r, ''))}")
    return out


def first_line(text: str) -> str:
    text = text.strip()
    return text.splitlines()[0][:300] if text else ""


def ranks_text(rs) -> str:
    rs = sorted(rs)
    return f"rank {rs[0]}" if len(rs) == 1 else "ranks " + ", ".join(map(str, rs))


def _output_tail(rank: int, outputs: dict) -> list[str]:
    if not outputs.get(rank, "").strip():
        return []
    return [f"--- rank {rank} output (last {OUTPUT_TAIL} lines) ---\n{_tail(outputs[rank])}"]


def _error_message(rank, rec, errors, stuck, stacks, outputs, finished, notes) -> str:
    head = f"rank {rank} raised {rec['type']}: {first_line(rec['message'])}"
    if rec["phase"] != "running fn":
        head += f" (while {rec['phase']})"
    parts = [head]
    parts += _others_summary(rank, errors, stuck, stacks)
    if _is_victim(rec) and finished:
        parts.append(f"{ranks_text(finished)} returned from fn and exited while rank {rank} "
                     f"still waited for {'it' if len(finished) == 1 else 'them'}: the ranks "
                     f"did not run the same collectives (number, order or sizes). "
                     f"run(..., debug=True) makes PyTorch check every collective across ranks.")
    parts += list(notes)
    parts.append(f"\n--- rank {rank} traceback ---\n{rec['traceback'].rstrip()}")
    parts += _output_tail(rank, outputs)
    return "\n".join(parts)


def _exit_message(rank, code, d, outputs, errors, stuck, stacks, notes) -> str:
    if code is not None and code < 0:
        how = f"was killed by {_signal_name(code)}"
        if code == -signal.SIGKILL:
            how += " (out of memory?)"
    else:
        how = f"exited with code {code}"
    if not os.path.exists(os.path.join(d, f"rank{rank}.log")):
        head = (f"rank {rank} {how} before it could run fn: the worker process failed to "
                f"start (its error went to the parent's terminal). If you call run() from a "
                f"script, call it under `if __name__ == \"__main__\":` - the workers import "
                f"the main module, as with multiprocessing.")
    elif code is not None and code < 0:
        head = (f"rank {rank} {how} without raising a Python exception (a crash in native "
                f"code, or a signal from outside)")
    else:
        head = (f"rank {rank} {how} without raising a Python exception (os._exit() in fn, or "
                f"native code that exited)")
    parts = [head] + _others_summary(rank, errors, stuck, stacks) + list(notes)
    parts += _output_tail(rank, outputs)
    return "\n".join(parts)


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


# --------------------------------------------------------------------------------------
# Hangs: where is each rank stuck?

_FRAME = re.compile(r'^\s*File "(?P<file>.*)", line (?P<line>\d+) in (?P<func>.*?)\s*$')
_THREAD = re.compile(r"^(?:Current thread|Thread) (0x[0-9a-fA-F]+)")


def dump_stacks(procs, ranks: list[int], d: str) -> dict[int, str]:
    """SIGUSR1 makes faulthandler write every thread's Python stack (works even while the
    rank sits in C++ or ignores SIGINT); wait briefly for the dumps."""
    if not ranks:
        return {}
    paths = {r: os.path.join(d, f"rank{r}.stacks") for r in ranks}
    before = {r: len(read_text(p)) for r, p in paths.items()}
    for r in ranks:
        try:
            os.kill(procs[r].pid, signal.SIGUSR1)
        except ProcessLookupError:
            pass
    t0 = time.monotonic()
    waiting = set(ranks)
    last = {}
    while waiting and time.monotonic() - t0 < DUMP_WAIT_S:
        time.sleep(0.02)
        for r in list(waiting):
            size = len(read_text(paths[r]))
            if size > before[r] and last.get(r) == size:  # grew, then stopped growing
                waiting.discard(r)
            last[r] = size
            if procs[r].exitcode is not None:
                waiting.discard(r)
    return {r: read_text(paths[r]) for r in ranks}


def _main_frames(text: str) -> list[tuple[str, int, str]]:
    """Frames (innermost first) of the main thread in a faulthandler dump."""
    lines = text.splitlines()
    if not lines or not lines[0].startswith("main thread "):
        return []
    main = int(lines[0].split()[-1], 16)
    frames, current, found = [], None, []
    for line in lines[1:]:
        m = _THREAD.match(line)
        if m:
            current = int(m.group(1), 16)
            frames = []
            if current == main:
                found = frames
            continue
        m = _FRAME.match(line)
        if m and current is not None:
            frames.append((m.group("file"), int(m.group("line")), m.group("func")))
    return found


def _is_library(path: str) -> bool:
    if path == "<string>" or path.startswith("<frozen"):
        return True  # the forkserver's entry point, importlib
    p = os.path.abspath(path)
    return p.startswith(_PACKAGE_DIR) or p.startswith(_TORCH_DIR) or p.startswith(_STDLIB_DIRS)


def _short(path: str) -> str:
    p = os.path.abspath(path)
    if p.startswith(_TORCH_DIR):
        return "torch/" + p[len(_TORCH_DIR):]
    return path


def _in_distributed(stack_text: str) -> bool:
    frames = _main_frames(stack_text)
    return bool(frames) and os.path.abspath(frames[0][0]).startswith(_TORCH_DIST_DIR)


def where(stack_text: str, callers: int = 0) -> str:
    """'File "x.py", line 12 in work -> recv (torch/distributed/distributed_c10d.py)'."""
    frames = _main_frames(stack_text)
    if not frames:
        return "(no stack: the rank had not started running Python code of its own)"
    user = [f for f in frames if not _is_library(f[0])]
    inner = frames[0]
    if not user:
        return f'File "{_short(inner[0])}", line {inner[1]} in {inner[2]} (before fn started)'
    f = user[0]
    text = f'File "{f[0]}", line {f[1]} in {f[2]}'
    if inner is not f:
        text += f" -> {inner[2]} ({_short(inner[0])})"
    src = linecache.getline(f[0], f[1]).strip()
    if callers:
        if src:
            text += f"\n        {src}"
        for c in user[1:1 + callers]:
            text += f'\n      called from File "{c[0]}", line {c[1]} in {c[2]}'
    return text


def _timeout_error(stuck, stacks, elapsed, timeout, errors, tracebacks, outputs, timed_out,
                   notes):
    in_dist = [r for r in stuck if _in_distributed(stacks.get(r, ""))]
    elsewhere = [r for r in stuck if r not in in_dist]
    culprit = elsewhere[0] if elsewhere else stuck[0]
    if timed_out:
        head = (f"rank {culprit} still running after {elapsed:.1f} s (timeout={timeout:g} s); "
                f"{'ranks' if len(stuck) > 1 else 'rank'} still running: "
                f"{', '.join(map(str, stuck))}")
    else:
        waited = sorted(errors)
        head = (f"rank {culprit} still running after {elapsed:.1f} s, while "
                f"{ranks_text(waited)} gave up waiting for a peer (see .tracebacks)")
    parts = [head, "where each rank is stuck:"]
    for r in stuck:
        parts.append(f"  rank {r} stuck at: {where(stacks.get(r, ''), callers=2)}")
    if in_dist and elsewhere:
        parts.append(f"{ranks_text(in_dist)} {'is' if len(in_dist) == 1 else 'are'} waiting "
                     f"inside torch.distributed for {ranks_text(elsewhere)}, which never "
                     f"joined: every rank must call the same collectives in the same order, "
                     f"and every send needs a matching recv.")
    elif in_dist:
        parts.append("every running rank is waiting inside torch.distributed: a collective "
                     "that not all ranks reached, collectives called in different orders, or "
                     "send/recv pairs waiting on each other (e.g. both ranks recv first).")
    parts += list(notes)
    for r in stuck:
        parts += _output_tail(r, outputs)
    return WorkerTimeout("\n".join(parts), culprit, list(stuck), stacks, tracebacks, outputs)


def report_interrupt(procs, d: str) -> None:
    """The caller pressed stop: say where the ranks were, then let run() kill them."""
    try:
        alive = [r for r, p in enumerate(procs) if p.exitcode is None]
        stacks = dump_stacks(procs, alive, d)
        if alive:
            lines = [f"paralab.launch: interrupted; stopping {ranks_text(alive)}. They were at:"]
            lines += [f"  rank {r}: {where(stacks.get(r, ''), callers=1)}" for r in alive]
            print("\n".join(lines), file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        pass
