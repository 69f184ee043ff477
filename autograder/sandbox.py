"""Run one notebook in a sandbox, within resource limits, and leave no process behind.

What a submission runs in (see ``autograder/README.md`` for what this does and does not
protect):

* **bubblewrap** (``bwrap``), when it is installed and works: new pid, network, ipc and uts
  namespaces (the network namespace has only a loopback interface, so ranks of a
  ``torch.distributed`` world reach each other and nothing else); a read-only view of the
  system directories and of the Python environment; the course code the notebook imports
  (``paralab/``, ``autograder/checks/``) mounted read-only under ``/sandbox/course``; a
  private ``/tmp``; and one writable work directory, ``/sandbox/work``, that is thrown away
  afterwards.  Nothing else of the host is visible: not ``solutions/``, not the gradebook,
  not other submissions, not the grader's output, not anyone's home.  When the grader runs
  as root, the notebook runs as an unused unprivileged uid, so that the process limit
  applies and the system's files keep their permissions.
* **without bubblewrap** the same limits apply but the notebook can read and write
  whatever the grader's user can; :func:`sandbox_warning` says so once per run.

Limits: per-cell timeout (the kernel is interrupted), wall clock per notebook, memory of the
whole process tree (resident set, polled) plus a per-process data limit, number of tasks
(``RLIMIT_NPROC`` and polling), CPU seconds per process, size of files written, and the
size of the outputs kept.  At a limit the whole process tree is killed; afterwards the tree
is looked for again and anything left is killed and reported.
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

SANDBOX_ROOT = "/sandbox"
WORK_IN_SANDBOX = "/sandbox/work"
COURSE_IN_SANDBOX = "/sandbox/course"
DEFAULT_SANDBOX_UID = 61000  # must be unused on the grading machine (root only)
ANSWERS_NAME = ".paralab-answers.jsonl"
MARKER_ENV = "PARALAB_SANDBOX_RUN"
MAX_ANSWERS_BYTES = 32 * 2**20
MAX_EVENT_BYTES = 8 * 2**20
POLL_S = 0.1


@dataclass
class Limits:
    """Resource limits of one notebook run (0 disables a limit)."""

    cell_timeout: float = 120.0       # s per cell; the kernel is interrupted
    interrupt_grace: float = 5.0      # s a kernel gets to react to the interrupt
    notebook_timeout: float = 900.0   # s of wall clock for the whole notebook
    memory_mb: int = 4096             # resident memory of the whole process tree
    process_memory_mb: int = 0        # RLIMIT_DATA per process (0: 1.5 x memory_mb)
    max_procs: int = 256              # tasks (processes and threads) of the tree
    cpu_seconds: int = 0              # RLIMIT_CPU per process (0: 2 x notebook_timeout)
    file_size_mb: int = 512           # largest file the notebook may write
    tmp_size_mb: int = 512            # size of the private /tmp (bubblewrap only)
    max_cell_output: int = 100_000    # characters of output kept per cell
    max_total_output: int = 2_000_000  # characters of output kept per notebook

    def effective_cpu_seconds(self) -> int:
        if self.cpu_seconds:
            return self.cpu_seconds
        return int(2 * self.notebook_timeout) if self.notebook_timeout else 0

    def effective_process_memory_mb(self) -> int:
        # above the tree limit, so that a process growing step by step is caught by the
        # watchdog ("killed: memory limit") rather than by a MemoryError at a random point
        return self.process_memory_mb or int(1.5 * self.memory_mb)


@dataclass
class CourseView:
    """Host paths of the code a notebook may import (mounted read-only in the sandbox)."""

    paralab_dir: str
    autograder_dir: str
    extra_checks_dirs: list[str] = field(default_factory=list)

    @classmethod
    def default(cls, extra_checks_dirs: Iterable[str] = ()) -> "CourseView":
        import importlib.util
        spec = importlib.util.find_spec("paralab")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("the paralab package is not importable")
        paralab_dir = list(spec.submodule_search_locations)[0]
        autograder_dir = os.path.dirname(os.path.abspath(__file__))
        own = os.path.join(autograder_dir, "checks")
        extra = [os.path.abspath(d) for d in extra_checks_dirs
                 if os.path.isdir(d) and os.path.abspath(d) != own]
        return cls(paralab_dir, autograder_dir, extra)


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
    interrupted: list[int] = field(default_factory=list)
    log: str = ""
    marker: str = ""                 # the run's token (PARALAB_SANDBOX_RUN=<token>)
    uid: int | None = None           # the uid it ran as, when the grader is root


# ---------------------------------------------------------------------------------------
# bubblewrap


_BWRAP_CACHE: dict[str, tuple[str | None, str]] = {}


def bwrap_status() -> tuple[str | None, str]:
    """(path to a working bwrap, "") or (None, why not).  Probes the options the sandbox
    uses, so that an old or restricted bubblewrap counts as missing, with the reason."""
    if "status" in _BWRAP_CACHE:
        return _BWRAP_CACHE["status"]
    path = shutil.which("bwrap")
    if path is None:
        result: tuple[str | None, str] = (None, "bubblewrap not found")
    else:
        base = [path] + _namespace_args() + ["--hostname", "sandbox", "--ro-bind", "/", "/",
                                             "--proc", "/proc", "--dev", "/dev", "--perms",
                                             "1777"]
        ok, why = _probe(base + ["--size", str(2**20), "--tmpfs", "/tmp", "true"])
        if ok:
            result = (path, "")
        else:
            ok, _ = _probe(base + ["--tmpfs", "/tmp", "true"])
            if ok:  # an older bubblewrap: no size limit for the private /tmp
                _BWRAP_CACHE["no_size"] = (path, "")
                result = (path, "")
            else:
                result = (None, f"bubblewrap does not work here ({why})")
    _BWRAP_CACHE["status"] = result
    return result


def _probe(cmd: list[str]) -> tuple[bool, str]:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, str(e)
    lines = (proc.stderr or proc.stdout).strip().splitlines()
    return proc.returncode == 0, (lines[-1] if lines else f"exit code {proc.returncode}")


def sandbox_warning(reason: str) -> str:
    return (f"warning: {reason}: submissions run WITHOUT a sandbox (they can read and write "
            f"whatever this user can, including the gradebook and solutions/); resource "
            f"limits still apply. Install it with `apt-get install bubblewrap` (and allow "
            f"unprivileged user namespaces), or pass --no-sandbox to silence this warning.")


def _namespace_args() -> list[str]:
    args = ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--die-with-parent", "--new-session"]
    if os.geteuid() != 0:
        args.insert(0, "--unshare-user")
    return args


def _host_dirs_for_python() -> list[str]:
    """Directories the interpreter and its environment live in (mounted read-only)."""
    paths = {os.path.realpath(sys.prefix), os.path.realpath(sys.base_prefix),
             os.path.realpath(sys.exec_prefix), os.path.realpath(sys.base_exec_prefix),
             os.path.dirname(os.path.realpath(sys.executable))}
    for p in list(paths):
        if p in ("/", "/usr") or p.startswith("/usr/"):
            paths.discard(p)
    # a prefix inside another one is covered by it
    out = []
    for p in sorted(paths, key=len):
        if not any(p == q or p.startswith(q + os.sep) for q in out):
            out.append(p)
    return out


def _parents(path: str) -> list[str]:
    parts = []
    head = os.path.dirname(path)
    while head and head != "/":
        parts.append(head)
        head = os.path.dirname(head)
    return list(reversed(parts))


HOSTS = ("127.0.0.1 localhost sandbox\n::1 localhost ip6-localhost ip6-loopback\n"
         "::ffff:127.0.0.1 localhost\n")


def bwrap_command(bwrap: str, work: str, view: CourseView, limits: Limits,
                  inner: list[str], hosts_file: str | None = None) -> list[str]:
    cmd = [bwrap] + _namespace_args() + ["--hostname", "sandbox"]
    if os.geteuid() == 0:
        cmd += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    for top in ("usr", "lib", "lib32", "lib64", "libx32", "bin", "sbin"):
        host = "/" + top
        if os.path.islink(host):
            cmd += ["--symlink", os.readlink(host), host]
        elif os.path.isdir(host):
            cmd += ["--ro-bind", host, host]
    cmd += ["--ro-bind", "/etc", "/etc"]
    if hosts_file:  # torch.distributed resolves the host name; "sandbox" must resolve
        cmd += ["--ro-bind", hosts_file, "/etc/hosts"]
    cmd += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777"]
    if limits.tmp_size_mb and "no_size" not in _BWRAP_CACHE:
        cmd += ["--size", str(limits.tmp_size_mb * 2**20)]
    cmd += ["--tmpfs", "/tmp"]
    made = {"/", "/usr", "/etc", "/tmp", "/proc", "/dev"}

    def mkdirs(path: str) -> None:
        for parent in _parents(path) + [path]:
            if parent not in made:
                cmd.extend(["--perms", "0755", "--dir", parent])
                made.add(parent)

    for host in _host_dirs_for_python():
        if host.startswith(SANDBOX_ROOT + "/") or host == SANDBOX_ROOT:
            raise RuntimeError(f"the Python environment lives under {SANDBOX_ROOT}, which "
                               f"the sandbox uses for itself")
        for parent in _parents(host):
            mkdirs(parent)
        cmd += ["--ro-bind", host, host]
        made.add(host)
    course = COURSE_IN_SANDBOX
    mkdirs(course + "/autograder")
    cmd += ["--ro-bind", view.paralab_dir, course + "/paralab"]
    for name in ("__init__.py", "execute.py"):
        cmd += ["--ro-bind", os.path.join(view.autograder_dir, name),
                f"{course}/autograder/{name}"]
    cmd += ["--ro-bind", os.path.join(view.autograder_dir, "checks"),
            f"{course}/autograder/checks"]
    for i, extra in enumerate(view.extra_checks_dirs):
        cmd += ["--ro-bind", extra, f"{course}/extra_checks_{i}"]
    # --chdir /: the work directory belongs to the sandbox uid, which the executor
    # switches to before it changes into it.
    cmd += ["--bind", work, WORK_IN_SANDBOX, "--chdir", "/", "--"]
    return cmd + inner


# ---------------------------------------------------------------------------------------
# Processes


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclass
class Proc:
    pid: int
    ppid: int
    uid: int
    threads: int
    rss: int  # bytes
    state: str = "R"

    @property
    def dead(self) -> bool:
        return self.state in ("Z", "X", "x")


def list_processes() -> dict[int, Proc]:
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read().decode("ascii", "replace")
            uid = os.stat(f"/proc/{name}").st_uid
        except OSError:
            continue
        rest = stat[stat.rfind(")") + 2:].split()
        # rest[0] is the state: fields shift by 3 from the man page numbering
        try:
            out[int(name)] = Proc(int(name), int(rest[1]), uid, int(rest[17]),
                                  int(rest[21]) * _PAGE, rest[0])
        except (IndexError, ValueError):
            continue
    return out


def descendants(procs: dict[int, Proc], roots: Iterable[int]) -> list[int]:
    children: dict[int, list[int]] = {}
    for p in procs.values():
        children.setdefault(p.ppid, []).append(p.pid)
    seen: list[int] = []
    stack = [r for r in roots if r in procs]
    visited = set(stack)
    while stack:
        pid = stack.pop(0)
        seen.append(pid)
        for c in children.get(pid, []):
            if c not in visited:
                visited.add(c)
                stack.append(c)
    return seen


def _has_marker(pid: int, marker: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return marker in f.read()
    except OSError:
        return False


def set_child_subreaper() -> bool:
    """Orphans of our children become our children, so none escapes the tree walk."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


