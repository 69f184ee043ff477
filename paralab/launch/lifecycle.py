"""The life of a world, from the parent's side: start the ranks, wait, collect, stop.

:func:`run` forks one process per rank from a ``forkserver`` (see the package docstring
for why), waits for every rank to leave a result or an error (polling the files described
in :mod:`paralab.launch.worker`), and kills every rank's process group before it returns,
whatever happened.  A world whose ranks could not connect is started again, a bounded
number of times, as :mod:`paralab.launch.rendezvous` explains.
"""

from __future__ import annotations

import datetime
import linecache
import logging
import multiprocessing as mp
import numbers
import os
import pickle
import shutil
import signal
import tempfile
import time
from multiprocessing.connection import wait as _wait_for_sentinels

import cloudpickle
import torch.distributed as dist

from . import diagnosis, rendezvous, worker
from .backend import resolve_backend
from .diagnosis import first_line, read_text

# Imported once by the forkserver, so that forking a worker costs milliseconds instead of
# an `import torch` each.  Only what workers use (and only third-party modules: a preloaded
# copy of the course's own modules would go stale when they are edited under a running
# notebook).  `torch._dynamo` (with SymPy, ~1.3 s) is there because a rank's first backward
# and its first optimizer import it: nearly every world of the course runs both, and paying
# it once in the forkserver instead of once per rank takes a third off the CPU time of the
# course's notebooks.  A world that never runs a backward pays it for nothing, once per
# process; bench/bench_launch.py measures both sides.  DTensor and pipelining, which only
# some exercises use, are then imported by the workers that need them in ~0.03 s.
PRELOAD = ["torch", "torch.distributed", "cloudpickle", "torch._dynamo"]

GRACE_S = 2.0       # after a rank fails, how long the others get to fail or finish on their own
POLL_S = 0.05       # how often the parent looks for result/error files

log = logging.getLogger("paralab.launch")

# Tests only: attempt (1-based) -> {rank: (delay_s, message)}.  That rank of that attempt
# fails after joining, as gloo does under load (see rendezvous.join).
_JOIN_FAULTS: dict[int, dict[int, tuple[float, str]]] = {}

_preloaded = False


class _Retry:
    """A world that failed to join and may be started again; ``record`` says why."""

    def __init__(self, record: dict):
        self.record = record


