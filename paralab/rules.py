"""The rules of a pipeline step: what each action needs, and the messages that follow.

A schedule only says in which order each rank runs its actions.  What makes a schedule
work or hang, fast or slow, are three dependencies -- and nothing else:

* ``F(i, s)`` needs ``F(i, s-1)``: the activations of the previous stage;
* ``B(i, s)`` needs ``F(i, s)`` (the activations its forward saved) and ``B(i, s+1)`` (the
  gradient of its output, computed by the next stage);
* ``W(i, s)`` needs ``B(i, s)``: the output gradient that ``B`` received.

Every part of the library that depends on them asks this module: ``validate`` (needs on the
same stage must come earlier in the rank's list), both simulators (an action starts when its
needs have finished), their deadlock report (which need never finishes), the lowering into
per-rank programs with explicit sends and receives (a need across ranks is a message), and,
through the lowering, the executor and the NCCL order check.

Where a stage runs is the schedule's data (``Schedule.rank_of``: Megatron's loop ``stage %
p``, or the V shape of ZB-V and DualPipeV), so the same rules hold for every placement.  A
*fused unit* -- consecutive actions of one rank that run as one kernel (a full backward
``B`` + ``W``, or DualPipe's overlapped forward and backward ``F`` + ``B`` + ``W`` of two
microbatches) -- needs what its actions need from outside it, and everything it computes is
ready when the whole unit ends (:func:`unit_kind` says which units exist).

A need that hands data from one stage to another (``carries`` an activation or a gradient)
becomes a *message* when the two stages live on different ranks; when they share a rank it
is a local hand-off.  A need within one stage (``B`` on its own ``F``, ``W`` on its ``B``)
is state the rank keeps, never a message.  Every need is of the same microbatch: the order
*between* microbatches comes only from each rank's list.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple

from .schedules import B, F, Action, Schedule, ScheduleError

ACTIVATION, GRADIENT = "activation", "gradient"


class Need(NamedTuple):
    """``action`` must have finished before the action that needs it can start."""

    action: Action
    carries: str | None = None  # ACTIVATION or GRADIENT when data goes from stage to stage
    why: str = ""               # the reason, as error messages state it
    label: str = ""             # how error messages name the needed action ("its forward ")


class Message(NamedTuple):
    """Data one rank sends another: ``kind`` of ``microbatch`` for ``stage``, which
    consumes it.  ``key`` (without the ranks) names it on both sides."""

    kind: str
    microbatch: int
    stage: int
    src: int
    dst: int

    @property
    def key(self) -> tuple[str, int, int]:
        return self.kind, self.microbatch, self.stage


def needs(action: Action, num_stages: int) -> tuple[Need, ...]:
    """What ``action`` waits for, in a pipeline of ``num_stages`` stages."""
    op, i, s = action
    if op == "F":
        if s == 0:
            return ()  # the first stage reads the data
        return (Need(F(i, s - 1), ACTIVATION,
                     why="a forward needs the activations of the previous stage"),)
    if op == "B":
        saved = Need(F(i, s), label="its forward ",
                     why="a backward needs the activations its forward saved")
        if s == num_stages - 1:
            return (saved,)  # the last stage starts from its own loss
        return (saved, Need(B(i, s + 1), GRADIENT,
                            why="a backward needs the gradient of its output from the next stage"))
    if op == "W":
        return (Need(B(i, s),
                     why="the weight gradient needs the output gradient that B receives"),)
    raise ValueError(f"unknown op {op!r} (use F, B or W)")


def crosses(schedule: Schedule, need: Need, action: Action) -> bool:
    """True when ``need`` is satisfied on another rank than ``action`` runs on."""
    return schedule.rank_of(need.action.stage) != schedule.rank_of(action.stage)


def message(schedule: Schedule, need: Need, action: Action) -> Message | None:
    """The message ``action`` receives for ``need``, or None (same rank, or no data)."""
    if need.carries is None or not crosses(schedule, need, action):
        return None
    return Message(need.carries, action.microbatch, action.stage,
                   schedule.rank_of(need.action.stage), schedule.rank_of(action.stage))


def same_stage_needs(op: str) -> tuple[Need, ...]:
    """The needs of ``op`` on its own stage (so on its own rank): only the order of the
    rank's list can satisfy them, which is why ``validate`` checks them."""
    template = Action(op, 0, 0)
    return tuple(n for n in needs(template, 1) if n.action.stage == template.stage)


