"""The pipeline simulator in its plainest form: read this one aloud.

Every rank runs its list of actions in order.  An action can start once its rank is free
and every action it needs (:func:`paralab.rules.needs`) has finished -- plus ``comm`` when
that need was met on another rank, since the data must travel.  Nothing else decides the
timeline, so the bubbles it shows are exactly the ones the dependencies force.

A rank's list is read unit by unit (:meth:`~paralab.schedules.Schedule.units`): usually one
action; several when the schedule fuses them into one kernel (a full backward ``B`` + ``W``,
or DualPipe's overlapped ``F`` + ``B`` + ``W``).  A unit waits for what its actions need
from outside it, lasts what :func:`~paralab.simulator.unit_durations` says, and everything
it computes is ready when it ends.

:func:`paralab.simulator.simulate` computes the same timelines for a million actions; the
tests check on random schedules that the two always agree.
"""

from __future__ import annotations

from . import rules
from .schedules import Schedule, ensure_valid
from .simulator import DeadlockError, action_costs, deadlock_message, unit_durations
from .timeline import Event, Timeline


def simulate(schedule: Schedule, t_f, t_b, t_w=0, comm=0, t_fb=None) -> Timeline:
    """Same arguments and result as :func:`paralab.simulator.simulate`."""
    ensure_valid(schedule)
    cost = action_costs(schedule, t_f, t_b, t_w, comm, t_fb)  # cost[op][stage]
    finished = {}                        # action -> the time it ended
    free = [0] * schedule.num_ranks      # when each rank is done with what it ran so far
    next_ = [0] * schedule.num_ranks     # index of each rank's next action
    events = []

    progress = True
    while progress:                      # sweep over the ranks until nobody can move
        progress = False
        for rank, order in enumerate(schedule.orders):
            units = dict(schedule.units(rank))   # first step -> step after the unit
            while next_[rank] < len(order):
                unit = order[next_[rank]:units[next_[rank]]]
                needs = [(action, need) for action in unit
                         for need in rules.needs(action, schedule.num_stages)
                         if need.action not in unit]
                if any(need.action not in finished for _, need in needs):
                    break                # wait until another rank has run it
                start = free[rank]
                for action, need in needs:
                    travel = comm if rules.crosses(schedule, need, action) else 0
                    start = max(start, finished[need.action] + travel)
                end = start
                for action, duration in zip(unit, unit_durations(unit, cost)):
                    events.append(Event(rank, action, end, end + duration))
                    end = end + duration
                for action in unit:
                    finished[action] = end
                free[rank] = end
                next_[rank] += len(unit)
                progress = True

    if any(next_[rank] < len(order) for rank, order in enumerate(schedule.orders)):
        raise DeadlockError(deadlock_message(schedule, next_, finished.__contains__))
    return Timeline(schedule, tuple(events), source="simulated")
