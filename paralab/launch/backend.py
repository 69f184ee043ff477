"""Which backend a world uses, and which device its ranks compute on.

The course runs the same worker code on a laptop (gloo, CPU) and on GPUs (NCCL).  That only
works if no worker hard-codes a device: every tensor a distributed exercise creates goes on
:func:`device`, and :mod:`paralab.comm` refuses a tensor that is elsewhere.  Without that
check a CPU tensor in GPU code goes unnoticed on one GPU (a 1-rank all-reduce is skipped)
and only fails on a machine with several.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

BACKENDS = ("auto", "gloo", "nccl")

#: Environment variable that names the device of gloo ranks explicitly.  ``cuda`` puts
#: them on the GPU (rank ``LOCAL_RANK`` on GPU ``LOCAL_RANK % count``): gloo all-reduces
#: and all-gathers CUDA tensors (not send/recv), so tensor-parallel code can be checked
#: on one GPU with several ranks.  ``meta`` is a dry run of a 1-rank world: shapes and
#: placement without data.  Unset: the CPU.  Under NCCL the device is always the rank's GPU.
DEVICE_ENV = "PARALAB_DEVICE"


def resolve_backend(backend: str, world_size: int, local_world_size: int | None = None) -> str:
    """'auto' means NCCL when every local rank can have a GPU of its own, else gloo."""
    if backend not in BACKENDS:
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
    """The device this rank should compute on: its own GPU under NCCL, else the CPU
    (or what ``PARALAB_DEVICE`` names, see :data:`DEVICE_ENV`).

    Call it inside the worker function (``x = torch.randn(4, device=device())``)."""
    backend = dist.get_backend() if dist.is_available() and dist.is_initialized() else None
    wanted = os.environ.get(DEVICE_ENV, "").strip()
    if backend == "nccl":
        if wanted and _parse(wanted).type != "cuda":
            raise ValueError(f"{DEVICE_ENV}={wanted} but this world runs NCCL, which only "
                             f"moves CUDA tensors: unset {DEVICE_ENV} or use backend='gloo'")
        return torch.device("cuda", torch.cuda.current_device())
    if not wanted:
        return torch.device("cpu")
    chosen = _parse(wanted)
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{DEVICE_ENV}={wanted} but no CUDA GPU is visible")
        if chosen.index is None:
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            chosen = torch.device("cuda", local_rank % torch.cuda.device_count())
    return chosen


def _parse(text: str) -> torch.device:
    try:
        return torch.device(text)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"{DEVICE_ENV}={text!r} is not a device torch knows (e.g. cpu, cuda, "
                         f"cuda:1, meta): {e}") from e
