"""The fast pipeline simulator: exact timelines from dependencies and costs.

Each rank executes its action list in order.  An action starts when its rank is free *and*
everything it needs (:mod:`paralab.rules`: the previous stage's forward, its own forward and
the next stage's backward, its own backward) has finished -- plus ``comm`` when that need
was met on another rank.  No other rule exists, so the bubbles the simulator shows are
exactly the ones the dependencies force.  Costs can be ints or ``Fraction``s (then every
result is exact, which is how the tests compare it with the SymPy formulas) or floats.

Read :mod:`paralab.reference_simulator` first: it does the same in a few lines, and a
property test checks that both give the same timeline on random schedules.  This one is
built for a million actions (``bench/bench_simulator.py`` times p=64, m=1024, v=4):

* an integer clock: exact costs become whole numbers of ticks of ``1/scale``, because
  ``Fraction`` arithmetic would dominate the run time; times become ``Fraction``s again
  only at the end;
* flat arrays: the end time of ``(op, stage, microbatch)`` lives at one index of a list,
  and the needs of each ``(op, stage)`` are looked up once, as index offsets, from
  :func:`paralab.rules.stage_table`;
* no sweeping: a rank that must wait is parked on the one action it waits for and woken
  when that action finishes;
* Python's cyclic garbage collector is paused (:func:`~paralab.schedules.gc_paused`).
"""

from __future__ import annotations

from collections import deque
from fractions import Fraction
from math import lcm
from numbers import Real
from typing import Callable, Sequence, Union

from . import rules
from .schedules import Action, Schedule, ScheduleError, ensure_valid, gc_paused
from .timeline import Timeline, make_event

Cost = Union[Real, Sequence[Real]]
OP_INDEX = {"F": 0, "B": 1, "W": 2}


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


def action_costs(schedule: Schedule, t_f: Cost, t_b: Cost, t_w: Cost = 0,
                 comm: Real = 0, t_fb: Cost | None = None) -> dict[str, list]:
    """Per op, the cost of each stage's action.  When the schedule does not split the
    backward (no ``W``), each ``B`` does both halves and costs ``t_b + t_w``.  ``"FB"`` is
    the cost of an overlapped forward and full backward (:func:`unit_durations`) per stage
    of its forward, or None when ``t_fb`` is not given."""
    if not isinstance(comm, Real) or comm < 0:
        raise ValueError(f"comm must be a non-negative number, got {comm!r}")
    costs = {"F": stage_costs(t_f, schedule, "t_f"), "B": stage_costs(t_b, schedule, "t_b"),
             "W": stage_costs(t_w, schedule, "t_w"),
             "FB": None if t_fb is None else stage_costs(t_fb, schedule, "t_fb")}
    if not schedule.splits_backward:
        costs["B"] = [b + w for b, w in zip(costs["B"], costs["W"])]
    return costs


def unit_durations(actions: Sequence[Action], costs: dict) -> list:
    """How long each action of a unit lasts, one after the other (``costs`` from
    :func:`action_costs`).

    A single action, or a full backward (``B`` + ``W``), costs what its actions cost.  An
    overlapped forward and full backward (``F`` + ``B`` + ``W``, DualPipe's ``F&B``) costs
    ``costs["FB"]`` of its forward's stage when given -- less than the sum when the two
    overlap -- and the sum otherwise; its actions are then drawn one after the other,
    each scaled to that total.  Whoever needs any action of a unit waits for the end of
    the whole unit: its parts run together."""
    parts = [costs[a[0]][a[2]] for a in actions]
    fb = costs.get("FB")
    if fb is None or len(actions) != 3 or actions[0][0] != "F":
        return parts
    total, nominal = fb[actions[0][2]], sum(parts)
    if nominal == 0:
        return [_divide(total, 3)] * 3
    if all(isinstance(x, (int, Fraction)) for x in parts + [total]):
        return [Fraction(total) * c / nominal for c in parts]
    return [total * c / nominal for c in parts]


def _divide(x: Real, n: int):
    if isinstance(x, (int, Fraction)):
        return Fraction(x) / n
    return x / n


