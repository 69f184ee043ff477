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
from math import lcm
from numbers import Real
from typing import Sequence, Union

from .schedules import Action, Schedule, ScheduleError, gc_paused, validate
from .timeline import Timeline, make_event

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


@gc_paused
def simulate(schedule: Schedule, t_f: Cost, t_b: Cost, t_w: Cost = 0,
             comm: Real = 0) -> Timeline:
    """Run ``schedule`` on the cost model and return its :class:`Timeline`.

    ``t_w`` is the weight-gradient cost.  When the schedule does not split the backward
    (no ``W`` actions), each ``B`` does both halves and costs ``t_b + t_w``.

    Times come out as ints when every cost is an int, as exact ``Fraction``s when any cost
    is a ``Fraction`` (or an int split over ``v`` chunks), and as floats when any is a float."""
    validate(schedule)
    if not isinstance(comm, Real) or comm < 0:
        raise ValueError(f"comm must be a non-negative number, got {comm!r}")
    costs_f = stage_costs(t_f, schedule, "t_f")
    costs_b = stage_costs(t_b, schedule, "t_b")
    costs_w = stage_costs(t_w, schedule, "t_w")
    if not schedule.splits_backward:
        costs_b = [b + w for b, w in zip(costs_b, costs_w)]

    # Exact inputs are simulated on an integer clock (ticks of 1/scale) because Fraction
    # arithmetic dominates the run time of large schedules; the times are converted back
    # at the end, so results are exactly what Fraction arithmetic would give.
    everything = costs_f + costs_b + costs_w + [comm]
    exact = all(isinstance(c, (int, Fraction)) for c in everything)
    scale = 1
    if exact:
        for c in everything:
            if isinstance(c, Fraction):
                scale = lcm(scale, c.denominator)

        def ticks(c):
            return int(c * scale)
    else:
        def ticks(c):
            return c
    cost = {"F": [ticks(c) for c in costs_f], "B": [ticks(c) for c in costs_b],
            "W": [ticks(c) for c in costs_w]}
    p, n_stages, m = schedule.num_ranks, schedule.num_stages, schedule.num_microbatches
    # Neighbouring stages live on different ranks whenever p > 1 (stage s is on rank s % p).
    hop = ticks(comm) if p > 1 else 0
    n_keys = n_stages * m  # key of (op, mb, stage): op_index * n_keys + stage * m + mb
    last = n_stages - 1

    end_time: list = [None] * (3 * n_keys)
    waiting: dict[int, int] = {}  # dependency key -> rank blocked on it
    position = [0] * p
    rank_free = [0] * p
    done_actions: list = []  # (rank, action, start, end) in execution order
    record = done_actions.append
    ready = deque(range(p))

    while ready:
        rank = ready.popleft()
        row = schedule.orders[rank]
        n = len(row)
        pos = position[rank]
        free = rank_free[rank]
        while pos < n:
            action = row[pos]
            op, mb, stage = action
            base = stage * m + mb
            start = free
            blocked = None
            if op == "F":
                k = base
                if stage > 0:
                    done = end_time[base - m]
                    if done is None:
                        blocked = base - m
                    else:
                        done = done + hop
                        if done > start:
                            start = done
            elif op == "B":
                k = n_keys + base
                done = end_time[base]
                if done is None:
                    blocked = base
                else:
                    if done > start:
                        start = done
                    if stage < last:
                        done = end_time[k + m]
                        if done is None:
                            blocked = k + m
                        else:
                            done = done + hop
                            if done > start:
                                start = done
            else:
                k = 2 * n_keys + base
                done = end_time[n_keys + base]
                if done is None:
                    blocked = n_keys + base
                elif done > start:
                    start = done
            if blocked is not None:
                waiting[blocked] = rank
                break
            end = start + cost[op][stage]
            end_time[k] = end
            free = end
            record((rank, action, start, end))
            pos += 1
            woken = waiting.pop(k, None)
            if woken is not None:
                ready.append(woken)
        position[rank] = pos
        rank_free[rank] = free

    stuck = [r for r in range(p) if position[r] < len(schedule.orders[r])]
    if stuck:
        def key(op, mb, stage):
            return ({"F": 0, "B": 1, "W": 2}[op] * n_stages + stage) * m + mb
        raise DeadlockError(_deadlock_message(schedule, stuck, position, end_time, key))

    if exact and (scale > 1 or any(isinstance(c, Fraction) for c in everything)):
        times: dict = {0: 0}  # tick -> time; a step has few distinct times: convert each once

        def convert(t):
            value = times.get(t)
            if value is None:
                value = times[t] = Fraction(t, scale)
            return value
    else:
        def convert(t):
            return t
    events = tuple(make_event(rank, action, convert(start), convert(end))
                   for rank, action, start, end in done_actions)
    return Timeline(schedule, events, source="simulated")


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
