"""Megatron-style tensor parallelism, small enough to read in one sitting.

A linear layer ``Y = X W`` (math convention; ``nn.Linear`` stores ``W`` transposed) can be
split over P ranks in two ways:

* **column-parallel**: each rank holds ``W[:, cols_i]`` and computes ``Y_i = X W_i``, a
  slice of the output columns.  Needs the full input ``X`` on every rank.
* **row-parallel**: each rank holds ``W[rows_i, :]`` and computes ``X_i W_i`` from a slice
  of the input columns; the results are *partial sums*: ``Y = sum_i X_i W_i``.

Four autograd operators move data between "replicated" and "sharded" (Megatron calls the
first two f and g).  Each forward has the *conjugate* collective as its backward:

===================  ===================  ======================
operator             forward              backward
===================  ===================  ======================
``copy_to_tp`` (f)   identity             all-reduce
``reduce_from_tp``   all-reduce           identity
``gather_from_tp``   all-gather (last)    split (keep own slice)
``scatter_to_tp``    split (keep slice)   all-gather
===================  ===================  ======================

Why f's backward is an all-reduce: every rank used the same ``X`` for a different slice of
the output, so ``dL/dX`` is the *sum* of every rank's contribution.

The FFN ``Linear(d, 4d) -> GeLU -> Linear(4d, d)`` of the homework is cheapest as
column -> row: GeLU is elementwise, so it can run on column shards with no communication,
and the row-parallel second layer consumes exactly those shards.  One all-reduce forward
(of Z) and one backward (of dL/dX), each of B*S*d elements.  Row -> row must all-reduce the
partial sums *before* GeLU (GeLU(a + b) != GeLU(a) + GeLU(b)); column -> column must
all-gather Y before the second layer.  ``paralab.formulas`` derives all three costs.

Every collective goes through :mod:`paralab.comm`, so a ``with comm.record() as log:``
block shows exactly what moved.  The layers are built where their dense original lives
(or on ``device=``, as ``nn.Linear``); :func:`ffn_parity_run` builds on
:func:`paralab.launch.device`, so the same exercise runs under gloo and NCCL.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import comm, launch
from .layouts import check_variant


# ---------------------------------------------------------------------------------------------
# The four operators
# ---------------------------------------------------------------------------------------------
class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, label):
        ctx.group, ctx.label = group, label
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return comm.all_reduce(grad, phase="backward", label=ctx.label, group=ctx.group), None, None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, label):
        return comm.all_reduce(x, phase="forward", label=label, group=group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, label):
        ctx.group = group
        return comm.all_gather(x, dim=-1, phase="forward", label=label, group=group)

    @staticmethod
    def backward(ctx, grad):
        p = comm.world_size(ctx.group)
        return comm.shard(grad, -1, comm.rank(ctx.group), p), None, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, label):
        ctx.group, ctx.label = group, label
        return comm.shard(x, -1, comm.rank(group), comm.world_size(group))

    @staticmethod
    def backward(ctx, grad):
        full = comm.all_gather(grad, dim=-1, phase="backward", label=ctx.label, group=ctx.group)
        return full, None, None


def copy_to_tp(x, group=None, label="input"):
    """f: identity forward, all-reduce of the gradient backward."""
    return _CopyToTP.apply(x, group, label)


def reduce_from_tp(x, group=None, label="output"):
    """g: all-reduce forward (sum the partial results), identity backward."""
    return _ReduceFromTP.apply(x, group, label)


def gather_from_tp(x, group=None, label="output"):
    """All-gather the last dimension forward; keep this rank's slice of the gradient backward."""
    return _GatherFromTP.apply(x, group, label)


