"""Collectives that keep an account of themselves.

Tensor parallelism is a trade: less memory and compute per rank for more communication.
To *see* the trade, every collective the course's layers issue goes through the wrappers
below, which do the real ``torch.distributed`` call and, while a :func:`record` block is
open, append a :class:`CollectiveRecord` saying what moved: which op, in the forward or the
backward pass, the shape and dtype of the full logical tensor, its size in bytes, and the
bytes each rank sends with the ring algorithm (what bandwidth actually pays for).

Ring traffic per rank for a tensor of N bytes on P ranks (defined once, in
:func:`paralab.formulas.collective_traffic`):

* all-reduce = reduce-scatter + all-gather: ``2 (P-1)/P * N``;
* all-gather or reduce-scatter alone: ``(P-1)/P * N``.

The log is a plain list held by the ``with`` block, not a process-group singleton; it is
thread-safe because on GPUs autograd runs backward functions on its own threads.

Every tensor handed to a collective must be on :func:`paralab.launch.device`, even in a
world of one rank where nothing is sent: NCCL only moves GPU tensors, and a CPU tensor in
GPU code would otherwise pass every test on one GPU and fail on the first machine with two.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Iterator

import torch
import torch.distributed as dist

from . import launch

PHASES = ("forward", "backward")

_lock = threading.Lock()
_active_logs: list["CommLog"] = []


@dataclass(frozen=True)
class CollectiveRecord:
    op: str            # "all_reduce" or "all_gather"
    phase: str         # "forward" or "backward"
    label: str         # what the tensor is, e.g. "linear2.output"
    shape: tuple       # shape of the full logical tensor (all-gather: its output)
    dtype: str
    elements: int      # elements of the full logical tensor
    bytes: int         # elements * bytes per element
    world_size: int

    @property
    def traffic_bytes(self) -> Fraction:
        """Bytes one rank sends with the ring algorithm (exact), priced by
        :func:`paralab.formulas.collective_traffic`."""
        # Imported here: SymPy costs ~0.4 s, which a worker that never prints a table
        # should not pay.
        from .formulas import collective_traffic
        value = collective_traffic(self.op, self.bytes, self.world_size)
        return Fraction(int(value.p), int(value.q))

    def as_dict(self) -> dict:
        d = asdict(self)
        d["traffic_bytes"] = float(self.traffic_bytes)
        return d


class CommLog:
    """The collectives issued while a :func:`record` block was open, in issue order."""

    def __init__(self, records=()) -> None:
        self.records: list[CollectiveRecord] = list(records)

    def __iter__(self):
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def table(self) -> str:
        """A readable table, one collective per line."""
        lines = [f"{'phase':<9} {'op':<14} {'tensor':<22} {'shape':<18} {'elements':>10} "
                 f"{'bytes':>10} {'ring bytes/rank':>15}"]
        for r in self.records:
            lines.append(f"{r.phase:<9} {r.op:<14} {r.label:<22} {str(tuple(r.shape)):<18} "
                         f"{r.elements:>10} {r.bytes:>10} {float(r.traffic_bytes):>15.0f}")
        if not self.records:
            lines.append("(no collectives)")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"CommLog({len(self.records)} collectives)"


@contextmanager
def record() -> Iterator[CommLog]:
    """Record every collective issued through this module inside the block.

    >>> with record() as log:
    ...     loss = model(x).sum(); loss.backward()
    >>> print(log.table())
    """
    log = CommLog()
    with _lock:
        _active_logs.append(log)
    try:
        yield log
    finally:
        with _lock:
            _active_logs.remove(log)


def _note(op: str, phase: str, label: str, full_shape, dtype: torch.dtype, world_size: int):
    if phase not in PHASES:
        raise ValueError(f"phase must be 'forward' or 'backward', got {phase!r}")
    if not _active_logs:
        return
    elements = 1
    for n in full_shape:
        elements *= int(n)
    entry = CollectiveRecord(op, phase, label, tuple(int(n) for n in full_shape),
                             str(dtype).replace("torch.", ""), elements,
                             elements * dtype.itemsize, world_size)
    with _lock:
        for log in _active_logs:
            log.records.append(entry)


def world_size(group=None) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def rank(group=None) -> int:
    return dist.get_rank(group) if dist.is_initialized() else 0


def check_device(tensor: torch.Tensor, op: str) -> None:
    """Refuse a tensor that is not on this rank's device (inside a world; outside one,
    nothing is communicated and any device will do)."""
    if not dist.is_initialized():
        return
    expected = launch.device()
    if tensor.device != expected:
        raise ValueError(
            f"{op} was handed a tensor on {tensor.device}, but this rank computes on "
            f"{expected} (paralab.launch.device()). Create every tensor of a distributed "
            f"exercise with device=launch.device(), or move it there with "
            f".to(launch.device()): NCCL only moves GPU tensors, and a world of one GPU "
            f"would hide the mistake (it sends nothing).")


def all_reduce(tensor: torch.Tensor, *, phase: str, label: str = "", group=None) -> torch.Tensor:
    """Sum ``tensor`` over the group; returns a new tensor (the input is not modified)."""
    check_device(tensor, "all_reduce")
    p = world_size(group)
    out = tensor.contiguous().clone()
    if p > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    _note("all_reduce", phase, label, out.shape, out.dtype, p)
    return out


def all_gather(tensor: torch.Tensor, *, dim: int = -1, phase: str, label: str = "",
               group=None) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along ``dim`` (rank order)."""
    check_device(tensor, "all_gather")
    p = world_size(group)
    tensor = tensor.contiguous()
    if p > 1:
        parts = [torch.empty_like(tensor) for _ in range(p)]
        dist.all_gather(parts, tensor, group=group)
        out = torch.cat(parts, dim=dim)
    else:
        out = tensor.clone()
    _note("all_gather", phase, label, out.shape, out.dtype, p)
    return out


def shard(tensor: torch.Tensor, dim: int, index: int, parts: int) -> torch.Tensor:
    """The ``index``-th of ``parts`` equal slices along ``dim`` (a clear error if uneven)."""
    size = tensor.shape[dim]
    if size % parts != 0:
        raise ValueError(f"cannot split dimension {dim} of size {size} into {parts} equal "
                         f"shards: tensor parallelism needs it divisible by the TP degree")
    step = size // parts
    return tensor.narrow(dim, index * step, step).contiguous()
