"""A small classifier to cut into pipeline stages, with its data and its one-process reference.

Pipeline parallelism is only convincing on a model that learns: gradients that equal a single
process's are the proof of correctness, and a loss that falls is the proof that the whole
thing trains.  :class:`Classifier` is the smallest model that shows both:

* a stack of ``blocks`` equally sized residual blocks, ``x + tanh(Linear(x))`` (:class:`Block`;
  residual, so that gradients reach the first block undiminished and a few steps visibly
  train it), whose last block is the head ``Linear(width, classes)``.  Every boundary
  between two blocks, and the input, is a ``(microbatch size, width)`` tensor, so whatever
  crosses a stage boundary has one shape and one dtype (:meth:`Classifier.boundary`);
* data generated in code (no download): ``classes`` overlapping Gaussian clusters in
  ``width`` dimensions, one fixed batch, so that full-batch gradient descent takes the loss
  well below chance (``log(classes)``) within a few steps;
* the loss of one microbatch is its mean cross-entropy divided by ``m``, so that the
  gradients accumulated over the ``m`` microbatches are those of the whole batch's mean:
  what one process computes (:meth:`reference_step`, :meth:`reference_training`).

Every rank builds the whole model from ``seed`` and keeps its own stages, so the pipeline
starts from exactly the single process's weights.  The class also speaks the model protocol
of :class:`paralab.interpreter.RankExecutor` (``build``, ``microbatches``, ``loss``,
``batch``, ``width``, ``torch_dtype``), so :func:`paralab.pipeline.run_pipeline` runs it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    """``x + tanh(Linear(x))``: a residual block of constant width."""

    def __init__(self, width: int):
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.linear(x))


@dataclass(frozen=True)
class Classifier:
    """``blocks`` blocks: ``blocks - 1`` residual blocks (:class:`Block`), then the head
    ``Linear(width, classes)``; ``batch`` points of ``classes`` clusters whose centres are
    ``separation`` standard deviations apart (per coordinate)."""

    width: int = 16
    blocks: int = 8
    classes: int = 4
    batch: int = 64
    separation: float = 0.5
    seed: int = 0
    dtype: str = "float64"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    # -- the model ---------------------------------------------------------------------------
    def build_model(self) -> nn.Sequential:
        """The whole model: an ``nn.Sequential`` whose children are the blocks.

        The weights depend on ``seed`` only (the global random state is left as it was), so
        every rank that builds it gets the same ones."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            blocks = [Block(self.width) for _ in range(self.blocks - 1)]
            blocks.append(nn.Sequential(nn.Linear(self.width, self.classes)))
        return nn.Sequential(*blocks).to(self.torch_dtype)

    def build(self, num_stages: int) -> list[nn.Sequential]:
        """The model cut into ``num_stages`` stages of ``blocks / num_stages`` consecutive
        blocks each (stage ``s`` computes on the output of stage ``s-1``)."""
        if num_stages < 1 or self.blocks % num_stages:
            raise ValueError(f"{self.blocks} blocks cannot be cut into {num_stages} equal "
                             f"stages: the number of stages must divide the number of blocks")
        model = self.build_model()
        per_stage = self.blocks // num_stages
        return [model[s * per_stage:(s + 1) * per_stage] for s in range(num_stages)]

    def boundary(self, m: int) -> tuple[tuple[int, int], torch.dtype]:
        """Shape and dtype of one microbatch's activation (or its gradient) between two
        stages, when the batch is split into ``m`` microbatches."""
        return (self._microbatch_size(m), self.width), self.torch_dtype

    # -- the data ----------------------------------------------------------------------------
    def data(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch: points ``x`` of shape ``(batch, width)`` and class labels ``y``."""
        generator = torch.Generator().manual_seed(self.seed + 1)
        centres = self.separation * torch.randn(self.classes, self.width, generator=generator,
                                    dtype=self.torch_dtype)
        y = torch.arange(self.batch) % self.classes
        y = y[torch.randperm(self.batch, generator=generator)]
        x = centres[y] + torch.randn(self.batch, self.width, generator=generator,
                                     dtype=self.torch_dtype)
        return x, y

    def microbatches(self, m: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The batch cut into ``m`` equal microbatches: ``(inputs, targets)``, two lists."""
        self._microbatch_size(m)
        x, y = self.data()
        return list(x.chunk(m)), list(y.chunk(m))

    def loss(self, output: torch.Tensor, target: torch.Tensor, m: int) -> torch.Tensor:
        """One microbatch's mean cross-entropy, divided by ``m``: the ``m`` losses add up to
        the batch's mean, and so do their gradients."""
        return F.cross_entropy(output, target) / m

    def _microbatch_size(self, m: int) -> int:
        if not isinstance(m, int) or m < 1 or self.batch % m:
            raise ValueError(f"a batch of {self.batch} does not split into {m!r} equal "
                             f"microbatches")
        return self.batch // m

    # -- one process -------------------------------------------------------------------------
    def reference_step(self, num_stages: int, m: int) -> tuple[list[float], dict]:
        """One training step of the whole model in one process, microbatch by microbatch:
        ``(losses, gradients)``, the losses scaled by ``1/m`` as :meth:`loss` does, the
        gradients named ``stage{s}.{parameter}`` for the cut into ``num_stages`` stages."""
        stages = self.build(num_stages)
        return self._step(stages, m), _gradients(stages)

    def reference_training(self, num_stages: int, m: int, steps: int, lr: float,
                           zero_grad: bool = True) -> list[float]:
        """The loss of each of ``steps`` steps of plain SGD (learning rate ``lr``, gradients
        zeroed before each step) in one process: the curve a pipeline must reproduce.
        ``zero_grad=False`` gives the curve of a loop that forgets to zero them (each step
        then descends along the sum of all gradients so far), to recognise that mistake."""
        stages = self.build(num_stages)
        parameters = [q for s in stages for q in s.parameters()]
        curve = []
        for _ in range(steps):
            if zero_grad:
                for q in parameters:
                    q.grad = None
            curve.append(sum(self._step(stages, m)))
            # torch.optim.SGD's update, written out: building an optimizer imports
            # torch._dynamo, seconds of start-up for a one-line update
            with torch.no_grad():
                for q in parameters:
                    q.add_(q.grad, alpha=-lr)
        return curve

    def _step(self, stages, m: int) -> list[float]:
        xs, ys = self.microbatches(m)
        losses = []
        for x, y in zip(xs, ys):
            out = x
            for stage in stages:
                out = stage(out)
            loss = self.loss(out, y, m)
            loss.backward()
            losses.append(loss.item())
        return losses


def _gradients(stages) -> dict:
    return {f"stage{s}.{name}": q.grad.detach().clone() for s, stage in enumerate(stages)
            for name, q in stage.named_parameters()}