def scatter_to_tp(x, group=None, label="input"):
    """Keep this rank's slice of the last dimension forward; all-gather the gradient backward."""
    return _ScatterToTP.apply(x, group, label)


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------
class ColumnParallelLinear(nn.Module):
    """``Y_i = X W[:, cols_i] + b_i``: output features split over the ranks.

    ``gather_output=True`` all-gathers the shards so every rank gets the full ``Y``.
    Build it from a dense layer with :meth:`from_dense` to compare against the original."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True,
                 gather_output: bool = False, group=None, name: str = "linear",
                 device=None, dtype=None):
        super().__init__()
        p = comm.world_size(group)
        if out_features % p:
            raise ValueError(f"column-parallel: out_features={out_features} is not divisible "
                             f"by the tensor-parallel degree {p}")
        self.in_features, self.out_features = in_features, out_features
        self.gather_output, self.group, self.name = gather_output, group, name
        place = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features // p, in_features, **place))
        self.bias = nn.Parameter(torch.zeros(out_features // p, **place)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)

    @classmethod
    def from_dense(cls, dense: nn.Linear, *, gather_output: bool = False, group=None,
                   name: str = "linear") -> "ColumnParallelLinear":
        """This rank's shard of ``dense``, on ``dense``'s device and dtype."""
        layer = cls(dense.in_features, dense.out_features, bias=dense.bias is not None,
                    gather_output=gather_output, group=group, name=name,
                    device=dense.weight.device, dtype=dense.weight.dtype)
        p, r = comm.world_size(group), comm.rank(group)
        with torch.no_grad():  # nn.Linear stores W transposed: output features are rows
            layer.weight.copy_(comm.shard(dense.weight, 0, r, p))
            if layer.bias is not None:
                layer.bias.copy_(comm.shard(dense.bias, 0, r, p))
        return layer

    def forward(self, x):
        x = copy_to_tp(x, self.group, f"{self.name}.input_grad")
        y = F.linear(x, self.weight, self.bias)
        if self.gather_output:
            y = gather_from_tp(y, self.group, f"{self.name}.output")
        return y


class RowParallelLinear(nn.Module):
    """``Y = sum_i X_i W[rows_i, :] + b``: input features split over the ranks.

    With ``input_is_parallel=False`` the layer slices a replicated input itself (free
    forward, all-gather of the gradient backward).  The bias is added once, after the
    all-reduce, so it is not counted P times."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True,
                 input_is_parallel: bool = True, group=None, name: str = "linear",
                 device=None, dtype=None):
        super().__init__()
        p = comm.world_size(group)
        if in_features % p:
            raise ValueError(f"row-parallel: in_features={in_features} is not divisible by "
                             f"the tensor-parallel degree {p}")
        self.in_features, self.out_features = in_features, out_features
        self.input_is_parallel, self.group, self.name = input_is_parallel, group, name
        place = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features // p, **place))
        self.bias = nn.Parameter(torch.zeros(out_features, **place)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)

    @classmethod
    def from_dense(cls, dense: nn.Linear, *, input_is_parallel: bool = True, group=None,
                   name: str = "linear") -> "RowParallelLinear":
        """This rank's shard of ``dense``, on ``dense``'s device and dtype."""
        layer = cls(dense.in_features, dense.out_features, bias=dense.bias is not None,
                    input_is_parallel=input_is_parallel, group=group, name=name,
                    device=dense.weight.device, dtype=dense.weight.dtype)
        p, r = comm.world_size(group), comm.rank(group)
        with torch.no_grad():
            layer.weight.copy_(comm.shard(dense.weight, 1, r, p))
            if layer.bias is not None:
                layer.bias.copy_(dense.bias)
        return layer

    def forward(self, x):
        if not self.input_is_parallel:
            x = scatter_to_tp(x, self.group, f"{self.name}.input_grad")
        partial = F.linear(x, self.weight)
        y = reduce_from_tp(partial, self.group, f"{self.name}.output")
        return y + self.bias if self.bias is not None else y


# ---------------------------------------------------------------------------------------------
# The homework's FFN, dense and parallel
# ---------------------------------------------------------------------------------------------
class FFN(nn.Module):
    """The dense reference: ``Linear(d, 4d) -> GeLU -> Linear(4d, d)``."""

    def __init__(self, d: int, hidden: int | None = None):
        super().__init__()
        self.linear1 = nn.Linear(d, hidden or 4 * d)
        self.linear2 = nn.Linear(hidden or 4 * d, d)

    def forward(self, x):
        return self.linear2(F.gelu(self.linear1(x)))


_LAYERS = {"column": ColumnParallelLinear, "row": RowParallelLinear}


