"""Run one notebook's code cells in a fresh kernel; the grader starts this inside the sandbox.

    python -m autograder.execute --cell-timeout 60 [--progress-fd 3] ... < notebook.ipynb

The notebook arrives on stdin, never as a file the student's code could read (its test
cells hold the hidden tests).  Progress goes to ``--progress-fd`` as JSON lines, one per
event, so that the grader keeps every finished cell even if it has to kill the whole
sandbox halfway (wall clock, memory, processes):

    {"type": "start", "index": i}
    {"type": "cell", "index": i, "outputs": [...], "execution_count": n, "interrupted": bool}
    {"type": "end", "status": "completed" | "unresponsive" | "kernel died" | "error",
     "index": i, "reason": "..."}

Before anything from the notebook runs, this process applies the resource limits it is
given, drops to an unprivileged uid when asked (the grader runs as root), and makes itself
non-dumpable so that the kernel (same uid) cannot read its memory through /proc.
A cell that runs past ``--cell-timeout`` is interrupted; a kernel that ignores the interrupt
for ``--interrupt-grace`` seconds ends the run ("unresponsive").
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import resource
import signal
import sys
import time
from typing import Any

MAX_NOTEBOOK = 64 * 2**20


def _set_limit(res: int, value: int) -> None:
    try:
        soft, hard = resource.getrlimit(res)
        new_hard = value if hard == resource.RLIM_INFINITY or hard > value else hard
        resource.setrlimit(res, (min(value, new_hard), new_hard))
    except (ValueError, OSError):
        pass


def apply_limits(args: argparse.Namespace) -> None:
    try:  # the grader's watchdog must keep getting the CPU when a notebook hogs it
        os.nice(10)
    except OSError:
        pass
    _set_limit(resource.RLIMIT_CORE, 0)
    if args.cpu_seconds > 0:  # SIGXCPU at the limit, SIGKILL 5 s later if it is ignored
        try:
            resource.setrlimit(resource.RLIMIT_CPU, (args.cpu_seconds, args.cpu_seconds + 5))
        except (ValueError, OSError):
            _set_limit(resource.RLIMIT_CPU, args.cpu_seconds)
    if args.memory_mb > 0:
        # RLIMIT_DATA, not RLIMIT_AS: torch reserves far more address space than it uses.
        _set_limit(resource.RLIMIT_DATA, args.memory_mb * 2**20)
    if args.file_size_mb > 0:
        _set_limit(resource.RLIMIT_FSIZE, args.file_size_mb * 2**20)
    if args.uid is not None:
        gid = args.gid if args.gid is not None else args.uid
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(args.uid, args.uid, args.uid)
    if args.max_procs > 0:
        _set_limit(resource.RLIMIT_NPROC, args.max_procs)
    if args.workdir:
        os.chdir(args.workdir)
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 0
    except (OSError, AttributeError):
        pass


class Progress:
    def __init__(self, fd: int | None):
        self.stream = os.fdopen(fd, "w", buffering=1, encoding="utf-8") if fd is not None \
            else None

    def send(self, **event: Any) -> None:
        if self.stream is None:
            return
        try:
            self.stream.write(json.dumps(event, separators=(",", ":")) + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass


class CellRun:
    """Collects the outputs of one cell, within a size budget."""

    def __init__(self, max_chars: int, budget: list):
        self.outputs: list[dict] = []
        self.max_chars = max_chars
        self.budget = budget  # characters left for the whole notebook, shared
        self.used = 0
        self.truncated = False
        self.clear_pending = False
        self.execution_count = None

    def _room(self, size: int) -> bool:
        if self.truncated:
            return False
        if self.used + size > self.max_chars or size > self.budget[0]:
            self.truncated = True
            self._append_stream("stdout", f"\n[... output truncated by the grader: more "
                                          f"than {self.max_chars} characters ...]\n")
            return False
        self.used += size
        self.budget[0] -= size
        return True

    def add(self, msg: dict) -> None:
        kind = msg["header"]["msg_type"]
        content = msg["content"]
        if kind == "clear_output":
            if content.get("wait"):
                self.clear_pending = True
            else:
                self._clear()
            return
        if kind not in ("stream", "display_data", "execute_result", "error",
                        "update_display_data"):
            return
        if self.clear_pending:
            self._clear()
        if kind == "update_display_data":
            return  # display updates by id are not kept in the graded notebook
        if kind == "stream":
            text = content.get("text", "")
            if not isinstance(text, str) or self.truncated:
                return
            room = min(self.max_chars - self.used, self.budget[0])
            if len(text) > room:  # keep what fits, then the truncation note
                head = text[:max(room, 0)]
                if head:
                    self._append_stream(content.get("name", "stdout"), head)
                    self.used += len(head)
                    self.budget[0] -= len(head)
                self._room(len(text))
                return
            self._room(len(text))
            self._append_stream(content.get("name", "stdout"), text)
            return
        if kind == "error":  # always kept (bounded): it decides whether the cell failed
            tb = [str(x)[:2000] for x in content.get("traceback", [])][-60:]
            self.outputs.append({"output_type": "error", "ename": str(content.get("ename"))[:200],
                                 "evalue": str(content.get("evalue"))[:5000], "traceback": tb})
            return
        if not self._room(len(json.dumps(content))):
            return
        if kind == "execute_result":
            self.outputs.append({"output_type": "execute_result",
                                 "data": content.get("data", {}),
                                 "metadata": content.get("metadata", {}),
                                 "execution_count": content.get("execution_count")})
        else:
            self.outputs.append({"output_type": "display_data", "data": content.get("data", {}),
                                 "metadata": content.get("metadata", {})})

    def _append_stream(self, name: str, text: str) -> None:
        name = name if name in ("stdout", "stderr") else "stdout"
        last = self.outputs[-1] if self.outputs else None
        if last and last["output_type"] == "stream" and last["name"] == name:
            last["text"] += text
        else:
            self.outputs.append({"output_type": "stream", "name": name, "text": text})

    def _clear(self) -> None:
        self.outputs = []
        self.clear_pending = False

    def note_error(self, ename: str, evalue: str) -> None:
        self.outputs.append({"output_type": "error", "ename": ename, "evalue": evalue,
                             "traceback": [f"{ename}: {evalue}"]})


def run(args: argparse.Namespace, nb: dict, progress: Progress) -> int:
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name="python3")
    devnull = open(os.devnull, "wb")
    try:
        km.start_kernel(cwd=os.getcwd(), stdout=devnull, stderr=devnull,
                        extra_arguments=["--HistoryManager.hist_file=:memory:"])
    except Exception as e:  # noqa: BLE001
        progress.send(type="end", status="error", index=None,
                      reason=f"the kernel could not start: {type(e).__name__}: {e}")
        return 1
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=args.startup_timeout)
    except RuntimeError as e:
        progress.send(type="end", status="error", index=None,
                      reason=f"the kernel did not start: {e}")
        _stop(km, kc)
        return 1
    budget = [args.max_total_output]
    count = 0
    status, reason, stop_index = "completed", "", None
    for index, cell in enumerate(nb.get("cells", [])):
        if cell.get("cell_type") != "code":
            continue
        source = cell.get("source", "")
        if isinstance(source, list):
            source = "".join(source)
        if not source.strip():
            continue
        progress.send(type="start", index=index)
        count += 1
        outcome, detail, cellrun, interrupted = _execute_cell(km, kc, source, args, budget)
        progress.send(type="cell", index=index, outputs=cellrun.outputs, execution_count=count,
                      interrupted=interrupted)
        if outcome != "ok":
            status, reason, stop_index = outcome, detail, index
            break
    progress.send(type="end", status=status, index=stop_index, reason=reason)
    _stop(km, kc)
    return 0


def _execute_cell(km, kc, source: str, args, budget):
    cellrun = CellRun(args.max_cell_output, budget)
    msg_id = kc.execute(source, store_history=True, allow_stdin=False, stop_on_error=False)
    deadline = time.monotonic() + args.cell_timeout
    interrupted = False
    idle = replied = False
    while not (idle and replied):
        now = time.monotonic()
        if now >= deadline:
            if interrupted:
                cellrun.note_error(
                    "CellTimeoutError",
                    f"the cell ran longer than {args.cell_timeout:g} s and did not stop when "
                    f"interrupted; the grader stopped the notebook here")
                return "unresponsive", f"ignored the interrupt at the {args.cell_timeout:g} s " \
                                       f"cell limit", cellrun, True
            km.interrupt_kernel()
            interrupted = True
            deadline = now + args.interrupt_grace
            continue
        try:
            msg = kc.get_iopub_msg(timeout=min(0.2, max(deadline - now, 0.01)))
        except queue.Empty:
            msg = None
        if msg is not None and msg.get("parent_header", {}).get("msg_id") == msg_id:
            if msg["header"]["msg_type"] == "status" and \
                    msg["content"].get("execution_state") == "idle":
                idle = True
            else:
                cellrun.add(msg)
        if not replied:
            try:
                reply = kc.get_shell_msg(timeout=0 if not idle else 0.05)
            except queue.Empty:
                reply = None
            if reply is not None and reply.get("parent_header", {}).get("msg_id") == msg_id:
                replied = True
        if msg is None and not km.is_alive():
            code = _exit_code(km)
            cellrun.note_error("DeadKernelError", _death_message(code, args))
            return "kernel died", _death_reason(code, args), cellrun, interrupted
    if interrupted:
        cellrun.note_error("CellTimeoutError",
                           f"the cell ran longer than {args.cell_timeout:g} s and was "
                           f"interrupted")
    return "ok", "", cellrun, interrupted


def _exit_code(km) -> int | None:
    proc = getattr(getattr(km, "provisioner", None), "process", None)
    if proc is None:
        return None
    try:
        return proc.poll()
    except Exception:  # noqa: BLE001
        return None


def _death_reason(code: int | None, args) -> str:
    if code is not None and code < 0 and -code == signal.SIGXCPU:
        return f"CPU time limit ({args.cpu_seconds} s)"
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}"
    return f"exit code {code}" if code is not None else "the kernel process is gone"


def _death_message(code: int | None, args) -> str:
    return f"the kernel died while running this cell ({_death_reason(code, args)}); " \
           f"the cells after it were not run"


def _stop(km, kc) -> None:
    try:
        kc.stop_channels()
    except Exception:  # noqa: BLE001
        pass
    try:
        km.shutdown_kernel(now=True)
    except Exception:  # noqa: BLE001
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m autograder.execute")
    parser.add_argument("--cell-timeout", type=float, default=120.0)
    parser.add_argument("--interrupt-grace", type=float, default=5.0)
    parser.add_argument("--startup-timeout", type=float, default=60.0)
    parser.add_argument("--max-cell-output", type=int, default=100_000)
    parser.add_argument("--max-total-output", type=int, default=2_000_000)
    parser.add_argument("--cpu-seconds", type=int, default=0)
    parser.add_argument("--memory-mb", type=int, default=0)
    parser.add_argument("--file-size-mb", type=int, default=0)
    parser.add_argument("--max-procs", type=int, default=0)
    parser.add_argument("--uid", type=int, default=None)
    parser.add_argument("--gid", type=int, default=None)
    parser.add_argument("--progress-fd", type=int, default=None)
    parser.add_argument("--workdir", default=None, help="directory the notebook runs in")
    args = parser.parse_args(argv)
    raw = sys.stdin.buffer.read(MAX_NOTEBOOK + 1)
    sys.stdin.close()
    progress = Progress(args.progress_fd)
    apply_limits(args)
    if len(raw) > MAX_NOTEBOOK:
        progress.send(type="end", status="error", index=None, reason="notebook too large")
        return 1
    try:
        nb = json.loads(raw)
    except ValueError as e:
        progress.send(type="end", status="error", index=None, reason=f"unreadable notebook: {e}")
        return 1
    del raw
    return run(args, nb, progress)


if __name__ == "__main__":
    sys.exit(main())
