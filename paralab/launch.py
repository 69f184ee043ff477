"""Start a torch.distributed world of N local processes from a notebook, a script or a test.

Every multi-process example of the course goes through :func:`run`::

    from paralab.launch import run
    import torch, torch.distributed as dist

    def work(rank, world_size, scale):
        t = torch.tensor([float(rank)]) * scale
        dist.all_reduce(t)                     # the default process group is ready
        print("sum is", t.item())              # echoed in the parent as "[rank r] sum is ..."
        return t

    run(work, 4, 2.0)                          # -> [tensor([12.]), tensor([12.]), ...]

``run`` exists because the plain tools fail students in ways that teach nothing: ``spawn``
cannot pickle a function defined in a notebook and takes ~7 s per world on the course
machines; ``fork`` hangs in the first matmul once the parent has used an OpenMP pool; child
output goes to the Jupyter server's terminal instead of the cell; a rank that raises makes
the others fail with "Connection closed by peer", which hides the real error; a rank that
never reaches a collective hangs the notebook forever.  ``run`` instead

* serialises ``fn`` and its arguments by value with cloudpickle, so notebook functions,
  closures and lambdas work;
* forks workers from a ``forkserver`` that has torch already imported (~2 s for the first
  4-rank world of a Python process, ~0.2 s for the next ones, against 3-9 s for every
  world with ``spawn`` on the course machines: ``bench/bench_launch.py``), each worker with
  one intra-op thread (N ranks x default threads on 2 cores are 30-70x slower);
* meets at a ``TCPStore`` that the parent opens on a port the OS chooses (no port races);
* returns every rank's return value *by value* (pickled through a private temporary
  directory), tensors included, in rank order;
* echoes each rank's stdout/stderr in the parent, prefixed ``[rank r]``;
* on failure raises :class:`WorkerError` naming the rank that failed *first* with its own
  traceback, and on a hang raises :class:`WorkerTimeout` saying where each rank is stuck;
  no worker, or process started by a worker, outlives the call.

The same worker function also runs under ``torchrun`` (``env://`` rendezvous), e.g. on GPUs.
From the command line, for a module ``mymod.py`` (on ``PYTHONPATH`` or in the current
directory) that defines ``work(rank, world_size, *args)``::

    # one machine, CPU, 4 local processes started by run():
    python -m paralab.launch mymod:work --world-size 4

    # the same under torchrun (one machine):
    torchrun --standalone --nproc-per-node 4 -m paralab.launch mymod:work

    # two machines with 8 GPUs each (run on both; HOST is the first machine):
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m paralab.launch mymod:work

Extra command-line arguments are passed after ``world_size``; each is converted with
``ast.literal_eval`` when it is a Python literal (``3``, ``0.5``, ``"[1, 2]"``) and passed as a
string otherwise.  Options: ``--world-size N`` (default 2; under torchrun the world is
torchrun's and a different N is refused), ``--backend {auto,gloo,nccl}``, ``--timeout S``.
In a script of your own, call :func:`from_env` under torchrun instead of :func:`run`.

Rules worth knowing
-------------------
* Arguments are copied to every rank (pickled by value); mutating them in a worker does not
  change the parent's objects.  Return what you need.  Everything passed or returned must be
  picklable by cloudpickle (tensors, modules, dicts of them, functions: yes; open files,
  locks, generators, CUDA streams: no).  CUDA tensors come back as CUDA tensors; return
  ``t.cpu()`` if the parent should not touch the GPU.
* Functions from importable modules are pickled by reference and re-imported in the
  workers (with the parent's ``sys.path`` and working directory); functions defined in a
  notebook or in ``__main__`` are pickled by value, with the globals they use.
* Workers see the parent's ``os.environ`` as it is when ``run`` is called, plus
  ``OMP_NUM_THREADS=1``, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE``.
* Every call starts fresh processes: nothing a rank sets up survives into the next call.
  The process group is destroyed when fn returns or raises.
* In a script, call ``run`` under ``if __name__ == "__main__":`` (as with multiprocessing:
  the worker processes import the main module).  Likewise a function from a test module is
  imported by every worker, with pytest; ``cloudpickle.register_pickle_by_value(module)``
  sends the module's functions by value instead, which makes each world ~0.1 s faster.
* ``timeout`` also bounds every collective (it is the process group's timeout), so raise it
  for long runs.  :class:`WorkerTimeout` is a subclass of :class:`WorkerError`, itself a
  ``RuntimeError``: ``except WorkerError`` catches both.
"""

