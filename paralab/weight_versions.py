"""Weight versions: which weights each microbatch's forward and backward see.

Everything else in the library assumes *synchronous* training: all microbatches of a step
use the same weights, and the weights change only between steps (a "flush").  PipeDream
(Harlap et al. 2018) did not flush: each stage updates its weights right after every
backward, so its pipeline never drains -- and microbatches see different weights.  This
module counts the versions, from a schedule's order alone (a stage's weights change only
when that stage's own backward runs, so the order on its rank decides everything):

* :func:`pipedream`: asynchronous 1F1B, one update per microbatch.  Stage ``s`` runs the
  forward of microbatch ``i`` with the weights after ``i - (p-s-1)`` updates: ``p-s-1``
  versions *stale* (rank 0 the most, the last stage not at all), and a different version on
  every stage.  Without *weight stashing* the backward would use newer weights than its
  forward -- a gradient of no function at all; PipeDream stashes the forward's version
  until the backward (one copy of the weights per microbatch in flight: ``p-s`` on stage
  ``s``).
* :func:`pipedream_2bw`: PipeDream-2BW (Narayanan et al. 2021), gradients accumulated
  over ``m`` microbatches and two weight buffers: batch ``t`` runs on version ``t-1`` on
  every stage -- a constant staleness of one, the same on all stages, two copies of the
  weights.
* :func:`flush`: PipeDream-Flush, the 1F1B of Megatron-LM and of this course: batch ``t``
  runs on version ``t`` everywhere -- exactly what one device running the whole batch
  would do.  The price is the bubble at every flush, which is why the rest of the course
  is about shrinking it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .schedules import one_f_one_b


@dataclass(frozen=True)
class WeightVersions:
    """Per ``(microbatch, stage)``: the weight version its forward and its backward use,
    and the version synchronous training (one device, same batches) would use."""

    name: str
    num_stages: int
    num_microbatches: int
    forward: dict
    backward: dict
    synchronous: dict

    def staleness(self, microbatch: int, stage: int) -> int:
        """How many updates behind synchronous training the forward is."""
        return self.synchronous[(microbatch, stage)] - self.forward[(microbatch, stage)]

    def table(self, which: str = "forward") -> list[list[int]]:
        """Rows = microbatches, columns = stages: the versions ``which`` uses (or
        ``"staleness"``)."""
        get = (self.staleness if which == "staleness"
               else lambda i, s: getattr(self, which)[(i, s)])
        return [[get(i, s) for s in range(self.num_stages)]
                for i in range(self.num_microbatches)]

    @property
    def stashing_consistent(self) -> bool:
        """Every backward uses the weights of its own forward."""
        return self.forward == self.backward

    @property
    def stages_agree(self) -> bool:
        """Every microbatch sees the same version on every stage."""
        return all(len({self.forward[(i, s)] for s in range(self.num_stages)}) == 1
                   for i in range(self.num_microbatches))


def pipedream(p: int, n: int, stashing: bool = True) -> WeightVersions:
    """Asynchronous 1F1B over ``n`` microbatches, one weight update per backward.

    Versions are counted along each rank's 1F1B order (:func:`~paralab.schedules.one_f_one_b`,
    which is PipeDream's order without the flush): the forward of ``(i, s)`` sees as many
    updates as backwards ran on stage ``s`` before it; with ``stashing`` the backward uses
    the same version, otherwise the one current when it runs."""
    schedule = one_f_one_b(p, n)
    forward, backward = {}, {}
    for stage, row in enumerate(schedule.orders):
        updates = 0
        for op, i, _ in row:
            if op == "F":
                forward[(i, stage)] = updates
            else:
                backward[(i, stage)] = forward[(i, stage)] if stashing else updates
                updates += 1
    synchronous = {(i, s): i for i in range(n) for s in range(p)}
    return WeightVersions("PipeDream" + ("" if stashing else " (no stashing)"), p, n,
                          forward, backward, synchronous)


def pipedream_2bw(p: int, batches: int, m: int) -> WeightVersions:
    """PipeDream-2BW: ``batches`` batches of ``m`` microbatches; batch ``t`` uses version
    ``max(t-1, 0)`` on every stage (the update from batch ``t-1`` is still being computed
    while batch ``t`` starts: ``W(t+1) = W(t) - lr * grad f(W(t-1))``)."""
    versions = {(i, s): max(i // m - 1, 0) for i in range(batches * m) for s in range(p)}
    synchronous = {(i, s): i // m for i in range(batches * m) for s in range(p)}
    return WeightVersions("PipeDream-2BW", p, batches * m, versions, dict(versions),
                          synchronous)


def flush(p: int, batches: int, m: int) -> WeightVersions:
    """PipeDream-Flush (1F1B with a flush per batch): batch ``t`` uses version ``t``
    everywhere, as one device would."""
    versions = {(i, s): i // m for i in range(batches * m) for s in range(p)}
    return WeightVersions("PipeDream-Flush", p, batches * m, versions, dict(versions),
                          dict(versions))


def weight_copies(name: str, p: int, stage: int) -> int:
    """Copies of stage ``stage``'s weights a rank keeps: PipeDream stashes one per
    microbatch in flight (``p - stage``), 2BW two, Flush one."""
    return {"pipedream": p - stage, "2bw": 2, "flush": 1}[name]
