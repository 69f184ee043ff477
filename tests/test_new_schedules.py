"""Schedules beyond 1F1B: exact orders (by hand, and against torch.distributed.pipelining's
own generators), validity, memory, and PipeDream's weight versions."""

from fractions import Fraction
from types import SimpleNamespace

import pytest
from hypothesis import given, settings, strategies as st

from paralab import formulas as fm
from paralab import reference_simulator, weight_versions
from paralab.schedules import (ScheduleError, build, dualpipe_v, interleaved_one_f_one_b,
                               megatron_group_size, one_f_one_b, validate, zb_h1, zb_h2,
                               zb_v)
from paralab.simulator import simulate
from schedule_strategies import new_schedules

ps = pytest.importorskip("torch.distributed.pipelining.schedules")


# -- by hand -------------------------------------------------------------------------------------
def test_zb_h2_is_the_papers_figure():
    # Qi et al. 2024, Figure 3 (bottom), p=4, m=8 (0-based here): the first device runs 7
    # forwards, then B0 W0 F7, then B/W pairs; the last device runs F/B pairs and keeps its
    # W's, pays W0 before its last forward, and ends with the W's it owes.
    s = zb_h2(4, 8)
    assert s.to_strings()[0] == ([f"0F{i}" for i in range(7)] + "0B0 0W0 0F7".split()
                                 + [f"0{op}{i}" for i in range(1, 8) for op in "BW"])
    assert s.to_strings()[3] == ([f"3{op}{i}" for i in range(7) for op in "FB"]
                                 + "3W0 3F7 3B7".split() + [f"3W{i}" for i in range(1, 8)])


def test_zb_h2_with_w_removed_is_1f1b_with_a_longer_warmup():
    for p, m in [(4, 8), (3, 2), (5, 12)]:
        rows = [[a for a in row if a[1] != "W"] for row in zb_h2(p, m).to_strings()]
        for r, row in enumerate(rows):
            warmup = min(2 * (p - r - 1), m)
            assert row[:warmup] == [f"{r}F{i}" for i in range(warmup)]
            steady = [a for k in range(m - warmup) for a in (f"{r}F{warmup + k}", f"{r}B{k}")]
            cooldown = [f"{r}B{k}" for k in range(m - warmup, m)]
            assert row[warmup:] == steady + cooldown


def test_interleaved_groups_follow_megatron_core():
    # Megatron-Core's get_schedule_table with groups of N: the forwards of a group run on
    # chunk 0, then chunk 1, then the next group; the last group may be shorter (>= p).
    assert [megatron_group_size(4, m) for m in (4, 6, 8, 9, 10, 11, 13)] == [4, 6, 4, 5, 5, 6, 7]
    s = interleaved_one_f_one_b(2, 5, 2, group=3)
    forwards = [a for a in s.to_strings()[1] if "F" in a]
    assert forwards == "1F0 1F1 1F2 3F0 3F1 3F2 1F3 1F4 3F3 3F4".split()
    backwards = [a for a in s.to_strings()[1] if "B" in a]
    assert backwards == "3B0 3B1 3B2 1B0 1B1 1B2 3B3 3B4 1B3 1B4".split()


def test_build_knows_the_new_names_and_refuses_what_they_cannot_do():
    assert build("zb-h2", 3, 5) == zb_h2(3, 5)
    assert build("zb-v", 3, 5) == zb_v(3, 5)
    assert build("dualpipev", 2, 4) == dualpipe_v(2, 4)
    assert zb_v(3, 5).chunks == dualpipe_v(2, 4).chunks == 2
    with pytest.raises(ScheduleError, match="only applies to the interleaved"):
        build("zb-v", 2, 4, v=3)
    with pytest.raises(ScheduleError, match=r"DualPipeV needs at least .* 2p = 8, got m=6"):
        dualpipe_v(4, 6)


# -- against torch.distributed.pipelining ------------------------------------------------------
def _stand_in(stage, num_stages, ranks, rank):
    """What torch's schedule constructors read from a stage, without building one."""
    return SimpleNamespace(stage_index=stage, num_stages=num_stages, group_size=ranks,
                           group_rank=rank, is_first=stage == 0,
                           is_last=stage == num_stages - 1, submod=None)


