"""bubblewrap: whether it works here, and the command line of one sandboxed notebook run.

What a notebook sees inside (``autograder/README.md`` says what this protects):

* new pid, network, ipc, uts (and, where possible, cgroup) namespaces; the network
  namespace has only a loopback interface, which is what the ranks of a
  ``torch.distributed`` world use;
* the runner is pid 1 of the pid namespace (``--as-pid-1``): the kernel cannot kill it
  (pid 1 only receives the signals it handles), and ``/proc/1/cmdline`` shows the runner's
  own command line, which names no host path;
* read-only: ``/usr`` and friends, ``/etc`` (with an ``/etc/hosts`` that resolves the
  sandbox's host name), and the Python environment, mounted at ``/sandbox/python`` when it
  is a virtual environment; the few files of the environment that spell out where it lives
  on the host (``pyvenv.cfg``, editable-install pointers) are replaced by copies that say
  ``/sandbox/...`` instead;
* the course code the notebook imports, *copied* into ``/sandbox/course`` (a tmpfs made
  read-only; no bind mount, so ``/proc/self/mountinfo`` names no checkout);
* a private ``/tmp`` and the work directory ``/sandbox/work``, both size-limited tmpfs that
  vanish with the sandbox (nothing the notebook writes reaches the host's disk).

What bubblewrap cannot hide: the host path of the Python environment still appears as the
source of its bind mount in ``/proc/self/mountinfo``, and a base interpreter outside
``/usr`` (pyenv, conda) is mounted at its own path.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

from .limits import Limits

SANDBOX_ROOT = "/sandbox"
WORK_IN_SANDBOX = "/sandbox/work"
COURSE_IN_SANDBOX = "/sandbox/course"
PYTHON_IN_SANDBOX = "/sandbox/python"
HOSTS = ("127.0.0.1 localhost sandbox\n::1 localhost ip6-localhost ip6-loopback\n"
         "::ffff:127.0.0.1 localhost\n")


@dataclass(frozen=True)
class Bwrap:
    """A bubblewrap that works here, with what it supports."""

    path: str
    sized_tmpfs: bool = True  # --size (bubblewrap 0.5); without it the tmpfs are unbounded


def bwrap_status() -> tuple[str | None, str]:
    """(path to a working bwrap, "") or (None, why not)."""
    found, why = probe()
    return (found.path if found else None), why


@functools.lru_cache(maxsize=None)
def probe() -> tuple[Bwrap | None, str]:
    """A working bubblewrap, or (None, why not).  Runs it with the options the sandbox
    uses, so that an old or restricted bubblewrap counts as missing, with the reason."""
    path = shutil.which("bwrap")
    if path is None:
        return None, "bubblewrap not found"
    why = ""
    for sized in (True, False):
        ok, why = _probe(path, sized)
        if ok:
            return Bwrap(path, sized_tmpfs=sized), ""
    return None, f"bubblewrap does not work here ({why})"


def _probe(path: str, sized: bool) -> tuple[bool, str]:
    fds = [data_fd(b"probe\n"), data_fd(b"probe\n")]
    size = ["--size", str(2**20)] if sized else []
    cmd = ([path] + namespace_args() +
           ["--as-pid-1", "--hostname", "sandbox", "--ro-bind", "/", "/", "--proc", "/proc",
            "--dev", "/dev", "--perms", "1777"] + size +
           ["--tmpfs", "/tmp", "--perms", "0755", "--tmpfs", "/tmp/course",
            "--perms", "0444", "--file", str(fds[0]), "/tmp/course/f",
            "--remount-ro", "/tmp/course", "--ro-bind-data", str(fds[1]), "/tmp/course/f",
            "true"])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=20, pass_fds=fds)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, str(e)
    finally:
        for fd in fds:
            os.close(fd)
    lines = (proc.stderr or proc.stdout).strip().splitlines()
    return proc.returncode == 0, (lines[-1] if lines else f"exit code {proc.returncode}")


def sandbox_warning(reason: str) -> str:
    return (f"warning: {reason}: submissions run WITHOUT a sandbox (they can read and write "
            f"whatever this user can, including the gradebook and solutions/); resource "
            f"limits still apply. Install it with `apt-get install bubblewrap` (and allow "
            f"unprivileged user namespaces), or pass --no-sandbox to silence this warning.")


def namespace_args() -> list[str]:
    args = ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--die-with-parent", "--new-session"]
    if os.geteuid() != 0:
        args.insert(0, "--unshare-user")
    return args


def data_fd(data: bytes) -> int:
    """A descriptor holding ``data`` from offset 0 (for --file and --ro-bind-data)."""
    try:
        fd = os.memfd_create("paralab-sandbox", os.MFD_CLOEXEC)
    except (AttributeError, OSError):
        import tempfile
        fd, name = tempfile.mkstemp(prefix="paralab-sandbox-data-")
        os.unlink(name)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


# ---------------------------------------------------------------------------------------
# The Python environment


@dataclass(frozen=True)
class PythonView:
    """How the interpreter and its environment appear in the sandbox."""

    binds: tuple[tuple[str, str], ...]     # (host directory, path in the sandbox), read-only
    executable: str                         # the interpreter, as the sandbox sees it
    masks: tuple[tuple[str, bytes], ...] = field(default=())  # file in the sandbox -> text

    @property
    def bin_dir(self) -> str:
        return os.path.dirname(self.executable)


def _outside_usr(paths: set[str]) -> list[str]:
    out = []
    for p in sorted((p for p in paths if not (p in ("/", "/usr") or p.startswith("/usr/"))),
                    key=len):
        if not any(p == q or p.startswith(q + os.sep) for q in out):  # covered by q
            out.append(p)
    return out


@functools.lru_cache(maxsize=None)
def python_view(hidden: tuple[tuple[str, str], ...] = ()) -> PythonView:
    """The environment of this interpreter; a virtual environment is mounted at
    ``/sandbox/python``.  ``hidden``: (host path, what to show instead) replaced in the
    environment's files that spell out host paths."""
    venv = os.path.realpath(sys.prefix)
    base = {os.path.realpath(sys.base_prefix), os.path.realpath(sys.base_exec_prefix),
            os.path.dirname(os.path.realpath(sys.executable))}
    if venv in base or any(venv.startswith(b + os.sep) for b in base):
        # not a virtual environment (or one inside its base): everything at its own path
        dirs = _outside_usr(base | {venv})
        return PythonView(tuple((d, d) for d in dirs), sys.executable)
    for d in _outside_usr(base):
        if d == SANDBOX_ROOT or d.startswith(SANDBOX_ROOT + "/"):
            raise RuntimeError(f"the Python installation lives under {SANDBOX_ROOT}, which "
                               f"the sandbox uses for itself")
    binds = [(d, d) for d in _outside_usr(base) if not (d == venv or
                                                          d.startswith(venv + os.sep))]
    binds.append((venv, PYTHON_IN_SANDBOX))
    executable = os.path.join(PYTHON_IN_SANDBOX, "bin", os.path.basename(sys.executable))
    replace = [(venv, PYTHON_IN_SANDBOX)] + list(hidden)
    masks = []
    for rel in _path_files(venv):
        try:
            with open(os.path.join(venv, rel), "rb") as f:
                text = f.read(1 << 20)
        except OSError:
            continue
        new = text
        for host, shown in sorted(replace, key=lambda r: -len(r[0])):
            new = new.replace(host.encode(), shown.encode())
        if new != text:
            masks.append((os.path.join(PYTHON_IN_SANDBOX, rel), new))
    return PythonView(tuple(binds), executable, tuple(masks))


