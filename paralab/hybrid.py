"""Hybrid parallelism: data x pipeline x tensor parallelism on one device mesh, trained for real.

``dp * pp * tp`` processes form a ``torch.distributed.DeviceMesh`` (:mod:`paralab.mesh`), and
each kind of parallelism gets its own process group from it, passed explicitly to the code
that communicates:

* the **tensor-parallel** group to the layers of :mod:`paralab.tp`: each block of the model
  is lecture 01's FFN, column -> row over the ``tp`` ranks of the group;
* the **pipeline** group to the executor of :mod:`paralab.interpreter`: the ``pp`` ranks of
  the group run the stages of a schedule (1F1B by default), sending activations and
  gradients point to point;
* the **data-parallel** group to :func:`average_gradients`: the ``dp`` ranks of the group
  hold the same shard of the same stage and have seen different parts of the batch; after
  the backward they all-reduce their gradients and divide by ``dp``, so that every replica
  takes the step a single process would take on the whole batch.

That is how Megatron-LM, DeepSpeed and PyTorch's own tools combine the three: one process
per device, one group per dimension.  Wrapping each pipeline stage in ``nn.DataParallel``
(a single process that copies a module to several devices on every forward, splits the
batch, and gathers the outputs back on the first device) is not a data-parallel dimension
of a mesh: there is one process, the stages run one after the other on the whole batch, and
every activation funnels through one device per stage.

:func:`train` runs ``steps`` SGD steps of the same model on a mesh and returns every rank's
parameters, losses and communication, per dimension: the TP all-reduces (logged by
:mod:`paralab.comm`), the pipeline's point-to-point sends (counted where every such message
passes, :func:`count_sends`) and the DP all-reduce.  :func:`reference_training` runs the
same steps in one process; the tests require every parameter to match, and every byte
count to equal :func:`paralab.formulas.ffn_stack_traffic`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from . import comm, launch, mesh, schedules, tp
from .interpreter import RankExecutor

#: How each parameter of a tensor-parallel FFN block is split over the TP ranks: the
#: dimension its shards are cut along, or None for a parameter every TP rank holds whole.
SHARD_DIMS = {"linear1.weight": 0, "linear1.bias": 0, "linear2.weight": 1, "linear2.bias": None}


@dataclass(frozen=True)
class HybridModel:
    """``layers`` blocks of lecture 01's FFN (``Linear(d, 4d) -> GeLU -> Linear(4d, d)``,
    ``d = width``), trained on a regression of ``batch`` random rows.

    Every rank draws the whole model and the whole batch from ``seed`` and keeps its part:
    its stage's blocks (``layers / pp`` of them), its tensor-parallel shard of each, its
    data-parallel share of the batch (``batch / dp`` rows).  The single-process reference
    draws the same numbers, so parity is exact up to rounding."""

    width: int = 8
    layers: int = 4
    batch: int = 16
    seed: int = 0
    dtype: str = "float64"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def blocks(self) -> list[tp.FFN]:
        torch.manual_seed(self.seed)
        return [tp.FFN(self.width).to(self.torch_dtype) for _ in range(self.layers)]

    def data(self) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed + 1)
        shape = (self.batch, self.width)
        x = torch.randn(shape, generator=generator, dtype=self.torch_dtype)
        return x, torch.randn(shape, generator=generator, dtype=self.torch_dtype)

    def check(self, shape, m: int, stages: int | None = None) -> None:
        """Refuse a mesh this model cannot be split over, saying which rule breaks
        (``stages``: the schedule's stages, ``pp`` unless it is interleaved)."""
        dp, pp, tp_ = mesh.check_shape(shape)
        stages = pp if stages is None else stages
        problems = []
        if self.layers % stages:
            problems.append(f"{self.layers} blocks do not split into {stages} equal pipeline "
                            f"stages")
        if (4 * self.width) % tp_:
            problems.append(f"the FFN's 4d = {4 * self.width} features do not split over "
                            f"tp = {tp_} ranks")
        if self.batch % (dp * m):
            problems.append(f"a batch of {self.batch} rows does not split into dp = {dp} "
                            f"replicas of m = {m} equal microbatches")
        if problems:
            raise ValueError("; ".join(problems))


def loss_fn(output: torch.Tensor, target: torch.Tensor, m: int) -> torch.Tensor:
    """Mean squared error of one microbatch over ``m``: summed over a replica's microbatches
    it is the replica's mean; averaged over the replicas, the whole batch's mean."""
    return ((output - target) ** 2).mean() / m


def parameter_name(block: int, name: str) -> str:
    return f"block{block}.{name}"


def reference_training(model: HybridModel, steps: int, lr: float) -> tuple[list, dict]:
    """``steps`` SGD steps of the whole model on the whole batch, in this process:
    ``(losses, {name: parameter})`` with names ``block{k}.linear1.weight`` and so on."""
    blocks = model.blocks()
    stack = nn.Sequential(*blocks)
    x, y = model.data()
    losses = []
    for _ in range(steps):
        stack.zero_grad(set_to_none=True)
        loss = ((stack(x) - y) ** 2).mean()
        loss.backward()
        losses.append(loss.item())
        sgd_step(stack.parameters(), lr)
    return losses, {parameter_name(k, name): q.detach().clone() for k, block in enumerate(blocks)
                    for name, q in block.named_parameters()}


# ---------------------------------------------------------------------------------------------
# One rank
# ---------------------------------------------------------------------------------------------
class RankModel:
    """The model as one rank of the mesh sees it, in the form the pipeline executor takes
    (``build``, ``microbatches``, ``loss``, ``batch``, ``width``, ``torch_dtype``, like
    :class:`paralab.pipeline.PipelineModel`): stages of tensor-parallel shards on
    ``tp_group``, and this replica's rows of the batch."""

    def __init__(self, model: HybridModel, shape, coords, tp_group=None):
        self.model, self.shape, self.coords, self.tp_group = model, shape, coords, tp_group
        dp = mesh.check_shape(shape)[0]
        self.batch = model.batch // dp
        self.width = model.width
        self.torch_dtype = model.torch_dtype

    def build(self, num_stages: int) -> list[nn.Sequential]:
        blocks = self.model.blocks()
        k = len(blocks) // num_stages
        return [nn.Sequential(*[tp.ParallelFFN(block, "col-row", group=self.tp_group)
                                for block in blocks[s * k:(s + 1) * k]])
                for s in range(num_stages)]

    def microbatches(self, m: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        dp = self.shape[0]
        x, y = (t.chunk(dp)[self.coords[0]] for t in self.model.data())
        return list(x.chunk(m)), list(y.chunk(m))

    def loss(self, output: torch.Tensor, target: torch.Tensor, m: int) -> torch.Tensor:
        return loss_fn(output, target, m)


def average_gradients(parameters: Iterable[torch.Tensor], group=None) -> None:
    """Replace every gradient by its mean over the data-parallel ``group``.

    The ranks of a DP group hold the same parameters and computed their gradients on
    different rows of the batch; the gradient of the whole batch's mean loss is the *mean*
    of theirs.  A sum would be ``dp`` times too large: the step of a single process with a
    learning rate ``dp`` times larger.  One all-reduce of all gradients flattened into one
    buffer (as DDP's buckets do), through :mod:`paralab.comm` so that it is logged."""
    grads = []
    for q in parameters:
        if q.grad is None:
            raise ValueError("a parameter has no gradient: every rank of a data-parallel "
                             "group must all-reduce the same gradients, so run the backward "
                             "of every stage before averaging")
        grads.append(q.grad)
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    total = comm.all_reduce(flat, phase="backward", label="dp.gradients", group=group)
    total /= comm.world_size(group)
    offset = 0
    for g in grads:
        g.copy_(total[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def sgd_step(parameters: Iterable[torch.Tensor], lr: float) -> None:
    with torch.no_grad():
        for q in parameters:
            q.sub_(q.grad, alpha=lr)


@dataclass
class SendLog:
    """Point-to-point sends: ``(destination, bytes)`` in the order they were issued."""

    sends: list = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(n for _, n in self.sends)


@contextmanager
def count_sends() -> Iterator[SendLog]:
    """Count every point-to-point send issued in the block through ``torch.distributed``'s
    ``isend`` and ``send`` (bytes and destination).  Counted at PyTorch's door rather than
    inside the executor, so the count holds whatever the executor's internals are."""
    log = SendLog()
    originals = {"isend": dist.isend, "send": dist.send}

    def counting(original):
        def send(tensor, *args, **kwargs):
            dst = kwargs.get("dst", args[0] if args else None)
            log.sends.append((dst, tensor.numel() * tensor.element_size()))
            return original(tensor, *args, **kwargs)
        return send

    for name, original in originals.items():
        setattr(dist, name, counting(original))
    try:
        yield log
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


def _records(log) -> list[dict]:
    return [{"op": r.op, "phase": r.phase, "label": r.label, "elements": r.elements,
             "bytes": r.bytes, "world_size": r.world_size,
             "traffic_bytes": r.traffic_bytes} for r in log]


def train_worker(rank: int, world_size: int, shape, model: HybridModel = HybridModel(),
                 steps: int = 2, lr: float = 0.1, m: int = 2, schedule: str = "1f1b",
                 average: Callable | None = None) -> dict:
    """Worker for :func:`paralab.launch.run`: ``steps`` SGD steps on the ``shape`` mesh.

    Builds the DeviceMesh, then, each step: the pipeline executor runs the schedule on the
    ``pp`` group with tensor-parallel stages on the ``tp`` group; ``average`` (default
    :func:`average_gradients`) averages the gradients over the ``dp`` group; SGD updates
    the parameters.  Returns this rank's coordinates, its groups as PyTorch built them, its
    parameters (on the CPU) and, per step, its losses and communication per dimension."""
    average = average_gradients if average is None else average
    plan = schedules.build(schedule, shape[1], m)
    model.check(shape, m, plan.num_stages)
    device_mesh = mesh.device_mesh(shape)
    groups = {dim: device_mesh.get_group(dim) for dim in mesh.DIMS}
    coords = tuple(int(c) for c in device_mesh.get_coordinate())
    pp_rank = coords[1]
    executor = RankExecutor(pp_rank, plan, RankModel(model, shape, coords, groups["tp"]),
                            device=launch.device(), group=groups["pp"])
    stages = [executor.stages[s] for s in sorted(executor.stages)]
    parameters = [q for stage in stages for q in stage.parameters()]
    per_step = []
    for _ in range(steps):
        for q in parameters:
            q.grad = None
        with comm.record() as tp_log, count_sends() as sends:
            out = executor.step()
        with comm.record() as dp_log:
            average(parameters, groups["dp"])
        sgd_step(parameters, lr)
        per_step.append({"losses": out["losses"], "tp": _records(tp_log),
                         "pp": list(sends.sends), "dp": _records(dp_log)})
    k = model.layers // plan.num_stages
    named = {}
    for s, stage in zip(sorted(executor.stages), stages):
        for name, q in stage.named_parameters():
            local, rest = name.split(".", 1)
            named[parameter_name(s * k + int(local), rest)] = q.detach().cpu().clone()
    return {"rank": rank, "coords": coords, "groups": mesh.mesh_groups(device_mesh),
            "parameters": named, "steps": per_step}


# ---------------------------------------------------------------------------------------------
# The whole mesh
# ---------------------------------------------------------------------------------------------
@dataclass
class HybridResult:
    """What :func:`train` returns: every rank's report, in rank order, and the setup."""

    shape: tuple
    model: HybridModel
    m: int
    ranks: list

    def parameters(self, replica: int = 0) -> dict:
        """The full parameters of data-parallel replica ``replica``, put back together from
        the tensor-parallel shards of its ranks (names as :func:`reference_training`)."""
        dp, pp, tp_ = self.shape
        full = {}
        for pp_index in range(pp):
            ranks = [self.ranks[mesh.rank_of((replica, pp_index, t), self.shape)]
                     for t in range(tp_)]
            for name in ranks[0]["parameters"]:
                shards = [r["parameters"][name] for r in ranks]
                dim = SHARD_DIMS[name.split(".", 1)[1]]
                full[name] = shards[0] if dim is None else torch.cat(shards, dim=dim)
        return full

    def replica_spread(self) -> float:
        """The largest difference between two data-parallel replicas' parameters: zero when
        the replicas stayed in step (they must: each took the averaged step)."""
        first = self.parameters(0)
        return max((float((self.parameters(i)[k] - v).abs().max()) for i in range(1, self.shape[0])
                    for k, v in first.items()), default=0.0)

    def losses(self) -> list[float]:
        """The loss of the whole batch at each step (the mean over the replicas of the sum
        over their microbatches, read on the last stage)."""
        dp, pp, _ = self.shape
        out = []
        for step in range(len(self.ranks[0]["steps"])):
            total = 0.0
            for replica in range(dp):
                last = self.ranks[mesh.rank_of((replica, pp - 1, 0), self.shape)]
                total += sum(last["steps"][step]["losses"].values())
            out.append(total / dp)
        return out

    def traffic(self, step: int = 0) -> list[dict]:
        """Bytes each rank sent in ``step``, per dimension: ``tp`` and ``dp`` are the ring
        traffic of the logged all-reduces (:func:`paralab.formulas.collective_traffic`),
        ``pp`` the bytes of the point-to-point sends."""
        out = []
        for r in self.ranks:
            record = r["steps"][step]
            out.append({"tp": sum(x["traffic_bytes"] for x in record["tp"]),
                        "pp": sum(n for _, n in record["pp"]),
                        "dp": sum(x["traffic_bytes"] for x in record["dp"])})
        return out


def train(shape=(2, 2, 2), model: HybridModel = HybridModel(), *, steps: int = 2,
          lr: float = 0.1, m: int = 2, schedule: str = "1f1b", average: Callable | None = None,
          timeout: float = 60.0, echo: bool = False) -> HybridResult:
    """Train ``model`` for ``steps`` SGD steps on ``dp * pp * tp`` fresh processes (one
    :func:`paralab.launch.run` world) and return every rank's report.  ``schedule`` is a
    name of :func:`paralab.schedules.build` (the traffic formulas of
    :func:`paralab.formulas.ffn_stack_traffic` are for one stage per rank: ``gpipe``,
    ``1f1b``); ``average`` replaces :func:`average_gradients` (an exercise passes its own)."""
    shape = mesh.check_shape(shape)
    plan = schedules.build(schedule, shape[1], m)
    model.check(shape, m, plan.num_stages)
    if launch.resolve_backend("auto", mesh.world_size(shape)) == "nccl":
        from .pipeline import check_message_order
        check_message_order(plan)  # NCCL matches a pair's messages in posting order
    ranks = launch.run(train_worker, mesh.world_size(shape), shape, model, steps, lr, m,
                       schedule, average, timeout=timeout, echo=echo)
    return HybridResult(shape, model, m, ranks)
