"""The processes of a notebook run: finding them, measuring them, killing them all.

A notebook's code can fork, daemonise, start a process group of its own or exit its parent
so that its children are orphaned.  The grader therefore never trusts the process tree
alone: a run's processes are the descendants of its runner, plus (without a pid namespace)
orphans reparented to the grader that carry the run's marker in their environment
(:data:`MARKER_ENV`), plus (when the grader is root) anything running as the run's own
uid (:class:`UidLease`).  :class:`Tree` measures them (tasks, memory) and kills them: first
stopped, so that a fork bomb cannot refill the slots a kill frees, then killed until none
is left.  :class:`PidsCgroup` caps the number of tasks where ``RLIMIT_NPROC`` cannot (root
without bubblewrap).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Iterable

MARKER_ENV = "PARALAB_SANDBOX_RUN"
DEFAULT_SANDBOX_UID = 61000  # must be unused on the grading machine (root only)

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

    def refused(self) -> bool:
        """Whether the cgroup has refused a fork: the notebook reached the process limit.
        (The tasks the grader counts can stay under the limit: the cgroup also counts
        processes that are exiting and not yet reaped.)"""
        try:
            with open(os.path.join(self.path, "pids.events")) as f:
                for line in f:
                    name, _, value = line.partition(" ")
                    if name == "max":
                        return int(value) > 0
        except (OSError, ValueError):
            pass
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



def sweep_strays() -> None:
    """Kill any descendant of this process still carrying a run's marker (without
    bubblewrap an orphan could outlive its run); with bubblewrap there are none."""
    procs = list_processes()
    me = os.getpid()
    marker = f"{MARKER_ENV}=".encode()
    for pid in descendants(procs, [me]):
        if pid != me and _has_marker(pid, marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
