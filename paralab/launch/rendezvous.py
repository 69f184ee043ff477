"""Joining the process group: the only phase of a world that :func:`run` starts again.

On a busy machine gloo sometimes fails to connect its ranks (``Gloo connectFullMesh failed
... Connection closed by peer``; measured once in 60 starts of a 4-rank world on 2 busy
cores).  Nothing is wrong with the student's code then, and starting the world again works.
But repeating a world is only safe while no rank has run any of the user's code: ``fn`` must
run exactly once per rank.  Three rules make that hold:

* a rank joins *before* it unpickles ``fn`` and its arguments (unpickling can import the
  user's modules, which runs their code);
* after ``init_process_group`` returns, a rank waits at a gate in the world's store.  The
  last rank to join opens it; a rank whose join fails closes it.  So either every rank has
  joined and all may go on, or none goes on;
* before it loads ``fn``, a rank leaves a marker file; the parent repeats a world only if,
  once it has killed every rank, there is no marker (the gate makes this always true; the
  marker makes it checked, not assumed).

Only connection failures during the join are repeated, at most :data:`ATTEMPTS` times in
all, each logged.  A join that *times out* is not (it has already cost the whole timeout,
and usually means a rank is stuck, which :func:`run` reports).
"""

from __future__ import annotations

import datetime
import re
import time

import torch
import torch.distributed as dist

#: The phase name a rank reports while it joins (see :mod:`paralab.launch.worker`).
PHASE = "joining the process group"
#: How many times :func:`run` starts a world whose ranks could not connect.
ATTEMPTS = 3

_JOINED = "paralab/joined"
_GATE = "paralab/gate"
_GO, _ABORT = b"go", b"abort"

_TRANSIENT = re.compile(r"Connection closed by peer|Connection reset by peer|Connection refused|"
                        r"Connection aborted|Broken pipe|ECONNRESET|ECONNREFUSED|ECONNABORTED")
# gloo's connectFullMesh failures reach Python as RuntimeError.
_NETWORK_TYPES = {"RuntimeError", "DistError", "DistBackendError", "DistNetworkError",
                  "DistStoreError", "OSError", "ConnectionError", "ConnectionResetError",
                  "ConnectionRefusedError", "ConnectionAbortedError", "BrokenPipeError"}


class JoinAborted(RuntimeError):
    """Raised by a rank that joined when another rank of its world could not."""


def join(rank: int, world_size: int, cfg: dict) -> None:
    """Join the world's default process group, then wait until every rank has (worker side)."""
    timeout = datetime.timedelta(seconds=cfg["timeout"])
    if cfg["backend"] == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    store = dist.TCPStore("127.0.0.1", cfg["port"], None, False, timeout=timeout)
    opened = False
    try:
        dist.init_process_group(cfg["backend"], store=store, rank=rank, world_size=world_size,
                                timeout=timeout)
        fault = cfg.get("join_faults", {}).get(rank)
        if fault is not None:  # tests: fail like gloo under load, after the others joined
            delay, message = fault
            time.sleep(delay)
            raise dist.DistNetworkError(message)
        if store.add(_JOINED, 1) == world_size:
            store.set(_GATE, _GO)
            opened = True
    except BaseException:
        if not opened:
            try:
                store.set(_GATE, _ABORT)  # the ranks already at the gate stop at once
            except BaseException:  # noqa: BLE001 - the store may be what failed
                pass
        raise
    store.wait([_GATE])
    if store.get(_GATE) != _GO:
        raise JoinAborted("another rank could not join the process group, so this world "
                          "stops before running fn")


def transient_failure(records) -> dict | None:
    """The first record (by time) of a rank whose join failed on a connection, else None.

    ``records`` are the error records of :mod:`paralab.launch.worker` (dicts with
    ``type``, ``message``, ``phase``, ``time``)."""
    for rec in sorted(records, key=lambda r: r["time"]):
        if rec["phase"] == PHASE and rec["type"] in _NETWORK_TYPES \
                and _TRANSIENT.search(rec["message"]):
            return rec
    return None
