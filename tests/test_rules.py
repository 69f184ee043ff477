"""The rules: what each action needs, and the messages a schedule implies."""

import pytest
from hypothesis import given, settings

from paralab import rules
from paralab.rules import ACTIVATION, GRADIENT, Message
from paralab.schedules import Action, Schedule, interleaved_one_f_one_b, one_f_one_b
from schedule_strategies import generated_schedules


def needed(action, num_stages):
    return [(str(n.action), n.carries) for n in rules.needs(Action.parse(action), num_stages)]


def test_what_each_action_needs():
    assert needed("0F3", 4) == []  # the first stage reads the data
    assert needed("2F3", 4) == [("1F3", ACTIVATION)]
    assert needed("3B1", 4) == [("3F1", None)]  # the last stage starts from its loss
    assert needed("1B1", 4) == [("1F1", None), ("2B1", GRADIENT)]
    assert needed("0B0", 4) == [("0F0", None), ("1B0", GRADIENT)]
    assert needed("2W5", 4) == [("2B5", None)]
    with pytest.raises(ValueError, match="unknown op 'X'"):
        rules.needs(Action("X", 0, 0), 2)


def test_same_stage_needs_are_the_order_validate_checks():
    assert [n.action.op for n in rules.same_stage_needs("F")] == []
    assert [n.action.op for n in rules.same_stage_needs("B")] == ["F"]
    assert [n.action.op for n in rules.same_stage_needs("W")] == ["B"]


def test_crossing_depends_on_placement():
    interleaved = interleaved_one_f_one_b(2, 4, 2)  # rank 0: stages 0, 2; rank 1: 1, 3
    f2 = Action("F", 0, 2)
    (need,) = rules.needs(f2, 4)
    assert rules.crosses(interleaved, need, f2)
    assert rules.message(interleaved, need, f2) == Message(ACTIVATION, 0, 2, 1, 0)
    single = interleaved_one_f_one_b(1, 2, 2)  # both stages on rank 0: a local hand-off
    (need,) = rules.needs(Action("F", 1, 1), 2)
    assert not rules.crosses(single, need, Action("F", 1, 1))
    assert rules.message(single, need, Action("F", 1, 1)) is None
    assert list(rules.messages(single)) == []


def test_messages_of_a_two_stage_pipeline():
    got = sorted(rules.messages(one_f_one_b(2, 2)))
    assert got == [Message(ACTIVATION, 0, 1, 0, 1), Message(ACTIVATION, 1, 1, 0, 1),
                   Message(GRADIENT, 0, 0, 1, 0), Message(GRADIENT, 1, 0, 1, 0)]


def test_inverse_table():
    users = rules.needed_by(3)
    assert {(op, s) for op, s, _ in users[("F", 1)]} == {("F", 2), ("B", 1)}
    assert {(op, s) for op, s, _ in users[("B", 1)]} == {("B", 0), ("W", 1)}
    assert users[("W", 1)] == ()


@settings(max_examples=40, deadline=None)
@given(schedule=generated_schedules(max_p=5, max_m=6))
def test_one_activation_and_one_gradient_per_boundary_between_ranks(schedule):
    m = schedule.num_microbatches
    got = list(rules.messages(schedule))
    assert len(got) == len(set(got))
    expected = set()
    for s in range(schedule.num_stages - 1):  # the boundary between stages s and s+1
        a, b = schedule.rank_of(s), schedule.rank_of(s + 1)
        if a != b:
            expected |= {Message(ACTIVATION, i, s + 1, a, b) for i in range(m)}
            expected |= {Message(GRADIENT, i, s, b, a) for i in range(m)}
    assert set(got) == expected


def test_a_custom_schedule_uses_the_same_rules():
    own = Schedule.from_strings(["0F0 0F1 0B0 0B1", "1F0 1B0 1F1 1B1"])
    assert len(list(rules.messages(own))) == 4
