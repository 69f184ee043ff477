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
on gloo in some patterns.)

What comes back: the per-microbatch losses, every parameter's gradient (to compare with a
single-process run), a *measured* :class:`~paralab.timeline.Timeline` of compute intervals
(waiting is idle, as in the simulator), and activation memory per rank measured with
saved-tensor hooks.  ``synthetic`` adds a fixed sleep to each action so bubbles are
visible and reproducible on a laptop where 4 ranks share 2 cores; ``recompute`` keeps only
each stage's input in the forward and recomputes the rest in the backward.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from . import launch
from .schedules import Action, Schedule, validate
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
    an interleaved schedule, as in the simulator) is slept inside each action on top of its
    real compute.  The schedule is validated -- and simulated, to rule out deadlocks --
    before any process starts, so a broken schedule fails at once with a clear message."""
    validate(schedule)
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


def _synthetic_costs(synthetic, schedule: Schedule):
    if synthetic is None:
        return None
    values = list(synthetic) + [0.0] * (3 - len(synthetic))
    if len(values) != 3 or any(v < 0 for v in values):
        raise ValueError(f"synthetic takes (t_f, t_b[, t_w]) non-negative seconds, got {synthetic}")
    return tuple(values)


class _SavedBytes:
    """Counts bytes autograd saves for backward (parameters excluded: they are not
    activations and exist anyway)."""

    def __init__(self, parameters):
        self.parameter_ptrs = {p.data_ptr() for p in parameters}
        self.current = 0
        self.peak = 0
        self.over_time = [(0.0, 0)]

    def hooks(self, bucket: list):
        def pack(t):
            if t.data_ptr() not in self.parameter_ptrs:
                bucket.append(t.numel() * t.element_size())
            return t
        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)

    def change(self, delta: int, now: float):
        self.current += delta
        self.peak = max(self.peak, self.current)
        self.over_time.append((now, self.current))


def _pipeline_worker(rank: int, world_size: int, schedule: Schedule, model: PipelineModel,
                     costs, recompute: bool) -> dict:
    device = launch.device()
    p, n_stages, m = schedule.num_ranks, schedule.num_stages, schedule.num_microbatches
    all_stages = model.build(n_stages)
    stages = {s: all_stages[s].to(device) for s in schedule.stages_of(rank)}
    del all_stages
    xs, ys = model.microbatches(m)
    shape = (model.batch // m, model.width)
    split = schedule.splits_backward
    delay = {}
    if costs:
        per_chunk = [c / schedule.chunks for c in costs]
        delay = {"F": per_chunk[0], "B": per_chunk[1] + (0 if split else per_chunk[2]),
                 "W": per_chunk[2]}

    memory = _SavedBytes([q for st in stages.values() for q in st.parameters()])
    saved = {}       # (i, s) -> dict(input, output, bytes)
    local = {}       # same-rank hand-over: ("act"|"grad", i, s) -> tensor
    pending_sends = []
    losses, events = {}, []

    def tag(kind: int, i: int, s: int) -> int:
        return (kind * n_stages + s) * m + i

    # A message is named by what it is (0: activation, 1: gradient), its microbatch and the
    # stage that consumes it.
    def send(tensor, kind, i, to_stage):
        dst = schedule.rank_of(to_stage)
        if dst == rank:
            local[(kind, i, to_stage)] = tensor
        else:
            pending_sends.append(dist.isend(tensor.contiguous(), dst, tag=tag(kind, i, to_stage)))

    def receive(kind, i, s, from_stage):
        src = schedule.rank_of(from_stage)
        if src == rank:
            return local.pop((kind, i, s))
        buffer = torch.empty(shape, dtype=model.torch_dtype, device=device)
        dist.recv(buffer, src, tag=tag(kind, i, s))
        return buffer

    def stage_input(i, s):
        inp = xs[i].to(device) if s == 0 else receive(0, i, s, s - 1)
        return inp.detach().requires_grad_(s > 0)

    _warm_up(stages, shape, model.torch_dtype, device)
    dist.barrier()
    t0 = time.perf_counter()
    for action in schedule.orders[rank]:
        op, i, s = action
        outgoing = None  # (tensor, kind, microbatch, consuming stage) to send when done
        if op == "F":
            inp, stage = stage_input(i, s), stages[s]
            start = time.perf_counter()
            sizes: list = []
            if recompute:
                with torch.no_grad():
                    out = stage(inp)
                sizes.append(inp.numel() * inp.element_size())
            else:
                with memory.hooks(sizes):
                    out = stage(inp)
            entry = {"input": inp, "output": out, "bytes": sum(sizes)}
            if s == n_stages - 1:
                if recompute:
                    entry["output"] = None
                else:
                    with memory.hooks(sizes):
                        entry["output"] = loss_fn(out, ys[i].to(device), m)
                    entry["bytes"] = sum(sizes)
                    losses[i] = entry["output"].item()
            else:
                outgoing = (out.detach(), 0, i, s + 1)
            saved[(i, s)] = entry
            memory.change(entry["bytes"], time.perf_counter() - t0)
        else:
            entry = saved[(i, s)]
            grad_out = None
            if op == "B" and s < n_stages - 1:
                grad_out = receive(1, i, s, s + 1)
                entry["grad_out"] = grad_out
            start = time.perf_counter()
            if op == "B" and recompute:  # rebuild the graph the forward did not keep
                with memory.hooks([]):
                    out = stages[s](entry["input"])
                    if s == n_stages - 1:
                        out = loss_fn(out, ys[i].to(device), m)
                        losses[i] = out.item()
                entry["output"] = out
            out, grad_out = entry["output"], entry.get("grad_out")
            params = list(stages[s].parameters())
            if op == "B":
                wants_input = s > 0
                targets = ([entry["input"]] if wants_input else []) + ([] if split else params)
                if targets:
                    torch.autograd.backward(out, grad_out, inputs=targets, retain_graph=split)
                if wants_input:
                    outgoing = (entry["input"].grad.detach(), 1, i, s - 1)
                    entry["input"].grad = None
                if not split:
                    _release(saved, memory, i, s, t0)
            else:  # W: weight gradients only, from the output gradient B received
                torch.autograd.backward(out, grad_out, inputs=params)
                _release(saved, memory, i, s, t0)
        if delay:  # synthetic cost: before the send, so the next stage waits for it too
            time.sleep(delay[op])
        if outgoing is not None:
            send(*outgoing)
        end = time.perf_counter()
        events.append((rank, tuple(action), start - t0, end - t0))
        pending_sends = [w for w in pending_sends if not w.is_completed()]

    for work in pending_sends:
        work.wait()
    dist.barrier()
    return {
        "events": events,
        "losses": losses,
        "grads": {f"stage{s}.{name}": q.grad.detach().cpu() for s, st in stages.items()
                  for name, q in st.named_parameters()},
        "peak_saved_bytes": memory.peak,
        "saved_bytes_over_time": memory.over_time,
    }


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


def _release(saved, memory, i, s, t0):
    entry = saved.pop((i, s))
    memory.change(-entry["bytes"], time.perf_counter() - t0)
