"""A real pipeline executor: any valid schedule, real processes, real point-to-point.

Each rank builds its stages of a small model, walks its action list from the schedule and
does exactly what each action says:

* ``F(i, s)``: take microbatch ``i``'s activations (from the data on stage 0, else from
  the rank of stage ``s-1``), run stage ``s``, keep what backward needs, send the output on
  (the last stage computes the loss instead);
* ``B(i, s)``: take the gradient of the stage output (the last stage starts from its
  loss), backpropagate to the stage *input* and send that gradient back; when the schedule
  has no ``W``, the weight gradients are computed in the same pass;
* ``W(i, s)``: backpropagate the same output gradient to the stage *weights* only.

Communication (the only part that differs from a single process): every send is
non-blocking (``isend``) and every receive is posted exactly when the action needs the data,
with a tag naming the (kind, microbatch, stage) it carries.  So no rank ever blocks on a
send, a receive can only wait for an action the schedule really runs earlier on another
rank, and messages can't be confused.  If the schedule itself can deadlock, the simulator
says so before any process starts.  (We avoid ``batch_isend_irecv``, which is known to hang
on gloo in some patterns.)  NCCL ignores tags and matches a pair's messages in the order
they are posted; :func:`check_message_order` verifies that before an NCCL run (every
schedule this library generates passes).  The tests run on gloo; the NCCL path has not been
exercised on GPUs yet.

What comes back: the per-microbatch losses, every parameter's gradient (to compare with a
single-process run), a *measured* :class:`~paralab.timeline.Timeline` of compute intervals
(waiting is idle, as in the simulator), and activation memory per rank measured with
saved-tensor hooks.  ``synthetic`` makes each action last a fixed time (its real compute
runs inside it) so bubbles are visible and reproducible on a laptop where 4 ranks share 2
cores; ``recompute`` keeps only each stage's input in the forward and recomputes the rest
in the backward.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from . import launch
from .schedules import Action, Schedule, ScheduleError, validate
from .simulator import simulate
from .memory import SavedTensorMeter
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
# The executor
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
                 check_deadlock: bool = True) -> PipelineResult:
    """Execute one training step of ``schedule`` on ``schedule.num_ranks`` processes.

    ``synthetic=(t_f, t_b[, t_w])`` in seconds *per rank* (split evenly over the chunks of
    an interleaved schedule, as in the simulator) sets how long each action lasts: it
    computes for real, then sleeps out the rest of its cost.  The schedule is validated -- and simulated, to rule out deadlocks --
    before any process starts, so a broken schedule fails at once with a clear message."""
    validate(schedule)
    if launch._resolve_backend(backend, schedule.num_ranks) == "nccl":
        check_message_order(schedule)
    costs = _synthetic_costs(synthetic, schedule)
    simulated = None
    if check_deadlock:  # raises DeadlockError naming the stuck ranks
        simulated = simulate(schedule, *(costs or (1, 1, 0)))
    per_rank = launch.run(_pipeline_worker, schedule.num_ranks, schedule, model, costs,
                          recompute, backend=backend, timeout=timeout, echo=echo)
    events, losses, grads, peaks, memory = [], {}, {}, [], []
    for result in per_rank:
        events.extend(Event(r, Action(*a), start, end) for r, a, start, end in result["events"])
        losses.update(result["losses"])
        grads.update(result["grads"])
        peaks.append(result["peak_saved_bytes"])
        memory.append(result["saved_bytes_over_time"])
    timeline = Timeline(schedule, tuple(events), source="measured", unit="s")
    return PipelineResult(schedule, timeline, [losses[i] for i in sorted(losses)], grads, peaks,
                          memory, simulated if costs else None,
                          {"synthetic": costs, "recompute": recompute})


def message_orders(schedule: Schedule) -> dict:
    """For each directed pair of ranks, the messages in the order the sender sends them and
    in the order the receiver needs them: ``{(src, dst): (sent, needed)}``.

    A message is ``("activation"|"gradient", microbatch, consuming stage)``.  Gloo matches
    messages by tag, so any order works; NCCL ignores tags and matches a pair's messages in
    the order they are posted, so there both lists must be equal."""
    last = schedule.num_stages - 1
    orders: dict = {}

    def entry(src, dst):
        return orders.setdefault((src, dst), ([], []))

    for rank, row in enumerate(schedule.orders):
        for op, i, s in row:
            if op == "F" and s < last and schedule.rank_of(s + 1) != rank:
                entry(rank, schedule.rank_of(s + 1))[0].append(("activation", i, s + 1))
            if op == "F" and s > 0 and schedule.rank_of(s - 1) != rank:
                entry(schedule.rank_of(s - 1), rank)[1].append(("activation", i, s))
            if op == "B" and s > 0 and schedule.rank_of(s - 1) != rank:
                entry(rank, schedule.rank_of(s - 1))[0].append(("gradient", i, s - 1))
            if op == "B" and s < last and schedule.rank_of(s + 1) != rank:
                entry(schedule.rank_of(s + 1), rank)[1].append(("gradient", i, s))
    return orders


def check_message_order(schedule: Schedule) -> None:
    """Raise :class:`ScheduleError` if some pair of ranks would post its messages in
    different orders on the two sides (fatal on NCCL, see :func:`message_orders`)."""
    for (src, dst), (sent, needed) in sorted(message_orders(schedule).items()):
        if sent != needed:
            k = next(k for k, (a, b) in enumerate(zip(sent, needed)) if a != b)
            raise ScheduleError(
                f"rank {src} sends its messages to rank {dst} in a different order than rank "
                f"{dst} needs them (message {k}: sends the {sent[k][0]} of microbatch "
                f"{sent[k][1]}, needs the {needed[k][0]} of microbatch {needed[k][1]}); NCCL "
                f"matches point-to-point messages in order, so this schedule runs on gloo only")


def _synthetic_costs(synthetic, schedule: Schedule):
    if synthetic is None:
        return None
    values = list(synthetic) + [0.0] * (3 - len(synthetic))
    if len(values) != 3 or any(v < 0 for v in values):
        raise ValueError(f"synthetic takes (t_f, t_b[, t_w]) non-negative seconds, got {synthetic}")
    return tuple(values)


class RankExecutor:
    """One rank's side of a pipeline: its stages, its action list and its mailboxes.

    Built once per world; :meth:`step` runs the rank's actions for one training step and
    can be called repeatedly (benchmarks do).  Gradients accumulate in the stage modules,
    as in any PyTorch training loop."""

    def __init__(self, rank: int, schedule: Schedule, model: PipelineModel, *,
                 costs=None, recompute: bool = False, device=None):
        self.rank, self.schedule, self.model = rank, schedule, model
        self.recompute, self.device = recompute, device or torch.device("cpu")
        self.split = schedule.splits_backward
        built = model.build(schedule.num_stages)
        self.stages = {s: built[s].to(self.device) for s in schedule.stages_of(rank)}
        self.shape = (model.batch // schedule.num_microbatches, model.width)
        self.delay = {}
        if costs:  # per-rank costs, split over this rank's chunks as in the simulator
            f, b, w = (c / schedule.chunks for c in costs)
            self.delay = {"F": f, "B": b + (0 if self.split else w), "W": w}

    # -- messages: named by kind (0 activation, 1 gradient), microbatch, consuming stage ------
    def _tag(self, kind: int, i: int, stage: int) -> int:
        return (kind * self.schedule.num_stages + stage) * self.schedule.num_microbatches + i

    def _send(self, tensor, kind, i, to_stage):
        dst = self.schedule.rank_of(to_stage)
        if dst == self.rank:
            self.local[(kind, i, to_stage)] = tensor
        else:
            work = dist.isend(tensor.contiguous(), dst, tag=self._tag(kind, i, to_stage))
            self.pending_sends.append(work)

    def _receive(self, kind, i, stage, from_stage):
        src = self.schedule.rank_of(from_stage)
        if src == self.rank:
            return self.local.pop((kind, i, stage))
        buffer = torch.empty(self.shape, dtype=self.model.torch_dtype, device=self.device)
        dist.recv(buffer, src, tag=self._tag(kind, i, stage))
        return buffer

    # -- the three actions; each returns the message to send when it is done, or None --------
    def _forward(self, i, s):
        stage, last = self.stages[s], s == self.schedule.num_stages - 1
        inp = self.xs[i].to(self.device) if s == 0 else self._receive(0, i, s, s - 1)
        inp = inp.detach().requires_grad_(s > 0)
        self._start = time.perf_counter()
        entry, sizes = {"input": inp}, []
        if self.recompute:  # keep only the input; B rebuilds the graph
            with torch.no_grad():
                out = stage(inp)
            sizes.append(inp.numel() * inp.element_size())
        else:
            with self.meter.hooks(sizes):
                out = stage(inp)
                if last:
                    out = loss_fn(out, self.ys[i].to(self.device), self.schedule.num_microbatches)
                    self.losses[i] = out.item()
        entry["output"], entry["bytes"] = out, sum(sizes)
        self.saved[(i, s)] = entry
        self.meter.change(entry["bytes"], self._start - self.t0)
        return None if last else (out.detach(), 0, i, s + 1)

    def _backward(self, i, s):
        entry, last = self.saved[(i, s)], s == self.schedule.num_stages - 1
        if not last:
            entry["grad_out"] = self._receive(1, i, s, s + 1)
        self._start = time.perf_counter()
        if self.recompute:
            with self.meter.hooks([]):
                out = self.stages[s](entry["input"])
                if last:
                    out = loss_fn(out, self.ys[i].to(self.device), self.schedule.num_microbatches)
                    self.losses[i] = out.item()
            entry["output"] = out
        params = [] if self.split else list(self.stages[s].parameters())
        targets = ([entry["input"]] if s > 0 else []) + params
        if targets:  # stage 0 with a split backward has no input gradient to compute
            torch.autograd.backward(entry["output"], entry.get("grad_out"), inputs=targets,
                                    retain_graph=self.split)
        if not self.split:
            self._release(i, s)
        if s == 0:
            return None
        grad, entry["input"].grad = entry["input"].grad.detach(), None
        return (grad, 1, i, s - 1)

    def _weight(self, i, s):
        entry = self.saved[(i, s)]
        self._start = time.perf_counter()
        torch.autograd.backward(entry["output"], entry.get("grad_out"),
                                inputs=list(self.stages[s].parameters()))
        self._release(i, s)
        return None

    def _release(self, i, s):
        entry = self.saved.pop((i, s))
        self.meter.change(-entry["bytes"], time.perf_counter() - self.t0)

    # -- one training step ------------------------------------------------------------------
    def step(self) -> dict:
        m = self.schedule.num_microbatches
        self.xs, self.ys = self.model.microbatches(m)
        self.meter = SavedTensorMeter(q for st in self.stages.values() for q in st.parameters())
        self.saved, self.local, self.pending_sends = {}, {}, []
        self.losses, events = {}, []
        run = {"F": self._forward, "B": self._backward, "W": self._weight}
        self.t0 = time.perf_counter()
        for action in self.schedule.orders[self.rank]:
            outgoing = run[action.op](action.microbatch, action.stage)
            if self.delay:  # synthetic cost, before the send so the next stage waits too;
                # the real compute runs inside it (an action takes max(compute, cost))
                time.sleep(max(0.0, self._start + self.delay[action.op] - time.perf_counter()))
            if outgoing is not None:
                self._send(*outgoing)
            end = time.perf_counter()
            events.append((self.rank, tuple(action), self._start - self.t0, end - self.t0))
            self.pending_sends = [w for w in self.pending_sends if not w.is_completed()]
        for work in self.pending_sends:
            work.wait()
        return {"events": events, "losses": self.losses, "peak_saved_bytes": self.meter.peak,
                "saved_bytes_over_time": self.meter.over_time}

    def grads(self) -> dict:
        return {f"stage{s}.{name}": q.grad.detach().cpu() for s, st in self.stages.items()
                for name, q in st.named_parameters()}

    def warm_up(self):
        _warm_up(self.stages, self.shape, self.model.torch_dtype, self.device)


def _pipeline_worker(rank: int, world_size: int, schedule: Schedule, model: PipelineModel,
                     costs, recompute: bool) -> dict:
    executor = RankExecutor(rank, schedule, model, costs=costs, recompute=recompute,
                            device=launch.device())
    executor.warm_up()
    dist.barrier()  # start the clocks together
    result = executor.step()
    dist.barrier()
    result["grads"] = executor.grads()
    return result


def _warm_up(stages, shape, dtype, device):
    """Run one throw-away forward/backward per stage, in the same call forms as the real
    actions, so one-time costs don't land inside the first timed action (the first
    ``autograd.backward`` with explicit output gradients imports SymPy: ~0.3 s)."""
    for stage in stages.values():
        x = torch.zeros(shape, dtype=dtype, device=device, requires_grad=True)
        out = stage(x)
        torch.autograd.backward(out, torch.ones_like(out), inputs=[x], retain_graph=True)
        torch.autograd.backward(out, torch.ones_like(out), inputs=list(stage.parameters()))
        stage.zero_grad(set_to_none=True)
