"""Activation memory: measured with saved-tensor hooks, predicted with formulas.

Pipeline schedules differ less in time than in memory: a rank must keep the activations of
every microbatch whose forward it has run and whose backward it has not, and *what* it
keeps per microbatch is what autograd saves for backward.  Two tools:

* :class:`SavedTensorMeter` counts the bytes autograd saves while a block runs (via
  ``torch.autograd.graph.saved_tensors_hooks``), so the executor can report, per rank, how
  many bytes were held over time and at the peak.
* :func:`transformer_layer_activations` gives Korthikanti et al. 2022's per-layer counts
  (Eq. 1-6 of "Reducing Activation Recomputation in Large Transformer Models") so a
  notebook can scale the measured "microbatches in flight" to a real model:
  peak bytes on rank r = in-flight microbatches(r) x layers per stage x bytes per layer.
"""

from __future__ import annotations

from typing import Iterable

import sympy as sp
import torch

s, b, h, a, t, L = sp.symbols("s b h a t L", positive=True)


class SavedTensorMeter:
    """Counts bytes autograd saves for backward, excluding parameters (they exist anyway
    and are not activations).  ``change`` keeps a running total, its peak and a history."""

    def __init__(self, parameters: Iterable[torch.Tensor] = ()):
        self.parameter_ptrs = {p.data_ptr() for p in parameters}
        self.current = 0
        self.peak = 0
        self.over_time = [(0.0, 0)]

    def hooks(self, sizes: list):
        """Context manager: append the size in bytes of every saved tensor to ``sizes``."""
        def pack(tensor):
            if tensor.data_ptr() not in self.parameter_ptrs:
                sizes.append(tensor.numel() * tensor.element_size())
            return tensor
        return torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)

    def change(self, delta: int, now: float) -> None:
        self.current += delta
        self.peak = max(self.peak, self.current)
        self.over_time.append((now, self.current))


def transformer_layer_activations(strategy: str = "none"):
    """Bytes of activations one transformer layer keeps for backward (16-bit activations).

    ``s`` sequence length, ``b`` microbatch size, ``h`` hidden size, ``a`` attention heads,
    ``t`` tensor-parallel degree.  Strategies (Korthikanti et al. 2022):

    * ``none``: ``s b h (34 + 5 a s / h)`` -- the ``5as/h`` term is the attention scores,
      softmax and its dropout mask, quadratic in ``s``;
    * ``tp``: tensor parallelism shards attention and the MLP but not the layer norms and
      dropouts: ``s b h (10 + 24/t + 5 a s / (h t))``;
    * ``tp+sp``: sequence parallelism shards those too: ``s b h (34 + 5 a s / h) / t``;
    * ``tp+sp+selective``: also recompute the attention core: ``34 s b h / t``;
    * ``full-recompute``: keep only the layer input: ``2 s b h``.
    """
    table = {
        "none": s * b * h * (34 + 5 * a * s / h),
        "tp": s * b * h * (10 + 24 / t + 5 * a * s / (h * t)),
        "tp+sp": s * b * h * (34 + 5 * a * s / h) / t,
        "tp+sp+selective": 34 * s * b * h / t,
        "full-recompute": 2 * s * b * h,
    }
    try:
        return table[strategy]
    except KeyError:
        raise ValueError(f"unknown strategy {strategy!r}; choose from {', '.join(table)}")


def pipeline_peak_bytes(in_flight: int, layers_per_stage, per_layer_bytes):
    """Peak activation bytes on a rank holding ``in_flight`` microbatches' activations."""
    return in_flight * layers_per_stage * per_layer_bytes
