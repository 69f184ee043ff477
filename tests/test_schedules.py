"""Schedules as data: generators produce exactly the documented orders; validation teaches."""

import pytest
from hypothesis import given, settings

from paralab.schedules import (Action, Schedule, ScheduleError, build, format_grid, gpipe,
                               interleaved_one_f_one_b, one_f_one_b, validate, zb_h1)
from schedule_strategies import generated_schedules


def parse_rows(*rows):
    return [row.split() for row in rows]


def test_action_text_form_round_trips():
    action = Action("B", 1, 5)
    assert str(action) == "5B1"
    assert Action.parse("5B1") == action
    assert Action.parse(" 12 W 3 ") == Action("W", 3, 12)
    with pytest.raises(ScheduleError, match="<stage><op><microbatch>"):
        Action.parse("F0")


def test_gpipe_order_p4_m8():
    s = gpipe(4, 8)
    assert s.to_strings()[2] == [f"2F{i}" for i in range(8)] + [f"2B{i}" for i in range(8)]
    assert (s.num_ranks, s.num_stages, s.num_microbatches, s.chunks) == (4, 4, 8, 1)


def test_one_f_one_b_order_matches_megatron_p4_m8():
    # Written out by hand from the definition: warm-up p-r-1 forwards, 1F1B, cool-down.
    expected = parse_rows(
        "0F0 0F1 0F2 0F3 0B0 0F4 0B1 0F5 0B2 0F6 0B3 0F7 0B4 0B5 0B6 0B7",
        "1F0 1F1 1F2 1B0 1F3 1B1 1F4 1B2 1F5 1B3 1F6 1B4 1F7 1B5 1B6 1B7",
        "2F0 2F1 2B0 2F2 2B1 2F3 2B2 2F4 2B3 2F5 2B4 2F6 2B5 2F7 2B6 2B7",
        "3F0 3B0 3F1 3B1 3F2 3B2 3F3 3B3 3F4 3B4 3F5 3B5 3F6 3B6 3F7 3B7",
    )
    assert one_f_one_b(4, 8).to_strings() == expected


def test_one_f_one_b_with_fewer_microbatches_than_stages():
    s = one_f_one_b(4, 2)
    assert s.to_strings()[0] == ["0F0", "0F1", "0B0", "0B1"]
    assert s.to_strings()[3] == ["3F0", "3B0", "3F1", "3B1"]


def test_interleaved_order_p2_m4_v2():
    # Rank 0 owns stages 0 and 2, rank 1 owns 1 and 3.  Microbatches go through the chunks in
    # groups of p=2: forwards 0,1 on chunk 0, then 0,1 on chunk 1, then 2,3 on chunk 0, ...
    expected = parse_rows(
        "0F0 0F1 2F0 2F1 0F2 2B0 0F3 2B1 2F2 0B0 2F3 0B1 2B2 2B3 0B2 0B3",
        "1F0 1F1 3F0 3B0 3F1 3B1 1F2 1B0 1F3 1B1 3F2 3B2 3F3 3B3 1B2 1B3",
    )
    s = interleaved_one_f_one_b(2, 4, 2)
    assert s.to_strings() == expected
    assert (s.num_stages, s.chunks) == (4, 2)


def test_interleaved_takes_any_m_from_p_on():
    # m=6 is not a multiple of p=4: Megatron-Core's smallest accepted group is all 6
    # microbatches (a group of 4 would leave a last group of 2 < p), so rank 0 runs the
    # forwards of 0..5 on its first chunk before its second chunk; it used to be refused.
    s = interleaved_one_f_one_b(4, 6, 2)
    assert s.to_strings()[0][:12] == [f"0F{i}" for i in range(6)] + [f"4F{i}" for i in range(6)]
    with pytest.raises(ScheduleError, match=r"needs at least p=4 microbatches, got m=3"):
        interleaved_one_f_one_b(4, 3, 2)
    with pytest.raises(ScheduleError, match=r"last group of 2 < p=4.*e\.g\. 6"):
        interleaved_one_f_one_b(4, 6, 2, group=4)


def test_zb_h1_order_p4_m8():
    s = zb_h1(4, 8)
    # Same F/B order as 1F1B once the W's are removed.
    without_w = [[a for a in row if a[1] != "W"] for row in s.to_strings()]
    assert without_w == one_f_one_b(4, 8).to_strings()
    # Rank r lets up to r weight-gradient passes wait: rank 0 pays each W right after its B,
    # rank 3 (the last) leaves its first W until three more B's have run.
    assert s.to_strings()[0][:8] == ["0F0", "0F1", "0F2", "0F3", "0B0", "0W0", "0F4", "0B1"]
    assert s.to_strings()[3] == ("3F0 3B0 3F1 3B1 3F2 3B2 3F3 3B3 3W0 3F4 3B4 3W1 3F5 3B5 3W2 "
                                 "3F6 3B6 3W3 3F7 3B7 3W4 3W5 3W6 3W7").split()


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "4"])
def test_generators_reject_bad_sizes(bad):
    with pytest.raises(ScheduleError, match="positive integer"):
        one_f_one_b(bad, 4)


