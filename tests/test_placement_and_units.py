"""A schedule's placement (stage -> rank) and fused units are data that validation, the
rules, both simulators, the lowering and the executor all read."""

from fractions import Fraction

import pytest
from hypothesis import given, settings

from paralab import lowering, reference_simulator, rules
from paralab.rules import ACTIVATION, GRADIENT, Message
from paralab.schedules import (Action, Schedule, ScheduleError, dualpipe_v, one_f_one_b,
                               v_placement, validate, zb_v)
from paralab.simulator import DeadlockError, simulate
from schedule_strategies import generated_schedules, new_schedules


# -- placement ---------------------------------------------------------------------------------
def test_the_v_placement_puts_both_ends_of_the_model_on_rank_0():
    assert v_placement(4) == (0, 1, 2, 3, 3, 2, 1, 0)
    s = Schedule.from_strings(["0F0 3F0 3B0 0B0", "1F0 2F0 2B0 1B0"], placement="v")
    assert s.placement == (0, 1, 1, 0)
    assert [s.rank_of(stage) for stage in range(4)] == [0, 1, 1, 0]
    assert s.stages_of(0) == [0, 3] and s.stages_of(1) == [1, 2]
    assert s.owners() == [0, 1, 1, 0]
    assert "rank r owns stages r and 3-r" in s.placement_rule()
    validate(s)


def test_megatrons_loop_given_explicitly_is_the_default():
    loop = Schedule.from_strings(["0F0 2F0 2B0 0B0", "1F0 3F0 3B0 1B0"], placement=[0, 1, 0, 1])
    assert loop.placement is None
    assert loop == Schedule.from_strings(["0F0 2F0 2B0 0B0", "1F0 3F0 3B0 1B0"])
    assert Schedule.from_strings(["0F0 0B0"], placement="loop").placement is None


@pytest.mark.parametrize("placement,message", [
    ([0, 1, 1], "names 3 stages, but the schedule has 4"),
    ([0, 0, 0, 1], "gives rank 0 3 stages; every rank holds the same number \\(2\\)"),
    ([0, 1, 2, 0], "puts stage 2 on rank 2, but ranks are numbered 0..1"),
    ("zigzag", "unknown placement 'zigzag'"),
])
def test_a_bad_placement_is_explained(placement, message):
    with pytest.raises(ScheduleError, match=message):
        Schedule.from_strings(["0F0 3F0 3B0 0B0", "1F0 2F0 2B0 1B0"], placement=placement)


def test_v_placement_needs_two_stages_per_rank():
    with pytest.raises(ScheduleError, match="exactly 2 stages per rank"):
        v_placement(2, 6)


def test_validation_reads_the_placement():
    # Stage 3 lives on rank 0 in the V; listing it on rank 1 is the wrong rank.
    s = Schedule.from_strings(["0F0 0B0 2F0 2B0", "1F0 3F0 3B0 1B0"], placement="v")
    with pytest.raises(ScheduleError, match=r"rank 0, step 2: 2F0 belongs to stage 2, which "
                                            r"lives on rank 1 \(V placement"):
        validate(s)


def test_rules_read_the_placement():
    s = zb_v(2, 1)  # rank 0: stages 0 and 3; rank 1: stages 1 and 2
    turn = Action("F", 0, 2)            # stage 2 needs stage 1, on the same rank
    (need,) = rules.needs(turn, 4)
    assert not rules.crosses(s, need, turn)
    assert rules.message(s, need, turn) is None
    assert sorted(rules.messages(s)) == [
        Message(ACTIVATION, 0, 1, 0, 1), Message(ACTIVATION, 0, 3, 1, 0),
        Message(GRADIENT, 0, 0, 1, 0), Message(GRADIENT, 0, 2, 0, 1)]


@settings(max_examples=30, deadline=None)
@given(schedule=new_schedules(max_p=4, max_m=8))
def test_new_schedules_exchange_one_message_per_boundary_between_ranks(schedule):
    expected = set()
    for s in range(schedule.num_stages - 1):
        a, b = schedule.rank_of(s), schedule.rank_of(s + 1)
        if a != b:
            expected |= {Message(ACTIVATION, i, s + 1, a, b)
                         for i in range(schedule.num_microbatches)}
            expected |= {Message(GRADIENT, i, s, b, a) for i in range(schedule.num_microbatches)}
    assert set(rules.messages(schedule)) == expected


# -- fused units -------------------------------------------------------------------------------
def test_units_round_trip_through_text():
    s = Schedule.from_strings(["0F0 3F0 3B0+3W0 0B0 0W0", "1F0 2F0 2B0 2W0 1B0 1W0"],
                              placement="v")
    assert s.fused == (((2, 2),), ())
    assert s.units(0) == [(0, 1), (1, 2), (2, 4), (4, 5), (5, 6)]
    assert s.unit_strings()[0] == ["0F0", "3F0", "3B0+3W0", "0B0", "0W0"]
    assert s.to_strings()[0] == ["0F0", "3F0", "3B0", "3W0", "0B0", "0W0"]
    assert str(s).splitlines()[0] == "rank 0: 0F0 3F0 3B0+3W0 0B0 0W0"
    assert Schedule.from_strings(s.unit_strings(), placement="v") == s
    validate(s)


