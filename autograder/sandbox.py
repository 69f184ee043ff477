"""Run one notebook in a sandbox, within resource limits, and leave nothing behind.

:meth:`Sandbox.run` is the one way a notebook runs, for ``python -m autograder grade`` (a pool
of these, see :mod:`autograder.grading`) as for a plain ``nbgrader autograde``
(:class:`autograder.preprocessors.SandboxedExecute`):

1. the runner, ``python -m autograder.execute``, starts in bubblewrap (:mod:`autograder.bwrap`)
   or, without it, as a plain child process; it reads its job (the notebook, the
   :class:`~autograder.limits.Limits`, the uid to run as) from a pipe, never from a file;
2. while it runs, this process reads two pipes: the runner's events
   (:mod:`autograder.events`) and the answers the notebook's test cells record (the
   notebook gets the write end as ``$PARALAB_ANSWERS``; they are copied to
   ``answers_dest``, at most :data:`MAX_ANSWERS_BYTES`), and polls the run's processes
   (:mod:`autograder.processes`) for the memory, process and wall-clock limits;
3. at the end, or at a limit, the whole process tree is killed and looked for again; the
   host folder of the run (only without bubblewrap: there the work directory lives on the
   host) is removed whatever its shape (:mod:`autograder.trees`).

Nothing that goes wrong here raises: the result says what happened (``status``), so that
one notebook can never stop the grading of the others.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from . import bwrap as bw
from .bwrap import COURSE_IN_SANDBOX, WORK_IN_SANDBOX, Bwrap, sandbox_warning
from .coursecode import CourseCode
from .events import Reader
from .limits import LIMITS_ENV, Limits, mb_text
from .processes import (DEFAULT_SANDBOX_UID, MARKER_ENV, PidsCgroup, Tree, UidLease,
                        list_processes, proportional_memory, set_child_subreaper,
                        tasks_of_uid)
from .trees import remove_tree

ANSWERS_ENV = "PARALAB_ANSWERS"
MAX_ANSWERS_BYTES = 32 * 2**20
MAX_JOB_BYTES = 80 * 2**20
POLL_S = 0.1
# The notebook's wall clock starts with its first cell: how long a kernel takes to start says
# something about the grading machine (its load, a cold disk cache), nothing about the
# student, whose code has not run yet.  Starting the kernel gets its own bound instead.
KERNEL_START_S = 60.0
_F_SETPIPE_SZ = 1031


@dataclass
class RunResult:
    """What happened to one notebook run."""

    cells: dict[int, dict] = field(default_factory=dict)  # index -> {"outputs", ...}
    running: int | None = None       # index of the cell that was running at the end
    status: str = "completed"        # completed | timed out | killed | kernel died | error
    reason: str = ""
    elapsed: float = 0.0
    peak_memory_mb: float = 0.0
    peak_tasks: int = 0
    survivors: int = 0               # processes found alive after the final kill
    answers_path: str | None = None
    answers_truncated: bool = False
    interrupted: list[int] = field(default_factory=list)
    log: str = ""
    marker: str = ""                 # the run's token (PARALAB_SANDBOX_RUN=<token>)
    uid: int | None = None           # the uid it ran as, when the grader is root
    mode: str = ""                   # bwrap | none
    leftovers: list[str] = field(default_factory=list)  # host files that could not go

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["cells"] = {str(k): v for k, v in self.cells.items()}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunResult":
        data = dict(data)
        data["cells"] = {int(k): v for k, v in data.get("cells", {}).items()}
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class Sandbox:
    """How notebooks run: ``mode`` is "bwrap" or "none"; ``code`` is what they may import."""

    mode: str
    limits: Limits = field(default_factory=Limits)
    code: CourseCode | None = None
    sandbox_uid: int = DEFAULT_SANDBOX_UID
    bwrap: Bwrap | None = None
    tmp_root: str | None = None
    extra_env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def create(cls, mode: str = "auto", limits: Limits | None = None,
               code: CourseCode | None = None, sandbox_uid: int = DEFAULT_SANDBOX_UID,
               warn: Callable[[str], None] | None = None, **kwargs: Any) -> "Sandbox":
        """``mode``: "auto" (bwrap if it works, else none with a warning), "bwrap" (error
        if it does not work) or "none" (explicit, no warning).  Without ``code``, the
        course code is copied into a temporary folder."""
        if mode not in ("auto", "bwrap", "none"):
            raise ValueError(f"sandbox mode must be auto, bwrap or none, not {mode!r}")
        found = None
        if mode in ("auto", "bwrap"):
            found, why = bw.probe()
            if found is None:
                if mode == "bwrap":
                    raise RuntimeError(f"{why}; install it with `apt-get install bubblewrap`")
                if warn is not None:
                    warn(sandbox_warning(why))
                mode = "none"
            else:
                mode = "bwrap"
        if mode == "none":
            set_child_subreaper()
        return cls(mode, limits or Limits(), code or CourseCode.temporary(), sandbox_uid,
                   found, **kwargs)

    @property
    def drops_uid(self) -> bool:
        return self.mode == "bwrap" and os.geteuid() == 0

    def run(self, nb: dict, answers_dest: str | None = None,
            code: CourseCode | None = None) -> RunResult:
        """Execute ``nb`` (a notebook as a dict); outputs come back in the result, the
        answers its test cells record go to ``answers_dest``.  ``code`` replaces the
        sandbox's course code for this run.  Never raises."""
        try:
            lease = UidLease(self.sandbox_uid) if self.drops_uid else None
            if lease is not None:
                lease.acquire()
        except (RuntimeError, OSError) as e:
            return RunResult(status="error", reason=str(e), mode=self.mode)
        try:
            return self._run(nb, answers_dest, lease.uid if lease is not None else None,
                             code or self.code)
        except Exception as e:  # noqa: BLE001 - one notebook must not stop the others
            return RunResult(status="error", reason=f"{type(e).__name__}: {e}",
                             mode=self.mode)
        finally:
            if lease is not None:
                lease.release()

    # -----------------------------------------------------------------------------------

    def _proc_limit(self, uid: int | None) -> int:
        if not self.limits.max_procs:
            return 0
        if uid is not None:
            return self.limits.max_procs  # the sandbox uid runs nothing else
        if os.geteuid() == 0:
            return 0  # root is exempt from RLIMIT_NPROC: polling (and a cgroup) only
        # the limit counts every process of this user, not only ours
        return tasks_of_uid(os.geteuid()) + self.limits.max_procs

    def _run(self, nb: dict, answers_dest: str | None, uid: int | None,
             code: CourseCode) -> RunResult:
        limits = self.limits
        base = tempfile.mkdtemp(prefix="paralab-sandbox-", dir=self.tmp_root)
        os.chmod(base, 0o700)
        token = secrets.token_hex(8)
        result = RunResult(marker=token, uid=uid, mode=self.mode)
        fds: list[int] = []
        try:
            if self.mode == "bwrap":
                work = WORK_IN_SANDBOX
            else:
                work = os.path.join(base, "work")
                os.mkdir(work, 0o700)
            progress_r, progress_w = os.pipe()
            answers_r, answers_w = os.pipe()
            fds += [progress_w, answers_w]
            try:
                fcntl.fcntl(answers_w, _F_SETPIPE_SZ, 2**20)
            except OSError:
                pass
            if uid is not None:  # the notebook opens it again through /proc, as this uid
                os.fchown(answers_w, uid, uid)
            env = self._environment(work, token, code, answers_w)
            inner = ["-m", "autograder.execute", "--progress-fd", str(progress_w)]
            if self.mode == "bwrap":
                python = bw.python_view(_hidden_paths())
                cmd, data_fds = bw.command(self.bwrap, limits, python, code.manifest(),
                                           [python.executable] + inner)
                fds += data_fds
            else:
                cmd = [sys.executable] + inner
            job = {"notebook": nb, "limits": limits.to_dict(), "workdir": work,
                   "nproc": self._proc_limit(uid), "uid": uid, "answers_fd": answers_w,
                   "startup_timeout": KERNEL_START_S}
            before = {p.pid for p in list_processes().values() if p.ppid == os.getpid()}
            cgroup = None
            if self.mode == "none" and os.geteuid() == 0 and limits.max_procs:
                cgroup = PidsCgroup.create(f"paralab-{token}", limits.max_procs)
            log_path = os.path.join(base, "runner.log")
            start = time.monotonic()
            with open(log_path, "wb") as log:
                popen = subprocess.Popen(
                    cmd, stdin=subprocess.PIPE, stdout=log, stderr=log, env=env,
                    cwd=work if self.mode == "none" else "/", start_new_session=True,
                    pass_fds=tuple(fds))
            for fd in fds:
                os.close(fd)
            fds = []
            if cgroup is not None:
                # the runner reads its whole job from stdin before it starts anything, so
                # it cannot have forked yet: everything it starts inherits the cgroup
                cgroup.add(popen.pid)
            tree = Tree(popen.pid, uid, token, before, adopt_orphans=self.mode == "none")
            tree.cgroup = cgroup
            sink = _AnswerSink(answers_dest)
            try:
                _feed(popen, job)
                self._watch(popen, tree, progress_r, answers_r, sink, start, result)
            finally:
                result.survivors = tree.kill(popen)
                try:
                    popen.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    result.survivors += 1
                sink.drain(answers_r)
                os.close(progress_r)
                os.close(answers_r)
                result.answers_path, result.answers_truncated = sink.close()
                if cgroup is not None:
                    result.survivors += len(cgroup.pids())
                    cgroup.remove()
                result.elapsed = time.monotonic() - start
                result.log = _tail_file(log_path)
        finally:
            for fd in fds:
                os.close(fd)
            result.leftovers = remove_tree(base)
        return result

    def _environment(self, work: str, token: str, code: CourseCode,
                     answers_fd: int) -> dict[str, str]:
        if self.mode == "bwrap":
            python_bin = bw.python_view(_hidden_paths()).bin_dir
            course, tmp = COURSE_IN_SANDBOX, "/tmp"
        else:
            python_bin = os.path.dirname(sys.executable)
            course, tmp = code.root, os.path.join(work, ".tmp")
            os.makedirs(tmp, exist_ok=True)
        env = {
            "PATH": f"{python_bin}:/usr/local/bin:/usr/bin:/bin",
            "HOME": work, "USER": "student", "LOGNAME": "student",
            "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "TMPDIR": tmp,
            "PYTHONDONTWRITEBYTECODE": "1", "PYTHONNOUSERSITE": "1", "PYTHONPATH": course,
            "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "GLOO_SOCKET_IFNAME": "lo",
            "NBGRADER_EXECUTION": "autograde",
            # the write end of the answers pipe, which the kernel inherits
            ANSWERS_ENV: f"/proc/self/fd/{answers_fd}",
            LIMITS_ENV: self.limits.to_json(),
            MARKER_ENV: token,
            "JUPYTER_RUNTIME_DIR": os.path.join(tmp, "jupyter-runtime"),
            "IPYTHONDIR": os.path.join(tmp, "ipython"),
            "MPLCONFIGDIR": os.path.join(tmp, "matplotlib"),
            "JUPYTER_PLATFORM_DIRS": "1",
        }
        extra = code.extra_checks_dirs(course)
        if extra:
            env["PARALAB_CHECKS_PATH"] = os.pathsep.join(extra)
        env.update(self.extra_env)
        return env

    def _watch(self, popen: subprocess.Popen, tree: Tree, progress_fd: int, answers_fd: int,
               sink: "_AnswerSink", start: float, result: RunResult) -> None:
        limits = self.limits
        reader = Reader()
        sel = selectors.DefaultSelector()
        sel.register(progress_fd, selectors.EVENT_READ, "progress")
        sel.register(answers_fd, selectors.EVENT_READ, "answers")
        eof = False
        near_cap_since = None
        first_cell = None  # when the notebook's first cell started (its clock's zero)
        try:
            while True:
                for key, _ in sel.select(timeout=POLL_S):
                    chunk = os.read(key.fd, 1 << 20)
                    if key.data == "answers":
                        if chunk:
                            sink.write(chunk)
                        else:
                            sel.unregister(key.fd)
                        continue
                    if not chunk:
                        eof = True
                        sel.unregister(key.fd)
                        continue
                    reader.feed(chunk)
                progress = reader.progress
                if eof and popen.poll() is not None:
                    _finish(result, progress)
                    if progress.end is None:
                        _runner_gone(result, popen.returncode, self.mode)
                    return
                if eof and progress.end is not None:
                    try:
                        popen.wait(timeout=5)
                    except subprocess.TimeoutExpired:
                        pass
                    _finish(result, progress)
                    return
                procs = list_processes()
                tasks, rss, pids = tree.usage(procs)
                result.peak_tasks = max(result.peak_tasks, tasks)
                refused = tree.cgroup is not None and tree.cgroup.refused()
                if limits.max_procs and (tasks >= 0.9 * limits.max_procs or refused):
                    near_cap_since = near_cap_since or time.monotonic()
                    if refused or tasks > limits.max_procs * 1.5 or \
                            time.monotonic() - near_cap_since > 0.5:
                        self._stop(result, reader, "killed",
                                   f"process limit ({limits.max_procs})", tree, popen)
                        return
                else:
                    near_cap_since = None
                memory: int | None = rss
                if limits.memory_mb and rss > limits.memory_mb * 2**20:
                    # the resident sizes count pages shared by forked processes once per
                    # process; the proportional sizes do not, but cost more to read, so
                    # only now, and not while the process limit is about to decide (a
                    # fork bomb has many processes, each with a large resident size)
                    memory = proportional_memory(pids) if near_cap_since is None else None
                if memory is not None:
                    result.peak_memory_mb = max(result.peak_memory_mb, memory / 2**20)
                    if limits.memory_mb and memory > limits.memory_mb * 2**20:
                        self._stop(result, reader, "killed",
                                   f"memory limit ({mb_text(limits.memory_mb)})", tree, popen)
                        return
                # the wall clock last: a notebook stuck at a limit was stopped by that limit
                now = time.monotonic()
                if first_cell is None and (progress.running is not None or progress.cells):
                    first_cell = now
                if first_cell is None:
                    # the runner gives up on a kernel after KERNEL_START_S itself; this is
                    # for a runner that cannot even do that
                    if limits.notebook_timeout and now - start > KERNEL_START_S + 10:
                        self._stop(result, reader, "timed out",
                                   f"the kernel did not start within {KERNEL_START_S:g} s",
                                   tree, popen)
                        return
                elif limits.notebook_timeout and now - first_cell > limits.notebook_timeout:
                    self._stop(result, reader, "timed out",
                               f"notebook limit {limits.notebook_timeout:g} s reached", tree,
                               popen)
                    return
        finally:
            sel.close()

    @staticmethod
    def _stop(result: RunResult, reader: Reader, status: str, reason: str, tree: Tree,
              popen: subprocess.Popen) -> None:
        tree.kill(popen)
        _finish(result, reader.progress)
        result.status, result.reason = status, reason