def _text(action, split):
    """torch's action in our text form.  A full backward is our B when the schedule does
    not split backwards, else our fused B+W; an overlapped forward and backward is our
    fused F+B+W."""
    kind, stage, mb = action.computation_type, action.stage_index, action.microbatch_index
    if kind == ps.OVERLAP_F_B:
        return "+".join(_text(a, split) for a in action.sub_actions)
    letter = {ps.FORWARD: "F", ps.BACKWARD_INPUT: "B", ps.BACKWARD_WEIGHT: "W"}.get(kind)
    if letter:
        return f"{stage}{letter}{mb}"
    if kind == ps.FULL_BACKWARD:
        return f"{stage}B{mb}+{stage}W{mb}" if split else f"{stage}B{mb}"
    return None  # communication


def torch_orders(kind, p, m, v=2):
    """torch's per-rank order as our unit strings, read from ``.pipeline_order``."""
    rows = []
    for rank in range(p):
        if kind == "interleaved":
            stages = [_stand_in(rank + k * p, p * v, p, rank) for k in range(v)]
            schedule = ps.ScheduleInterleaved1F1B(stages, n_microbatches=m)
        else:
            stages = [_stand_in(rank, 2 * p, p, rank), _stand_in(2 * p - 1 - rank, 2 * p, p, rank)]
            cls = {"zb-v": ps.ScheduleZBVZeroBubble, "dualpipev": ps.ScheduleDualPipeV}[kind]
            schedule = cls(stages, n_microbatches=m)
        split = kind != "interleaved"
        rows.append([t for t in (_text(a, split) for a in schedule.pipeline_order[rank]
                                 if a is not None) if t])
    return rows