@gc_paused
def simulate(schedule: Schedule, t_f: Cost, t_b: Cost, t_w: Cost = 0,
             comm: Real = 0, t_fb: Cost | None = None) -> Timeline:
    """Run ``schedule`` on the cost model and return its :class:`Timeline`.

    ``t_w`` is the weight-gradient cost.  When the schedule does not split the backward
    (no ``W`` actions), each ``B`` does both halves and costs ``t_b + t_w``.  ``t_fb`` is
    what an overlapped forward and full backward (a fused ``F`` + ``B`` + ``W`` unit, as in
    DualPipe) costs; by default the sum of its parts (no overlap).

    Times come out as ints when every cost is an int, as exact ``Fraction``s when any cost
    is a ``Fraction`` (or an int split over ``v`` chunks), and as floats when any is a float.
    An invalid schedule is refused with :func:`~paralab.schedules.validate`'s message (a
    generated or already validated one is not checked again)."""
    ensure_valid(schedule)
    costs = action_costs(schedule, t_f, t_b, t_w, comm, t_fb)
    fused = _fused_durations(schedule, costs) if schedule.fused else {}

    # Exact inputs are simulated on an integer clock (ticks of 1/scale); the times are
    # converted back at the end, so results are exactly what Fraction arithmetic would give.
    everything = (costs["F"] + costs["B"] + costs["W"] + (costs["FB"] or []) + [comm]
                  + [d for parts in fused.values() for d in parts])
    exact = all(isinstance(c, (int, Fraction)) for c in everything)
    scale = 1
    if exact:
        for c in everything:
            if isinstance(c, Fraction):
                scale = lcm(scale, c.denominator)
        ticks = {op: [int(c * scale) for c in row] for op, row in costs.items()
                 if row is not None}
        fused = {key: [int(d * scale) for d in parts] for key, parts in fused.items()}
        hop = int(comm * scale)
    else:
        ticks, hop = costs, comm
    if schedule.fused:
        ranks, actions, starts, ends, busy = _run_units(schedule, ticks, fused, hop)
    else:
        ranks, actions, starts, ends, busy = _run(schedule, ticks, hop)

    if exact and (scale > 1 or any(isinstance(c, Fraction) for c in everything)):
        times: dict = {0: 0}  # tick -> time: a step has few distinct times
        for t in starts:
            if t not in times:
                times[t] = Fraction(t, scale)
        for t in ends:
            if t not in times:
                times[t] = Fraction(t, scale)
        get = times.__getitem__
        events = tuple(map(make_event, ranks, actions, map(get, starts), map(get, ends)))
        clock_scale = scale
    else:
        events = tuple(map(make_event, ranks, actions, starts, ends))
        clock_scale = None
    timeline = Timeline(schedule, events, source="simulated")
    # Hand over what we have, so that metrics need no second pass over the events.  On the
    # exact clock, with no instantaneous forward or backward, peak activations follow from
    # each rank's order alone.  (Float sums and ties depend on rounding: there the timeline
    # works from the times themselves.)
    distinct = exact and min(costs["F"] + costs["B"]
                             + [d for parts in fused.values() for d in parts]) > 0
    timeline._preset(clock_scale, starts, ends, ranks, actions, busy if exact else None,
                     distinct)
    return timeline


def check_deadlock(schedule: Schedule) -> None:
    """Raise :class:`DeadlockError` if the ranks of ``schedule`` would wait on each other
    forever (whatever the costs: waiting is decided by the order alone)."""
    ensure_valid(schedule)
    zero = [0] * schedule.num_stages
    if schedule.fused:
        costs = {"F": zero, "B": zero, "W": zero, "FB": None}
        _run_units(schedule, costs, _fused_durations(schedule, costs), 0)
    else:
        _run(schedule, {"F": zero, "B": zero, "W": zero}, 0)


def _run(schedule: Schedule, cost: dict, hop) -> tuple[list, list, list, list, list]:
    """The event loop.  ``cost[op][stage]`` and ``hop`` are in clock units.  Returns the
    rank, action, start and end of every action in the order they were simulated, and the
    busy time of each rank."""
    p, n_stages, m = schedule.num_ranks, schedule.num_stages, schedule.num_microbatches
    n_keys = n_stages * m  # (op, mb, stage) lives at index OP_INDEX[op] * n_keys + stage * m + mb
    table: dict[str, list] = {op: [None] * n_stages for op in OP_INDEX}
    for (op, stage), found in rules.stage_table(n_stages).items():
        action = Action(op, 0, stage)
        needs = tuple((OP_INDEX[n.action.op] * n_keys + n.action.stage * m,
                       hop if rules.crosses(schedule, n, action) else 0) for n in found)
        table[op][stage] = (OP_INDEX[op] * n_keys + stage * m, cost[op][stage], needs)

    end_time: list = [None] * (3 * n_keys)
    waiting: dict[int, int] = {}  # key of an unfinished action -> the rank parked on it
    position = [0] * p
    rank_free = [0] * p
    rank_busy = [0] * p
    ranks: list = []
    actions: list = []
    starts: list = []
    ends: list = []
    ready = deque(range(p))

    while ready:
        rank = ready.popleft()
        row = schedule.orders[rank]
        n = len(row)
        pos = position[rank]
        free = rank_free[rank]
        busy = rank_busy[rank]
        while pos < n:
            action = row[pos]
            op, mb, stage = action
            key, duration, needs = table[op][stage]
            start = free
            for base, delay in needs:
                done = end_time[base + mb]
                if done is None:
                    break  # not finished yet: park this rank on it (below)
                done += delay
                if done > start:
                    start = done
            else:  # every need has finished: run it
                key += mb
                free = end_time[key] = start + duration
                busy += duration
                ranks.append(rank)
                actions.append(action)
                starts.append(start)
                ends.append(free)
                pos += 1
                woken = waiting.pop(key, None)
                if woken is not None:
                    ready.append(woken)
                continue
            waiting[base + mb] = rank
            break
        position[rank] = pos
        rank_free[rank] = free
        rank_busy[rank] = busy

    if any(position[r] < len(schedule.orders[r]) for r in range(p)):
        def finished(a: Action) -> bool:
            return end_time[OP_INDEX[a.op] * n_keys + a.stage * m + a.microbatch] is not None
        raise DeadlockError(deadlock_message(schedule, position, finished))
    return ranks, actions, starts, ends, rank_busy