def _finish(result: RunResult, progress: Any) -> None:
    """The run's outcome from its events."""
    result.cells = progress.cells
    result.running = progress.running
    result.interrupted = list(progress.interrupted)
    end, reason = progress.end, progress.reason
    if end == "unresponsive":
        result.status, result.reason = "timed out", reason
    elif end == "kernel died":
        result.status = "killed" if "limit" in reason else "kernel died"
        result.reason = reason
    elif end == "work dir full":
        result.status, result.reason = "killed", reason
    elif end == "error":
        result.status, result.reason = "error", reason


def _runner_gone(result: RunResult, code: int | None, mode: str) -> None:
    """The runner ended without saying how the run ended."""
    if result.status != "completed":
        return
    signalled = code is not None and code < 0
    if signalled and mode == "none":
        # without a pid namespace the notebook runs as the runner's user and can signal
        # it; nothing else kills the runner but the grader at a limit (already reported)
        result.status = "killed"
        result.reason = f"the notebook's code killed the grader's runner " \
                        f"({_signal_name(-code)})"
        return
    result.status = "error"
    result.reason = f"the notebook runner stopped unexpectedly (exit code {code})"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _feed(popen: subprocess.Popen, job: dict) -> None:
    data = json.dumps(job).encode()
    try:
        popen.stdin.write(data)
    except (BrokenPipeError, OSError):
        pass
    finally:
        try:
            popen.stdin.close()
        except OSError:
            pass


