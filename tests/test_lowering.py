"""Lowering: per-rank programs with explicit sends and receives, checked by hand, against the
rules, and against torch.distributed.pipelining's own lowering."""

from types import SimpleNamespace

import pytest
from hypothesis import given, settings

from paralab import lowering, rules
from paralab.schedules import Schedule, build, interleaved_one_f_one_b, one_f_one_b
from schedule_strategies import generated_schedules

pipelining = pytest.importorskip("torch.distributed.pipelining.schedules")


def text(programs):
    return [[str(step) for step in program] for program in programs]


def test_one_f_one_b_p2_m2_by_hand():
    programs = lowering.lower(one_f_one_b(2, 2))
    assert text(programs) == [
        "0F0 0SEND_F0 0F1 0SEND_F1 0RECV_B0 0B0 0RECV_B1 0B1".split(),
        "1RECV_F0 1F0 1B0 1SEND_B0 1RECV_F1 1F1 1B1 1SEND_B1".split(),
    ]
    f1 = programs[1][1]
    assert (f1.kind, f1.takes, f1.gives) == ("F", (("activation", 0, 1),), ())
    b1 = programs[1][2]
    assert (b1.takes, b1.gives) == ((), (("gradient", 0, 0),))  # the last stage: from its loss
    assert programs[0][1].message == rules.Message("activation", 0, 1, src=0, dst=1)
    assert programs[1][3].message == rules.Message("gradient", 0, 0, src=1, dst=0)


def test_stages_on_one_rank_hand_over_locally():
    (program,) = lowering.lower(interleaved_one_f_one_b(1, 2, 2))
    assert all(step.kind in ("F", "B") for step in program)
    forward = {step.action: step for step in program if step.kind == "F"}
    assert forward[("F", 0, 0)].gives == (("activation", 0, 1),)
    assert forward[("F", 0, 1)].takes == (("activation", 0, 1),)


def test_split_backward_w_needs_no_message():
    programs = lowering.lower(build("zb-h1", 2, 2))
    w_steps = [step for program in programs for step in program if step.kind == "W"]
    assert len(w_steps) == 4 and all(not (s.takes or s.gives or s.message) for s in w_steps)


@settings(max_examples=40, deadline=None)
@given(schedule=generated_schedules(max_p=5, max_m=6))
def test_programs_carry_exactly_the_messages_of_the_rules(schedule):
    programs = lowering.lower(schedule)
    for rank, program in enumerate(programs):  # the compute steps are the schedule's order
        assert [step.action for step in program if step.action] == list(schedule.orders[rank])
    sent = [s.message for program in programs for s in program if s.kind.startswith("SEND")]
    received = [s.message for program in programs for s in program
                if s.kind.startswith("RECV")]
    expected = sorted(rules.messages(schedule))
    assert sorted(sent) == sorted(received) == expected
    for rank, program in enumerate(programs):
        for step in program:
            if step.message is not None:
                assert rank == (step.message.src if step.kind.startswith("SEND")
                                else step.message.dst)
    # every message is received before the step that consumes it, and sent after its producer
    for program in programs:
        seen = set()
        for step in program:
            if step.kind.startswith("RECV"):
                seen.add(step.message.key)
            elif step.action:
                assert all(key in seen for key in step.takes), step
                seen |= set(step.gives)
            else:
                assert step.message.key in seen, step


def test_message_orders_compare_the_lowered_lists():
    swapped = Schedule.from_strings(["0F0 0F1 0B0 0B1", "1F1 1F0 1B0 1B1"])
    orders = lowering.message_orders(lowering.lower(swapped))
    sent, received = orders[(0, 1)]
    assert sent == [("activation", 0, 1), ("activation", 1, 1)]
    assert received == [("activation", 1, 1), ("activation", 0, 1)]
    assert orders[(1, 0)][0] == orders[(1, 0)][1]


# -- torch.distributed.pipelining ----------------------------------------------------------------
def _stand_in(stage, num_stages, ranks, rank):
    """What torch's schedule constructors read from a stage, without building one."""
    return SimpleNamespace(stage_index=stage, num_stages=num_stages, group_size=ranks,
                           group_rank=rank, is_first=stage == 0, is_last=stage == num_stages - 1)


def _torch_orders(kind, p, m, v):
    """torch's compute order per rank, read from ``.pipeline_order`` without running."""
    from torch.distributed.pipelining import (Schedule1F1B, ScheduleGPipe,
                                              ScheduleInterleaved1F1B)
    if kind == "interleaved":
        orders = {}
        for rank in range(p):
            stages = [_stand_in(rank + k * p, p * v, p, rank) for k in range(v)]
            orders[rank] = ScheduleInterleaved1F1B(stages, n_microbatches=m).pipeline_order[rank]
    else:
        cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[kind]
        orders = cls(_stand_in(0, p, p, 0), n_microbatches=m).pipeline_order
    compute = (pipelining.FORWARD, pipelining.FULL_BACKWARD)
    return [[str(a) for a in orders[r] if a is not None and a.computation_type in compute]
            for r in range(p)]


CASES = [("gpipe", 4, 8, 1), ("gpipe", 3, 5, 1), ("1f1b", 4, 8, 1), ("1f1b", 2, 6, 1),
         ("1f1b", 3, 3, 1), ("interleaved", 4, 8, 2), ("interleaved", 2, 4, 3)]


@pytest.mark.parametrize("kind,p,m,v", CASES)
def test_compute_orders_equal_torchs(kind, p, m, v):
    ours = build(kind, p, m, v).to_strings()
    theirs = _torch_orders(kind, p, m, v)
    if kind == "1f1b":
        # torch 2.13's Schedule1F1B.pipeline_order numbers the last rank's forwards from 1
        # (what it executes is right); compare that rank with the quirk undone.
        def undo(a):
            stage, op, mb = a.partition("F")
            return f"{stage}F{int(mb) - 1}" if op else a
        if theirs[-1] != ours[-1]:
            theirs[-1] = [undo(a) for a in theirs[-1]]
    assert theirs == ours


@pytest.mark.parametrize("kind,p,m,v", CASES)
def test_sends_and_receives_equal_torchs_lowering(kind, p, m, v):
    # Same compute orders (previous test), lowered by torch's _add_send_recv and by us.
    # torch places a receive where the sender sends, we place it where it is needed; what
    # must agree is, for every pair of ranks, the order of the messages each side posts.
    schedule = build(kind, p, m, v)
    ctype = {"F": pipelining.FORWARD, "B": pipelining.FULL_BACKWARD}
    compute = {r: [pipelining._Action(a.stage, ctype[a.op], a.microbatch) for a in row]
               for r, row in enumerate(schedule.orders)}
    theirs = pipelining._add_send_recv(compute, lambda s: s % p, schedule.num_stages)
    ours = lowering.lower(schedule)

    def torch_peer(a):  # the other rank of torch's communication action
        kind = a.computation_type.value
        return (a.stage_index + (1 if kind in ("SEND_F", "RECV_B") else -1)) % p

    for rank in range(p):
        for prefix in ("SEND", "RECV"):
            for peer in range(p):
                mine = [str(s) for s in ours[rank] if s.kind.startswith(prefix)
                        and peer == (s.message.dst if prefix == "SEND" else s.message.src)]
                torch_side = [str(a) for a in theirs[rank]
                              if a.computation_type.value.startswith(prefix)
                              and torch_peer(a) == peer]
                assert mine == torch_side, (rank, prefix, peer)