@pytest.mark.parametrize("rank0,rank1,message", [
    ("0F0 0F1+0B0 0W0 0B1 0W1", "1F0 1B0 1W0 1F1 1B1 1W1",
     r"rank 0, step 1: 0F1\+0B0 cannot be fused: a unit is either a full backward"),
    ("0F0 0F1 0B1 0B0+0W1 0W0", "1F0 1B0 1W0 1F1 1B1 1W1",
     "the W of a full backward is of the same microbatch and stage"),
    ("0F0 0F1 0B0 0W0 0B1 0W1", "1F0 1B0 1W0 1F1+1B1+1W1",
     r"1B1 needs 1F1 .* cannot run at the same time"),
])
def test_a_unit_that_cannot_exist_is_explained(rank0, rank1, message):
    with pytest.raises(ScheduleError, match=message):
        validate(Schedule.from_strings([rank0, rank1]))


def test_fused_positions_must_fit():
    row = tuple(Action.parse(a) for a in "0F0 0B0 0W0".split())
    with pytest.raises(ScheduleError, match="does not fit"):
        Schedule((row,), 1, 1, fused=(((2, 2),),))
    with pytest.raises(ScheduleError, match="does not fit"):
        Schedule((row,), 1, 1, fused=(((0, 1),),))
    with pytest.raises(ScheduleError, match="one \\(possibly empty\\) list per rank"):
        Schedule((row,), 1, 1, fused=((), ()))


def test_a_unit_waits_for_all_its_needs_and_finishes_as_one():
    # Rank 0's last unit overlaps microbatch 1's forward through stage 0 with microbatch
    # 0's full backward through stage 0; the backward needs rank 1's gradient.
    s = Schedule.from_strings(["0F0 0F1+0B0+0W0 0B1 0W1", "1F0 1B0 1W0 1F1 1B1 1W1"])
    t = simulate(s, 1, 1, 1, t_fb=2)
    # 1W0 ends at 4 (1F0 at 1-2, 1B0 at 2-3, 1W0 at 3-4); the gradient of 1B0 is ready at 3
    start = t.event("0F1").start
    assert start == 3
    assert t.event("0W0").end == start + 2     # the unit costs t_fb, not 3
    # the parts are drawn one after the other, in proportion to their own costs
    assert [t.event(a).end - t.event(a).start for a in ("0F1", "0B0", "0W0")] == \
        [Fraction(2, 3)] * 3
    # whoever needs 0F1 waits for the end of the whole unit
    assert t.event("1F1").start == start + 2
    assert t.busy[0] == 1 + 2 + 1 + 1
    assert reference_simulator.simulate(s, 1, 1, 1, t_fb=2).events == t.events


def test_without_t_fb_an_overlapped_unit_costs_its_parts():
    s = Schedule.from_strings(["0F0 0F1+0B0+0W0 0B1 0W1", "1F0 1B0 1W0 1F1 1B1 1W1"])
    t = simulate(s, 1, 2, 3)
    assert t.event("0W0").end - t.event("0F1").start == 1 + 2 + 3
    assert [t.event(a).end - t.event(a).start for a in ("0F1", "0B0", "0W0")] == [1, 2, 3]


def test_a_deadlocked_unit_names_what_it_waits_for():
    # Rank 1 insists on overlapping its second forward with a backward it can only run
    # after rank 0's second forward, which rank 0 runs after it gets its first gradient.
    s = Schedule.from_strings(["0F0 0B0 0W0 0F1 0B1 0W1", "1F0 1F1+1B0+1W0 1B1 1W1"])
    for simulator in (simulate, reference_simulator.simulate):
        with pytest.raises(DeadlockError, match=r"rank 1 at step 1 \(1F1\+1B0\+1W0\) waits for "
                                                r"0F1 \(rank 0\)"):
            simulator(s, 1, 1, 1)


# -- the lowering and the NCCL order -----------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(schedule=new_schedules(max_p=4, max_m=8))
def test_new_schedules_lower_to_exactly_the_rules_messages(schedule):
    programs = lowering.lower(schedule)
    for rank, program in enumerate(programs):
        assert [step.action for step in program if step.action] == list(schedule.orders[rank])
    sent = sorted(s.message for program in programs for s in program if s.kind.startswith("SEND"))
    received = sorted(s.message for program in programs for s in program
                      if s.kind.startswith("RECV"))
    assert sent == received == sorted(rules.messages(schedule))


def consumed_in_time(programs):
    for program in programs:
        seen = set()
        for step in program:
            if step.kind.startswith("RECV"):
                seen.add(step.message.key)
            elif step.action:
                assert all(key in seen for key in step.takes), step
                seen |= set(step.gives)


@settings(max_examples=30, deadline=None)
@given(schedule=new_schedules(max_p=4, max_m=8))
def test_receives_in_the_senders_order_agree_on_both_sides(schedule):
    hoisted = lowering.post_in_send_order(lowering.lower(schedule))
    for sent, received in lowering.message_orders(hoisted).values():
        assert sent == received
    consumed_in_time(hoisted)
    for before, after in zip(lowering.lower(schedule), hoisted):
        assert sorted(map(str, before)) == sorted(map(str, after))   # only moved
        assert [s for s in before if not s.kind.startswith("RECV")] == \
            [s for s in after if not s.kind.startswith("RECV")]


@settings(max_examples=30, deadline=None)
@given(schedule=generated_schedules(max_p=5, max_m=6))
def test_posting_in_send_order_leaves_the_existing_schedules_alone(schedule):
    programs = lowering.lower(schedule)
    assert lowering.post_in_send_order(programs) == programs


def test_the_v_schedules_need_the_senders_order_on_nccl():
    from paralab import pipeline

    for schedule in (zb_v(4, 8), dualpipe_v(4, 8)):
        with pytest.raises(ScheduleError, match="different order .* posting each receive in "
                                                "the sender's order"):
            pipeline.check_message_order(schedule)
        pipeline.check_message_order(schedule,
                                     lowering.post_in_send_order(lowering.lower(schedule)))
    pipeline.check_message_order(one_f_one_b(4, 8))