class _AnswerSink:
    """Copies the answers pipe to the answers file, at most MAX_ANSWERS_BYTES (the rest is
    read and dropped, so that a notebook writing more never blocks on a full pipe)."""

    def __init__(self, dest: str | None):
        self.dest = dest
        self.file = None
        self.written = 0
        self.truncated = False
        if dest is not None:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            self.file = open(dest, "wb")

    def write(self, chunk: bytes) -> None:
        room = MAX_ANSWERS_BYTES - self.written
        if len(chunk) > room:
            self.truncated = True
            chunk = chunk[:max(room, 0)]
        if chunk and self.file is not None:
            self.file.write(chunk)
            self.written += len(chunk)

    def drain(self, fd: int) -> None:
        """What is left in the pipe once every writer is gone (or killed)."""
        os.set_blocking(fd, False)
        while True:
            try:
                chunk = os.read(fd, 1 << 20)
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                return
            if not chunk:
                return
            self.write(chunk)

    def close(self) -> tuple[str | None, bool]:
        if self.file is not None:
            self.file.close()
        return self.dest, self.truncated


def _hidden_paths() -> tuple[tuple[str, str], ...]:
    """Host paths the sandbox must not show, and what it shows instead: the checkout this
    package lives in (its editable-install pointers then lead to the sandbox's copy)."""
    from .coursecode import PACKAGE_DIR
    checkout = os.path.dirname(os.path.realpath(PACKAGE_DIR))
    if (checkout + os.sep).startswith(os.path.realpath(sys.prefix) + os.sep):
        return ()  # installed into the environment itself: nothing of a checkout to hide
    return ((checkout, COURSE_IN_SANDBOX),)


def _tail_file(path: str, size: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - size))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""
