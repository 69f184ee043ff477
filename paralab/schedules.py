"""Pipeline schedules as data.

A pipeline schedule is nothing more than, for every rank, the ordered list of the work it
does.  Keeping it as plain data (instead of as control flow buried in a training loop) is
what lets one object be printed, validated, simulated, plotted, executed by real
processes, and graded.

Conventions (the same as ``torch.distributed.pipelining`` and Megatron-LM):

* Everything is 0-based: microbatch ``0 .. m-1``, stage ``0 .. S-1``, rank ``0 .. p-1``.
* ``stage`` is the *global* (virtual) stage.  With ``v`` chunks per rank there are
  ``S = v * p`` stages and rank ``r`` owns stages ``r, r + p, r + 2p, ...`` (Megatron's
  interleaved placement, "loop"); with ``v = 1`` stage ``s`` simply lives on rank ``s``.
  A schedule may carry another placement as data (``Schedule.placement``, stage -> rank):
  the V shape of ZB-V and DualPipeV puts stages ``r`` and ``2p-1-r`` on rank ``r``, so the
  last rank runs two neighbouring stages and the first rank both ends of the model.
* An action is ``(op, microbatch, stage)``.  ``F`` is a forward; ``B`` is a backward (or,
  when a schedule splits the backward, only the gradient w.r.t. the stage's *input*, which
  is what the previous stage is waiting for); ``W`` is the gradient w.r.t. the stage's
  *weights*, which nobody waits for and can therefore fill bubbles (zero-bubble schedules).
* The text form of an action is ``f"{stage}{op}{microbatch}"``, e.g. ``0F3`` or ``5B1``.
* Consecutive actions of a rank may be *fused* into one unit that runs as one kernel
  (``Schedule.fused``): a full backward ``B`` + ``W`` of one microbatch in a schedule that
  otherwise splits them, or DualPipe's overlapped forward and backward of two different
  microbatches, ``F`` + ``B`` + ``W``.  Its text form joins the actions with ``+``:
  ``3F5+4B1+4W1``.
"""

from __future__ import annotations

import functools
import gc
import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, NamedTuple, Sequence

OPS = ("F", "B", "W")
_ACTION_RE = re.compile(r"^\s*(\d+)\s*([FBW])\s*(\d+)\s*$")


class ScheduleError(ValueError):
    """A schedule (or a request for one) that cannot work, with the reason spelled out."""


class Action(NamedTuple):
    """One unit of pipeline work: ``op`` of ``microbatch`` through ``stage``."""

    op: str
    microbatch: int
    stage: int

    def __str__(self) -> str:
        return f"{self.stage}{self.op}{self.microbatch}"

    @classmethod
    def parse(cls, text: str) -> "Action":
        """Parse the text form ``"<stage><op><microbatch>"``, e.g. ``"2B5"``."""
        if isinstance(text, Action):
            return text
        match = _ACTION_RE.match(str(text))
        if not match:
            raise ScheduleError(
                f"cannot read action {text!r}: write <stage><op><microbatch> with op in F/B/W, "
                f"e.g. '0F3' (stage 0, forward, microbatch 3)"
            )
        stage, op, microbatch = match.groups()
        return cls(op, int(microbatch), int(stage))


def F(microbatch: int, stage: int) -> Action:
    return Action("F", microbatch, stage)


def B(microbatch: int, stage: int) -> Action:
    return Action("B", microbatch, stage)


def W(microbatch: int, stage: int) -> Action:
    return Action("W", microbatch, stage)


