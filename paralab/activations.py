"""Activations held for backward, counted by how long autograd really keeps them.

A pipeline rank must keep, for every microbatch whose forward it has run and whose backward
it has not, what autograd saved during that forward -- and nothing longer.  Whether a
runtime does that is not visible in its own bookkeeping (a dict it empties, a counter it
decrements): a forgotten reference to a stage's output, with ``retain_graph=True``, keeps
the whole graph and every tensor it saved alive, whatever the bookkeeping says.

:class:`HeldActivations` therefore measures lifetimes.  While it watches, every tensor
autograd saves during a stage's forward (a saved-tensor *pack hook*) is wrapped in a small
holder that belongs to that forward call; autograd drops the holder when it frees the saved
tensor -- after the backward through it, or when the graph is no longer referenced -- and
the holder's finaliser tells the meter.  A forward call is *held* from its first saved
tensor until its last one is freed.  The peak number of forwards held at once is the peak
number of ``(microbatch, stage)`` activations a rank holds, the quantity
:attr:`paralab.timeline.Timeline.peak_activations` predicts (``m`` for GPipe, ``p - r`` for
1F1B); the bytes come along.  Parameters, which exist anyway, are not counted; nor is what
is saved outside a stage's forward (e.g. by the loss).

The meter only needs to see the stage modules being *called* (``stage(x)``: module hooks
mark the start and end of each forward); it also notes whether each forward's input
required a gradient, which a stage that receives its input from another one must (otherwise
its backward cannot produce the gradient to send back).

This module imports only torch, so that a rank of a multi-process test can use it without
paying for SymPy (:mod:`paralab.memory` has the formulas and the executor's own meter).
"""

from __future__ import annotations

import time
from typing import Iterable, Mapping

import torch
import torch.nn as nn


class _Forward:
    """One call of a stage's forward: how many of its saved tensors are alive."""

    __slots__ = ("stage", "alive")

    def __init__(self, stage):
        self.stage = stage
        self.alive = 0


class _Saved:
    """A tensor autograd saved, held on behalf of one forward call."""

    __slots__ = ("tensor", "forward", "nbytes", "meter", "__weakref__")

    def __init__(self, tensor, forward: _Forward, nbytes: int, meter: "HeldActivations"):
        self.tensor, self.forward, self.nbytes, self.meter = tensor, forward, nbytes, meter

    def __del__(self):
        self.meter._release(self)


class HeldActivations:
    """Watch ``stages`` (a mapping ``stage index -> module``, or modules) while in a
    ``with`` block: how many of their forward calls autograd still holds, and the bytes.

    ``current`` / ``peak``: forward calls held now / at most; ``current_bytes`` /
    ``peak_bytes`` likewise in bytes; ``over_time``: ``[(time.perf_counter(), held), ...]``
    at every change; ``forwards``: ``(stage, input requires grad)`` of each forward call
    seen, in order."""

    def __init__(self, stages: Mapping[int, nn.Module] | Iterable[nn.Module]):
        self.stages = dict(stages) if isinstance(stages, Mapping) else dict(enumerate(stages))
        self.parameter_ptrs = {q.data_ptr() for module in self.stages.values()
                               for q in module.parameters()}
        self.current = self.peak = 0
        self.current_bytes = self.peak_bytes = 0
        self.over_time: list[tuple[float, int]] = [(time.perf_counter(), 0)]
        self.forwards: list[tuple[int, bool]] = []
        self._open: list[_Forward] = []
        self._handles: list = []
        self._saving = None

    # -- watching ---------------------------------------------------------------------------
    def __enter__(self) -> "HeldActivations":
        for stage, module in self.stages.items():
            self._handles.append(module.register_forward_pre_hook(self._pre_hook(stage)))
            self._handles.append(module.register_forward_hook(self._post_hook))
        self._saving = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)
        self._saving.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._saving.__exit__(*exc)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._open.clear()

    def _pre_hook(self, stage):
        def hook(module, args):
            first = args[0] if args else None
            self.forwards.append((stage, bool(getattr(first, "requires_grad", False))))
            self._open.append(_Forward(stage))
        return hook

    def _post_hook(self, module, args, output):
        if self._open:
            self._open.pop()

    # -- saved tensors --------------------------------------------------------------------------
    def _pack(self, tensor: torch.Tensor):
        # Everything is kept detached: a node that saves its own output (tanh, softmax do)
        # would otherwise hold, through what the hook returns, the output that holds the
        # node -- a reference cycle that never frees the graph.
        if not self._open or tensor.data_ptr() in self.parameter_ptrs:
            return tensor.detach()
        forward = self._open[-1]
        nbytes = tensor.numel() * tensor.element_size()
        if forward.alive == 0:
            self.current += 1
            self.peak = max(self.peak, self.current)
        forward.alive += 1
        self.current_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        self.over_time.append((time.perf_counter(), self.current))
        return _Saved(tensor.detach(), forward, nbytes, self)

    def _release(self, saved: _Saved) -> None:
        forward = saved.forward
        forward.alive -= 1
        self.current_bytes -= saved.nbytes
        if forward.alive == 0:
            self.current -= 1
            self.over_time.append((time.perf_counter(), self.current))


def _unpack(packed):
    return packed.tensor if isinstance(packed, _Saved) else packed