class Tree:
    """The processes of one run: descendants of its root, and (as root) anything running
    as the sandbox uid or carrying the run's marker.  Without bubblewrap, orphans of the
    run are reparented to the grader (a child subreaper) and recognised by the marker in
    their environment, so that runs going on at the same time never touch each other."""

    def __init__(self, root_pid: int, uid: int | None, marker: str, before: set[int],
                 adopt_orphans: bool = False):
        self.root_pid = root_pid
        self.uid = uid
        self.marker = f"{MARKER_ENV}={marker}".encode()
        self.before = before  # our children that existed before this run
        self.adopt_orphans = adopt_orphans
        self.cgroup: PidsCgroup | None = None

    def pids(self, procs: dict[int, Proc] | None = None, deep: bool = False) -> list[int]:
        procs = list_processes() if procs is None else procs
        me = os.getpid()
        roots = [self.root_pid]
        if self.adopt_orphans:
            roots += [p.pid for p in procs.values()
                      if p.ppid == me and p.pid not in self.before and p.pid != self.root_pid
                      and _has_marker(p.pid, self.marker)]
        found = descendants(procs, roots)
        extra = set()
        if self.uid is not None:
            extra |= {p.pid for p in procs.values() if p.uid == self.uid}
        if deep:
            extra |= {pid for pid in procs if pid not in found and pid != me
                      and _has_marker(pid, self.marker)}
        # a zombie is dead already: it only waits to be reaped (see kill)
        return [p for p in found + sorted(extra - set(found)) if not procs[p].dead]

    def usage(self, procs: dict[int, Proc]) -> tuple[int, int, list[int]]:
        pids = self.pids(procs)
        tasks = sum(procs[p].threads for p in pids if p in procs)
        rss = sum(procs[p].rss for p in pids if p in procs)
        return tasks, rss, pids

    def kill(self, popen: subprocess.Popen | None = None, rounds: int = 100) -> int:
        """SIGKILL everything, parents first, until nothing is left; returns how many
        processes were still found after all rounds (0 when clean).  Without a pid
        namespace a fork bomb refills every slot that a kill frees, so the processes are
        first stopped (a stopped process cannot fork), and a pids cgroup closed."""
        if self.cgroup is not None:
            self.cgroup.close()
        for _ in range(5):
            pids = [p for p in self.pids() if p != os.getpid()]
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGSTOP)
                except (ProcessLookupError, PermissionError):
                    pass
            procs = list_processes()
            if all(procs[p].state in ("T", "t") or procs[p].dead for p in pids if p in procs):
                break
        killed: set[int] = set()
        left = 0
        for i in range(rounds):
            pids = self.pids(deep=(i % 10 == 0))
            if self.cgroup is not None:
                pids += [p for p in self.cgroup.pids() if p not in pids]
            if popen is not None and popen.poll() is None and popen.pid not in pids:
                pids.insert(0, popen.pid)
            pids = [p for p in pids if p != os.getpid()]
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            killed.update(pids)
            self._reap(killed)
            time.sleep(0.01 if i < 20 else 0.05)
        else:
            left = len([p for p in self.pids(deep=True) if p != os.getpid()])
        deadline = time.monotonic() + 2.0
        while self._reap(killed) and time.monotonic() < deadline:
            time.sleep(0.02)
        return left

    def _reap(self, pids: set[int]) -> bool:
        """Reap the killed processes that became our children (orphans, without
        bubblewrap); True while some of them are still to be reaped."""
        waiting = False
        for pid in list(pids):
            if pid == self.root_pid:
                continue  # the Popen object reaps its own process
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except (ChildProcessError, OSError):
                pids.discard(pid)  # not our child, or gone
                continue
            if done:
                pids.discard(pid)
            else:
                waiting = True
        return waiting


