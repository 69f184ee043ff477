"""A Megatron-style Transformer layer in plain torch: the model whose memory lecture 04 counts.

One pre-LayerNorm layer, laid out as in Megatron-LM (activations are ``(s, b, h)``:
sequence, microbatch, hidden)::

    x -> LayerNorm -> QKV -> scores = Q K^T / sqrt(d) -> softmax -> dropout -> @ V
      -> output projection -> dropout -> + x
      -> LayerNorm -> Linear(h, 4h) -> GeLU -> Linear(4h, h) -> dropout -> + (residual)

Every operation is a plain ``torch.nn.functional`` call, so what autograd keeps for backward
is exactly what PyTorch's own kernels keep -- which :func:`paralab.memory.saved_tensors`
measures and :mod:`paralab.memory` derives term by term (Korthikanti et al. 2022).

Parallelism and recomputation are options of the same layer, so one code path is measured
in every configuration:

* **tensor parallelism** (``tp=t``, run on the ``t`` ranks of ``group``): :func:`shard` gives
  a rank its slice -- ``a/t`` heads of the fused QKV (column-parallel), the matching rows
  of the output projection (row-parallel), ``4h/t`` columns of the first MLP linear and rows
  of the second.  LayerNorms, dropouts after the two blocks and the residual stream stay
  replicated; Megatron's ``f``/``g`` come from :mod:`paralab.tp`.
* **sequence parallelism** (``sequence_parallel=True``, Korthikanti et al. §4.2.2): the
  replicated regions are split along the *sequence* instead; entering a tensor-parallel
  block all-gathers the sequence, leaving it reduce-scatters.  As in Megatron, the linear
  after the all-gather keeps its *shard* of the input and gathers it again in the
  backward, so no rank ever stores the full sequence.
* **recomputation** (``recompute``): ``"selective"`` re-runs the attention core (the part
  quadratic in ``s``: scores, softmax, dropout, ``@ V``) in the backward; ``"full"`` keeps
  only the layer input and re-runs the whole layer.  Both use
  ``torch.utils.checkpoint``, which restores the RNG state so that the dropout masks of
  the re-run are the ones of the forward -- without that, the gradients would be wrong.

:class:`TransformerPipelineModel` cuts a stack of these layers into pipeline stages that
:func:`paralab.pipeline.run_pipeline` runs on real processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import comm, launch, tp

RECOMPUTE = ("none", "selective", "full")


# ---------------------------------------------------------------------------------------------
# Sequence parallelism: the two conjugate operators and the linear that keeps its shard
# ---------------------------------------------------------------------------------------------
def _reduce_scatter_sequence(x, group, phase):
    """Sum over the ranks, keep this rank's slice of the sequence (dim 0).  An all-reduce
    followed by a slice: the same result, on every backend (gloo has no reduce-scatter)."""
    total = comm.all_reduce(x, phase=phase, label="sequence", group=group)
    return comm.shard(total, 0, comm.rank(group), comm.world_size(group))


class _ScatterSequence(torch.autograd.Function):
    """Leave a tensor-parallel block: reduce-scatter along the sequence (the partial sums
    of the row-parallel linear become this rank's summed slice); backward all-gathers."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_sequence(x, group, "forward")

    @staticmethod
    def backward(ctx, grad):
        return comm.all_gather(grad, dim=0, phase="backward", label="sequence",
                               group=ctx.group), None


class _GatheredLinear(torch.autograd.Function):
    """``F.linear(all_gather(x_shard), W, b)`` that saves only ``x_shard``.

    Plain autograd would save the gathered input (the whole sequence) for the weight
    gradient; Megatron saves the shard and all-gathers it again in the backward -- a
    recomputation of communication that keeps the linear's input at ``sbh/t``."""

    @staticmethod
    def forward(ctx, x_shard, weight, bias, group):
        ctx.group = group
        ctx.save_for_backward(x_shard, weight)
        ctx.has_bias = bias is not None
        full = comm.all_gather(x_shard, dim=0, phase="forward", label="sequence", group=group)
        return F.linear(full, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x_shard, weight = ctx.saved_tensors
        full = comm.all_gather(x_shard, dim=0, phase="backward", label="sequence",
                               group=ctx.group)
        grad_full = grad @ weight
        grad_weight = grad.reshape(-1, grad.shape[-1]).t() @ full.reshape(-1, full.shape[-1])
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
        return _reduce_scatter_sequence(grad_full, ctx.group, "backward"), grad_weight, grad_bias, None


# ---------------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------------
class TransformerLayer(nn.Module):
    """One Megatron-style layer (see the module docstring); input and output ``(s, b, h)``
    (``(s/t, b, h)`` with sequence parallelism).

    ``hidden`` and ``heads`` are the *whole* layer's ``h`` and ``a``; with ``tp=t`` this
    module holds one rank's shard (build it with :func:`shard`)."""

    def __init__(self, hidden: int, heads: int, *, dropout: float = 0.1, tp: int = 1,
                 sequence_parallel: bool = False, recompute: str = "none", group=None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden size {hidden} is not divisible by the {heads} heads: "
                             f"each head gets hidden/heads features")
        if heads % tp:
            raise ValueError(f"{heads} heads cannot be split over tensor-parallel degree {tp}: "
                             f"each rank computes whole heads")
        if sequence_parallel and tp == 1:
            raise ValueError("sequence parallelism splits what tensor parallelism leaves "
                             "replicated: it needs tp > 1")
        if recompute not in RECOMPUTE:
            raise ValueError(f"unknown recompute {recompute!r}; choose from "
                             f"{', '.join(RECOMPUTE)}")
        self.hidden, self.heads, self.tp = hidden, heads, tp
        self.head_dim = hidden // heads
        self.local_heads = heads // tp
        self.dropout, self.sequence_parallel, self.recompute = dropout, sequence_parallel, recompute
        self.group = group
        local = hidden // tp
        kw = dict(dtype=dtype)
        self.ln1 = nn.LayerNorm(hidden, **kw)
        self.qkv = nn.Linear(hidden, 3 * local, **kw)       # column-parallel
        self.proj = nn.Linear(local, hidden, **kw)          # row-parallel
        self.ln2 = nn.LayerNorm(hidden, **kw)
        self.fc1 = nn.Linear(hidden, 4 * local, **kw)       # column-parallel
        self.fc2 = nn.Linear(4 * local, hidden, **kw)       # row-parallel

    # -- entering and leaving a tensor-parallel block -----------------------------------------
    def _column(self, x, linear):
        """A column-parallel linear on the block's (replicated or sequence-split) input."""
        if self.sequence_parallel:
            return _GatheredLinear.apply(x, linear.weight, linear.bias, self.group)
        if self.tp > 1:
            x = tp.copy_to_tp(x, self.group, "layer.input_grad")   # f
        return F.linear(x, linear.weight, linear.bias)

    def _row(self, x, linear):
        """A row-parallel linear: partial sums, summed over the ranks, then the bias once."""
        partial = F.linear(x, linear.weight)
        if self.sequence_parallel:
            partial = _ScatterSequence.apply(partial, self.group)
        elif self.tp > 1:
            partial = tp.reduce_from_tp(partial, self.group, "layer.output")  # g
        return partial + linear.bias

    # -- the attention core: the part recomputed by selective recomputation --------------------
    def _attention_core(self, q, k, v):
        """``dropout(softmax(Q K^T / sqrt(d))) @ V`` on ``(b a/t, s, d)`` heads.  Keeps, per
        the paper: Q and K (for the scores), the softmax output, the dropout mask, the
        dropout output and V (for ``@ V``): the ``5 a s^2 b`` term lives here."""
        scores = torch.baddbmm(torch.empty(q.shape[0], q.shape[1], k.shape[1], dtype=q.dtype,
                                           device=q.device),
                               q, k.transpose(1, 2), beta=0.0, alpha=1 / math.sqrt(self.head_dim))
        probs = F.dropout(F.softmax(scores, dim=-1), self.dropout, self.training)
        return torch.bmm(probs, v)

    def _attention_core_recomputed(self, q, k, v):
        """Selective recomputation: keep Q, K, V; re-run the core in the backward."""
        return checkpoint(self._attention_core, q, k, v, use_reentrant=False)

    def _attention(self, y):
        s, b = y.shape[0] * (self.tp if self.sequence_parallel else 1), y.shape[1]
        qkv = self._column(y, self.qkv)                          # (s, b, 3h/t), per head q|k|v
        qkv = qkv.view(s, b * self.local_heads, 3 * self.head_dim)
        q, k, v = (part.transpose(0, 1) for part in qkv.split(self.head_dim, dim=-1))
        if self.recompute == "selective":
            context = self._attention_core_recomputed(q, k, v)
        else:
            context = self._attention_core(q, k, v)
        context = context.transpose(0, 1).reshape(s, b, self.local_heads * self.head_dim)
        return self._row(context, self.proj)

    def _mlp(self, y):
        return self._row(F.gelu(self._column(y, self.fc1)), self.fc2)

    def _layer(self, x):
        h = (self.hidden,)
        x = x + F.dropout(self._attention(F.layer_norm(x, h, self.ln1.weight, self.ln1.bias)),
                          self.dropout, self.training)
        return x + F.dropout(self._mlp(F.layer_norm(x, h, self.ln2.weight, self.ln2.bias)),
                             self.dropout, self.training)

    def _layer_recomputed(self, x):
        """Full recomputation: keep the layer input only; re-run the layer in the backward."""
        return checkpoint(self._layer, x, use_reentrant=False)

    def forward(self, x):
        if self.recompute == "full" and torch.is_grad_enabled():
            return self._layer_recomputed(x)
        return self._layer(x)


def shard(layer: TransformerLayer, rank: int, tp_degree: int, *, sequence_parallel: bool = False,
          group=None, recompute: str | None = None) -> TransformerLayer:
    """Rank ``rank``'s tensor-parallel shard of a whole ``layer`` (same weights, sliced):
    ``a/t`` whole heads of the fused QKV and the matching inputs of the projection, ``4h/t``
    of the MLP's features; the LayerNorms and the row-parallel biases stay whole."""
    if layer.tp != 1:
        raise ValueError("shard a whole layer (tp=1), not a shard")
    weight = layer.qkv.weight
    part = TransformerLayer(layer.hidden, layer.heads, dropout=layer.dropout, tp=tp_degree,
                            sequence_parallel=sequence_parallel,
                            recompute=recompute or layer.recompute, group=group,
                            dtype=weight.dtype).to(weight.device)

    def rows(tensor):
        return comm.shard(tensor, 0, rank, tp_degree)

    with torch.no_grad():
        for name in ("ln1", "ln2"):
            getattr(part, name).load_state_dict(getattr(layer, name).state_dict())
        # heads are contiguous blocks of 3d rows (q|k|v of head 0, then head 1, ...)
        part.qkv.weight.copy_(rows(layer.qkv.weight))
        part.qkv.bias.copy_(rows(layer.qkv.bias))
        part.fc1.weight.copy_(rows(layer.fc1.weight))
        part.fc1.bias.copy_(rows(layer.fc1.bias))
        for name in ("proj", "fc2"):
            getattr(part, name).weight.copy_(comm.shard(getattr(layer, name).weight, 1, rank,
                                                        tp_degree))
            getattr(part, name).bias.copy_(getattr(layer, name).bias)
    part.train(layer.training)
    return part


def build_layers(num_layers: int, hidden: int, heads: int, *, seed: int = 0, **options):
    """``num_layers`` whole layers with weights drawn from ``seed`` (so every rank of a
    parallel run, and the single-process reference, start from the same weights)."""
    torch.manual_seed(seed)
    return [TransformerLayer(hidden, heads, **options) for _ in range(num_layers)]


# ---------------------------------------------------------------------------------------------
# Pipeline stages for paralab.pipeline.run_pipeline
# ---------------------------------------------------------------------------------------------
class _Stage(nn.Module):
    """Some layers of the stack.  The executor passes ``(microbatch, s*h)`` tensors between
    stages; a stage views them as ``(s, b, h)`` (a view: nothing is copied or saved)."""

    def __init__(self, layers, seq: int, hidden: int):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.seq, self.hidden = seq, hidden

    def forward(self, x):
        y = x.view(x.shape[0], self.seq, self.hidden).transpose(0, 1)
        for layer in self.layers:
            y = layer(y)
        return y.transpose(0, 1).reshape(x.shape[0], self.seq * self.hidden)


@dataclass(frozen=True)
class TransformerPipelineModel:
    """A stack of :class:`TransformerLayer` cut into pipeline stages, in the form
    :func:`paralab.pipeline.run_pipeline` takes (``build``, ``microbatches``, ``loss``,
    ``batch``, ``width``, ``torch_dtype``, like :class:`paralab.pipeline.PipelineModel`).

    ``batch`` sequences of ``seq`` tokens; a microbatch of ``b = batch/m`` sequences crosses
    the stages as a ``(b, seq*hidden)`` tensor."""

    seq: int = 8
    hidden: int = 16
    heads: int = 4
    layers_per_stage: int = 1
    batch: int = 16
    dropout: float = 0.1
    recompute: str = "none"
    seed: int = 0
    dtype: str = "float32"

    @property
    def width(self) -> int:
        return self.seq * self.hidden

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def build(self, num_stages: int) -> list[nn.Module]:
        layers = build_layers(num_stages * self.layers_per_stage, self.hidden, self.heads,
                              seed=self.seed, dropout=self.dropout, recompute=self.recompute,
                              dtype=self.torch_dtype)
        k = self.layers_per_stage
        return [_Stage(layers[i * k:(i + 1) * k], self.seq, self.hidden)
                for i in range(num_stages)]

    def data(self) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed + 1)
        shape = (self.batch, self.width)
        x = torch.randn(shape, generator=generator, dtype=self.torch_dtype)
        return x, torch.randn(shape, generator=generator, dtype=self.torch_dtype)

    def microbatches(self, m: int):
        if self.batch % m:
            raise ValueError(f"batch {self.batch} does not split into {m} equal microbatches")
        x, y = self.data()
        return list(x.chunk(m)), list(y.chunk(m))

    def loss(self, output, target, m: int):
        """Mean squared error / m, as :func:`paralab.pipeline.loss_fn`."""
        return ((output - target) ** 2).mean() / m


# ---------------------------------------------------------------------------------------------
# One tensor-parallel step on real processes
# ---------------------------------------------------------------------------------------------
def parallel_layer_step(rank: int, world_size: int, seq: int = 8, batch: int = 2,
                        hidden: int = 16, heads: int = 4, *, sequence_parallel: bool = False,
                        recompute: str = "none", dropout: float = 0.0, seed: int = 0,
                        dtype: str = "float64") -> dict:
    """Worker for :func:`paralab.launch.run`: one forward and backward of rank ``rank``'s
    shard of a layer built from ``seed`` (world size = TP degree).

    Returns this rank's ``output`` and ``input_grad`` (its sequence slice with SP), the
    ``grads`` of its parameters, the ``saved`` tensors (:func:`paralab.memory.saved_tensors`)
    and the ``whole`` layer's input, output gradient and state, so the caller can compare
    with one process running the whole layer."""
    from . import memory

    torch.manual_seed(seed)
    whole = TransformerLayer(hidden, heads, dropout=dropout, dtype=getattr(torch, dtype))
    x = torch.randn(seq, batch, hidden, dtype=whole.qkv.weight.dtype)
    grad_out = torch.randn_like(x)
    device = launch.device()
    part = shard(whole, rank, world_size, sequence_parallel=sequence_parallel,
                 recompute=recompute).to(device)
    if sequence_parallel:
        x, grad_out = (comm.shard(z, 0, rank, world_size) for z in (x, grad_out))
    x = x.to(device).requires_grad_()
    torch.manual_seed(seed + 1 + rank)  # dropout draws
    out, saved = memory.saved_tensors(part, x, parameters=part.parameters())
    out.backward(grad_out.to(device))
    return {"output": out.detach().cpu(), "input_grad": x.grad.cpu(),
            "grads": {n: q.grad.cpu() for n, q in part.named_parameters()}, "saved": saved}
