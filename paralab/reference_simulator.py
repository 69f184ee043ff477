"""The pipeline simulator in its plainest form: read this one aloud.

Every rank runs its list of actions in order.  An action can start once its rank is free
and every action it needs (:func:`paralab.rules.needs`) has finished -- plus ``comm`` when
that need was met on another rank, since the data must travel.  Nothing else decides the
timeline, so the bubbles it shows are exactly the ones the dependencies force.

:func:`paralab.simulator.simulate` computes the same timelines for a million actions; the
tests check on random schedules that the two always agree.
"""

from __future__ import annotations

from . import rules
from .schedules import Schedule, ensure_valid
from .simulator import DeadlockError, action_costs, deadlock_message
from .timeline import Event, Timeline


def simulate(schedule: Schedule, t_f, t_b, t_w=0, comm=0) -> Timeline:
    """Same arguments and result as :func:`paralab.simulator.simulate`."""
    ensure_valid(schedule)
    cost = action_costs(schedule, t_f, t_b, t_w, comm)  # cost[op][stage]
    finished = {}                        # action -> the time it ended
    free = [0] * schedule.num_ranks      # when each rank is done with what it ran so far
    next_ = [0] * schedule.num_ranks     # index of each rank's next action
    events = []

    progress = True
    while progress:                      # sweep over the ranks until nobody can move
        progress = False
        for rank, order in enumerate(schedule.orders):
            while next_[rank] < len(order):
                action = order[next_[rank]]
                needs = rules.needs(action, schedule.num_stages)
                if any(need.action not in finished for need in needs):
                    break                # wait until another rank has run it
                start = free[rank]
                for need in needs:
                    travel = comm if rules.crosses(schedule, need, action) else 0
                    start = max(start, finished[need.action] + travel)
                end = start + cost[action.op][action.stage]
                finished[action] = free[rank] = end
                events.append(Event(rank, action, start, end))
                next_[rank] += 1
                progress = True

    if any(next_[rank] < len(order) for rank, order in enumerate(schedule.orders)):
        raise DeadlockError(deadlock_message(schedule, next_, finished.__contains__))
    return Timeline(schedule, tuple(events), source="simulated")