from __future__ import annotations

import ast
import ctypes
import datetime
import faulthandler
import importlib
import io
import linecache
import multiprocessing as mp
import numbers
import os
import pickle
import re
import select
import shutil
import signal
import sys
import sysconfig
import tempfile
import threading
import time
import traceback
from multiprocessing.connection import wait as _wait_for_sentinels

import cloudpickle
import torch
import torch.distributed as dist

__all__ = ["run", "from_env", "device", "WorkerError", "WorkerTimeout", "main"]

# Imported once by the forkserver, so that forking a worker costs milliseconds instead of
# an `import torch` each.  Only torch modules: they never change under a running notebook,
# whereas a preloaded copy of the course's own modules would go stale when they are edited.
# dtensor and pipelining cost ~0.5 s each to import; paid once here, not once per world.
PRELOAD = ["torch", "torch.distributed", "torch.distributed.tensor",
           "torch.distributed.pipelining", "cloudpickle"]

GRACE_S = 2.0       # after a rank fails, how long the others get to fail or finish on their own
DUMP_WAIT_S = 1.0   # after SIGUSR1, how long a hung rank gets to write its stacks
POLL_S = 0.05       # how often the parent looks for result/error files
OUTPUT_TAIL = 20    # lines of a rank's output quoted in an error message

_THIS_FILE = os.path.abspath(__file__)
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_TORCH_DIST_DIR = os.path.join(_TORCH_DIR, "distributed") + os.sep
_STDLIB_DIRS = tuple({os.path.abspath(sysconfig.get_paths()[k]) + os.sep
                      for k in ("stdlib", "platstdlib")})


class WorkerError(RuntimeError):
    """A rank of a :func:`run` world failed.

    ``rank`` is the rank that failed first (ranks that only failed because a peer vanished
    or timed out are passed over); ``tracebacks`` maps every rank that raised to its
    traceback text, ``outputs`` every rank to its captured stdout+stderr.
    """

    def __init__(self, message: str, rank: int, tracebacks: dict[int, str],
                 outputs: dict[int, str]):
        super().__init__(message)
        self.rank = rank
        self.tracebacks = tracebacks
        self.outputs = outputs


class WorkerTimeout(WorkerError):
    """Ranks of a :func:`run` world were still running when it had to stop them.

    ``ranks`` lists them; ``rank`` is the most likely culprit (a running rank that is not
    waiting inside torch.distributed, else the lowest); ``stacks`` maps each of them to the
    Python stacks it reported just before it was killed.
    """

    def __init__(self, message: str, rank: int, ranks: list[int], stacks: dict[int, str],
                 tracebacks: dict[int, str], outputs: dict[int, str]):
        super().__init__(message, rank, tracebacks, outputs)
        self.ranks = ranks
        self.stacks = stacks


# --------------------------------------------------------------------------------------
# Backend and device


def _resolve_backend(backend: str, world_size: int, local_world_size: int | None = None) -> str:
    """'auto' means NCCL when every local rank can have a GPU of its own, else gloo."""
    if backend not in ("auto", "gloo", "nccl"):
        raise ValueError(f"backend must be 'auto', 'gloo' or 'nccl', not {backend!r}")
    local = world_size if local_world_size is None else local_world_size
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if backend == "auto":
        return "nccl" if gpus >= local and gpus > 0 else "gloo"
    if backend == "nccl" and gpus < local:
        raise ValueError(
            f"backend='nccl' needs one CUDA GPU per local rank: {local} local ranks but "
            f"{gpus} GPU(s) visible. Use backend='gloo' (CPU) or backend='auto'.")
    return backend


