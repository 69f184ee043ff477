"""Lowering: a schedule becomes one program per rank, with its communication spelled out.

A schedule says what each rank *computes*.  To run it, each rank must also receive what its
actions need from other ranks and send what other ranks need from it.  The lowering writes
that down, from the rules (:mod:`paralab.rules`) alone: rank ``r``'s program is its action
list, and around each action

* before it, a receive for every need that arrives from another rank -- ``RECV_F`` for the
  activation a forward needs, ``RECV_B`` for the gradient a backward needs;
* after it, a send for every action on another rank that needs it -- ``SEND_F`` (the
  forward's output), ``SEND_B`` (the backward's input gradient).

When two neighbouring stages share a rank (interleaving with one rank), the data is handed
over locally and no step is written.  Steps are named as in ``torch.distributed.pipelining``
(its ``_ComputationType``): a step's ``stage`` is the stage that runs it, so ``1SEND_F0`` is
stage 1 sending microbatch 0's activations, which arrive as ``2RECV_F0``.

The programs are plain data, like the schedule: the executor (:mod:`paralab.interpreter`)
runs them step by step, and the NCCL order check compares, for every pair of ranks, the
sends of one program with the receives of the other (:func:`message_orders`).  Receives are
placed where the data is needed, which is the order NCCL will match them in; on gloo the
interpreter may post them earlier, since gloo matches messages by tag.
"""

from __future__ import annotations

from typing import NamedTuple

from . import rules
from .rules import Message
from .schedules import Action, Schedule, ensure_valid

COMPUTE = ("F", "B", "W")

Program = tuple  # tuple[Step, ...]: one rank's steps, in order


class Step(NamedTuple):
    """One step of a rank's program.

    For ``SEND_*``/``RECV_*``, ``message`` is what travels.  For a compute step (``F``,
    ``B``, ``W``), ``takes`` are the keys (:attr:`Message.key`) of the data it consumes and
    ``gives`` the keys of the data it produces for later steps -- received or sent, or
    handed over on the rank: the interpreter keeps them in one mailbox either way."""

    kind: str
    microbatch: int
    stage: int
    message: Message | None = None
    takes: tuple = ()
    gives: tuple = ()

    def __str__(self) -> str:
        return f"{self.stage}{self.kind}{self.microbatch}"

    @property
    def action(self) -> Action | None:
        """The schedule's action for a compute step, else None."""
        return Action(self.kind, self.microbatch, self.stage) if self.kind in COMPUTE else None


def lower(schedule: Schedule) -> tuple[Program, ...]:
    """One program per rank (see the module docstring).  ``schedule`` must be valid."""
    ensure_valid(schedule)
    n_stages = schedule.num_stages
    table, users = rules.stage_table(n_stages), rules.needed_by(n_stages)
    # What the steps around (op, stage) look like for microbatch 0; per microbatch only the
    # index changes (every need is of the action's own microbatch).
    templates = {}
    for (op, stage), found in table.items():
        action = Action(op, 0, stage)
        before, takes, gives, after = [], [], [], []
        for need in found:
            if need.carries is not None:
                takes.append((need.carries, stage))
                sent = rules.message(schedule, need, action)
                if sent is not None:
                    before.append(("RECV_" + op, sent))
        for user_op, user_stage, need in users[(op, stage)]:
            if need.carries is not None:
                gives.append((need.carries, user_stage))
                sent = rules.message(schedule, need, Action(user_op, 0, user_stage))
                if sent is not None:
                    after.append(("SEND_" + op, sent))
        templates[(op, stage)] = before, tuple(takes), tuple(gives), after

    programs = []
    for row in schedule.orders:
        steps = []
        for op, i, stage in row:
            before, takes, gives, after = templates[(op, stage)]
            for kind, sent in before:
                steps.append(Step(kind, i, stage, sent._replace(microbatch=i)))
            steps.append(Step(op, i, stage, None, tuple((k, i, s) for k, s in takes),
                              tuple((k, i, s) for k, s in gives)))
            for kind, sent in after:
                steps.append(Step(kind, i, stage, sent._replace(microbatch=i)))
        programs.append(tuple(steps))
    return tuple(programs)


def message_orders(programs) -> dict:
    """For each directed pair of ranks that exchanges messages, ``{(src, dst): (sent,
    received)}``: the message keys in the order ``src``'s program sends them and in the
    order ``dst``'s program receives them."""
    orders: dict = {}
    for program in programs:
        for step in program:
            sent = step.message
            if sent is not None:
                sides = orders.setdefault((sent.src, sent.dst), ([], []))
                sides[0 if step.kind.startswith("SEND") else 1].append(sent.key)
    return orders


def post_in_send_order(programs) -> tuple[Program, ...]:
    """The programs with receives moved earlier so that, for every pair of ranks, the
    receiver posts its receives in the order the sender sends -- what NCCL, which matches a
    pair's messages in posting order, needs.

    :func:`lower` places a receive where its data is needed.  For most schedules that is
    already the senders' order; with the V placement (ZB-V, DualPipeV) two ranks exchange
    activations *and* gradients in both directions, and a rank may need a gradient before
    an activation its neighbour sent first.  Here the receive of each message moves up to
    the earliest need of it or of any message sent after it by the same sender
    (``torch.distributed.pipelining`` places receives where the sender sends, which has
    the same effect).  No new waiting is created: a rank that now waits for message ``k``
    at a point where it used to wait for a later message ``j`` of the same sender gets
    ``k`` no later than ``j``, since the sender sends ``k`` first.  Programs whose orders
    already agree come back unchanged."""
    sends = {}  # (src, dst) -> keys in the order src sends them
    for program in programs:
        for step in program:
            if step.kind.startswith("SEND"):
                sends.setdefault((step.message.src, step.message.dst), []).append(
                    step.message.key)
    out = []
    for dst, program in enumerate(programs):
        anchor = {}  # message key -> index of the compute step that consumes it
        for index, step in enumerate(program):
            if step.kind.startswith("RECV"):
                consumer = next(k for k in range(index + 1, len(program))
                                if program[k].kind in COMPUTE)
                anchor[step.message.key] = consumer
        hoisted = {}  # message key -> (anchor index, source, rank in the sender's order)
        for (src, to), keys in sends.items():
            if to != dst:
                continue
            earliest = len(program)
            for k in range(len(keys) - 1, -1, -1):
                earliest = min(earliest, anchor[keys[k]])
                hoisted[keys[k]] = (earliest, src, k)
        receives = sorted((hoisted[s.message.key], s) for s in program
                          if s.kind.startswith("RECV"))
        steps, r = [], 0
        for index, step in enumerate(program):
            if step.kind.startswith("RECV"):
                continue
            while r < len(receives) and receives[r][0][0] == index:
                steps.append(receives[r][1])
                r += 1
            steps.append(step)
        out.append(tuple(steps))
    return tuple(out)


def format_programs(programs) -> str:
    """One line per rank: ``rank 1: 1RECV_F0 1F0 1SEND_F0 ...``."""
    return "\n".join(f"rank {r}: " + " ".join(str(step) for step in program)
                     for r, program in enumerate(programs))
