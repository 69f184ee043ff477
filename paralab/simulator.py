"""A dependency-driven pipeline simulator.

Each rank executes its action list in order.  An action starts when its rank is free *and*
everything it depends on has finished (plus ``comm`` when that dependency ran on another
rank):

* ``F(i, s)`` needs ``F(i, s-1)``: the activations of the previous stage;
* ``B(i, s)`` needs ``F(i, s)`` (its saved activations) and ``B(i, s+1)`` (the gradient
  of its output);
* ``W(i, s)`` needs ``B(i, s)``.

No other rule exists, so the bubbles the simulator shows are exactly the ones the
dependencies force.  Costs can be ints or ``Fraction``s (then every result is exact, which
is how the tests compare it with the SymPy formulas) or floats.
"""

from __future__ import annotations

from collections import deque
from fractions import Fraction
from numbers import Real
from typing import Sequence, Union

from .schedules import Action, Schedule, ScheduleError, validate
from .timeline import Event, Timeline

Cost = Union[Real, Sequence[Real]]


class DeadlockError(ScheduleError):
    """The ranks wait on each other forever; the message names every stuck rank."""


def stage_costs(cost: Cost, schedule: Schedule, name: str) -> list:
    """Cost of one microbatch through each (virtual) stage.

    A number is the cost of one microbatch through one *rank's* share of the model; with
    ``v`` chunks per rank each chunk costs a ``v``-th of it (so interleaving does not change
    the total work).  A sequence gives every stage's cost explicitly."""
    v = schedule.chunks
    if isinstance(cost, Real):
        costs = [cost if v == 1 else _divide(cost, v)] * schedule.num_stages
    else:
        costs = list(cost)
        if len(costs) != schedule.num_stages:
            raise ValueError(f"{name} has {len(costs)} per-stage costs but the schedule has "
                             f"{schedule.num_stages} stages")
    for c in costs:
        if not isinstance(c, Real) or c < 0:
            raise ValueError(f"{name} must be non-negative numbers, got {c!r}")
    return costs


def _divide(x: Real, n: int):
    if isinstance(x, (int, Fraction)):
        return Fraction(x) / n
    return x / n


def simulate(schedule: Schedule, t_f: Cost, t_b: Cost, t_w: Cost = 0,
             comm: Real = 0) -> Timeline:
    """Run ``schedule`` on the cost model and return its :class:`Timeline`.

    ``t_w`` is the weight-gradient cost.  When the schedule does not split the backward
    (no ``W`` actions), each ``B`` does both halves and costs ``t_b + t_w``."""
    validate(schedule)
    if not isinstance(comm, Real) or comm < 0:
        raise ValueError(f"comm must be a non-negative number, got {comm!r}")
    costs_f = stage_costs(t_f, schedule, "t_f")
    costs_b = stage_costs(t_b, schedule, "t_b")
    costs_w = stage_costs(t_w, schedule, "t_w")
    if not schedule.splits_backward:
        costs_b = [b + w for b, w in zip(costs_b, costs_w)]
    cost = {"F": costs_f, "B": costs_b, "W": costs_w}

    p, n_stages, m = schedule.num_ranks, schedule.num_stages, schedule.num_microbatches
    op_index = {"F": 0, "B": 1, "W": 2}

    def key(op: str, mb: int, stage: int) -> int:
        return (op_index[op] * n_stages + stage) * m + mb

    end_time: list = [None] * (3 * n_stages * m)
    waiting: dict[int, int] = {}  # dependency key -> rank blocked on it
    position = [0] * p
    rank_free = [0] * p
    events: list[Event] = []
    ready = deque(range(p))

    def dependencies(a: Action):
        if a.op == "F":
            if a.stage > 0:
                yield "F", a.microbatch, a.stage - 1
        elif a.op == "B":
            yield "F", a.microbatch, a.stage
            if a.stage < n_stages - 1:
                yield "B", a.microbatch, a.stage + 1
        else:
            yield "B", a.microbatch, a.stage

    while ready:
        rank = ready.popleft()
        row = schedule.orders[rank]
        while position[rank] < len(row):
            action = row[position[rank]]
            start = rank_free[rank]
            blocked = None
            for op, mb, stage in dependencies(action):
                done = end_time[key(op, mb, stage)]
                if done is None:
                    blocked = key(op, mb, stage)
                    break
                if stage % p != rank:
                    done = done + comm
                if done > start:
                    start = done
            if blocked is not None:
                waiting[blocked] = rank
                break
            end = start + cost[action.op][action.stage]
            k = key(action.op, action.microbatch, action.stage)
            end_time[k] = end
            rank_free[rank] = end
            events.append(Event(rank, action, start, end))
            position[rank] += 1
            woken = waiting.pop(k, None)
            if woken is not None:
                ready.append(woken)

    stuck = [r for r in range(p) if position[r] < len(schedule.orders[r])]
    if stuck:
        raise DeadlockError(_deadlock_message(schedule, stuck, position, end_time, key))
    return Timeline(schedule, tuple(events), source="simulated")


def _deadlock_message(schedule, stuck, position, end_time, key) -> str:
    lines = ["deadlock: the schedule can never finish; these ranks wait forever:"]
    for rank in stuck:
        action = schedule.orders[rank][position[rank]]
        needs = []
        if action.op == "F" and action.stage > 0:
            needs.append(Action("F", action.microbatch, action.stage - 1))
        if action.op == "B":
            needs.append(Action("F", action.microbatch, action.stage))
            if action.stage < schedule.num_stages - 1:
                needs.append(Action("B", action.microbatch, action.stage + 1))
        if action.op == "W":
            needs.append(Action("B", action.microbatch, action.stage))
        missing = [a for a in needs if end_time[key(a.op, a.microbatch, a.stage)] is None]
        waits = ", ".join(f"{a} (rank {schedule.rank_of(a.stage)})" for a in missing)
        lines.append(f"  rank {rank} at step {position[rank]} ({action}) waits for {waits}")
    lines.append("each of those is itself queued behind an action that waits: reorder so that "
                 "what a rank waits for is scheduled before what it blocks")
    return "\n".join(lines)
