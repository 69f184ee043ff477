"""Real pipelines: any valid schedule, run by real processes with real point-to-point.

:func:`run_pipeline` runs one training step of a schedule on ``schedule.num_ranks``
processes and compares nothing itself: it returns what a test or a lecture compares with a
single process (:func:`reference_step`) and with the simulator.  Before any process starts,
the schedule is validated, lowered into one program per rank (:mod:`paralab.lowering`:
its computation with the sends and receives written in), checked for deadlock, and -- for
NCCL, which matches a pair's messages in posting order -- checked that both sides of every
pair post their messages in the same order (:func:`check_message_order`).  Each rank then
interprets its program (:mod:`paralab.interpreter`).

What comes back: the per-microbatch losses, every parameter's gradient, a *measured*
:class:`~paralab.timeline.Timeline` of compute intervals (waiting is idle, as in the
simulator), and the bytes autograd saved for backward per rank, measured with saved-tensor
hooks.  ``synthetic`` makes each action last a fixed time (its real compute runs inside it)
so bubbles are visible and reproducible on a laptop where 4 ranks share 2 cores;
``recompute`` keeps only each stage's input in the forward and recomputes the rest in the
backward.  The tests run on gloo; the NCCL path has not been exercised on GPUs yet.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from . import launch, lowering
from .interpreter import RankExecutor
from .schedules import Action, Schedule, ScheduleError, ensure_valid
from .simulator import check_deadlock as _check_deadlock
from .simulator import simulate
from .timeline import Event, Timeline


@dataclass(frozen=True)
class PipelineModel:
    """A stack of ``Linear(width, width) -> Tanh`` blocks, split evenly over the stages.

    Every rank builds the whole stack from ``seed`` and keeps only its stages, so the
    pipeline starts from exactly the weights of the single-process reference."""

    width: int = 16
    layers_per_stage: int = 2
    batch: int = 32
    seed: int = 0
    dtype: str = "float64"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def build(self, num_stages: int) -> list[nn.Sequential]:
        torch.manual_seed(self.seed)
        return [nn.Sequential(*[layer for _ in range(self.layers_per_stage)
                                for layer in (nn.Linear(self.width, self.width), nn.Tanh())])
                .to(self.torch_dtype) for _ in range(num_stages)]

    def data(self) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed + 1)
        x = torch.randn(self.batch, self.width, generator=generator, dtype=self.torch_dtype)
        y = torch.randn(self.batch, self.width, generator=generator, dtype=self.torch_dtype)
        return x, y

    def microbatches(self, m: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if self.batch % m:
            raise ValueError(f"batch {self.batch} does not split into {m} equal microbatches")
        x, y = self.data()
        return list(x.chunk(m)), list(y.chunk(m))

    def loss(self, output: torch.Tensor, target: torch.Tensor, m: int) -> torch.Tensor:
        return loss_fn(output, target, m)


def loss_fn(output: torch.Tensor, target: torch.Tensor, m: int) -> torch.Tensor:
    """Mean squared error of one microbatch, divided by m so the sum over microbatches is
    the mean over the whole batch (what the single-process reference computes)."""
    return ((output - target) ** 2).mean() / m


def parameter_names(model: PipelineModel, num_stages: int) -> list[str]:
    return [f"stage{s}.{name}" for s, stage in enumerate(model.build(num_stages))
            for name, _ in stage.named_parameters()]


def reference_step(model: PipelineModel, num_stages: int, m: int) -> tuple[list, dict]:
    """One training step of the whole model in one process: (losses, gradients)."""
    stages = model.build(num_stages)
    xs, ys = model.microbatches(m)
    losses = []
    for x, y in zip(xs, ys):
        out = x
        for stage in stages:
            out = stage(out)
        loss = loss_fn(out, y, m)
        loss.backward()
        losses.append(loss.item())
    grads = {f"stage{s}.{name}": p.grad.clone() for s, stage in enumerate(stages)
             for name, p in stage.named_parameters()}
    return losses, grads


# ---------------------------------------------------------------------------------------------
# One step on real processes
# ---------------------------------------------------------------------------------------------
@dataclass
class PipelineResult:
    schedule: Schedule
    timeline: Timeline              # measured compute intervals, seconds
    losses: list                    # per microbatch
    grads: dict                     # parameter name -> gradient
    peak_saved_bytes: list          # per rank: most bytes held for backward at once
    saved_bytes_over_time: list     # per rank: [(time, bytes), ...]
    simulated: Timeline | None = None   # the cost model with the nominal synthetic costs
    meta: dict = field(default_factory=dict)

    def calibrated(self) -> Timeline:
        """The simulator fed with the *measured* mean duration of each kind of action.

        What is left between this and the measurement is communication latency and
        scheduling noise: the dependencies themselves are modelled exactly."""
        chunks = self.schedule.chunks
        means = {}
        for op in "FBW":
            durations = [e.duration for e in self.timeline.events if e.action.op == op]
            means[op] = chunks * sum(durations) / len(durations) if durations else 0.0
        return simulate(self.schedule, means["F"], means["B"], means["W"])

    @property
    def peak_activations(self) -> list[int]:
        return self.timeline.peak_activations

    def max_grad_error(self, reference: dict) -> float:
        return max(float((self.grads[k] - v).abs().max()) for k, v in reference.items())


def run_pipeline(schedule: Schedule, model: PipelineModel = PipelineModel(), *,
                 synthetic: Sequence[float] | None = None, recompute: bool = False,
                 timeout: float = 60.0, backend: str = "auto", echo: bool = True,
                 check_deadlock: bool = True,
                 sender_order: bool | None = None) -> PipelineResult:
    """Execute one training step of ``schedule`` on ``schedule.num_ranks`` processes.

    ``synthetic=(t_f, t_b[, t_w])`` in seconds *per rank* (split evenly over the chunks of
    an interleaved schedule, as in the simulator) sets how long each action lasts: it
    computes for real, then sleeps out the rest of its cost; the simulator's timeline for
    those costs comes back as ``simulated``.  The schedule is validated and checked for
    deadlock before any process starts, so a broken schedule fails at once with a clear
    message (``check_deadlock=False`` skips the latter, to watch a deadlock happen).

    ``sender_order``: post every pair's receives in the order the sender sends
    (:func:`paralab.lowering.post_in_send_order`), which NCCL needs for the V placement
    (ZB-V, DualPipeV); by default only on NCCL and only when the plain lowering's orders
    differ.  ``True`` forces it (gloo runs it just as well)."""
    ensure_valid(schedule)
    programs = lowering.lower(schedule)
    nccl = launch._resolve_backend(backend, schedule.num_ranks) == "nccl"
    if sender_order or (sender_order is None and nccl and _orders_differ(programs)):
        programs = lowering.post_in_send_order(programs)
    if nccl:
        check_message_order(schedule, programs)
    costs = _synthetic_costs(synthetic, schedule)
    simulated = None
    if check_deadlock:  # raises DeadlockError naming the stuck ranks
        if costs:
            simulated = simulate(schedule, *costs)
        else:
            _check_deadlock(schedule)
    per_rank = launch.run(_pipeline_worker, schedule.num_ranks, schedule, programs, model,
                          costs, recompute, backend=backend, timeout=timeout, echo=echo)
    events, losses, grads, peaks, memory = [], {}, {}, [], []
    for result in per_rank:
        events.extend(Event(r, Action(*a), start, end) for r, a, start, end in result["events"])
        losses.update(result["losses"])
        grads.update(result["grads"])
        peaks.append(result["peak_saved_bytes"])
        memory.append(result["saved_bytes_over_time"])
    timeline = Timeline(schedule, tuple(events), source="measured", unit="s")
    return PipelineResult(schedule, timeline, [losses[i] for i in sorted(losses)], grads, peaks,
                          memory, simulated, {"synthetic": costs, "recompute": recompute})


def message_orders(schedule: Schedule) -> dict:
    """For each directed pair of ranks, the messages in the order the sender sends them and
    in the order the receiver receives them: ``{(src, dst): (sent, received)}``, read off the
    lowered programs (:func:`paralab.lowering.message_orders`).

    A message is ``("activation"|"gradient", microbatch, consuming stage)``.  Gloo matches
    messages by tag, so any order works; NCCL ignores tags and matches a pair's messages in
    the order they are posted, so there both lists must be equal."""
    return lowering.message_orders(lowering.lower(schedule))


def _orders_differ(programs) -> bool:
    return any(sent != received
               for sent, received in lowering.message_orders(programs).values())


def check_message_order(schedule: Schedule, programs=None) -> None:
    """Raise :class:`ScheduleError` if some pair of ranks would post its messages in
    different orders on the two sides (fatal on NCCL, see :func:`message_orders`).
    ``programs`` are the lowered programs, if already at hand."""
    if programs is None:
        programs = lowering.lower(schedule)
    for (src, dst), (sent, needed) in sorted(lowering.message_orders(programs).items()):
        if sent != needed:
            k = next(k for k, (a, b) in enumerate(zip(sent, needed)) if a != b)
            raise ScheduleError(
                f"rank {src} sends its messages to rank {dst} in a different order than rank "
                f"{dst} needs them (message {k}: sends the {sent[k][0]} of microbatch "
                f"{sent[k][1]}, needs the {needed[k][0]} of microbatch {needed[k][1]}); NCCL "
                f"matches point-to-point messages in order, so as lowered this schedule runs "
                f"on gloo only{_hint(programs)}")


def _hint(programs) -> str:
    """What to do when receives posted in the senders' order would agree."""
    if _orders_differ(lowering.post_in_send_order(programs)):
        return ""
    return ("; posting each receive in the sender's order (lowering.post_in_send_order, "
            "which run_pipeline does on NCCL) makes both sides agree")


def _synthetic_costs(synthetic, schedule: Schedule):
    if synthetic is None:
        return None
    values = list(synthetic) + [0.0] * (3 - len(synthetic))
    if len(values) != 3 or any(v < 0 for v in values):
        raise ValueError(f"synthetic takes (t_f, t_b[, t_w]) non-negative seconds, got {synthetic}")
    return tuple(values)


def _pipeline_worker(rank: int, world_size: int, schedule: Schedule, programs, model,
                     costs, recompute: bool) -> dict:
    executor = RankExecutor(rank, schedule, model, costs=costs, recompute=recompute,
                            device=launch.device(), program=programs[rank])
    executor.warm_up()
    dist.barrier()  # start the clocks together
    result = executor.step()
    dist.barrier()
    result["grads"] = executor.grads()
    return result