def torch_accepts_interleaved(p, m):
    rounds = max(1, m // p)
    return m % rounds == 0


@pytest.mark.parametrize("p", [1, 2, 3, 4, 5])
def test_interleaved_for_any_m_equals_torch_where_torch_accepts_it(p):
    compared = 0
    for v in (1, 2, 3):
        for m in range(p, 3 * p + 3):
            if not torch_accepts_interleaved(p, m):
                continue  # torch's rounds must divide m (m=9, p=4: two rounds of 4.5)
            assert build("interleaved", p, m, v).unit_strings() == \
                torch_orders("interleaved", p, m, v), (p, m, v)
            compared += 1
    assert compared >= 3 * (p + 1)


def test_torch_refuses_some_m_that_megatrons_groups_take():
    with pytest.raises(ValueError, match="multiple of the number of rounds"):
        torch_orders("interleaved", 4, 9)
    assert simulate(interleaved_one_f_one_b(4, 9, 2), 2, 4).makespan == \
        fm.evaluate(fm.interleaved_time(), p=4, m=9, v=2, t_f=2, t_b=4)


@pytest.mark.parametrize("p", [1, 2, 3, 4, 5])
def test_zb_v_equals_torchs_zbv_zero_bubble(p):
    for m in range(1, 3 * p + 2):
        assert zb_v(p, m).unit_strings() == torch_orders("zb-v", p, m), (p, m)


@pytest.mark.parametrize("p", [1, 2, 3, 4, 5])
def test_dualpipe_v_equals_torchs_dualpipev(p):
    for m in range(2 * p, 4 * p + 2):
        ours = dualpipe_v(p, m)
        assert ours.unit_strings() == torch_orders("dualpipev", p, m), (p, m)
        assert ours.fused  # the overlapped F&B units are part of the schedule's data


# -- validity, memory ------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(schedule=new_schedules())
def test_every_new_schedule_is_valid_and_runs(schedule):
    validate(schedule)
    t = simulate(schedule, 2, 3, 1, t_fb=4)
    assert all(b + i == t.makespan for b, i in zip(t.busy, t.idle))
    actions = 3 if schedule.splits_backward else 2
    assert sum(len(row) for row in schedule.orders) == \
        actions * schedule.num_microbatches * schedule.num_stages


@settings(max_examples=40, deadline=None)
@given(p=st.integers(1, 6), m=st.integers(1, 14))
def test_peak_memory_of_the_new_schedules(p, m):
    assert simulate(zb_h2(p, m), 1, 1, 1).peak_activations == \
        [int(fm.evaluate(fm.peak_activations("zb-h2", r), p=p, m=m)) for r in range(p)]
    if m >= 2 * p - 1:  # ZB-V: 2p half-size chunks = 1F1B's p full stages, on every rank
        assert simulate(zb_v(p, m), 1, 1, 1).peak_activations == [2 * p] * p
    if m >= 2 * p:      # DualPipeV: 2p + 1 chunks (DeepSeek's PP + 1), on every rank
        assert simulate(dualpipe_v(p, m), 1, 1, 1, t_fb=2).peak_activations == [2 * p + 1] * p


@settings(max_examples=40, deadline=None)
@given(p=st.integers(1, 6), v=st.integers(1, 4), data=st.data())
def test_interleaving_any_m_keeps_the_bubble_and_pays_in_memory(p, v, data):
    m = data.draw(st.integers(p, 4 * p + 2))
    t_f, t_b = Fraction(data.draw(st.integers(1, 4))), Fraction(data.draw(st.integers(1, 4)))
    t = simulate(interleaved_one_f_one_b(p, m, v), t_f, t_b)
    assert t.makespan == fm.evaluate(fm.interleaved_time(), p=p, m=m, v=v, t_f=t_f, t_b=t_b)
    group = megatron_group_size(p, m)
    assert t.peak_activations == [
        int(fm.evaluate(fm.peak_activations("interleaved", r, group=group), p=p, m=m, v=v))
        for r in range(p)]


@settings(max_examples=25, deadline=None)
@given(schedule=new_schedules(max_p=4, max_m=8),
       costs=st.lists(st.fractions(0, 3, max_denominator=3), min_size=5, max_size=5))
def test_both_simulators_agree_on_the_new_schedules(schedule, costs):
    t_f, t_b, t_w, comm, t_fb = costs
    fast = simulate(schedule, t_f, t_b, t_w, comm, t_fb=t_fb)
    slow = reference_simulator.simulate(schedule, t_f, t_b, t_w, comm, t_fb=t_fb)
    assert sorted((e.rank, e.action, e.start, e.end) for e in fast.events) == \
        sorted((e.rank, e.action, e.start, e.end) for e in slow.events)
    assert fast.peak_activations == slow.peak_activations
    floats = [float(c) + 0.25 for c in costs]
    assert simulate(schedule, *floats[:4], t_fb=floats[4]).makespan == \
        reference_simulator.simulate(schedule, *floats[:4], t_fb=floats[4]).makespan


# -- PipeDream's weight versions ---------------------------------------------------------------------
def test_pipedream_is_p_minus_s_minus_1_versions_stale():
    versions = weight_versions.pipedream(4, 12)
    for i in range(12):
        for s in range(4):
            assert versions.staleness(i, s) == min(i, 4 - s - 1)
    assert versions.stashing_consistent and not versions.stages_agree
    unstashed = weight_versions.pipedream(4, 12, stashing=False)
    # without stashing, stage 0's backward of microbatch 5 runs on weights 3 updates newer
    assert unstashed.backward[(5, 0)] - unstashed.forward[(5, 0)] == 3
    assert not unstashed.stashing_consistent


def test_2bw_is_one_batch_stale_and_flush_is_synchronous():
    two = weight_versions.pipedream_2bw(4, batches=3, m=4)
    assert two.stages_agree and two.stashing_consistent
    assert [two.staleness(i, 0) for i in range(12)] == [0] * 4 + [1] * 8
    flush = weight_versions.flush(4, batches=3, m=4)
    assert all(flush.staleness(i, s) == 0 for i in range(12) for s in range(4))
    assert [weight_versions.weight_copies(n, 4, 0) for n in ("pipedream", "2bw", "flush")] == \
        [4, 2, 1]


def test_pipedream_versions_follow_the_1f1b_order():
    # The forward of (i, s) sees exactly the backwards stage s ran before it.
    versions = weight_versions.pipedream(3, 6)
    for s, row in enumerate(one_f_one_b(3, 6).to_strings()):
        for k, text in enumerate(row):
            if "F" in text:
                i = int(text.split("F")[1])
                assert versions.forward[(i, s)] == sum("B" in a for a in row[:k])


def test_zb_h1_still_the_reference():
    # zb_h1 keeps its order: ZB-H2 lives next to it, not instead of it.
    assert zb_h1(4, 8).to_strings()[3][:8] == "3F0 3B0 3F1 3B1 3F2 3B2 3F3 3B3".split()