def proportional_memory(pids: Iterable[int]) -> int:
    """Bytes of memory the processes use, shared pages divided among their sharers (PSS).
    The resident sizes of forked ranks count the pages they share with their parent once
    per process; the limit must not."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
                for line in f:
                    if line.startswith(b"Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except (OSError, ValueError, IndexError):
            continue
    return total


class PidsCgroup:
    """A pids cgroup capping the number of tasks of one run, for when RLIMIT_NPROC cannot
    help (running as root without bubblewrap: root is exempt from it).  Best effort: used
    when this process may create cgroups (root, cgroup v1 ``pids`` hierarchy or the
    cgroup v2 root with the pids controller enabled); otherwise only polling limits the
    number of processes."""

    def __init__(self, path: str):
        self.path = path

    @classmethod
    def create(cls, name: str, limit: int) -> "PidsCgroup | None":
        if os.geteuid() != 0 or limit <= 0:
            return None
        for base, needs_controller in (("/sys/fs/cgroup/pids", False), ("/sys/fs/cgroup", True)):
            try:
                if needs_controller:
                    with open(os.path.join(base, "cgroup.subtree_control")) as f:
                        if "pids" not in f.read().split():
                            continue
                elif not os.path.exists(os.path.join(base, "pids.max")) and \
                        not os.path.exists(os.path.join(base, "tasks")):
                    continue
                path = os.path.join(base, name)
                os.mkdir(path)
                with open(os.path.join(path, "pids.max"), "w") as f:
                    f.write(str(limit))
                return cls(path)
            except OSError:
                continue
        return None

    def close(self) -> None:
        """No new process in the cgroup from now on (forks fail), before the kill."""
        try:
            with open(os.path.join(self.path, "pids.max"), "w") as f:
                f.write("0")
        except OSError:
            pass

    def add(self, pid: int) -> bool:
        try:
            with open(os.path.join(self.path, "cgroup.procs"), "w") as f:
                f.write(str(pid))
            return True
        except OSError:
            return False

    def pids(self) -> list[int]:
        """Live processes of the cgroup (zombies waiting to be reaped are not counted)."""
        try:
            with open(os.path.join(self.path, "cgroup.procs")) as f:
                listed = [int(x) for x in f.read().split()]
        except (OSError, ValueError):
            return []
        procs = list_processes()
        return [p for p in listed if p in procs and not procs[p].dead]

    def remove(self) -> None:
        for _ in range(50):
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError:
                for pid in self.pids():
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
                time.sleep(0.05)


class UidLease:
    """An unused uid for one run, from ``base`` on, held with a lock file, so that
    grading runs going on at the same time (other jobs, other instructors' graders) never
    share a uid: the process limit and the clean-up work per uid."""

    SPAN = 1000

    def __init__(self, base: int):
        self.base = base
        self.uid: int | None = None
        self.fd: int | None = None

    @staticmethod
    def _directory() -> str | None:
        for parent in ("/run/lock", tempfile.gettempdir()):
            path = os.path.join(parent, "paralab-sandbox-uids")
            try:
                os.makedirs(path, mode=0o700, exist_ok=True)
                st = os.lstat(path)
            except OSError:
                continue
            import stat
            if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and \
                    not st.st_mode & 0o022:
                return path
        return None

    def acquire(self) -> int:
        import fcntl
        folder = self._directory()
        busy = {p.uid for p in list_processes().values()}
        for uid in range(self.base, self.base + self.SPAN):
            if uid in busy:
                continue
            if folder is None:  # nowhere to lock: take the first uid nothing runs as
                self.uid = uid
                return uid
            try:
                fd = os.open(os.path.join(folder, f"{uid}.lock"),
                             os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW, 0o600)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            self.uid, self.fd = uid, fd
            return uid
        raise RuntimeError(f"no unused uid from {self.base} to {self.base + self.SPAN - 1} "
                           f"for the sandbox (see --sandbox-uid)")

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the lock
            self.fd = None


def tasks_of_uid(uid: int) -> int:
    return sum(p.threads for p in list_processes().values() if p.uid == uid)


# ---------------------------------------------------------------------------------------
# Running a notebook


@dataclass
class Sandbox:
    """How notebooks run: ``mode`` is "bwrap" or "none"."""

    mode: str
    limits: Limits = field(default_factory=Limits)
    view: CourseView | None = None
    sandbox_uid: int = DEFAULT_SANDBOX_UID
    bwrap: str | None = None
    tmp_root: str | None = None
    extra_env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def create(cls, mode: str = "auto", limits: Limits | None = None,
               view: CourseView | None = None, sandbox_uid: int = DEFAULT_SANDBOX_UID,
               warn: Callable[[str], None] | None = None, **kwargs: Any) -> "Sandbox":
        """``mode``: "auto" (bwrap if it works, else none with a warning), "bwrap" (error
        if it does not work) or "none" (explicit, no warning)."""
        limits = limits or Limits()
        view = view or CourseView.default()
        if mode not in ("auto", "bwrap", "none"):
            raise ValueError(f"sandbox mode must be auto, bwrap or none, not {mode!r}")
        path = None
        if mode in ("auto", "bwrap"):
            path, why = bwrap_status()
            if path is None:
                if mode == "bwrap":
                    raise RuntimeError(f"{why}; install it with `apt-get install bubblewrap`")
                if warn is not None:
                    warn(sandbox_warning(why))
                mode = "none"
            else:
                mode = "bwrap"
        if mode == "none":
            set_child_subreaper()
        return cls(mode, limits, view, sandbox_uid, path, **kwargs)

    @property
    def drops_uid(self) -> bool:
        return self.mode == "bwrap" and os.geteuid() == 0

    def run(self, nb: dict, answers_dest: str | None = None) -> RunResult:
        """Execute ``nb`` (a notebook as a dict); outputs come back in the result."""
        lease = UidLease(self.sandbox_uid) if self.drops_uid else None
        if lease is not None:
            try:
                lease.acquire()
            except RuntimeError as e:
                return RunResult(status="error", reason=str(e))
        try:
            return self._run(nb, answers_dest, lease.uid if lease is not None else None)
        finally:
            if lease is not None:
                lease.release()

    def _run(self, nb: dict, answers_dest: str | None, uid: int | None) -> RunResult:
        limits = self.limits
        base = tempfile.mkdtemp(prefix="paralab-sandbox-", dir=self.tmp_root)
        os.chmod(base, 0o700)
        work = os.path.join(base, "work")
        os.mkdir(work, 0o700)
        token = secrets.token_hex(8)
        if uid is not None:
            os.chown(work, uid, uid)
        inside_work = WORK_IN_SANDBOX if self.mode == "bwrap" else work
        env = self._environment(inside_work, token)
        if not limits.max_procs:
            proc_limit = 0
        elif uid is not None:
            proc_limit = limits.max_procs  # the sandbox uid runs nothing else
        elif os.geteuid() == 0:
            proc_limit = 0  # root is exempt from RLIMIT_NPROC: polling only
        else:  # the limit counts every process of this user, not only ours
            proc_limit = tasks_of_uid(os.geteuid()) + limits.max_procs
        read_fd, write_fd = os.pipe()
        inner = [sys.executable, "-m", "autograder.execute",
                 "--cell-timeout", str(limits.cell_timeout),
                 "--interrupt-grace", str(limits.interrupt_grace),
                 "--max-cell-output", str(limits.max_cell_output),
                 "--max-total-output", str(limits.max_total_output),
                 "--cpu-seconds", str(limits.effective_cpu_seconds()),
                 "--memory-mb", str(limits.effective_process_memory_mb()),
                 "--file-size-mb", str(limits.file_size_mb),
                 "--max-procs", str(proc_limit),
                 "--progress-fd", str(write_fd), "--workdir", inside_work]
        if uid is not None:
            inner += ["--uid", str(uid), "--gid", str(uid)]
        if self.mode == "bwrap":
            hosts = os.path.join(base, "hosts")
            with open(hosts, "w") as f:
                f.write(HOSTS)
            os.chmod(hosts, 0o644)
            cmd = bwrap_command(self.bwrap, work, self.view, limits, inner, hosts)
        else:
            cmd = inner
        result = RunResult(marker=token, uid=uid)
        log_path = os.path.join(base, "executor.log")
        before = {p.pid for p in list_processes().values() if p.ppid == os.getpid()}
        start = time.monotonic()
        cgroup = None
        if self.mode == "none" and os.geteuid() == 0 and limits.max_procs:
            cgroup = PidsCgroup.create(f"paralab-{token}", limits.max_procs)
        with open(log_path, "wb") as log:
            # the progress pipe is the only descriptor the child inherits besides stdio
            popen = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=log, stderr=log, env=env,
                cwd=work if self.mode == "none" else "/", start_new_session=True,
                pass_fds=(write_fd,))
        if cgroup is not None:
            # the runner reads the whole notebook from stdin before it starts anything, so
            # it cannot have forked yet: everything it starts inherits the cgroup
            cgroup.add(popen.pid)
        os.close(write_fd)
        tree = Tree(popen.pid, uid, token, before, adopt_orphans=self.mode == "none")
        tree.cgroup = cgroup
        try:
            self._feed(popen, nb)
            self._watch(popen, tree, read_fd, start, result)
        finally:
            os.close(read_fd)
            result.survivors = tree.kill(popen)
            try:
                popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                result.survivors += 1
            if cgroup is not None:
                result.survivors += len(cgroup.pids())
                cgroup.remove()
            result.elapsed = time.monotonic() - start
            result.log = _tail_file(log_path)
            if answers_dest is not None:
                result.answers_path = _copy_answers(os.path.join(work, ANSWERS_NAME),
                                                    answers_dest)
            shutil.rmtree(base, ignore_errors=True)
        return result

    def _environment(self, work: str, token: str) -> dict[str, str]:
        venv_bin = os.path.dirname(sys.executable)
        env = {
            "PATH": f"{venv_bin}:/usr/local/bin:/usr/bin:/bin",
            "HOME": work, "USER": "student", "LOGNAME": "student",
            "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "TMPDIR": "/tmp",
            "PYTHONDONTWRITEBYTECODE": "1", "PYTHONNOUSERSITE": "1",
            "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "GLOO_SOCKET_IFNAME": "lo",
            "NBGRADER_EXECUTION": "autograde",
            "PARALAB_ANSWERS": os.path.join(work, ANSWERS_NAME),
            MARKER_ENV: token,
        }
        if self.mode == "bwrap":
            env["PYTHONPATH"] = COURSE_IN_SANDBOX
            extra = [f"{COURSE_IN_SANDBOX}/extra_checks_{i}"
                     for i in range(len(self.view.extra_checks_dirs))]
            tmp = "/tmp"
        else:
            extra = list(self.view.extra_checks_dirs)
            tmp = os.path.join(work, ".tmp")
            os.makedirs(tmp, exist_ok=True)
            env["TMPDIR"] = tmp
        if extra:
            env["PARALAB_CHECKS_PATH"] = os.pathsep.join(extra)
        env["JUPYTER_RUNTIME_DIR"] = os.path.join(tmp, "jupyter-runtime")
        env["IPYTHONDIR"] = os.path.join(tmp, "ipython")
        env["MPLCONFIGDIR"] = os.path.join(tmp, "matplotlib")
        env["JUPYTER_PLATFORM_DIRS"] = "1"
        env.update(self.extra_env)
        return env

    @staticmethod
    def _feed(popen: subprocess.Popen, nb: dict) -> None:
        data = json.dumps(nb).encode()
        try:
            popen.stdin.write(data)
        except (BrokenPipeError, OSError):
            pass
        finally:
            try:
                popen.stdin.close()
            except OSError:
                pass

    def _watch(self, popen: subprocess.Popen, tree: Tree, read_fd: int, start: float,
               result: RunResult) -> None:
        limits = self.limits
        sel = selectors.DefaultSelector()
        sel.register(read_fd, selectors.EVENT_READ)
        buffer = b""
        eof = False
        ended = False
        near_cap_since = None
        while True:
            for _key, _ in sel.select(timeout=POLL_S):
                chunk = os.read(read_fd, 1 << 16)
                if not chunk:
                    eof = True
                    sel.unregister(read_fd)
                    break
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    ended |= self._event(line, result)
                if len(buffer) > MAX_EVENT_BYTES:
                    buffer = b""  # an oversized event is dropped, not accumulated
            if eof and popen.poll() is not None:
                if not ended and result.status == "completed":
                    result.status = "error"
                    result.reason = f"the notebook runner stopped unexpectedly (exit code " \
                                    f"{popen.returncode})"
                return
            if eof and ended:
                try:
                    popen.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
                return
            procs = list_processes()
            tasks, rss, pids = tree.usage(procs)
            result.peak_tasks = max(result.peak_tasks, tasks)
            if limits.max_procs and tasks >= 0.9 * limits.max_procs:
                near_cap_since = near_cap_since or time.monotonic()
                if tasks > limits.max_procs * 1.5 or time.monotonic() - near_cap_since > 0.5:
                    self._stop(result, "killed", f"process limit ({limits.max_procs})", tree,
                               popen)
                    return
            else:
                near_cap_since = None
            memory: int | None = rss
            if limits.memory_mb and rss > limits.memory_mb * 2**20:
                # the resident sizes count pages shared by forked processes once per
                # process; the proportional sizes do not, but cost more to read, so only
                # now, and not while the process limit is about to decide (a fork bomb
                # has many processes, each with a large resident size)
                memory = proportional_memory(pids) if near_cap_since is None else None
            if memory is not None:
                result.peak_memory_mb = max(result.peak_memory_mb, memory / 2**20)
                if limits.memory_mb and memory > limits.memory_mb * 2**20:
                    self._stop(result, "killed", f"memory limit ({_mb(limits.memory_mb)})",
                               tree, popen)
                    return
            # the wall clock last: a notebook stuck at a limit was stopped by that limit
            if limits.notebook_timeout and time.monotonic() - start > limits.notebook_timeout:
                self._stop(result, "timed out",
                           f"notebook limit {limits.notebook_timeout:g} s reached", tree, popen)
                return

    @staticmethod
    def _stop(result: RunResult, status: str, reason: str, tree: Tree,
              popen: subprocess.Popen) -> None:
        tree.kill(popen)
        result.status, result.reason = status, reason

    def _event(self, line: bytes, result: RunResult) -> bool:
        try:
            event = json.loads(line)
        except ValueError:
            return False
        if not isinstance(event, dict):
            return False
        kind = event.get("type")
        index = event.get("index")
        if kind == "start" and isinstance(index, int):
            result.running = index
        elif kind == "cell" and isinstance(index, int):
            outputs = event.get("outputs")
            result.cells[index] = {"outputs": outputs if isinstance(outputs, list) else [],
                                   "execution_count": event.get("execution_count")}
            if event.get("interrupted"):
                result.interrupted.append(index)
            if result.running == index:
                result.running = None
        elif kind == "end":
            status = event.get("status")
            reason = str(event.get("reason") or "")[:500]
            if status == "unresponsive":
                result.status, result.reason = "timed out", reason
            elif status == "kernel died":
                result.status = "killed" if "limit" in reason else "kernel died"
                result.reason = reason
            elif status == "error":
                result.status, result.reason = "error", reason
            if isinstance(index, int):
                result.running = index
            return True
        return False


def _mb(mb: int) -> str:
    return f"{mb / 1024:g} GiB" if mb >= 1024 else f"{mb} MiB"


def _tail_file(path: str, size: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - size))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _copy_answers(src: str, dest: str) -> str | None:
    """Copy the answers file out of the work directory without following a link the
    student may have planted there, and at most MAX_ANSWERS_BYTES of it."""
    try:
        fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        data = b""
    else:
        try:
            import stat
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                data = b""
            else:
                data = os.read(fd, MAX_ANSWERS_BYTES)
                while len(data) < MAX_ANSWERS_BYTES:
                    more = os.read(fd, MAX_ANSWERS_BYTES - len(data))
                    if not more:
                        break
                    data += more
        finally:
            os.close(fd)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with open(dest, "wb") as f:
        f.write(data)
    return dest


# ---------------------------------------------------------------------------------------
# Putting results back into the notebook


def apply_results(nb: Any, result: RunResult, limits: Limits) -> Any:
    """Write the outputs of ``result`` into ``nb`` (a NotebookNode), explain where and why
    the run stopped, and mark the code cells that never ran so that they cannot pass."""
    from nbformat.notebooknode import from_dict

    stopped = result.status != "completed"
    where = result.running
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        data = result.cells.get(index)
        if data is not None:
            cell.outputs = [from_dict(o) for o in map(clean_output, data["outputs"]) if o]
            cell.execution_count = data.get("execution_count")
        else:
            cell.outputs = []
            cell.execution_count = None
        if stopped and index == where and not _has_error(cell):
            cell.outputs.append(from_dict(_error_output(
                "GraderStop", f"{result.status}: {result.reason}; the notebook was stopped "
                              f"while this cell was running")))
        elif data is None and cell.source.strip() and (stopped or where is not None):
            cell.outputs = [from_dict(_error_output(
                "NotRun", f"this cell did not run: the notebook was stopped earlier "
                          f"({result.status}: {result.reason})"))]
    return nb


def clean_output(o: Any) -> dict | None:
    """A well-formed nbformat output built from ``o`` (which came out of the sandbox), or
    None: one malformed output must not make the whole notebook unreadable."""
    if not isinstance(o, dict):
        return None
    kind = o.get("output_type")
    if kind == "stream":
        name = o.get("name") if o.get("name") in ("stdout", "stderr") else "stdout"
        return {"output_type": "stream", "name": name, "text": str(o.get("text", ""))}
    if kind == "error":
        tb = o.get("traceback")
        return {"output_type": "error", "ename": str(o.get("ename", "")),
                "evalue": str(o.get("evalue", "")),
                "traceback": [str(t) for t in tb] if isinstance(tb, list) else []}
    if kind in ("display_data", "execute_result"):
        data = o.get("data")
        if not isinstance(data, dict):
            return None
        kept = {}
        for mime, value in data.items():
            if not isinstance(mime, str) or "/" not in mime:
                continue
            if isinstance(value, str):
                kept[mime] = value
            elif isinstance(value, list) and all(isinstance(v, str) for v in value):
                kept[mime] = "".join(value)
            elif mime.endswith("json") and isinstance(value, (dict, list)):
                kept[mime] = value
        if not kept:
            return None
        meta = o.get("metadata") if isinstance(o.get("metadata"), dict) else {}
        out = {"output_type": kind, "data": kept, "metadata": meta}
        if kind == "execute_result":
            count = o.get("execution_count")
            out["execution_count"] = count if isinstance(count, int) else None
        return out
    return None


def _has_error(cell: Any) -> bool:
    return any(o.get("output_type") == "error" for o in cell.get("outputs", []))


def _error_output(ename: str, evalue: str) -> dict:
    return {"output_type": "error", "ename": ename, "evalue": evalue,
            "traceback": [f"{ename}: {evalue}"]}
