"""The executor: each rank interprets its lowered program (:mod:`paralab.lowering`).

A program is the rank's action list with its communication written in, so running it is a
loop over steps, each doing exactly what it says:

* ``RECV_F`` / ``RECV_B``: wait for the activation / output gradient a later step needs and
  file it in the rank's *mailbox* under the message's key;
* ``F(i, s)``: take the input (the data on stage 0, else what the step ``takes`` from the
  mailbox), run stage ``s``, keep what backward needs, and leave the output in the mailbox
  for whoever the step ``gives`` it to (the last stage computes the loss instead);
* ``B(i, s)``: take the gradient of the stage output (the last stage starts from its loss),
  backpropagate to the stage *input* and leave that gradient in the mailbox; when the
  schedule has no ``W``, the weight gradients are computed in the same pass;
* ``W(i, s)``: backpropagate the same output gradient to the stage *weights* only;
* ``SEND_F`` / ``SEND_B``: send a mailbox entry to the rank that needs it.

Data handed from one stage to the next on the same rank goes through the mailbox without a
message.  Sends are non-blocking (``isend``) and waited for at the end of the step, so no
rank ever blocks on a send, and every message carries a tag naming its (kind, microbatch,
stage).  gloo matches messages by tag, so there every receive of the step is *posted* when
the step starts and the ``RECV`` step only waits for its data: transfers then overlap the
computation instead of starting when the data is needed.  NCCL ignores tags and matches a
pair's messages in posting order, so there each receive is posted at its ``RECV`` step, in
the lowered order (:func:`paralab.pipeline.check_message_order` checks both sides agree).
(We avoid ``batch_isend_irecv``, which is known to hang on gloo in some patterns.)

``group`` (optional) is the pipeline's process group when the pipeline is one dimension of a
larger mesh (:mod:`paralab.hybrid`): the programs name pipeline ranks ``0..p-1``, which are
that group's ranks, and every send and receive goes to the global rank
``dist.get_global_rank(group, r)`` within ``group``.  Without it the pipeline is the whole
world, as before.

Measured along the way: each compute step's start and end (waiting for data is idle, as in
the simulator) and the bytes autograd saves for backward, via saved-tensor hooks.
``costs`` makes each compute step last a fixed time (its real compute runs inside it);
``recompute`` keeps only each stage's input in the forward and recomputes in the backward,
from the random state the forward started from (dropout masks are the forward's).
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.distributed as dist

from . import lowering
from .memory import SavedTensorMeter
from .rules import ACTIVATION
from .schedules import Schedule


class RankExecutor:
    """One rank's side of a pipeline: its stages, its program and its mailbox.

    Built once per world; :meth:`step` runs the rank's program for one training step and
    can be called repeatedly (benchmarks do).  Gradients accumulate in the stage modules,
    as in any PyTorch training loop.  ``model`` provides ``build(num_stages)``,
    ``microbatches(m)``, ``loss(output, target, m)``, ``batch``, ``width`` and
    ``torch_dtype`` (see :class:`paralab.pipeline.PipelineModel`).  ``rank`` is the
    pipeline rank; with ``group`` (the pipeline's process group) it is this process's rank
    in that group, and messages go to the group's members."""

    def __init__(self, rank: int, schedule: Schedule, model, *, costs=None,
                 recompute: bool = False, device=None, program=None, group=None):
        self.rank, self.schedule, self.model = rank, schedule, model
        self.group = group
        self.recompute, self.device = recompute, device or torch.device("cpu")
        self.program = lowering.lower(schedule)[rank] if program is None else program
        self.split = schedule.splits_backward
        self.last = schedule.num_stages - 1
        built = model.build(schedule.num_stages)
        self.stages = {s: built[s].to(self.device) for s in schedule.stages_of(rank)}
        self.parameters = {s: list(stage.parameters()) for s, stage in self.stages.items()}
        m = schedule.num_microbatches
        self.shape = (model.batch // m, model.width)
        xs, ys = model.microbatches(m)
        self.xs = [x.to(self.device) for x in xs]
        self.ys = [y.to(self.device) for y in ys]
        self.delay = {}
        if costs:  # per-rank costs, split over this rank's chunks as in the simulator
            f, b, w = (c / schedule.chunks for c in costs)
            self.delay = {"F": f, "B": b + (0 if self.split else w), "W": w}
        self.prepost = dist.is_initialized() and dist.get_backend() == "gloo"
        self._receives = [(s.message.key, self._peer(s.message.src), self._tag(s.message.key))
                          for s in self.program if s.kind.startswith("RECV")]
        self._steps = [self._prepare(step) for step in self.program]

    # -- the program, prepared once: (handler, arguments) per step ---------------------------
    def _peer(self, pipeline_rank: int) -> int:
        """The global rank of a pipeline rank (the same number without a group)."""
        if self.group is None:
            return pipeline_rank
        return dist.get_global_rank(self.group, pipeline_rank)

    def _tag(self, key) -> int:
        kind, i, stage = key
        kind_index = 0 if kind == ACTIVATION else 1
        return ((kind_index * self.schedule.num_stages + stage)
                * self.schedule.num_microbatches + i)

    def _prepare(self, step: lowering.Step):
        i, s = step.microbatch, step.stage
        if step.kind in ("F", "B"):
            assert len(step.takes) <= 1, step  # one input, or one output gradient
            take = step.takes[0] if step.takes else None
            handler = self._forward if step.kind == "F" else self._backward
            return handler, (i, s, take, step.gives)
        if step.kind == "W":
            return self._weight, (i, s)
        key = step.message.key
        if step.kind.startswith("SEND"):
            return self._send, (key, self._peer(step.message.dst), self._tag(key))
        return self._recv, (key, self._peer(step.message.src), self._tag(key))

    # -- communication -----------------------------------------------------------------------
    def _post(self, src: int, tag: int):
        buffer = torch.empty(self.shape, dtype=self.model.torch_dtype, device=self.device)
        return buffer, dist.irecv(buffer, src, group=self.group, tag=tag)

    def _recv(self, key, src: int, tag: int):
        buffer, work = self.posted.pop(key, None) or self._post(src, tag)
        work.wait()
        self.mailbox[key] = buffer

    def _send(self, key, dst: int, tag: int):
        self.sent.append(dist.isend(self.mailbox.pop(key).contiguous(), dst, group=self.group,
                                    tag=tag))

    # -- computation -------------------------------------------------------------------------
    def _forward(self, i, s, take, gives):
        inp = self.xs[i] if take is None else self.mailbox.pop(take)
        start = time.perf_counter()
        inp = inp.detach().requires_grad_(take is not None)
        stage = self.stages[s]
        rng = None
        if self.recompute:  # keep only the input; B rebuilds the graph
            rng = self._rng_state()  # ...drawing the same dropout masks as this forward
            with torch.no_grad():
                out = stage(inp)
            held = inp.numel() * inp.element_size()
        else:
            sizes = []
            with self.meter.hooks(sizes):
                out = stage(inp)
                if s == self.last:
                    out = self.model.loss(out, self.ys[i], self.schedule.num_microbatches)
                    self.losses[i] = out.item()
            held = sum(sizes)
        self.saved[(i, s)] = {"input": inp, "output": out, "bytes": held, "rng": rng}
        self.meter.change(held, start - self.t0)
        for key in gives:
            self.mailbox[key] = out.detach()
        self._finish("F", i, s, start)

    def _backward(self, i, s, take, gives):
        entry = self.saved[(i, s)]
        grad_out = entry["grad_out"] = None if take is None else self.mailbox.pop(take)
        start = time.perf_counter()
        if self.recompute:
            with self.meter.hooks([]), self._replaying(entry["rng"]):
                out = self.stages[s](entry["input"])
                if s == self.last:
                    out = self.model.loss(out, self.ys[i], self.schedule.num_microbatches)
                    self.losses[i] = out.item()
            entry["output"] = out
        params = [] if self.split else self.parameters[s]
        targets = ([entry["input"]] if gives else []) + params
        if targets:  # stage 0 with a split backward has no input gradient to compute
            torch.autograd.backward(entry["output"], grad_out, inputs=targets,
                                    retain_graph=self.split)
        if not self.split:
            self._release(i, s)
        if gives:
            grad, entry["input"].grad = entry["input"].grad.detach(), None
            for key in gives:
                self.mailbox[key] = grad
        self._finish("B", i, s, start)

    def _weight(self, i, s):
        entry = self.saved[(i, s)]
        start = time.perf_counter()
        torch.autograd.backward(entry["output"], entry["grad_out"], inputs=self.parameters[s])
        self._release(i, s)
        self._finish("W", i, s, start)

    def _rng_state(self):
        """The random state a forward starts from (the device's too, on a GPU)."""
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return torch.get_rng_state(), cuda

    @contextlib.contextmanager
    def _replaying(self, state):
        """Run the recomputation from the random state its forward started from, then put
        the state back: dropout draws the forward's masks again (as torch.utils.checkpoint
        does), and the forwards that follow draw what they would have without
        recomputation."""
        cpu, cuda = state
        with torch.random.fork_rng(devices=[self.device] if cuda is not None else []):
            torch.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state(cuda, self.device)
            yield

    def _release(self, i, s):
        entry = self.saved.pop((i, s))
        self.meter.change(-entry["bytes"], time.perf_counter() - self.t0)

    def _finish(self, op, i, s, start):
        if self.delay:  # synthetic cost, before any send so the next stage waits too;
            # the real compute ran inside it (an action takes max(compute, cost))
            time.sleep(max(0.0, start + self.delay[op] - time.perf_counter()))
        self.events.append((self.rank, (op, i, s), start - self.t0,
                            time.perf_counter() - self.t0))

    # -- one training step -------------------------------------------------------------------
    def step(self) -> dict:
        self.meter = SavedTensorMeter(q for params in self.parameters.values() for q in params)
        self.mailbox, self.saved, self.sent, self.losses, self.events = {}, {}, [], {}, []
        self.posted = ({key: self._post(src, tag) for key, src, tag in self._receives}
                       if self.prepost else {})
        self.t0 = time.perf_counter()
        for handler, args in self._steps:
            handler(*args)
        for work in self.sent:
            work.wait()
        return {"events": self.events, "losses": self.losses,
                "peak_saved_bytes": self.meter.peak,
                "saved_bytes_over_time": self.meter.over_time}

    def grads(self) -> dict:
        return {f"stage{s}.{name}": q.grad.detach().cpu() for s, st in self.stages.items()
                for name, q in st.named_parameters()}

    def warm_up(self):
        """Run one throw-away forward/backward per stage, in the same call forms as the
        real steps, so one-time costs don't land inside the first timed action (the first
        ``autograd.backward`` with explicit output gradients imports SymPy: ~0.3 s)."""
        for stage in self.stages.values():
            x = torch.zeros(self.shape, dtype=self.model.torch_dtype, device=self.device,
                            requires_grad=True)
            out = stage(x)
            torch.autograd.backward(out, torch.ones_like(out), inputs=[x], retain_graph=True)
            torch.autograd.backward(out, torch.ones_like(out), inputs=list(stage.parameters()))
            stage.zero_grad(set_to_none=True)