def stage_table(num_stages: int) -> dict[tuple[str, int], tuple[Need, ...]]:
    """``needs`` of every ``(op, stage)`` for microbatch 0.

    Every need is of the action's own microbatch, so microbatch ``i``'s needs are these
    with ``microbatch = i``: a fast loop can look them up instead of building them."""
    table = {}
    for stage in range(num_stages):
        for op in ("F", "B", "W"):
            table[(op, stage)] = found = needs(Action(op, 0, stage), num_stages)
            assert all(n.action.microbatch == 0 for n in found), "needs cross microbatches"
    return table


def needed_by(num_stages: int) -> dict[tuple[str, int], tuple[tuple[str, int, Need], ...]]:
    """The inverse of ``needs``: for ``(op, stage)``, the ``(op', stage', need)`` of every
    action (same microbatch) that waits for it.  The lowering uses it to place sends."""
    inverse: dict = {(op, s): [] for s in range(num_stages) for op in ("F", "B", "W")}
    for (op, stage), found in stage_table(num_stages).items():
        for need in found:
            inverse[(need.action.op, need.action.stage)].append((op, stage, need))
    return {key: tuple(value) for key, value in inverse.items()}


def messages(schedule: Schedule) -> Iterator[Message]:
    """Every message one training step of ``schedule`` implies: the activation of
    ``(i, s)`` from the rank of ``s-1`` to the rank of ``s``, and the gradient of ``(i, s)``'s
    output from the rank of ``s+1`` to the rank of ``s``, whenever those ranks differ."""
    for (op, stage), found in stage_table(schedule.num_stages).items():
        for need in found:
            sent = message(schedule, need, Action(op, 0, stage))
            if sent is not None:
                for i in range(schedule.num_microbatches):
                    yield sent._replace(microbatch=i)


FULL_BACKWARD, OVERLAPPED = "full backward", "overlapped F&B"


def unit_kind(actions, num_stages: int, where: str = "") -> str:
    """What a fused unit is, or :class:`ScheduleError` saying why it cannot be one.

    Two kinds exist, the two that ``torch.distributed.pipelining`` runs:

    * ``FULL_BACKWARD``: ``B`` then ``W`` of the same microbatch and stage -- one backward
      that computes the input and the weight gradients together, in a schedule that splits
      other backwards (torch's ``FULL_BACKWARD`` next to ``BACKWARD_INPUT``);
    * ``OVERLAPPED``: ``F`` of one microbatch, then the full backward (``B``, ``W``) of
      another -- DualPipe's overlapped forward and backward, whose cost is its own (``F&B``
      in the DeepSeek-V3 report; ``t_fb`` in the simulator).

    The actions of a unit run at the same time, so none may need another -- except ``W`` on
    its own ``B``, which the full backward computes in the same pass."""
    actions = tuple(actions)
    ops = "".join(a.op for a in actions)
    prefix = f"{where}: " if where else ""
    text = "+".join(str(a) for a in actions)
    if ops == "BW":
        kind = FULL_BACKWARD
    elif ops == "FBW":
        kind = OVERLAPPED
    else:
        raise ScheduleError(
            f"{prefix}{text} cannot be fused: a unit is either a full backward (B then W of "
            f"one microbatch and stage, e.g. 4B1+4W1) or an overlapped forward and full "
            f"backward (F of one microbatch, then B and W of another, e.g. 3F5+4B1+4W1)")
    backward, weight = actions[-2], actions[-1]
    if backward[1:] != weight[1:]:
        raise ScheduleError(f"{prefix}{text}: the W of a full backward is of the same "
                            f"microbatch and stage as its B ({backward} goes with "
                            f"{Action('W', backward.microbatch, backward.stage)})")
    inside = set(actions)
    for action in actions:
        for need in needs(action, num_stages):
            if need.action in inside and not (action.op == "W" and need.action.op == "B"):
                raise ScheduleError(
                    f"{prefix}{text}: {action} needs {need.action} ({need.why}), so the two "
                    f"cannot run at the same time in one unit")
    return kind