class _JoinFailed:
    """What _supervise saw: a rank could not connect while joining (``record``)."""

    def __init__(self, record: dict, errors: dict, elapsed: float):
        self.record, self.errors, self.elapsed = record, errors, elapsed


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
    still running at ``timeout``.  No worker process outlives the call.  When the ranks
    could not connect to each other (a transient failure on a loaded machine) and none has
    started fn, the world is started again, up to ``rendezvous.ATTEMPTS`` times in all,
    with a warning on the ``paralab.launch`` logger; fn runs exactly once on every rank.
    """
    _check_args(fn, world_size, timeout)
    world_size = int(world_size)
    timeout = float(timeout)
    backend = resolve_backend(backend, world_size)
    try:
        payload = cloudpickle.dumps((fn, args, kwargs))
    except Exception as e:
        raise TypeError(f"run() sends fn and its arguments to the workers by value with "
                        f"cloudpickle, and this failed: {type(e).__name__}: {e}") from e

    tmp = tempfile.mkdtemp(prefix="paralab-run-")
    try:
        cfg = {"payload": os.path.join(tmp, "payload.pkl"), "backend": backend,
               "timeout": timeout, "debug": bool(debug), "parent": os.getpid(),
               "env": dict(os.environ), "sources": _interactive_sources()}
        with open(cfg["payload"], "wb") as f:
            f.write(payload)
        failed_joins: list[dict] = []
        for attempt in range(1, rendezvous.ATTEMPTS + 1):
            outcome = _world(attempt, world_size, tmp, cfg, echo, failed_joins)
            if not isinstance(outcome, _Retry):
                return outcome
            failed_joins.append(outcome.record)
            rec = outcome.record
            log.warning("paralab.launch: rank %d could not join the process group (%s: %s); "
                        "no rank had started fn, so the world is started again (attempt %d "
                        "of %d)", rec["rank"], rec["type"], first_line(rec["message"]),
                        attempt + 1, rendezvous.ATTEMPTS)
        raise AssertionError("unreachable: the last attempt never asks for another")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _world(attempt: int, world_size: int, tmp: str, cfg: dict, echo: bool,
           failed_joins: list[dict]):
    """Start one world and see it through: its results, an exception raised, or _Retry."""
    d = os.path.join(tmp, f"attempt{attempt}")
    os.mkdir(d)
    timeout = cfg["timeout"]
    can_retry = attempt < rendezvous.ATTEMPTS
    notes = []
    if failed_joins:
        notes.append(f"run() started this world {attempt} times; each earlier attempt failed "
                     f"while joining the process group (first: {failed_joins[0]['type']}: "
                     f"{first_line(failed_joins[0]['message'])}).")
    procs: list = []
    killed: set[int] = set()
    store = dist.TCPStore("127.0.0.1", 0, None, True, timeout=datetime.timedelta(seconds=timeout),
                          wait_for_workers=False)
    try:
        cfg = dict(cfg, dir=d, port=store.port, join_faults=_JOIN_FAULTS.get(attempt, {}))
        ctx = _context()
        for r in range(world_size):
            p = ctx.Process(target=worker.main, args=(r, world_size, cfg),
                            name=f"paralab-rank{r}")
            p.start()  # the first one in a Python process also starts the forkserver (~2 s)
            procs.append(p)
        start = time.monotonic()
        try:
            report = _supervise(procs, d, start, timeout, can_retry, notes)
        except KeyboardInterrupt:
            diagnosis.report_interrupt(procs, d)
            raise
        if isinstance(report, _JoinFailed):
            # Kill first, then look: once every rank is dead none can start fn any more.
            _kill_all(procs, killed)
            started = [r for r in range(world_size)
                       if os.path.exists(os.path.join(d, f"rank{r}.fn"))]
            if not started:
                return _Retry(report.record)
            notes.append(f"The world was not started again because "
                         f"{diagnosis.ranks_text(started)} had already started loading fn.")
            errors = dict(report.errors)
            errors.update(_load_errors(d, [r for r in range(world_size) if r not in errors and
                                           os.path.exists(os.path.join(d, f"rank{r}.error"))]))
            report = diagnosis.diagnose(procs, d, errors, {}, report.elapsed, timeout,
                                        timed_out=False, notes=notes)
        outputs = {r: read_text(os.path.join(d, f"rank{r}.log")) for r in range(world_size)}
        if echo:
            _echo(outputs)
        if isinstance(report, Exception):
            report.outputs.update(outputs)
            raise report
        return report
    finally:
        _stop(procs, killed)
        del store


def _supervise(procs, d: str, start: float, timeout: float, can_retry: bool, notes: list):
    """Wait for the world to finish; return the results, the exception to raise, or (when
    ``can_retry``) _JoinFailed as soon as a rank reports a connection failure while joining."""
    n = len(procs)
    deadline = start + timeout
    failed_at = None        # monotonic time at which the first failure was seen
    all_done_at = None      # every rank has written its result
    exit_seen = {}          # rank -> wall time at which we saw it exit without a record
    errors: dict[int, dict] = {}
    path = lambda r, kind: os.path.join(d, f"rank{r}.{kind}")  # noqa: E731
    while True:
        now = time.monotonic()
        # Exit codes first, files second: a rank writes its result or error file before it
        # exits, so a rank seen exited here has its file by the time we look for it (the
        # other order reads "no file yet" then "exited", a clean rank taken for a crash).
        codes = [p.exitcode for p in procs]
        has_result = [os.path.exists(path(r, "result")) for r in range(n)]
        has_error = [os.path.exists(path(r, "error")) for r in range(n)]
        for r, c in enumerate(codes):
            if c is not None and not has_result[r] and not has_error[r] and r not in exit_seen:
                exit_seen[r] = time.time()
        if any(has_error) or exit_seen:
            failed_at = failed_at or now
        elif all(has_result):
            all_done_at = all_done_at or now
        if can_retry and any(has_error):
            errors.update(_load_errors(d, [r for r in range(n) if has_error[r] and r not in errors]))
            transient = rendezvous.transient_failure(errors.values())
            if transient is not None:
                return _JoinFailed(transient, errors, now - start)
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

    elapsed = time.monotonic() - start
    errors.update(_load_errors(d, [r for r in range(n)
                                   if r not in errors and os.path.exists(path(r, "error"))]))
    if not errors and not exit_seen and all(os.path.exists(path(r, "result")) for r in range(n)):
        out = []
        for r in range(n):
            with open(path(r, "result"), "rb") as f:
                out.append(pickle.load(f))
        return out
    return diagnosis.diagnose(procs, d, errors, exit_seen, elapsed, timeout,
                              timed_out=failed_at is None, notes=notes)


def _load_errors(d: str, ranks) -> dict[int, dict]:
    out = {}
    for r in ranks:
        with open(os.path.join(d, f"rank{r}.error"), "rb") as f:
            out[r] = pickle.load(f)
    return out


def warm_up() -> None:
    """Start the process that :func:`run` forks workers from, and return at once: its
    imports (seconds) then happen while the caller does something else, instead of when
    the first world starts.  Nothing to do where workers are spawned, or when it runs."""
    ctx = _context()
    if ctx.get_start_method() == "forkserver":
        from multiprocessing import forkserver
        forkserver.ensure_running()


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


def _kill_group(pid: int | None, sig=signal.SIGKILL) -> None:
    if pid is None:
        return
    for kill in (os.killpg, os.kill):  # group first; the pid alone if setsid had not run yet
        try:
            kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _kill_all(procs, killed: set[int]) -> None:
    """Kill every rank's process group (grandchildren included) and wait for the ranks.

    ``killed`` holds the ranks already killed: their pids are not signalled twice (once
    reaped, a pid may belong to another process)."""
    for r, p in enumerate(procs):
        if r not in killed:
            _kill_group(p.pid)
            killed.add(r)
    for p in procs:
        p.join(5.0)


def _stop(procs, killed: set[int]) -> None:
    """Kill every rank and release its process object."""
    _kill_all(procs, killed)
    for p in procs:
        try:
            p.close()
        except ValueError:
            pass


def _echo(outputs: dict[int, str]) -> None:
    lines = [f"[rank {r}] {line}" for r in sorted(outputs)
             for line in outputs[r].splitlines()]
    if lines:
        print("\n".join(lines), flush=True)