def test_build_by_name():
    assert build("1f1b", 3, 5) == one_f_one_b(3, 5)
    assert build("interleaved", 2, 4, 2) == interleaved_one_f_one_b(2, 4, 2)
    with pytest.raises(ScheduleError, match="unknown schedule 'pipedream'"):
        build("pipedream", 2, 2)
    with pytest.raises(ScheduleError, match="only applies to the interleaved"):
        build("gpipe", 2, 2, v=2)


@settings(max_examples=60, deadline=None)
@given(generated=generated_schedules())
def test_every_generated_schedule_is_valid(generated):
    s = validate(generated)
    per_rank = 3 if s.name == "zb-h1" else 2
    assert all(len(row) == per_rank * s.num_microbatches * s.chunks for row in s.orders)


# -- validation messages -----------------------------------------------------------------------
def schedule(*rows, m=None, stages=None):
    return Schedule.from_strings(list(rows), num_microbatches=m, num_stages=stages)


def test_validate_names_a_missing_backward():
    s = schedule("0F0 0F1 0B0", "1F0 1F1 1B0 1B1", m=2)
    with pytest.raises(ScheduleError, match=r"0B1 is missing: microbatch 1 never runs the "
                                            r"backward of stage 0 on rank 0"):
        validate(s)


def test_validate_names_an_action_on_the_wrong_rank():
    s = schedule("0F0 1F0 0B0", "1B0", m=1)
    with pytest.raises(ScheduleError, match=r"rank 0, step 1: 1F0 belongs to stage 1, which "
                                            r"lives on rank 1"):
        validate(s)


def test_validate_names_a_backward_before_its_forward():
    s = schedule("0B0 0F0", m=1)
    with pytest.raises(ScheduleError, match=r"0B0 \(step 0\) comes before its forward 0F0"):
        validate(s)


def test_validate_names_a_duplicate():
    s = schedule("0F0 0F0 0B0", m=1)
    with pytest.raises(ScheduleError, match=r"0F0 appears twice \(steps 0 and 1\)"):
        validate(s)


def test_validate_requires_w_for_every_b_once_split():
    s = schedule("0F0 0B0 0W0 0F1 0B1", m=2)
    with pytest.raises(ScheduleError, match=r"0W1 is missing.*splits the backward"):
        validate(s)


def test_validate_rejects_w_before_b():
    s = schedule("0F0 0W0 0B0", m=1)
    with pytest.raises(ScheduleError, match=r"0W0 \(step 1\) comes before 0B0"):
        validate(s)


def test_validate_rejects_out_of_range_indices():
    s = schedule("0F0 0F1 0B0 0B1", m=1)
    with pytest.raises(ScheduleError, match="microbatches are numbered 0..0"):
        validate(s)


def test_uneven_stage_count_is_rejected():
    with pytest.raises(ScheduleError, match="cannot be spread over 2 ranks"):
        Schedule.from_strings(["0F0 0B0", "1F0 1B0"], num_stages=3)


# -- rendering ----------------------------------------------------------------------------------
def test_str_is_one_line_per_rank():
    assert str(gpipe(2, 2)) == "rank 0: 0F0 0F1 0B0 0B1\nrank 1: 1F0 1F1 1B0 1B1"


def test_grid_shows_each_ranks_kth_action():
    lines = format_grid(one_f_one_b(2, 2)).splitlines()
    assert lines[0].split() == ["step", "r0", "r1"]
    assert lines[1].split() == ["0", "0F0", "1F0"]
    assert lines[2].split() == ["1", "0F1", "1B0"]
    assert len(lines) == 1 + 4


def test_from_strings_infers_sizes():
    s = Schedule.from_strings(["0F0 2F0 2B0 0B0", "1F0 3F0 3B0 1B0"])
    assert (s.num_microbatches, s.num_stages, s.chunks) == (1, 4, 2)
    validate(s)


def test_validate_checks_even_a_schedule_marked_valid():
    # ensure_valid trusts the generators' output; validate itself always checks in full,
    # which is what makes the property test above a test of the generators.
    from paralab import schedules

    broken = schedule("0F0 0B0 0F1", "1F0 1B0 1F1 1B1", m=2)
    schedules._mark_valid(broken)
    with pytest.raises(ScheduleError, match="0B1 is missing"):
        validate(broken)
