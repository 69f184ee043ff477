"""The process of one rank: what it does between being forked and exiting.

A rank reports to the parent only through files in the world's private directory (the
parent polls for them), so that a rank that crashes, hangs or is killed still leaves what
it knew behind:

``rank{r}.log``      its stdout and stderr (C++ output included), unbuffered;
``rank{r}.stacks``   its Python stacks, written by faulthandler on SIGUSR1 (hang reports);
``rank{r}.fn``       a marker: the rank has started loading the user's code;
``rank{r}.result``   its return value (cloudpickle), once fn has returned;
``rank{r}.error``    a record of the exception it raised, and in which phase.
"""

from __future__ import annotations

import ctypes
import faulthandler
import io
import linecache
import os
import pickle
import select
import signal
import sys
import threading
import time
import traceback

import cloudpickle
import torch
import torch.distributed as dist

from . import rendezvous

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _die_with_parent() -> None:
    """SIGKILL this process when the process that called run() dies, even by SIGKILL.

    Two mechanisms: a thread that waits on a pidfd of the caller and then kills this rank's
    whole process group (grandchildren included), and, should that thread not get the GIL,
    the kernel's parent-death signal.  The latter fires when our parent, the forkserver,
    exits; the forkserver exits when the caller is gone and no process holds its "alive"
    pipe, so the copy of that pipe that every forkserver child inherits is closed here (it
    is only ever used by the forkserver's own client, which this process is not)."""
    from multiprocessing import forkserver
    server = getattr(forkserver, "_forkserver", None)
    fd = getattr(server, "_forkserver_alive_fd", None)
    if isinstance(fd, int):
        try:
            os.close(fd)
        except OSError:
            pass
        server._forkserver_alive_fd = None
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # it died before the prctl took effect
        os.killpg(0, signal.SIGKILL)


def _watch_caller(pid: int) -> None:
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        fd = None
    if fd is not None:
        select.select([fd], [], [])  # readable once the process has exited; no polling
    else:
        while _alive(pid):
            time.sleep(0.5)
    os.killpg(0, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def write_atomically(path: str, data: bytes) -> None:
    # The parent polls for these files: it must never see half of one.
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _user_traceback(exc: BaseException) -> str:
    tb = exc.__traceback__
    # Drop the frames of this package above the user's function, when there are any below.
    t = tb
    while t is not None and os.path.abspath(t.tb_frame.f_code.co_filename).startswith(
            _PACKAGE_DIR):
        t = t.tb_next
    if t is not None:
        tb = t
    return "".join(traceback.format_exception(type(exc), exc, tb))


def _capture_output(d: str, rank: int):
    log = io.FileIO(os.path.join(d, f"rank{rank}.log"), "w")
    os.dup2(log.fileno(), 1)  # C++ output (gloo, NCCL warnings) lands in the log as well
    os.dup2(log.fileno(), 2)
    # Unbuffered: what a rank printed before it hung or was killed must be in the file.
    for name, fd in (("stdout", 1), ("stderr", 2)):
        setattr(sys, name, io.TextIOWrapper(io.FileIO(fd, "w", closefd=False), encoding="utf-8",
                                            errors="backslashreplace", line_buffering=True,
                                            write_through=True))
    faulthandler.enable(file=log)  # a segfault leaves its Python stack in the output
    stacks = open(os.path.join(d, f"rank{rank}.stacks"), "w")
    stacks.write(f"main thread 0x{threading.get_ident():x}\n")
    stacks.flush()
    faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
    return log, stacks


def main(rank: int, world_size: int, cfg: dict) -> None:
    """Target of the process of every rank (a child of the forkserver)."""
    d = cfg["dir"]
    # Own session and process group: the parent kills the group, grandchildren included.
    # Also out of the terminal's foreground group: Ctrl-C is for the caller to handle.
    os.setsid()
    _die_with_parent()
    threading.Thread(target=_watch_caller, args=(cfg["parent"],), daemon=True,
                     name="paralab-watch-caller").start()
    _files = _capture_output(d, rank)  # noqa: F841 - kept open until os._exit

    # The forkserver froze its environment when it started; use the caller's current one.
    os.environ.clear()
    os.environ.update(cfg["env"])
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size))
    if cfg["debug"]:
        os.environ["TORCH_DISTRIBUTED_DEBUG"] = "DETAIL"
    # torch read TORCH_DISTRIBUTED_DEBUG when the forkserver imported it: read it again.
    dist.set_debug_level_from_env()
    torch.set_num_threads(1)
    linecache.cache.update(cfg["sources"])  # notebook cells, for readable tracebacks

    code, phase = 1, rendezvous.PHASE
    try:
        rendezvous.join(rank, world_size, cfg)
        # From here on the user's code may run (unpickling can import the user's modules):
        # say so before, so that the parent never starts this world again.
        phase = "loading fn and its arguments"
        write_atomically(os.path.join(d, f"rank{rank}.fn"), b"")
        with open(cfg["payload"], "rb") as f:
            fn, args, kwargs = pickle.load(f)
        phase = "running fn"
        result = fn(rank, world_size, *args, **kwargs)
        phase = "sending the result back"
        try:
            data = cloudpickle.dumps(result)
        except Exception as e:
            raise TypeError(f"fn returned a value that cannot be pickled and sent back to "
                            f"the parent ({type(result).__name__}): {e}") from e
        write_atomically(os.path.join(d, f"rank{rank}.result"), data)
        code = 0
    except BaseException as e:  # noqa: BLE001 - SystemExit and KeyboardInterrupt included
        record = {"rank": rank, "time": time.time(), "type": type(e).__name__,
                  "message": str(e), "phase": phase, "traceback": _user_traceback(e)}
        write_atomically(os.path.join(d, f"rank{rank}.error"), pickle.dumps(record))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()  # a clean slate for the next world
            except BaseException:  # noqa: BLE001
                pass
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
    # Skip interpreter teardown: a non-daemon thread left by fn must not keep us alive.
    os._exit(code)