class ParallelFFN(nn.Module):
    """The FFN split over the ranks of ``group`` in one of the layouts of
    :data:`paralab.layouts.LAYOUTS`.

    * ``col-row`` (Megatron): column -> GeLU on shards -> row.  Output replicated.
    * ``row-row``: row (all-reduce *before* GeLU) -> GeLU -> row.  Output replicated.
    * ``col-col``: column (all-gather Y) -> GeLU -> column.  With ``gather_output`` the
      output is all-gathered again; without it each rank holds a column shard of Z.

    Each layer's input is what the layer before hands over: a row-parallel Linear2 after
    a column-parallel Linear1 consumes the column shards of Y as they are; after a
    replicated output it slices its input itself; a column-parallel Linear1 in front of
    another column-parallel layer gathers its output.
    """

    def __init__(self, dense: FFN, variant: str = "col-row", *, group=None,
                 gather_output: bool = True):
        super().__init__()
        first, second = check_variant(variant)
        self.variant = variant
        self.linear1 = self._layer(first, dense.linear1, "linear1", group,
                                   output_gathered=second == "column", input_sharded=False)
        self.linear2 = self._layer(second, dense.linear2, "linear2", group,
                                   output_gathered=gather_output, input_sharded=first == "column")

    @staticmethod
    def _layer(kind, dense, name, group, output_gathered, input_sharded):
        if kind == "column":
            return ColumnParallelLinear.from_dense(dense, gather_output=output_gathered,
                                                   group=group, name=name)
        return RowParallelLinear.from_dense(dense, input_is_parallel=input_sharded, group=group,
                                            name=name)

    def forward(self, x):
        return self.linear2(F.gelu(self.linear1(x)))


# ---------------------------------------------------------------------------------------------
# Parity with the dense FFN: what the tests, the lecture and the command line run
# ---------------------------------------------------------------------------------------------
def ffn_case(batch: int, seq: int, d: int, seed: int = 0, dtype=torch.float64, device=None):
    """The dense FFN, input ``X`` and target of a parity check: ``(dense, x, target)``.

    Drawn from ``seed`` on the CPU, in this order (``torch.manual_seed(seed)``, ``FFN(d)``,
    ``randn`` for X, ``randn`` for the target), so that every rank and the single-process
    reference get the same numbers whatever their device; then moved to ``device``."""
    torch.manual_seed(seed)
    dense = FFN(d).to(dtype)
    x = torch.randn(batch, seq, d, dtype=dtype)
    target = torch.randn(batch, seq, d, dtype=dtype)
    if device is not None:
        dense, x, target = dense.to(device), x.to(device), target.to(device)
    return dense, x, target


def dense_reference(batch: int, seq: int, d: int, seed: int = 0, dtype=torch.float64) -> dict:
    """One forward+backward of the dense FFN of :func:`ffn_case`, in this process (CPU).

    Returns ``output``, ``input_grad`` (dL/dX) and ``grads`` (parameter name -> gradient),
    the loss being ``sum((FFN(X) - target)^2)`` as in :func:`ffn_parity_run`."""
    dense, x, target = ffn_case(batch, seq, d, seed, dtype)
    x.requires_grad_(True)
    out = dense(x)
    ((out - target) ** 2).sum().backward()
    return {"output": out.detach(), "input_grad": x.grad.detach(),
            "grads": {name: p.grad.detach() for name, p in dense.named_parameters()}}


def ffn_parity_step(rank: int, world_size: int, variant: str = "col-row", batch: int = 2,
                    seq: int = 4, d: int = 8, seed: int = 0, dtype=torch.float64,
                    gather_output: bool = True) -> dict:
    """:func:`ffn_parity_run`, with every tensor left on :func:`paralab.launch.device`."""
    dense, x, target = ffn_case(batch, seq, d, seed, dtype, device=launch.device())
    model = ParallelFFN(dense, variant, gather_output=gather_output)
    sharded_output = variant == "col-col" and not gather_output
    if sharded_output:  # each rank owns the loss of its own columns of Z
        target = comm.shard(target, -1, rank, world_size)
    x.requires_grad_(True)
    with comm.record() as log:
        out = model(x)
        ((out - target) ** 2).sum().backward()
    full = comm.all_gather(out.detach(), phase="forward") if sharded_output else out.detach()
    return {
        "output": full,
        "input_grad": x.grad.detach(),
        "grads": {name: p.grad.detach() for name, p in model.named_parameters()},
        "records": log.records,
    }


def ffn_parity_run(rank: int, world_size: int, variant: str = "col-row", batch: int = 2,
                   seq: int = 4, d: int = 8, seed: int = 0, dtype=torch.float64,
                   gather_output: bool = True) -> dict:
    """Worker for ``paralab.launch.run``: one forward+backward of the parallel FFN.

    Every rank builds the dense FFN and input of :func:`ffn_case` on its device, shards it,
    runs one step under a communication log and returns its output, ``dL/dX``, its
    parameter gradients (copied to the CPU, to compare with :func:`dense_reference`) and
    the log."""
    result = ffn_parity_step(rank, world_size, variant, batch, seq, d, seed, dtype,
                             gather_output)
    result["output"] = result["output"].cpu()
    result["input_grad"] = result["input_grad"].cpu()
    result["grads"] = {name: g.cpu() for name, g in result["grads"].items()}
    return result