def _fused_durations(schedule: Schedule, costs: dict) -> dict:
    """``(rank, first step) -> durations of its actions`` for every fused unit."""
    out = {}
    for rank, units in enumerate(schedule.fused):
        row = schedule.orders[rank]
        for start, length in units:
            out[(rank, start)] = unit_durations(row[start:start + length], costs)
    return out


def _run_units(schedule: Schedule, cost: dict, fused: dict, hop):
    """The event loop of :func:`_run` for a schedule with fused units: a rank runs unit
    after unit; a unit starts when the rank is free and every need of its actions from
    outside the unit has finished; each of its actions is ready when the unit ends."""
    p, n_stages, m = schedule.num_ranks, schedule.num_stages, schedule.num_microbatches
    n_keys = n_stages * m
    table = {}
    for (op, stage), found in rules.stage_table(n_stages).items():
        action = Action(op, 0, stage)
        table[(op, stage)] = (OP_INDEX[op] * n_keys + stage * m, tuple(
            (OP_INDEX[n.action.op] * n_keys + n.action.stage * m, n.action,
             hop if rules.crosses(schedule, n, action) else 0) for n in found))
    plans = []  # per rank: per unit, (actions, durations, keys, outside needs)
    for rank, row in enumerate(schedule.orders):
        plan = []
        for start, stop in schedule.units(rank):
            unit = row[start:stop]
            durations = fused.get((rank, start))
            if durations is None:
                durations = [cost[unit[0][0]][unit[0][2]]]
            keys, outside = [], []
            for op, mb, stage in unit:
                key, needs = table[(op, stage)]
                keys.append(key + mb)
                outside.extend((base + mb, delay) for base, needed, delay in needs
                               if Action(needed.op, mb, needed.stage) not in unit)
            plan.append((unit, durations, keys, outside))
        plans.append(plan)

    end_time: list = [None] * (3 * n_keys)
    waiting: dict[int, int] = {}
    position, rank_free, rank_busy = [0] * p, [0] * p, [0] * p
    ranks: list = []
    actions: list = []
    starts: list = []
    ends: list = []
    ready = deque(range(p))
    while ready:
        rank = ready.popleft()
        plan = plans[rank]
        pos, free = position[rank], rank_free[rank]
        while pos < len(plan):
            unit, durations, keys, outside = plan[pos]
            start = free
            for key, delay in outside:
                done = end_time[key]
                if done is None:
                    waiting[key] = rank
                    break
                if done + delay > start:
                    start = done + delay
            else:
                t = start
                for action, duration in zip(unit, durations):
                    ranks.append(rank)
                    actions.append(action)
                    starts.append(t)
                    t = t + duration
                    ends.append(t)
                rank_busy[rank] += t - start
                free = t
                for key in keys:
                    end_time[key] = t
                    woken = waiting.pop(key, None)
                    if woken is not None:
                        ready.append(woken)
                pos += 1
                continue
            break
        position[rank], rank_free[rank] = pos, free

    if any(position[r] < len(plans[r]) for r in range(p)):
        def finished(a: Action) -> bool:
            return end_time[OP_INDEX[a.op] * n_keys + a.stage * m + a.microbatch] is not None
        steps = [schedule.units(r)[position[r]][0] if position[r] < len(plans[r])
                 else len(schedule.orders[r]) for r in range(p)]
        raise DeadlockError(deadlock_message(schedule, steps, finished))
    return ranks, actions, starts, ends, rank_busy


def deadlock_message(schedule: Schedule, position: Sequence[int],
                     finished: Callable[[Action], bool]) -> str:
    """Name every rank that cannot go on, the action (or fused unit) it is at and the needs
    of that action that never finish.  ``position[r]`` is the index of rank ``r``'s next
    action (the first of its unit)."""
    lines = ["deadlock: the schedule can never finish; these ranks wait forever:"]
    for rank, row in enumerate(schedule.orders):
        if position[rank] == len(row):
            continue
        stop = dict(schedule.units(rank)).get(position[rank], position[rank] + 1) \
            if schedule.fused else position[rank] + 1
        unit = row[position[rank]:stop]
        missing = [n.action for action in unit for n in rules.needs(action, schedule.num_stages)
                   if not finished(n.action) and n.action not in unit]
        waits = ", ".join(f"{a} (rank {schedule.rank_of(a.stage)})" for a in missing)
        action = "+".join(str(a) for a in unit)
        lines.append(f"  rank {rank} at step {position[rank]} ({action}) waits for {waits}")
    lines.append("each of those is itself queued behind an action that waits: reorder so that "
                 "what a rank waits for is scheduled before what it blocks")
    return "\n".join(lines)
