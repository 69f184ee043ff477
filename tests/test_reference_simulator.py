"""The short reference simulator and the fast one agree on every schedule."""

from fractions import Fraction

import pytest
from hypothesis import given, settings, strategies as st

from paralab import reference_simulator
from paralab.schedules import Action, Schedule, build, gpipe
from paralab.simulator import DeadlockError, simulate


@st.composite
def merged_schedules(draw):
    """Any valid schedule: each rank's actions in a random order that keeps F, B (and W)
    of every (microbatch, stage) in that order.  Most of those with p > 1 deadlock."""
    p, v, m = draw(st.integers(1, 4)), draw(st.integers(1, 2)), draw(st.integers(1, 3))
    ops = "FBW" if draw(st.booleans()) else "FB"
    orders = []
    for rank in range(p):
        chains = [[Action(op, i, s) for op in ops] for s in range(rank, p * v, p)
                  for i in range(m)]
        row = []
        while chains:
            k = draw(st.integers(0, len(chains) - 1))
            row.append(chains[k].pop(0))
            if not chains[k]:
                chains.pop(k)
        orders.append(tuple(row))
    return Schedule(tuple(orders), m, p * v)


@st.composite
def perturbed_schedules(draw):
    """A generated schedule with a few neighbouring actions swapped (where that keeps it
    valid): mostly schedules that run, with different bubbles."""
    kind = draw(st.sampled_from(["gpipe", "1f1b", "interleaved", "zb-h1"]))
    p, m = draw(st.integers(1, 4)), draw(st.integers(1, 5))
    v = draw(st.integers(2, 3)) if kind == "interleaved" else 1
    schedule = build(kind, p, m * p if kind == "interleaved" else m, v)
    orders = [list(row) for row in schedule.orders]
    for _ in range(draw(st.integers(0, 6))):
        row = orders[draw(st.integers(0, p - 1))]
        k = draw(st.integers(0, len(row) - 2))
        a, b = row[k], row[k + 1]
        if a[1:] != b[1:]:  # never swap the F/B/W of one (microbatch, stage)
            row[k], row[k + 1] = b, a
    return Schedule(tuple(map(tuple, orders)), schedule.num_microbatches, schedule.num_stages)


costs = st.fractions(0, 3, max_denominator=3)


def outcome(simulator, schedule, t_f, t_b, t_w, comm):
    try:
        t = simulator(schedule, t_f, t_b, t_w, comm)
    except DeadlockError as error:
        return "deadlock", str(error)
    peaks_by_sorting = [max(c for _, c in t.activations_over_time(r))
                        for r in range(schedule.num_ranks)]
    assert t.peak_activations == peaks_by_sorting
    return ("ran", sorted((e.rank, e.action, e.start, e.end) for e in t.events), t.makespan,
            t.busy, t.idle, t.bubble_fraction, t.peak_activations)


@settings(max_examples=150, deadline=None)
@given(schedule=st.one_of(merged_schedules(), perturbed_schedules()),
       t_f=costs, t_b=costs, t_w=costs, comm=costs)
def test_reference_and_fast_simulators_agree(schedule, t_f, t_b, t_w, comm):
    expected = outcome(reference_simulator.simulate, schedule, t_f, t_b, t_w, comm)
    assert outcome(simulate, schedule, t_f, t_b, t_w, comm) == expected


@settings(max_examples=30, deadline=None)
@given(schedule=perturbed_schedules(), data=st.data())
def test_they_agree_on_per_stage_and_float_costs(schedule, data):
    n = schedule.num_stages
    per_stage = st.lists(costs, min_size=n, max_size=n)
    exact = [data.draw(per_stage) for _ in range(3)]
    assert outcome(simulate, schedule, *exact, Fraction(1, 2)) == \
        outcome(reference_simulator.simulate, schedule, *exact, Fraction(1, 2))
    floats = [float(c) + 0.25 for c in data.draw(st.lists(costs, min_size=4, max_size=4))]
    assert outcome(simulate, schedule, *floats) == \
        outcome(reference_simulator.simulate, schedule, *floats)


def test_the_reference_gives_the_homework_numbers():
    t = reference_simulator.simulate(gpipe(4, 8), 2, 4)
    assert (t.makespan, t.ideal, t.peak_activations) == (66, 48, [8, 8, 8, 8])


def test_the_reference_refuses_what_the_fast_one_refuses():
    with pytest.raises(Exception, match="is missing"):
        reference_simulator.simulate(Schedule.from_strings(["0F0"], num_microbatches=1), 1, 1)
    crossed = Schedule.from_strings(["0F0 0B0 0F1 0B1", "1F1 1B1 1F0 1B0"])
    with pytest.raises(DeadlockError, match=r"rank 1 at step 0 \(1F1\) waits for 0F1"):
        reference_simulator.simulate(crossed, 1, 1)