@dataclass(frozen=True)
class Schedule:
    """Per-rank ordered action lists plus the sizes they refer to.

    ``orders[r]`` is what rank ``r`` executes, in order.  Construct one directly, from
    strings with :meth:`from_strings`, or with a generator (:func:`gpipe`,
    :func:`one_f_one_b`, :func:`interleaved_one_f_one_b`, :func:`zb_h1`, :func:`zb_h2`,
    :func:`zb_v`, :func:`dualpipe_v`).

    Two optional fields make a schedule's shape part of its data, so that validation, the
    rules, both simulators, the lowering and the executor all read it from one place:

    * ``placement``: which rank holds each stage, ``placement[stage] = rank``; ``None`` (the
      default) is Megatron's loop, ``stage % p``.  Pass ``"v"`` for the V shape
      (:func:`v_placement`) or any sequence in which every rank holds as many stages.
    * ``fused``: per rank, ``(first step, number of steps)`` of each unit of several
      consecutive actions that run as one kernel (see :meth:`units`); empty by default.
    """

    orders: tuple[tuple[Action, ...], ...]
    num_microbatches: int
    num_stages: int
    name: str = "custom"
    placement: tuple[int, ...] | None = None
    fused: tuple[tuple[tuple[int, int], ...], ...] = ()

    def __post_init__(self) -> None:
        orders = tuple(tuple(Action.parse(a) if not isinstance(a, Action) else a for a in row)
                       for row in self.orders)
        object.__setattr__(self, "orders", orders)
        if len(orders) < 1:
            raise ScheduleError("a schedule needs at least one rank")
        if self.num_stages % len(orders) != 0:
            raise ScheduleError(
                f"{self.num_stages} stages cannot be spread over {len(orders)} ranks: every rank "
                f"owns the same number of stages (num_stages = chunks * ranks)"
            )
        if self.placement is not None:
            object.__setattr__(self, "placement",
                               _normalise_placement(self.placement, len(orders), self.num_stages))
        if self.fused:
            object.__setattr__(self, "fused", _normalise_fused(self.fused, orders))

    # -- sizes ---------------------------------------------------------------------------
    @property
    def num_ranks(self) -> int:
        return len(self.orders)

    @property
    def chunks(self) -> int:
        """Model chunks (virtual stages) per rank: ``v`` in the interleaved schedule."""
        return self.num_stages // self.num_ranks

    @property
    def splits_backward(self) -> bool:
        """True when backward is split into B (input grad) and W (weight grad)."""
        return any(a.op == "W" for row in self.orders for a in row)

    def rank_of(self, stage: int) -> int:
        """The rank that holds ``stage``: ``placement[stage]``, or ``stage % p``."""
        if self.placement is None:
            return stage % self.num_ranks
        return self.placement[stage]

    def stages_of(self, rank: int) -> list[int]:
        """The stages ``rank`` holds, in increasing order (its chunks 0, 1, ...)."""
        if self.placement is None:
            return list(range(rank, self.num_stages, self.num_ranks))
        return [s for s, owner in enumerate(self.placement) if owner == rank]

    def owners(self) -> list[int]:
        """``rank_of`` of every stage, as a list (what fast loops index)."""
        if self.placement is None:
            p = self.num_ranks
            return [s % p for s in range(self.num_stages)]
        return list(self.placement)

    def placement_rule(self) -> str:
        """The placement in words, for error messages."""
        p, n = self.num_ranks, self.num_stages
        if self.placement is None:
            return (f"rank r owns stages r, r+{p}, r+{2 * p}, ..." if n > p
                    else "stage s lives on rank s")
        if self.placement == v_placement(p, n):
            return f"V placement: rank r owns stages r and {2 * p - 1}-r"
        return "placement " + ", ".join(f"stage {s} -> rank {r}"
                                        for s, r in enumerate(self.placement))

    def units(self, rank: int) -> list[tuple[int, int]]:
        """``(start, stop)`` of every unit of ``orders[rank]``, in order: a single action,
        or several consecutive actions fused into one kernel (``fused``)."""
        row = self.orders[rank]
        marked = dict(self.fused[rank]) if self.fused else {}
        out, k = [], 0
        while k < len(row):
            length = marked.get(k, 1)
            out.append((k, k + length))
            k += length
        return out

    # -- conversions -----------------------------------------------------------------------
    @classmethod
    def from_strings(
        cls,
        orders: Sequence[Sequence[str] | str],
        num_microbatches: int | None = None,
        num_stages: int | None = None,
        name: str = "custom",
        placement=None,
    ) -> "Schedule":
        """Build a schedule from text: one list of actions (or one space-separated line)
        per rank.  A token joining actions with ``+`` (``3F5+4B1+4W1``) is a fused unit.
        Sizes not given are inferred from the largest indices used; ``placement`` is passed
        on (``"v"`` for the V shape)."""
        rows = [row.split() if isinstance(row, str) else list(row) for row in orders]
        parsed, fused = [], []
        for row in rows:
            actions, units = [], []
            for token in row:
                parts = str(token).split("+") if not isinstance(token, Action) else [token]
                if len(parts) > 1:
                    units.append((len(actions), len(parts)))
                actions.extend(Action.parse(a) for a in parts)
            parsed.append(actions)
            fused.append(tuple(units))
        everything = [a for row in parsed for a in row]
        if num_microbatches is None:
            num_microbatches = 1 + max((a.microbatch for a in everything), default=-1)
        if num_stages is None:
            top = 1 + max((a.stage for a in everything), default=len(rows) - 1)
            num_stages = -(-max(top, len(rows)) // len(rows)) * len(rows)
        return cls(tuple(tuple(r) for r in parsed), num_microbatches, num_stages, name,
                   placement, tuple(fused) if any(fused) else ())

    def to_strings(self) -> list[list[str]]:
        """Per rank, the action strings, e.g. ``[["0F0", "0F1", ...], ...]``."""
        return [[str(a) for a in row] for row in self.orders]

    def unit_strings(self) -> list[list[str]]:
        """Per rank, one string per unit: fused actions joined with ``+``
        (``["0F0", ..., "3F5+4B1+4W1", ...]``); equal to :meth:`to_strings` without units."""
        return [["+".join(str(a) for a in row[start:stop]) for start, stop in self.units(r)]
                for r, row in enumerate(self.orders)]

    # -- rendering ---------------------------------------------------------------------------
    def __str__(self) -> str:
        return format_orders(self)

    def grid(self) -> str:
        return format_grid(self)


def v_placement(p: int, num_stages: int | None = None) -> tuple[int, ...]:
    """The V shape (ZB-V, DualPipeV): stage ``s < p`` on rank ``s``, stage ``s >= p`` on rank
    ``2p-1-s``, so rank ``r`` holds stages ``r`` and ``2p-1-r``.  Microbatches go down the
    ranks and come back up; the turn (stages ``p-1`` and ``p``) stays on the last rank, and
    the first rank computes both the first layers and the loss."""
    n = 2 * p if num_stages is None else num_stages
    if n != 2 * p:
        raise ScheduleError(f"the V placement has exactly 2 stages per rank: 2p = {2 * p} "
                            f"stages for p = {p} ranks, not {n}")
    return tuple(s if s < p else 2 * p - 1 - s for s in range(n))


def _normalise_placement(placement, p: int, n_stages: int):
    """``None`` for Megatron's loop (so that equal schedules compare equal), else a tuple."""
    if isinstance(placement, str):
        if placement == "loop":
            return None
        if placement == "v":
            return v_placement(p, n_stages)
        raise ScheduleError(f"unknown placement {placement!r}: use 'loop' (stage % p), 'v' "
                            f"(rank r holds stages r and 2p-1-r) or a stage -> rank sequence")
    try:
        ranks = tuple(int(r) for r in placement)
    except (TypeError, ValueError):
        raise ScheduleError(f"a placement is a sequence of ranks, one per stage, not "
                            f"{placement!r}") from None
    if len(ranks) != n_stages:
        raise ScheduleError(f"the placement names {len(ranks)} stages, but the schedule has "
                            f"{n_stages}: give the rank of every stage")
    bad = [s for s, r in enumerate(ranks) if not 0 <= r < p]
    if bad:
        raise ScheduleError(f"the placement puts stage {bad[0]} on rank {ranks[bad[0]]}, but "
                            f"ranks are numbered 0..{p - 1}")
    counts = Counter(ranks)
    per_rank = n_stages // p
    uneven = [r for r in range(p) if counts.get(r, 0) != per_rank]
    if uneven:
        raise ScheduleError(f"the placement gives rank {uneven[0]} {counts.get(uneven[0], 0)} "
                            f"stages; every rank holds the same number ({per_rank})")
    if ranks == tuple(s % p for s in range(n_stages)):
        return None
    return ranks


def _normalise_fused(fused, orders) -> tuple:
    """Per rank, sorted ``(start, length)`` pairs; empty tuple when nothing is fused."""
    if len(fused) != len(orders):
        raise ScheduleError(f"fused names units for {len(fused)} ranks; the schedule has "
                            f"{len(orders)}: give one (possibly empty) list per rank")
    out = []
    for rank, (units, row) in enumerate(zip(fused, orders)):
        pairs = sorted((int(start), int(length)) for start, length in units)
        end = 0
        for start, length in pairs:
            if length < 2 or start < end or start + length > len(row):
                raise ScheduleError(
                    f"rank {rank}: a fused unit at step {start} of {length} actions does not "
                    f"fit: units are at least 2 consecutive actions of the rank's list, "
                    f"within it and not overlapping")
            end = start + length
        out.append(tuple(pairs))
    return tuple(out) if any(out) else ()


def format_orders(schedule: Schedule) -> str:
    """One line per rank: ``rank 0: 0F0 0F1 ...`` (fused units as ``3F5+4B1+4W1``)."""
    if schedule.fused:
        return "\n".join(f"rank {r}: " + " ".join(row)
                         for r, row in enumerate(schedule.unit_strings()))
    return "\n".join(f"rank {r}: " + " ".join(str(a) for a in row)
                     for r, row in enumerate(schedule.orders))


def format_grid(schedule: Schedule) -> str:
    """A step x rank table: row ``k`` shows every rank's ``k``-th action.

    Steps are positions in each rank's list (a fused unit is one step), not times; use the
    simulator for times."""
    rows = schedule.unit_strings()
    width = max([4] + [len(a) for row in rows for a in row])
    header = "step " + " ".join(f"{'r' + str(r):>{width}}" for r in range(schedule.num_ranks))
    lines = [header]
    for step in range(max((len(row) for row in rows), default=0)):
        cells = [row[step] if step < len(row) else "" for row in rows]
        lines.append(f"{step:>4} " + " ".join(f"{c:>{width}}" for c in cells))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Validation: every error names the offending action and says why it is wrong.
# ---------------------------------------------------------------------------------------------
def validate(schedule: Schedule) -> Schedule:
    """Check that ``schedule`` describes one complete training step.

    Rules: every (microbatch, stage) has exactly one ``F`` and one ``B`` -- and, if any ``W``
    appears, exactly one ``W`` -- all on the rank that owns the stage (``rank_of``), and each
    after what it needs on its own stage (:func:`paralab.rules.same_stage_needs`: F, then
    B, then W).  A fused unit is a full backward (``B`` then ``W`` of one microbatch and
    stage) or an overlapped forward and full backward (``F`` of one, then ``B`` and ``W`` of
    another), whose actions must not need each other (:func:`paralab.rules.unit_kind`).
    Returns the schedule so calls can be chained; raises :class:`ScheduleError` otherwise.
    This does not prove the ranks can't wait on each other forever: the simulator does.
    """
    from . import rules  # rules builds on Action, defined above

    m, n_stages = schedule.num_microbatches, schedule.num_stages
    if m < 1:
        raise ScheduleError(f"a schedule needs at least one microbatch, got {m}")
    ops = ("F", "B", "W") if schedule.splits_backward else ("F", "B")
    owner = schedule.owners()
    position: dict[Action, int] = {}  # action -> step on its rank (the rank is owner[stage])
    claim = position.setdefault
    for rank, row in enumerate(schedule.orders):
        for index, action in enumerate(row):
            op, microbatch, stage = action
            if not (op in OPS and 0 <= microbatch < m and 0 <= stage < n_stages
                    and owner[stage] == rank):
                _reject_action(schedule, rank, index, action)
            first = claim(action, index)
            if first != index:
                raise ScheduleError(
                    f"rank {rank}: {action} appears twice (steps {first} and {index}); each "
                    f"microbatch goes through each stage's {_op_name(op)} exactly once")
    # Every action present is valid and distinct, so the count tells whether any is missing.
    if len(position) != len(ops) * n_stages * m:
        for op in ops:
            for stage in range(n_stages):
                for mb in range(m):
                    action = Action(op, mb, stage)
                    if action not in position:
                        extra = (" (this schedule splits the backward, so every B needs its W)"
                                 if op == "W" else "")
                        raise ScheduleError(
                            f"{action} is missing: microbatch {mb} never runs the "
                            f"{_op_name(op)} of stage {stage} on rank "
                            f"{schedule.rank_of(stage)}{extra}")
    for op in ops:
        for need in rules.same_stage_needs(op):
            needed_op = need.action.op
            for action, index in position.items():
                if action[0] == op:
                    needed = Action(needed_op, action[1], action[2])
                    before = position[needed]
                    if index < before:
                        raise ScheduleError(
                            f"rank {schedule.rank_of(action.stage)}: {action} (step {index}) "
                            f"comes before {need.label}{needed} (step {before}): {need.why}")
    for rank, units in enumerate(schedule.fused):
        row = schedule.orders[rank]
        for start, length in units:
            rules.unit_kind(row[start:start + length], n_stages, where=f"rank {rank}, step "
                                                                       f"{start}")
    _mark_valid(schedule)
    return schedule


def ensure_valid(schedule: Schedule) -> Schedule:
    """:func:`validate` ``schedule`` unless that is known to pass already.

    A schedule is immutable, so once validated -- or built by one of the generators below,
    whose every output the tests validate over a range of sizes -- it stays valid; the
    simulator, the lowering and the executor call this instead of validating again."""
    if not schedule.__dict__.get("_valid", False):
        validate(schedule)
    return schedule


def _mark_valid(schedule: Schedule) -> Schedule:
    object.__setattr__(schedule, "_valid", True)  # not a field: no effect on ==, hash, repr
    return schedule


def _reject_action(schedule: Schedule, rank: int, index: int, action: Action) -> None:
    """Raise the error for an action that is invalid on its own (op, index range, rank)."""
    p, m, n_stages = schedule.num_ranks, schedule.num_microbatches, schedule.num_stages
    if action.op not in OPS:
        raise ScheduleError(f"rank {rank}, step {index}: unknown op {action.op!r} "
                            f"(use F, B or W)")
    if not 0 <= action.microbatch < m:
        raise ScheduleError(
            f"rank {rank}, step {index}: {action} uses microbatch {action.microbatch}, "
            f"but microbatches are numbered 0..{m - 1}")
    if not 0 <= action.stage < n_stages:
        raise ScheduleError(
            f"rank {rank}, step {index}: {action} uses stage {action.stage}, "
            f"but stages are numbered 0..{n_stages - 1}")
    owner = schedule.rank_of(action.stage)
    rule = (f"rank r owns stages r, r+{p}, r+{2 * p}, ..." if schedule.placement is None
            else schedule.placement_rule())
    raise ScheduleError(
        f"rank {rank}, step {index}: {action} belongs to stage {action.stage}, "
        f"which lives on rank {owner} ({rule})")


def gc_paused(function):
    """Run ``function`` with Python's cyclic garbage collector paused.

    Building or simulating a large schedule allocates a million small objects that never
    form reference cycles; every collection the allocations trigger walks all of them again,
    which more than doubles the run time for nothing.  Reference counting still frees
    everything as usual, and the collector is restarted (if it was running) on the way out."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return function(*args, **kwargs)
        finally:
            if was_enabled:
                gc.enable()

    return wrapper


def _op_name(op: str) -> str:
    return {"F": "forward", "B": "backward", "W": "weight-gradient pass"}.get(op, op)


def _check_sizes(p: int, m: int, v: int = 1) -> None:
    for name, value in (("p (ranks)", p), ("m (microbatches)", m), ("v (chunks per rank)", v)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ScheduleError(f"{name} must be a positive integer, got {value!r}")


# ---------------------------------------------------------------------------------------------
# Generators
# ---------------------------------------------------------------------------------------------
@gc_paused
def gpipe(p: int, m: int) -> Schedule:
    """GPipe (Huang et al. 2019): all forwards, then all backwards.

    Every rank holds the activations of all ``m`` microbatches before its first backward."""
    _check_sizes(p, m)
    orders = [[F(i, r) for i in range(m)] + [B(i, r) for i in range(m)] for r in range(p)]
    return _mark_valid(Schedule(tuple(map(tuple, orders)), m, p, "gpipe"))


@gc_paused
def one_f_one_b(p: int, m: int) -> Schedule:
    """1F1B as in PipeDream-Flush and Megatron-LM.

    Rank ``r`` runs a warm-up of ``p - r - 1`` forwards (just enough that its first
    backward can arrive without idling), then alternates one forward and one backward
    (steady state), then drains the remaining backwards (cool-down).  Its bubble is the
    same as GPipe's; what it saves is memory: at most ``p - r`` microbatches in flight."""
    _check_sizes(p, m)
    orders = []
    for r in range(p):
        warmup = min(p - r - 1, m)
        row = [F(i, r) for i in range(warmup)]
        for k in range(m - warmup):  # steady state: the forward of k+warmup, backward of k
            row += [F(warmup + k, r), B(k, r)]
        row += [B(i, r) for i in range(m - warmup, m)]  # cool-down
        orders.append(tuple(row))
    return _mark_valid(Schedule(tuple(orders), m, p, "1f1b"))


def megatron_group_size(p: int, m: int) -> int:
    """The microbatch group size the interleaved schedule uses by default: ``p`` when ``p``
    divides ``m``, otherwise the smallest ``N`` in ``[p, m]`` that Megatron-Core accepts as
    ``microbatch_group_size_per_vp_stage`` (its last group, ``m mod N`` microbatches, is
    empty or holds at least ``p``).  ``N = m`` always qualifies, so any ``m >= p`` has one."""
    return next(n for n in range(p, m + 1) if m % n == 0 or m % n >= p)


def check_group_size(p: int, m: int, group: int) -> None:
    """Refuse a microbatch group size Megatron-Core refuses, saying why."""
    if not isinstance(group, int) or isinstance(group, bool) or not p <= group <= m:
        raise ScheduleError(
            f"the microbatch group size must be a whole number in [p, m] = [{p}, {m}], got "
            f"{group!r}: fewer than p microbatches per group leave the first rank waiting "
            f"for its own microbatches to come back from the last rank before its next chunk")
    rest = m % group
    if 0 < rest < p:
        raise ScheduleError(
            f"m={m} microbatches in groups of {group} leave a last group of {rest} < p={p}: "
            f"its microbatches return to rank 0 before rank 0 has other work, a bubble "
            f"Megatron-Core refuses; pick a group size with m % N = 0 or >= p (e.g. "
            f"{megatron_group_size(p, m)})")


@gc_paused
def interleaved_one_f_one_b(p: int, m: int, v: int, group: int | None = None) -> Schedule:
    """Megatron-LM's interleaved 1F1B (Narayanan et al. 2021, section 2.2), for any ``m >= p``.

    Each rank holds ``v`` model chunks (stages ``r, r+p, ...``).  Microbatches go through
    the chunks in *groups*, as in Megatron-Core's ``get_schedule_table``: a rank runs the
    forwards of the first group's microbatches on its first chunk, then the same group on
    its second chunk, and so on, then the next group; backwards follow the same table with
    the chunks reversed.  The warm-up is ``2(p-r-1) + (v-1) N`` chunk forwards for a group
    size ``N``, then one forward and one backward alternate.  ``group`` is Megatron-Core's
    ``microbatch_group_size_per_vp_stage``; by default ``p`` when ``p`` divides ``m`` (the
    paper's schedule) and otherwise :func:`megatron_group_size`.  Fill and drain are ``v``
    times shorter, so the bubble overhead falls from (p-1)/m to (p-1)/(v m) when p divides m.

    ``torch.distributed.pipelining.ScheduleInterleaved1F1B`` uses *rounds* instead: ``max(1,
    m // p)`` equal rounds of ``m / rounds`` microbatches, so it refuses an ``m`` that the
    rounds do not divide (``m = 9``, ``p = 4``: two rounds of 4.5), and it accepts ``m < p``
    (one round of ``m``), which Megatron-Core and this function refuse.  Where both accept
    ``m``, the orders are the same: torch's round is a group of ``m / rounds``
    microbatches, and that is the group size chosen here."""
    _check_sizes(p, m, v)
    if m < p:
        raise ScheduleError(
            f"interleaved 1F1B needs at least p={p} microbatches, got m={m}: with fewer, rank "
            f"0 runs out of forwards of its first chunk before microbatch 0 comes back for "
            f"its second chunk (Megatron-Core refuses m < p)")
    if group is None:
        group = megatron_group_size(p, m)
    check_group_size(p, m, group)
    total = m * v  # (microbatch, chunk) pairs per rank
    table = []     # Megatron-Core's schedule table: (microbatch, chunk) in forward order
    for first in range(0, m, group):
        last = min(first + group, m)
        table += [(i, chunk) for chunk in range(v) for i in range(first, last)]
    orders = []
    for r in range(p):
        forwards = [F(i, chunk * p + r) for i, chunk in table]
        backwards = [B(i, (v - 1 - chunk) * p + r) for i, chunk in table]
        # Warm-up: enough forwards that the first backward of the last chunk can arrive.
        warmup = min((p - r - 1) * 2 + (v - 1) * group, total)
        row = forwards[:warmup]
        for k in range(total - warmup):  # steady state: one forward, one backward
            row += [forwards[warmup + k], backwards[k]]
        row += backwards[total - warmup:]  # cool-down
        orders.append(tuple(row))
    name = "interleaved" if v > 1 else "interleaved(v=1)"
    return _mark_valid(Schedule(tuple(orders), m, p * v, name))


@gc_paused
def zb_h1(p: int, m: int) -> Schedule:
    """ZB-H1 from Zero Bubble Pipeline Parallelism (Qi et al. 2024).

    The backward is split into B (gradient w.r.t. the stage input, which the previous
    stage waits for) and W (gradient w.r.t. the weights, which nobody waits for).  F's and
    B's follow 1F1B exactly -- so rank ``r`` still has at most ``p - r`` microbatches in
    flight -- and each B is followed by a W, except that rank ``r`` lets up to ``r`` W's
    wait.  Late ranks finish their B's early in the cool-down; postponing their W's lets
    them pass gradients upstream sooner and fills their own tail with the W's they owe.
    For ``m >= p`` and ``t_w <= min(t_f, t_b)`` the bubble shrinks from
    (p-1)(t_f+t_b+t_w) to (p-1)(t_f+t_b-t_w)."""
    _check_sizes(p, m)
    orders = []
    for r in range(p):
        warmup = min(p - r - 1, m)
        may_owe = r  # W's this rank may postpone while it still has B's to run
        row = [F(i, r) for i in range(warmup)]  # warm-up
        next_w = 0

        def backward(k: int) -> list[Action]:
            nonlocal next_w
            out = [B(k, r)]
            if k + 1 - next_w > may_owe:  # owes more W's than allowed: pay one now
                out.append(W(next_w, r))
                next_w += 1
            return out

        for k in range(m - warmup):  # steady state
            row += [F(warmup + k, r)] + backward(k)
        for k in range(m - warmup, m):  # cool-down: the remaining B's, then the W's owed
            row += backward(k)
        row += [W(i, r) for i in range(next_w, m)]
        orders.append(tuple(row))
    return _mark_valid(Schedule(tuple(orders), m, p, "zb-h1"))


@gc_paused
def zb_h2(p: int, m: int) -> Schedule:
    """ZB-H2 from Zero Bubble Pipeline Parallelism (Qi et al. 2024, section 2.2).

    ZB-H1 spends no memory beyond 1F1B's.  ZB-H2 buys the rest of the bubble with memory:
    rank ``r`` runs ``2(p-r-1)`` warm-up forwards -- enough to keep it busy until its first
    gradient arrives, so it holds up to ``2(p-r)-1`` microbatches (``2p-1`` on rank 0,
    against 1F1B's ``p``) -- then one forward and one backward at a time, each backward
    followed by a W unless the rank owes at most ``2r`` of them; the W's owed fill the
    tail.  The layout becomes a parallelogram: every rank works without a gap from its first
    forward to its last W, so the only idle time is the fill ``r t_f`` before a rank starts
    and what it waits after it ends -- time the next step's forwards can use when no
    global synchronisation separates the steps (the paper's optimizer post-validation).
    Rank 0's order is the paper's Figure 3: F0..F6, B0 W0 F7, then B W pairs (p=4, m=8)."""
    _check_sizes(p, m)
    orders = []
    for r in range(p):
        warmup = min(2 * (p - r - 1), m)
        owed = []  # microbatches whose W this rank has postponed, oldest first
        row = [F(i, r) for i in range(warmup)]
        for k in range(m):
            if warmup + k < m:  # steady state: a forward before each backward
                row.append(F(warmup + k, r))
            row.append(B(k, r))
            owed.append(k)
            if len(owed) > 2 * r:
                row.append(W(owed.pop(0), r))
        row += [W(i, r) for i in owed]
        orders.append(tuple(row))
    return _mark_valid(Schedule(tuple(orders), m, p, "zb-h2"))


class _RowBuilder:
    """One rank's list being written: actions in order, some grouped into fused units, and
    a counter per (op, stage) that hands out the next microbatch (every generator here
    runs each stage's microbatches in order)."""

    def __init__(self):
        self.row: list[Action] = []
        self.units: list[tuple[int, int]] = []
        self.count: Counter = Counter()

    def next(self, op: str, stage: int) -> Action:
        action = Action(op, self.count[(op, stage)], stage)
        self.count[(op, stage)] += 1
        return action

    def add(self, *actions: Action) -> None:
        """Append ``actions`` as one unit (several: fused into one kernel)."""
        if len(actions) > 1:
            self.units.append((len(self.row), len(actions)))
        self.row.extend(actions)


def _v_schedule(builders: list[_RowBuilder], p: int, m: int, name: str,
                keep=lambda a: True) -> Schedule:
    rows, fused = [], []
    for b in builders:
        # ``keep`` drops the actions of microbatches a generator planned beyond m; a fused
        # unit is only ever made of kept actions.
        index, row, units = {}, [], []
        for k, action in enumerate(b.row):
            if keep(action):
                index[k] = len(row)
                row.append(action)
        for start, length in b.units:
            units.append((index[start], length))
        rows.append(tuple(row))
        fused.append(tuple(units))
    return _mark_valid(Schedule(tuple(rows), m, 2 * p, name, v_placement(p),
                                tuple(fused) if any(fused) else ()))


@gc_paused
def zb_v(p: int, m: int) -> Schedule:
    """ZB-V (Qi et al. 2024, section 6), in ``torch.distributed.pipelining``'s order
    (``ScheduleZBVZeroBubble``).

    The model is cut into ``2p`` chunks placed in a V (:func:`v_placement`): rank ``r``
    holds chunk ``r`` of the way down and chunk ``2p-1-r`` of the way back, so the last
    rank turns a microbatch around at once and the first rank computes the loss.  Every
    rank therefore starts its backwards early, like the last stage of 1F1B, which is what
    lets ZB-V keep 1F1B's peak activation memory while its W's fill the bubble.

    Rank ``r``: a warm-up of ``2(p-r)-1`` forwards of its first chunk, then ``r`` pairs of
    forwards (second chunk, first chunk), then ``p-r`` rounds of forward, B and W on the
    second chunk; a steady state of rounds (F, B, W on the first chunk, then on the
    second); a cool-down of ``r`` B's on both chunks, ``p-r`` rounds of B and W on the
    first chunk, and the W's still owed (second chunk, then first).  Built as if there were
    ``max(m, 2p-1)`` microbatches and the extra ones removed, as torch does."""
    _check_sizes(p, m)
    n = max(m, 2 * p - 1)
    builders = []
    for r in range(p):
        down, up = r, 2 * p - 1 - r
        b = _RowBuilder()
        for _ in range(2 * (p - r) - 1):
            b.add(b.next("F", down))
        for _ in range(r):
            b.add(b.next("F", up))
            b.add(b.next("F", down))
        for _ in range(p - r):
            b.add(b.next("F", up))
            b.add(b.next("B", up))
            b.add(b.next("W", up))
        while b.count[("F", up)] < b.count[("F", down)] or b.count[("F", down)] < n:
            if b.count[("F", down)] < n:
                b.add(b.next("F", down))
            b.add(b.next("B", down))
            b.add(b.next("W", down))
            b.add(b.next("F", up))
            b.add(b.next("B", up))
            b.add(b.next("W", up))
        for _ in range(r):
            b.add(b.next("B", down))
            b.add(b.next("B", up))
        for _ in range(p - r):
            b.add(b.next("B", down))
            b.add(b.next("W", down))
        for stage in (up, down):
            while b.count[("W", stage)] < b.count[("B", stage)]:
                b.add(b.next("W", stage))
        builders.append(b)
    return _v_schedule(builders, p, m, "zb-v", keep=lambda a: a.microbatch < m)


@gc_paused
def dualpipe_v(p: int, m: int) -> Schedule:
    """DualPipeV, in ``torch.distributed.pipelining``'s order (``ScheduleDualPipeV``).

    DualPipe (DeepSeek-V3 report, section 3.2.1) feeds microbatches from both ends of the
    pipeline into two copies of the model; DualPipeV is the same schedule cut in half: one
    copy, ``2p`` chunks in a V (:func:`v_placement`) on ``p`` ranks.  Its steady state
    *overlaps* the forward of one microbatch with the full backward of another in one unit
    (``F&B``: in DeepSeek's kernels, one's computation hides the other's all-to-all
    communication); the tail splits the backwards into B and W and uses the W's to fill
    the drain.  Needs ``m >= 2p``.

    Rank ``r`` (chunks ``d = r`` down, ``u = 2p-1-r`` up): ``2(p-r-1)`` forwards of ``d``;
    ``r+1`` pairs of forwards (``d``, ``u``); ``p-r-1`` rounds of B, W and F on ``u``; then
    ``m-2p+r+1`` rounds of two overlapped units (F of ``d`` with the full backward of ``u``,
    F of ``u`` with the full backward of ``d``; the last rank runs its first F and full
    backward one after the other); ``p-r-1`` rounds of a full backward of ``u`` and an
    overlapped unit (F of ``u``, backward of ``d``); ``r+1`` rounds of backwards of ``u``
    and ``d`` that switch from full to split (B only) halfway; ``p-r-1`` rounds of an owed W
    and a backward of ``d``; and the W's still owed, oldest first."""
    _check_sizes(p, m)
    if m < 2 * p:
        raise ScheduleError(
            f"DualPipeV needs at least as many microbatches as stages, 2p = {2 * p}, got "
            f"m={m}: its steady state overlaps forwards and backwards of the two chunks of "
            f"every rank, and with fewer microbatches it never reaches one")
    builders = []
    for r in range(p):
        down, up = r, 2 * p - 1 - r
        b = _RowBuilder()
        owed: list[Action] = []  # W's of split backwards, oldest first

        def full_backward(stage):  # B and W of one microbatch, in one pass
            action = b.next("B", stage)
            return action, Action("W", action.microbatch, stage)

        def backward(stage, split):
            if split:
                action = b.next("B", stage)
                owed.append(Action("W", action.microbatch, stage))
                b.add(action)
            else:
                b.add(*full_backward(stage))

        def pay_owed():
            if owed:
                b.add(owed.pop(0))

        for _ in range(2 * (p - r - 1)):
            b.add(b.next("F", down))
        for _ in range(r + 1):
            b.add(b.next("F", down))
            b.add(b.next("F", up))
        for _ in range(p - r - 1):
            backward(up, split=True)
            pay_owed()
            b.add(b.next("F", up))
        for i in range(m - 2 * p + r + 1):
            if i == 0 and r == p - 1:  # torch keeps these two apart, for a smaller bubble
                b.add(b.next("F", down))
                b.add(*full_backward(up))
            else:
                b.add(b.next("F", down), *full_backward(up))
            b.add(b.next("F", up), *full_backward(down))
        for _ in range(p - r - 1):
            b.add(*full_backward(up))
            b.add(b.next("F", up), *full_backward(down))
        split = False
        for i in range(r + 1):
            if i == (r + 1) // 2 and r % 2 == 1:
                split = True
            backward(up, split)
            if i == (r + 1) // 2 and r % 2 == 0:
                split = True
            backward(down, split)
        for _ in range(p - r - 1):
            pay_owed()
            backward(down, split)
        for _ in range(r + 1):
            pay_owed()
        builders.append(b)
    return _v_schedule(builders, p, m, "dualpipev")


GENERATORS = {
    "gpipe": lambda p, m, v=1: gpipe(p, m),
    "1f1b": lambda p, m, v=1: one_f_one_b(p, m),
    "interleaved": lambda p, m, v=2: interleaved_one_f_one_b(p, m, v),
    "zb-h1": lambda p, m, v=1: zb_h1(p, m),
    "zb-h2": lambda p, m, v=1: zb_h2(p, m),
    "zb-v": lambda p, m, v=1: zb_v(p, m),
    "dualpipev": lambda p, m, v=1: dualpipe_v(p, m),
}


def build(name: str, p: int, m: int, v: int = 1) -> Schedule:
    """Build a schedule by its CLI name: ``gpipe``, ``1f1b``, ``interleaved``, ``zb-h1``,
    ``zb-h2``, ``zb-v``, ``dualpipev``.  ``v`` (chunks per rank) is for ``interleaved``
    only; ``zb-v`` and ``dualpipev`` always hold two chunks per rank, in a V."""
    try:
        generator = GENERATORS[name]
    except KeyError:
        raise ScheduleError(f"unknown schedule {name!r}; choose from {', '.join(GENERATORS)}")
    if name != "interleaved" and v != 1:
        raise ScheduleError(f"-v/chunks only applies to the interleaved schedule, not {name!r}")
    return generator(p, m, v)


def actions(schedule: Schedule) -> Iterable[tuple[int, int, Action]]:
    """Yield ``(rank, step, action)`` for every action of the schedule."""
    for rank, row in enumerate(schedule.orders):
        for step, action in enumerate(row):
            yield rank, step, action


def op_counts(schedule: Schedule) -> Counter:
    return Counter(a.op for _, _, a in actions(schedule))
