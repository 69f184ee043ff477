"""The runner: run one notebook's code cells in a fresh kernel, inside the sandbox.

    python -m autograder.execute --progress-fd N  < job.json

The grader (:class:`autograder.sandbox.Sandbox`) starts this and writes its job on stdin,
one JSON object: ``notebook`` (the notebook, which holds the hidden tests: it never exists as
a file the student's code could read), ``limits`` (:class:`autograder.limits.Limits`, as
given, fractions of a second included), ``workdir``, ``uid`` (the uid to run as, when the
grader is root), ``nproc`` (the ``RLIMIT_NPROC`` to set) and ``answers_fd`` (the pipe the
kernel records answers to, which it inherits).  What happens goes back as events on
``--progress-fd`` (:mod:`autograder.events`, where the protocol is written down).

Before anything from the notebook runs, this process applies the limits to itself (its
kernel inherits them), drops to the unprivileged uid when asked, makes itself non-dumpable
(so that the kernel cannot read its memory through /proc) and handles the signals a kernel
could send it.  In bubblewrap it is pid 1 of the sandbox's pid namespace, which the kernel
cannot kill at all, and it reaps the orphans that become its children.  A cell that runs
past the cell timeout is interrupted; a kernel that ignores the interrupt for the grace
period ends the run ("unresponsive"); a work directory that outgrows its limit ends it too.
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

from .events import Emitter
from .limits import LIMITS_ENV, Limits, mb_text
from .trees import tree_size

MAX_JOB = 80 * 2**20
WORK_POLL_S = 0.2       # how often the work directory's size is looked at (tmpfs)
WORK_WALK_S = 1.0       # ... when it has to be walked (no bubblewrap)
WORK_WALK_ENTRIES = 200_000


class Job:
    """The job the grader sent, checked."""

    def __init__(self, data: Any):
        if not isinstance(data, dict) or not isinstance(data.get("notebook"), dict):
            raise ValueError("the job has no notebook")
        self.notebook: dict = data["notebook"]
        self.limits = Limits.from_dict(data.get("limits", {}))
        self.limits_json = self.limits.to_json()
        self.workdir = str(data.get("workdir") or os.getcwd())
        self.uid = _int_or_none(data.get("uid"))
        self.nproc = int(data.get("nproc") or 0)
        self.answers_fd = _int_or_none(data.get("answers_fd"))
        self.startup_timeout = float(data.get("startup_timeout") or 60.0)


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _set_limit(res: int, value: int) -> None:
    try:
        soft, hard = resource.getrlimit(res)
        new_hard = value if hard == resource.RLIM_INFINITY or hard > value else hard
        resource.setrlimit(res, (min(value, new_hard), new_hard))
    except (ValueError, OSError):
        pass


def apply_limits(job: Job) -> None:
    limits = job.limits
    try:  # the grader's watchdog must keep getting the CPU when a notebook hogs it
        os.nice(10)
    except OSError:
        pass
    _set_limit(resource.RLIMIT_CORE, 0)
    cpu = limits.effective_cpu_seconds()
    if cpu > 0:  # SIGXCPU at the limit, SIGKILL 5 s later if it is ignored
        try:
            resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 5))
        except (ValueError, OSError):
            _set_limit(resource.RLIMIT_CPU, cpu)
    memory = limits.effective_process_memory_mb()
    if memory > 0:
        # RLIMIT_DATA, not RLIMIT_AS: torch reserves far more address space than it uses.
        _set_limit(resource.RLIMIT_DATA, memory * 2**20)
    if limits.file_size_mb > 0:
        _set_limit(resource.RLIMIT_FSIZE, limits.file_size_mb * 2**20)
    if job.uid is not None:
        os.setgroups([])
        os.setresgid(job.uid, job.uid, job.uid)
        os.setresuid(job.uid, job.uid, job.uid)
    if job.nproc > 0:
        _set_limit(resource.RLIMIT_NPROC, job.nproc)
    os.chdir(job.workdir)
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 0
    except (OSError, AttributeError):
        pass


def _ignore(signum, frame) -> None:
    pass


def protect_runner() -> None:
    """Signals the kernel may send its runner do nothing.  (As pid 1 of a pid namespace a
    signal without a handler is not even delivered, and SIGKILL and SIGSTOP from inside
    the namespace never are; Python's own SIGINT handler would raise.)  A handler, not
    SIG_IGN: exec resets caught signals, so the kernel starts with the default ones."""
    for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM",
                 "SIGTSTP", "SIGTTIN", "SIGTTOU"):
        sig = getattr(signal, name, None)
        if sig is not None:
            try:
                signal.signal(sig, _ignore)
            except (OSError, ValueError):
                pass


class WorkDir:
    """The size of the work directory, against its limit: ``statvfs`` when it is a file
    system of its own (the sandbox's tmpfs), a walk otherwise (no bubblewrap)."""

    def __init__(self, path: str, limit_mb: int):
        self.path = path
        self.limit = limit_mb * 2**20
        self.mounted = os.path.ismount(path)
        self.next = 0.0

    def full(self, now: bool = False) -> bool:
        """Whether the files reached the limit (looked at every so often, or ``now``)."""
        if not self.limit:
            return False
        if not now and time.monotonic() < self.next:
            return False
        now = time.monotonic()
        self.next = now + (WORK_POLL_S if self.mounted else WORK_WALK_S)
        try:
            if self.mounted:
                st = os.statvfs(self.path)
                used = (st.f_blocks - st.f_bfree) * st.f_frsize
            else:
                used = tree_size(self.path, WORK_WALK_ENTRIES)
        except OSError:
            return False
        return used >= self.limit


def reap_orphans(keep: int | None) -> None:
    """As pid 1, orphans of the notebook's processes become this process's children:
    reap the dead ones (but not the kernel, whose exit status its manager reads)."""
    if os.getpid() != 1:
        return
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == keep:
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read().decode("ascii", "replace")
        except OSError:
            continue
        rest = stat[stat.rfind(")") + 2:].split()
        if len(rest) > 1 and rest[0] == "Z" and rest[1] == "1":
            try:
                os.waitpid(int(name), os.WNOHANG)
            except OSError:
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


def run(job: Job, emit: Emitter) -> int:
    from jupyter_client.manager import KernelManager

    os.environ[LIMITS_ENV] = job.limits_json  # what applies, for the notebook to see
    km = KernelManager(kernel_name="python3")
    devnull = open(os.devnull, "wb")
    try:
        km.start_kernel(cwd=os.getcwd(), stdout=devnull, stderr=devnull,
                        extra_arguments=["--HistoryManager.hist_file=:memory:"],
                        pass_fds=(job.answers_fd,) if job.answers_fd is not None else ())
    except Exception as e:  # noqa: BLE001
        emit.end("error", None, f"the kernel could not start: {type(e).__name__}: {e}")
        return 1
    finally:
        if job.answers_fd is not None:  # the kernel holds it now, and only the kernel
            try:
                os.close(job.answers_fd)
            except OSError:
                pass
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=job.startup_timeout)
    except RuntimeError as e:
        emit.end("error", None, f"the kernel did not start: {e}")
        _stop(km, kc)
        return 1
    limits = job.limits
    budget = [limits.max_total_output]
    work = WorkDir(os.getcwd(), limits.work_size_mb)
    count = 0
    status, reason, stop_index = "completed", "", None
    for index, cell in enumerate(job.notebook.get("cells", [])):
        if not isinstance(cell, dict) or cell.get("cell_type") != "code":
            continue
        source = cell.get("source", "")
        if isinstance(source, list):
            source = "".join(s for s in source if isinstance(s, str))
        if not isinstance(source, str) or not source.strip():
            continue
        emit.start(index)
        count += 1
        outcome, detail, cellrun, interrupted = _execute_cell(km, kc, source, limits, budget,
                                                              work)
        emit.cell(index, cellrun.outputs, count, interrupted)
        if outcome != "ok":
            status, reason, stop_index = outcome, detail, index
            break
    emit.end(status, stop_index, reason)
    _stop(km, kc)
    return 0


def _execute_cell(km, kc, source: str, limits: Limits, budget: list, work: WorkDir):
    cellrun = CellRun(limits.max_cell_output, budget)
    msg_id = kc.execute(source, store_history=True, allow_stdin=False, stop_on_error=False)
    timeout = limits.cell_timeout or float("inf")
    deadline = time.monotonic() + timeout
    interrupted = False
    idle = replied = False
    kernel_pid = getattr(getattr(km, "provisioner", None), "process", None)
    kernel_pid = getattr(kernel_pid, "pid", None)
    while not (idle and replied):
        now = time.monotonic()
        if now >= deadline:
            if interrupted:
                cellrun.note_error(
                    "CellTimeoutError",
                    f"the cell ran longer than {limits.cell_timeout:g} s and did not stop when "
                    f"interrupted; the grader stopped the notebook here")
                return "unresponsive", f"ignored the interrupt at the " \
                                       f"{limits.cell_timeout:g} s cell limit", cellrun, True
            km.interrupt_kernel()
            interrupted = True
            deadline = now + limits.interrupt_grace
            continue
        if work.full():
            return _work_full(cellrun, limits) + (interrupted,)
        reap_orphans(kernel_pid)
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
            cellrun.note_error("DeadKernelError", _death_message(code, limits))
            return "kernel died", _death_reason(code, limits), cellrun, interrupted
    if interrupted:
        cellrun.note_error("CellTimeoutError",
                           f"the cell ran longer than {limits.cell_timeout:g} s and was "
                           f"interrupted")
    if work.full(now=True):  # a cell that failed at the limit stops the notebook too
        return _work_full(cellrun, limits) + (interrupted,)
    return "ok", "", cellrun, interrupted


def _work_full(cellrun: CellRun, limits: Limits) -> tuple[str, str, CellRun]:
    limit = mb_text(limits.work_size_mb)
    cellrun.note_error("WorkDirectoryFull",
                       f"the files in the work directory reached {limit}, their limit; the "
                       f"grader stopped the notebook here")
    return "work dir full", f"work directory limit ({limit})", cellrun


def _exit_code(km) -> int | None:
    proc = getattr(getattr(km, "provisioner", None), "process", None)
    if proc is None:
        return None
    try:
        return proc.poll()
    except Exception:  # noqa: BLE001
        return None


def _death_reason(code: int | None, limits: Limits) -> str:
    if code is not None and code < 0 and -code == signal.SIGXCPU:
        return f"CPU time limit ({limits.effective_cpu_seconds()} s)"
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}"
    return f"exit code {code}" if code is not None else "the kernel process is gone"


def _death_message(code: int | None, limits: Limits) -> str:
    return f"the kernel died while running this cell ({_death_reason(code, limits)}); " \
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
    parser.add_argument("--progress-fd", type=int, default=None,
                        help="descriptor the events go to (autograder/events.py)")
    args = parser.parse_args(argv)
    protect_runner()
    raw = sys.stdin.buffer.read(MAX_JOB + 1)
    sys.stdin.close()
    emit = Emitter(args.progress_fd)
    if len(raw) > MAX_JOB:
        emit.end("error", None, "notebook too large")
        return 1
    try:
        job = Job(json.loads(raw))
    except (ValueError, TypeError) as e:
        emit.end("error", None, f"unreadable job: {e}")
        return 1
    del raw
    try:
        apply_limits(job)
    except OSError as e:
        emit.end("error", None, f"the limits could not be applied: {e}")
        return 1
    return run(job, emit)


if __name__ == "__main__":
    sys.exit(main())