def device() -> torch.device:
    """The device this rank should compute on: its own GPU under NCCL, else the CPU.

    Call it inside the worker function (``x = torch.randn(4, device=device())``)."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --------------------------------------------------------------------------------------
# The worker side


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


def _write_atomically(path: str, data: bytes) -> None:
    # The parent polls for these files: it must never see half of one.
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _user_traceback(exc: BaseException) -> str:
    tb = exc.__traceback__
    # Drop the frames of this module above the user's function, when there are any below.
    t = tb
    while t is not None and os.path.abspath(t.tb_frame.f_code.co_filename) == _THIS_FILE:
        t = t.tb_next
    if t is not None:
        tb = t
    return "".join(traceback.format_exception(type(exc), exc, tb))


def _worker(rank: int, world_size: int, cfg: dict) -> None:
    """Target of the process of every rank (a child of the forkserver)."""
    d = cfg["dir"]
    # Own session and process group: the parent kills the group, grandchildren included.
    # Also out of the terminal's foreground group: Ctrl-C is for the caller to handle.
    os.setsid()
    _die_with_parent()
    threading.Thread(target=_watch_caller, args=(cfg["parent"],), daemon=True,
                     name="paralab-watch-caller").start()
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

    code, phase = 1, "loading fn and its arguments"
    try:
        with open(os.path.join(d, "payload.pkl"), "rb") as f:
            fn, args, kwargs = pickle.load(f)
        phase = "joining the process group"
        timeout = datetime.timedelta(seconds=cfg["timeout"])
        if cfg["backend"] == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        store = dist.TCPStore("127.0.0.1", cfg["port"], None, False, timeout=timeout)
        dist.init_process_group(cfg["backend"], store=store, rank=rank, world_size=world_size,
                                timeout=timeout)
        phase = "running fn"
        result = fn(rank, world_size, *args, **kwargs)
        phase = "sending the result back"
        try:
            data = cloudpickle.dumps(result)
        except Exception as e:
            raise TypeError(f"fn returned a value that cannot be pickled and sent back to "
                            f"the parent ({type(result).__name__}): {e}") from e
        _write_atomically(os.path.join(d, f"rank{rank}.result"), data)
        code = 0
    except BaseException as e:  # noqa: BLE001 - SystemExit and KeyboardInterrupt included
        record = {"rank": rank, "time": time.time(), "type": type(e).__name__,
                  "message": str(e), "phase": phase, "traceback": _user_traceback(e)}
        _write_atomically(os.path.join(d, f"rank{rank}.error"), pickle.dumps(record))
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


# --------------------------------------------------------------------------------------
# The parent side

_preloaded = False


def _context():
    global _preloaded
    if "forkserver" not in mp.get_all_start_methods():  # not Linux or macOS
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    if not _preloaded:
        # Has an effect only if no forkserver is running yet in this process.
        ctx.set_forkserver_preload(PRELOAD)
        _preloaded = True
    return ctx


def _interactive_sources() -> dict:
    """linecache entries of code that has no file (notebook cells), to ship to workers."""
    out = {}
    for name, entry in list(linecache.cache.items()):
        if len(entry) == 4 and entry[1] is None and not os.path.exists(name):
            out[name] = entry
    return out


def _check_args(fn, world_size, timeout):
    if not callable(fn):
        raise TypeError(f"run() needs a function to call on every rank as "
                        f"fn(rank, world_size, *args, **kwargs); got {type(fn).__name__} "
                        f"{fn!r:.80}")
    if isinstance(world_size, bool) or not isinstance(world_size, numbers.Integral) \
            or world_size < 1:
        raise ValueError(f"world_size must be a whole number of processes >= 1, "
                         f"not {world_size!r}")
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")


def _read_text(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "backslashreplace")
    except OSError:
        return ""


def _kill_group(pid: int | None, sig=signal.SIGKILL) -> None:
    if pid is None:
        return
    for kill in (os.killpg, os.kill):  # group first; the pid alone if setsid had not run yet
        try:
            kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _stop(procs) -> None:
    """Kill every rank's process group (grandchildren included) and reap the ranks."""
    for p in procs:
        _kill_group(p.pid)
    for p in procs:
        p.join(5.0)
        try:
            p.close()
        except ValueError:
            pass


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def run(fn, world_size, *args, backend="auto", timeout=60.0, debug=False, echo=True,
        **kwargs) -> list:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` fresh processes.

    Each process has an initialised default process group (``torch.distributed``) of
    ``world_size`` ranks.  Returns the ranks' return values, in rank order.

    backend: "auto" (NCCL when there is a CUDA GPU per rank, else gloo), "gloo" or "nccl".
    timeout: seconds the ranks may run (counted once their processes exist, so the
        one-off forkserver start is not included); also the process group's timeout.
        Past it every rank is stopped and :class:`WorkerTimeout` says where the ranks
        still running were stuck.
    debug: set ``TORCH_DISTRIBUTED_DEBUG=DETAIL`` in the workers: collectives whose
        shapes or order differ across ranks then fail at once with PyTorch's description.
    echo: print each rank's captured stdout/stderr afterwards, lines prefixed ``[rank r] ``.

    Raises :class:`WorkerError` when a rank fails and :class:`WorkerTimeout` when ranks are
    still running at ``timeout``.  No worker process outlives the call.
    """
    _check_args(fn, world_size, timeout)
    world_size = int(world_size)
    timeout = float(timeout)
    backend = _resolve_backend(backend, world_size)
    try:
        payload = cloudpickle.dumps((fn, args, kwargs))
    except Exception as e:
        raise TypeError(f"run() sends fn and its arguments to the workers by value with "
                        f"cloudpickle, and this failed: {type(e).__name__}: {e}") from e

    tmp = tempfile.mkdtemp(prefix="paralab-run-")
    procs: list = []
    store = None
    try:
        with open(os.path.join(tmp, "payload.pkl"), "wb") as f:
            f.write(payload)
        store = dist.TCPStore("127.0.0.1", 0, None, True,
                              timeout=datetime.timedelta(seconds=timeout),
                              wait_for_workers=False)
        cfg = {"dir": tmp, "port": store.port, "backend": backend, "timeout": timeout,
               "debug": bool(debug), "parent": os.getpid(), "env": dict(os.environ),
               "sources": _interactive_sources()}
        ctx = _context()
        for r in range(world_size):
            p = ctx.Process(target=_worker, args=(r, world_size, cfg), name=f"paralab-rank{r}")
            p.start()  # the first one in a Python process also starts the forkserver (~2 s)
            procs.append(p)
        start = time.monotonic()
        try:
            report = _supervise(procs, tmp, start, timeout)
        except KeyboardInterrupt:
            _on_interrupt(procs, tmp)
            raise
        outputs = {r: _read_text(os.path.join(tmp, f"rank{r}.log")) for r in range(world_size)}
        if echo:
            _echo(outputs)
        if isinstance(report, Exception):
            report.outputs.update(outputs)
            raise report
        return report
    finally:
        _stop(procs)
        del store
        shutil.rmtree(tmp, ignore_errors=True)


def _echo(outputs: dict[int, str]) -> None:
    lines = [f"[rank {r}] {line}" for r in sorted(outputs)
             for line in outputs[r].splitlines()]
    if lines:
        print("\n".join(lines), flush=True)


def _supervise(procs, tmp: str, start: float, timeout: float):
    """Wait for the world to finish; return the results or the exception to raise."""
    n = len(procs)
    deadline = start + timeout
    failed_at = None        # monotonic time at which the first failure was seen
    all_done_at = None      # every rank has written its result
    exit_seen = {}          # rank -> wall time at which we saw it exit without a record
    path = lambda r, kind: os.path.join(tmp, f"rank{r}.{kind}")  # noqa: E731
    while True:
        now = time.monotonic()
        has_result = [os.path.exists(path(r, "result")) for r in range(n)]
        has_error = [os.path.exists(path(r, "error")) for r in range(n)]
        codes = [p.exitcode for p in procs]
        for r, c in enumerate(codes):
            if c is not None and not has_result[r] and not has_error[r] and r not in exit_seen:
                exit_seen[r] = time.time()
        if any(has_error) or exit_seen:
            failed_at = failed_at or now
        elif all(has_result):
            all_done_at = all_done_at or now
        running = [r for r in range(n) if codes[r] is None]
        if not running:
            break
        if all_done_at is not None and now - all_done_at >= GRACE_S:
            break                       # results are in; a rank stuck on its way out is killed
        if failed_at is not None and now - failed_at >= GRACE_S:
            break
        if now >= deadline:
            break
        _wait_for_sentinels([procs[r].sentinel for r in running],
                            max(0.0, min(POLL_S, deadline - now)))

    now = time.monotonic()
    elapsed = now - start
    codes = [p.exitcode for p in procs]
    errors = {}
    for r in range(n):
        if os.path.exists(path(r, "error")):
            with open(path(r, "error"), "rb") as f:
                errors[r] = pickle.load(f)
    if not errors and not exit_seen and all(os.path.exists(path(r, "result")) for r in range(n)):
        out = []
        for r in range(n):
            with open(path(r, "result"), "rb") as f:
                out.append(pickle.load(f))
        return out

    # Ranks neither finished nor failed: ask them where they are before they are killed.
    stuck = [r for r in range(n) if codes[r] is None and r not in errors
             and not os.path.exists(path(r, "result"))]
    stacks = _dump_stacks(procs, stuck, tmp)
    outputs = {r: _read_text(path(r, "log")) for r in range(n)}
    tracebacks = {r: e["traceback"] for r, e in errors.items()}
    culprits = [(_is_victim(e), e["time"], r, e) for r, e in errors.items()]
    for r, t in exit_seen.items():
        culprits.append((False, t, r, None))
    culprits.sort(key=lambda c: c[:3])
    if stuck and (not culprits or culprits[0][0]):
        # Nothing failed on its own: ranks are hung (and any failures only waited for them).
        return _timeout_error(stuck, stacks, elapsed, timeout, errors, tracebacks, outputs,
                              timed_out=failed_at is None)
    if not culprits:  # not reachable as far as we know; never hide a failure though
        return WorkerError("the world ended without results from every rank", 0, tracebacks,
                           outputs)
    _, _, rank, rec = culprits[0]
    if rec is None:
        return WorkerError(_exit_message(rank, codes[rank], tmp, outputs, errors, stuck, stacks),
                           rank, tracebacks, outputs)
    finished = [r for r in range(n) if os.path.exists(path(r, "result"))]
    return WorkerError(_error_message(rank, rec, errors, stuck, stacks, outputs, finished),
                       rank, tracebacks, outputs)


_VICTIM_PATTERNS = re.compile(
    r"Connection closed by peer|Connection reset by peer|Broken pipe|Socket Timeout|"
    r"[Tt]imed out|[Tt]imeout|ECONNRESET|ECONNREFUSED|Connection refused|"
    r"NCCL communicator was aborted|has been aborted|the remote peer")
_VICTIM_TYPES = {"RuntimeError", "DistError", "DistBackendError", "DistNetworkError",
                 "DistStoreError", "OSError", "ConnectionError", "ConnectionResetError",
                 "BrokenPipeError", "TimeoutError"}


def _is_victim(rec: dict) -> bool:
    """Did this rank fail only because a peer vanished or never came (a consequence)?"""
    return rec["type"] in _VICTIM_TYPES and bool(_VICTIM_PATTERNS.search(rec["message"]))


def _tail(text: str, lines: int = OUTPUT_TAIL) -> str:
    rows = text.rstrip("\n").splitlines()
    return "\n".join(rows[-lines:])


def _others_summary(culprit: int, errors: dict, stuck: list, stacks: dict) -> list[str]:
    out = []
    victims = sorted(r for r, e in errors.items() if r != culprit and _is_victim(e))
    own = sorted(r for r, e in errors.items() if r != culprit and not _is_victim(e))
    if victims:
        out.append(f"{_ranks(victims)} then failed waiting for a peer that had gone "
                   f"(a consequence; their tracebacks are in .tracebacks).")
    for r in own:
        out.append(f"rank {r} also raised {errors[r]['type']}: "
                   f"{_first_line(errors[r]['message'])}")
    for r in stuck:
        out.append(f"rank {r} was still running and was stopped at: {_where(stacks.get(r, ''))}")
    return out


def _first_line(text: str) -> str:
    text = text.strip()
    return text.splitlines()[0][:300] if text else ""


def _ranks(rs) -> str:
    rs = sorted(rs)
    return f"rank {rs[0]}" if len(rs) == 1 else "ranks " + ", ".join(map(str, rs))


def _error_message(rank, rec, errors, stuck, stacks, outputs, finished) -> str:
    head = f"rank {rank} raised {rec['type']}: {_first_line(rec['message'])}"
    if rec["phase"] != "running fn":
        head += f" (while {rec['phase']})"
    parts = [head]
    parts += _others_summary(rank, errors, stuck, stacks)
    if _is_victim(rec) and finished:
        parts.append(f"{_ranks(finished)} returned from fn and exited while rank {rank} still "
                     f"waited for {'it' if len(finished) == 1 else 'them'}: the ranks did not "
                     f"run the same collectives (number, order or sizes). run(..., debug=True) "
                     f"makes PyTorch check every collective across ranks.")
    parts.append(f"\n--- rank {rank} traceback ---\n{rec['traceback'].rstrip()}")
    if outputs.get(rank, "").strip():
        parts.append(f"--- rank {rank} output (last {OUTPUT_TAIL} lines) ---\n"
                     f"{_tail(outputs[rank])}")
    return "\n".join(parts)


def _exit_message(rank, code, tmp, outputs, errors, stuck, stacks) -> str:
    if code is not None and code < 0:
        how = f"was killed by {_signal_name(code)}"
        if code == -signal.SIGKILL:
            how += " (out of memory?)"
    else:
        how = f"exited with code {code}"
    if not os.path.exists(os.path.join(tmp, f"rank{rank}.log")):
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
    parts = [head] + _others_summary(rank, errors, stuck, stacks)
    if outputs.get(rank, "").strip():
        parts.append(f"--- rank {rank} output (last {OUTPUT_TAIL} lines) ---\n"
                     f"{_tail(outputs[rank])}")
    return "\n".join(parts)


# --------------------------------------------------------------------------------------
# Hangs: where is each rank stuck?

_FRAME = re.compile(r'^\s*File "(?P<file>.*)", line (?P<line>\d+) in (?P<func>.*?)\s*$')
_THREAD = re.compile(r"^(?:Current thread|Thread) (0x[0-9a-fA-F]+)")


def _dump_stacks(procs, ranks: list[int], tmp: str) -> dict[int, str]:
    """SIGUSR1 makes faulthandler write every thread's Python stack (works even while the
    rank sits in C++ or ignores SIGINT); wait briefly for the dumps."""
    if not ranks:
        return {}
    paths = {r: os.path.join(tmp, f"rank{r}.stacks") for r in ranks}
    before = {r: len(_read_text(p)) for r, p in paths.items()}
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
            size = len(_read_text(paths[r]))
            if size > before[r] and last.get(r) == size:  # grew, then stopped growing
                waiting.discard(r)
            last[r] = size
            if procs[r].exitcode is not None:
                waiting.discard(r)
    return {r: _read_text(paths[r]) for r in ranks}


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
    return p == _THIS_FILE or p.startswith(_TORCH_DIR) or p.startswith(_STDLIB_DIRS)


def _short(path: str) -> str:
    p = os.path.abspath(path)
    if p.startswith(_TORCH_DIR):
        return "torch/" + p[len(_TORCH_DIR):]
    return path


def _in_distributed(stack_text: str) -> bool:
    frames = _main_frames(stack_text)
    return bool(frames) and os.path.abspath(frames[0][0]).startswith(_TORCH_DIST_DIR)


def _where(stack_text: str, callers: int = 0) -> str:
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


def _timeout_error(stuck, stacks, elapsed, timeout, errors, tracebacks, outputs, timed_out):
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
                f"{_ranks(waited)} gave up waiting for a peer (see .tracebacks)")
    parts = [head, "where each rank is stuck:"]
    for r in stuck:
        parts.append(f"  rank {r} stuck at: {_where(stacks.get(r, ''), callers=2)}")
    if in_dist and elsewhere:
        parts.append(f"{_ranks(in_dist)} {'is' if len(in_dist) == 1 else 'are'} waiting inside "
                     f"torch.distributed for {_ranks(elsewhere)}, which never joined: every "
                     f"rank must call the same collectives in the same order, and every send "
                     f"needs a matching recv.")
    elif in_dist:
        parts.append("every running rank is waiting inside torch.distributed: a collective "
                     "that not all ranks reached, collectives called in different orders, or "
                     "send/recv pairs waiting on each other (e.g. both ranks recv first).")
    for r in stuck:
        if outputs.get(r, "").strip():
            parts.append(f"--- rank {r} output (last {OUTPUT_TAIL} lines) ---\n"
                         f"{_tail(outputs[r])}")
    return WorkerTimeout("\n".join(parts), culprit, list(stuck), stacks, tracebacks, outputs)


def _on_interrupt(procs, tmp: str) -> None:
    """The caller pressed stop: say where the ranks were, then let run() kill them."""
    try:
        alive = [r for r, p in enumerate(procs) if p.exitcode is None]
        stacks = _dump_stacks(procs, alive, tmp)
        if alive:
            lines = [f"paralab.launch: interrupted; stopping {_ranks(alive)}. They were at:"]
            lines += [f"  rank {r}: {_where(stacks.get(r, ''), callers=1)}" for r in alive]
            print("\n".join(lines), file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        pass


# --------------------------------------------------------------------------------------
# torchrun


def _torchrun_env() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def from_env(fn, *args, backend="auto", timeout=None, debug=False, **kwargs):
    """Run ``fn(rank, world_size, *args, **kwargs)`` in a process started by ``torchrun``.

    Initialises the default process group from torchrun's environment (``env://``), calls
    fn, destroys the group and returns fn's value (for this rank only).  ``timeout`` in
    seconds for collectives (None: PyTorch's default).  With NCCL each process uses GPU
    ``LOCAL_RANK``.
    """
    if not callable(fn):
        raise TypeError(f"from_env() needs a function fn(rank, world_size, *args); got "
                        f"{type(fn).__name__} {fn!r:.80}")
    if not _torchrun_env():
        raise RuntimeError("from_env() runs inside processes started by torchrun (RANK, "
                           "WORLD_SIZE, MASTER_ADDR and MASTER_PORT are not set). Start the "
                           "script with `torchrun --standalone --nproc-per-node N script.py`, "
                           "or use paralab.launch.run(fn, N) to start local processes.")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    backend = _resolve_backend(backend, world_size, local_world)
    if debug:
        os.environ["TORCH_DISTRIBUTED_DEBUG"] = "DETAIL"
        dist.set_debug_level_from_env()
    if backend == "nccl":
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    extra = {} if timeout is None else {"timeout": datetime.timedelta(seconds=timeout)}
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size,
                            **extra)
    try:
        return fn(rank, world_size, *args, **kwargs)
    finally:
        dist.destroy_process_group()


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


_USAGE = """usage: python -m paralab.launch MODULE:FUNCTION [--world-size N] [--backend B]
                                [--timeout S] [ARG ...]
Calls FUNCTION(rank, world_size, *ARGS) on every rank and prints each rank's result.
Under torchrun the world is torchrun's; otherwise N local processes (default 2) are started.
ARGs are Python literals where they parse as one (3, 0.5, "[1,2]"), else strings."""


def main(argv: list[str] | None = None) -> int:
    """Command line: see the module docstring."""
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = {"--world-size": None, "--backend": "auto", "--timeout": None}
    target, rest, i = None, [], 0
    while i < len(argv):
        a = argv[i]
        key, _, inline = a.partition("=")
        if a in ("-h", "--help"):
            print(_USAGE)
            return 0
        if key in opts:
            if inline:
                opts[key] = inline
            elif i + 1 < len(argv):
                opts[key] = argv[i + 1]
                i += 1
            else:
                print(f"{key} needs a value\n{_USAGE}", file=sys.stderr)
                return 2
        elif a == "--":
            rest += argv[i + 1:]
            break
        elif target is None:
            target = a
        else:
            rest.append(a)
        i += 1
    if target is None or ":" not in target:
        print(f"expected MODULE:FUNCTION as first argument, got {target!r}\n{_USAGE}",
              file=sys.stderr)
        return 2
    module_name, _, func_name = target.partition(":")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # `python -m` has it; torchrun -m may not
    fn = importlib.import_module(module_name)
    for part in func_name.split("."):
        fn = getattr(fn, part)
    args = [_literal(a) for a in rest]
    timeout = None if opts["--timeout"] is None else float(opts["--timeout"])

    if _torchrun_env():
        ws = int(os.environ["WORLD_SIZE"])
        if opts["--world-size"] is not None and int(opts["--world-size"]) != ws:
            print(f"--world-size {opts['--world-size']} disagrees with torchrun's WORLD_SIZE="
                  f"{ws}; under torchrun the world size is torchrun's (--nnodes x "
                  f"--nproc-per-node).", file=sys.stderr)
            return 2
        result = from_env(fn, *args, backend=opts["--backend"], timeout=timeout)
        print(f"[rank {os.environ['RANK']}] returned {result!r}", flush=True)
        return 0
    ws = 2 if opts["--world-size"] is None else int(opts["--world-size"])
    try:
        results = run(fn, ws, *args, backend=opts["--backend"],
                      timeout=60.0 if timeout is None else timeout)
    except WorkerError as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return 1
    for r, result in enumerate(results):
        print(f"[rank {r}] returned {result!r}", flush=True)
    return 0


if __name__ == "__main__":
    # Run the imported paralab.launch, not this __main__ copy, so that workers and user code
    # share one module.
    from paralab.launch import main as _main
    sys.exit(_main())
