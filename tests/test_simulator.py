"""The simulator: exact timelines from dependencies and costs."""

from fractions import Fraction

import pytest
from hypothesis import given, settings, strategies as st

from paralab.schedules import (Schedule, ScheduleError, gpipe, interleaved_one_f_one_b,
                               one_f_one_b, zb_h1)
from paralab.simulator import DeadlockError, simulate


def test_gpipe_homework_numbers():
    t = simulate(gpipe(4, 8), t_f=2, t_b=4)
    # Forward fill: stage 3 starts microbatch 0 at 3*t_f; last forward ends at (8+3)*2 = 22;
    # the backward wave then takes (8+3)*4 = 44.
    assert t.event("3F0").start == 6
    assert t.event("3F7").end == 22
    assert t.event("0B7").end == 66
    assert (t.makespan, t.ideal) == (66, 48)
    assert t.time_ratio == Fraction(66, 48)
    assert t.bubble_fraction == Fraction(4 * 66 - 4 * 48, 4 * 66)
    assert t.bubble_overhead == Fraction(66 - 48, 48)
    assert t.peak_activations == [8, 8, 8, 8]


def test_one_f_one_b_same_time_less_memory():
    g = simulate(gpipe(4, 16), 2, 4)
    f = simulate(one_f_one_b(4, 16), 2, 4)
    assert g.makespan == f.makespan == 19 * 6
    assert f.peak_activations == [4, 3, 2, 1]


def test_interleaved_divides_the_bubble():
    # Each rank's work is split over v chunks; the bubble (p-1)(t_f+t_b) shrinks by v.
    assert simulate(interleaved_one_f_one_b(4, 8, 2), 2, 4).makespan == 48 + Fraction(18, 2)
    assert simulate(interleaved_one_f_one_b(4, 8, 4), 2, 4).makespan == 48 + Fraction(18, 4)


def test_zb_h1_idle_is_a_third_of_1f1b():
    one = simulate(one_f_one_b(4, 8), 2, 2, t_w=2)   # B does input and weight gradients: 4
    zb = simulate(zb_h1(4, 8), 2, 2, t_w=2)
    assert one.makespan == 8 * 6 + 3 * 6
    assert zb.idle == [x / 3 for x in one.idle]
    assert zb.peak_activations == one.peak_activations == [4, 3, 2, 1]


def test_comm_is_added_on_cross_rank_dependencies_only():
    t = simulate(gpipe(2, 1), t_f=1, t_b=1, comm=Fraction(1, 2))
    assert t.event("1F0").start == Fraction(3, 2)
    assert t.event("0B0").start == t.event("1B0").end + Fraction(1, 2)
    # Two chunks on one rank: no communication between its stages.
    single = simulate(interleaved_one_f_one_b(1, 2, 2), t_f=2, t_b=2, comm=5)
    assert single.makespan == 2 * (2 + 2)


def test_per_stage_costs():
    t = simulate(gpipe(2, 1), t_f=[1, 3], t_b=[2, 5])
    assert t.event("1F0").end == 4
    assert t.makespan == 1 + 3 + 5 + 2
    assert t.ideal == 8  # the busiest rank (stage 1) works 3 + 5
    with pytest.raises(ValueError, match="has 3 per-stage costs but the schedule has 2 stages"):
        simulate(gpipe(2, 1), t_f=[1, 1, 1], t_b=1)


def test_negative_costs_are_rejected():
    with pytest.raises(ValueError, match="non-negative"):
        simulate(gpipe(2, 2), t_f=-1, t_b=1)
    with pytest.raises(ValueError, match="comm must be"):
        simulate(gpipe(2, 2), t_f=1, t_b=1, comm=-2)


def test_deadlock_names_every_stuck_rank():
    # Rank 1 insists on running microbatch 1 before 0, while rank 0 sends 0 first and then
    # waits for 0's gradient: both wait forever.
    s = Schedule.from_strings(["0F0 0B0 0F1 0B1", "1F1 1B1 1F0 1B0"])
    with pytest.raises(DeadlockError) as err:
        simulate(s, 1, 1)
    message = str(err.value)
    assert "rank 0 at step 1 (0B0) waits for 1B0 (rank 1)" in message
    assert "rank 1 at step 0 (1F1) waits for 0F1 (rank 0)" in message


def test_invalid_schedule_is_rejected_before_simulating():
    with pytest.raises(Exception, match="is missing"):
        simulate(Schedule.from_strings(["0F0"], num_microbatches=1), 1, 1)


def test_activation_release_counts_before_acquire():
    # One rank, B of microbatch 0 ends exactly when F of microbatch 1 starts.
    s = Schedule.from_strings(["0F0 0B0 0F1 0B1"])
    t = simulate(s, 1, 1)
    assert t.peak_activations == [1]
    assert t.activations_over_time(0) == [(0, 1), (2, 1), (4, 0)]


def test_float_costs_work():
    t = simulate(one_f_one_b(3, 4), 0.5, 1.0)
    assert t.makespan == pytest.approx((4 + 2) * 1.5)


@settings(max_examples=40, deadline=None)
@given(p=st.integers(1, 6), m=st.integers(1, 10),
       t_f=st.fractions(Fraction(1, 4), 4, max_denominator=4),
       t_b=st.fractions(Fraction(1, 4), 4, max_denominator=4))
def test_timeline_respects_dependencies_and_rank_order(p, m, t_f, t_b):
    for schedule in (gpipe(p, m), one_f_one_b(p, m), zb_h1(p, m)):
        t = simulate(schedule, t_f, t_b, t_w=t_b / 2)
        for rank in range(p):
            events = [t.event(a) for a in schedule.orders[rank]]
            assert all(a.end <= b.start for a, b in zip(events, events[1:]))
        for e in t.events:
            a = e.action
            if a.op == "F" and a.stage > 0:
                assert t.event(f"{a.stage - 1}F{a.microbatch}").end <= e.start
            if a.op == "B" and a.stage < p - 1:
                assert t.event(f"{a.stage + 1}B{a.microbatch}").end <= e.start
        # Busy + idle = makespan on every rank; ideal is the busiest rank's work.
        assert all(b + i == t.makespan for b, i in zip(t.busy, t.idle))


def test_generated_or_validated_schedules_are_not_validated_again(monkeypatch):
    import paralab.schedules as schedules

    calls = []
    real = schedules.validate
    monkeypatch.setattr(schedules, "validate", lambda s: calls.append(s) or real(s))
    simulate(one_f_one_b(4, 8), 2, 4)  # a generator's output is valid by construction
    assert calls == []
    own = Schedule.from_strings(["0F0 0F1 0B0 0B1", "1F0 1B0 1F1 1B1"])
    simulate(own, 1, 1)
    simulate(own, 1, 2)
    assert calls == [own]  # once: a schedule cannot change
    broken = Schedule.from_strings(["0F0 0B0 0F1", "1F0 1B0 1F1 1B1"])
    for _ in range(2):  # a failed validation is not remembered as a pass
        with pytest.raises(ScheduleError, match="0B1 is missing: microbatch 1 never runs"):
            simulate(broken, 1, 1)


def test_peaks_with_instantaneous_actions_count_coinciding_changes_together():
    # Zero-cost forwards and backwards: acquiring and releasing at one instant holds nothing.
    s = Schedule.from_strings(["0F0 0F1 0B0 0B1"])
    t = simulate(s, 0, 0)
    assert t.peak_activations == [0]
    assert simulate(s, 0, 1).peak_activations == [2]
    assert simulate(s, 1, 0).peak_activations == [2]