def _path_files(venv: str) -> list[str]:
    """Files of a virtual environment that record host paths: its configuration and the
    pointers of editable installs (``.pth``, ``__editable__`` finders, ``direct_url.json``,
    ``.egg-link``)."""
    out = ["pyvenv.cfg"]
    lib = os.path.join(venv, "lib")
    try:
        versions = [d for d in os.listdir(lib) if d.startswith("python")]
    except OSError:
        versions = []
    for v in versions:
        site = os.path.join("lib", v, "site-packages")
        try:
            names = os.listdir(os.path.join(venv, site))
        except OSError:
            continue
        for name in names:
            if name.endswith((".pth", ".egg-link")) or name.startswith("__editable__"):
                out.append(os.path.join(site, name))
            elif name.endswith(".dist-info"):
                out.append(os.path.join(site, name, "direct_url.json"))
    return out


# ---------------------------------------------------------------------------------------
# The command


def _parents(path: str) -> list[str]:
    parts = []
    head = os.path.dirname(path)
    while head and head != "/":
        parts.append(head)
        head = os.path.dirname(head)
    return list(reversed(parts))


def command(bw: Bwrap, limits: Limits, python: PythonView, course: list[tuple[str, str]],
            inner: list[str]) -> tuple[list[str], list[int]]:
    """The bwrap command running ``inner`` (whose interpreter is ``python.executable``),
    and the descriptors it reads its files from (pass them to the child, close them after).

    ``course``: (path relative to /sandbox/course, host file) of the code to copy in."""
    fds: list[int] = []
    cmd = [bw.path] + namespace_args() + ["--as-pid-1", "--hostname", "sandbox"]
    if os.geteuid() == 0:
        cmd += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    for top in ("usr", "lib", "lib32", "lib64", "libx32", "bin", "sbin"):
        host = "/" + top
        if os.path.islink(host):
            cmd += ["--symlink", os.readlink(host), host]
        elif os.path.isdir(host):
            cmd += ["--ro-bind", host, host]
    cmd += ["--ro-bind", "/etc", "/etc"]
    # torch.distributed resolves the host name: "sandbox" must resolve
    fds.append(data_fd(HOSTS.encode()))
    cmd += ["--perms", "0444", "--ro-bind-data", str(fds[-1]), "/etc/hosts"]
    cmd += ["--proc", "/proc", "--dev", "/dev"]
    made = {"/", "/usr", "/etc", "/proc", "/dev"}

    def tmpfs(path: str, size_mb: int, perms: str) -> None:
        for parent in _parents(path):
            mkdir(parent)
        cmd.extend(["--perms", perms])
        if size_mb and bw.sized_tmpfs:
            cmd.extend(["--size", str(size_mb * 2**20)])
        cmd.extend(["--tmpfs", path])
        made.add(path)

    def mkdir(path: str) -> None:
        for parent in _parents(path) + [path]:
            if parent not in made:
                cmd.extend(["--perms", "0755", "--dir", parent])
                made.add(parent)

    tmpfs("/tmp", limits.tmp_size_mb, "1777")
    tmpfs(SANDBOX_ROOT, 1, "0755")
    for host, inside in python.binds:
        for parent in _parents(inside):
            mkdir(parent)
        cmd += ["--ro-bind", host, inside]
        made.add(inside)
    for inside, text in python.masks:
        fds.append(data_fd(text))
        cmd += ["--perms", "0444", "--ro-bind-data", str(fds[-1]), inside]
    tmpfs(COURSE_IN_SANDBOX, 0, "0755")
    try:
        for rel, host in course:
            inside = f"{COURSE_IN_SANDBOX}/{rel}"
            for parent in _parents(inside):
                mkdir(parent)
            fds.append(os.open(host, os.O_RDONLY | os.O_CLOEXEC))
            cmd += ["--perms", "0444", "--file", str(fds[-1]), inside]
    except OSError:
        for fd in fds:
            os.close(fd)
        raise
    cmd += ["--remount-ro", COURSE_IN_SANDBOX]
    # every user of the sandbox may write its work directory (the runner switches to the
    # sandbox uid as root); nothing else in it is writable but /tmp
    tmpfs(WORK_IN_SANDBOX, limits.work_size_mb, "0777")
    cmd += ["--remount-ro", SANDBOX_ROOT, "--chdir", "/", "--"]
    return cmd + inner, fds
