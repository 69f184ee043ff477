"""Running the same worker function under ``torchrun`` (``env://`` rendezvous), e.g. on GPUs.

:func:`run` starts its own processes; torchrun starts them for us, one per GPU, on one
machine or several.  :func:`from_env` is the adapter: it joins the process group torchrun
describes in the environment, calls ``fn(rank, world_size, *args)`` as :func:`run` would,
and tears the group down.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from .backend import resolve_backend

_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def under_torchrun() -> bool:
    """Was this process started by torchrun (or anything that sets its variables)?"""
    return all(k in os.environ for k in _TORCHRUN_VARIABLES)


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
    if not under_torchrun():
        raise RuntimeError("from_env() runs inside processes started by torchrun (RANK, "
                           "WORLD_SIZE, MASTER_ADDR and MASTER_PORT are not set). Start the "
                           "script with `torchrun --standalone --nproc-per-node N script.py`, "
                           "or use paralab.launch.run(fn, N) to start local processes.")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    backend = resolve_backend(backend, world_size, local_world)
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
