"""Pipeline schedules as data.

A pipeline schedule is nothing more than, for every rank, the ordered list of the work it
does.  Keeping it as plain data (instead of as control flow buried in a training loop) is
what lets one object be printed, validated, simulated, plotted, executed by real
processes, and graded.

Conventions (the same as ``torch.distributed.pipelining`` and Megatron-LM):

* Everything is 0-based: microbatch ``0 .. m-1``, stage ``0 .. S-1``, rank ``0 .. p-1``.
* ``stage`` is the *global* (virtual) stage.  With ``v`` chunks per rank there are
  ``S = v * p`` stages and rank ``r`` owns stages ``r, r + p, r + 2p, ...`` (Megatron's
  interleaved placement); with ``v = 1`` stage ``s`` simply lives on rank ``s``.
* An action is ``(op, microbatch, stage)``.  ``F`` is a forward; ``B`` is a backward (or,
  when a schedule splits the backward, only the gradient w.r.t. the stage's *input*, which
  is what the previous stage is waiting for); ``W`` is the gradient w.r.t. the stage's
  *weights*, which nobody waits for and can therefore fill bubbles (zero-bubble schedules).
* The text form of an action is ``f"{stage}{op}{microbatch}"``, e.g. ``0F3`` or ``5B1``.
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
    :func:`one_f_one_b`, :func:`interleaved_one_f_one_b`, :func:`zb_h1`).
    """

    orders: tuple[tuple[Action, ...], ...]
    num_microbatches: int
    num_stages: int
    name: str = "custom"

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
        return stage % self.num_ranks

    def stages_of(self, rank: int) -> list[int]:
        return list(range(rank, self.num_stages, self.num_ranks))

    # -- conversions -----------------------------------------------------------------------
    @classmethod
    def from_strings(
        cls,
        orders: Sequence[Sequence[str] | str],
        num_microbatches: int | None = None,
        num_stages: int | None = None,
        name: str = "custom",
    ) -> "Schedule":
        """Build a schedule from text: one list of actions (or one space-separated line)
        per rank.  Sizes not given are inferred from the largest indices used."""
        rows = [row.split() if isinstance(row, str) else list(row) for row in orders]
        parsed = [[Action.parse(a) for a in row] for row in rows]
        everything = [a for row in parsed for a in row]
        if num_microbatches is None:
            num_microbatches = 1 + max((a.microbatch for a in everything), default=-1)
        if num_stages is None:
            top = 1 + max((a.stage for a in everything), default=len(rows) - 1)
            num_stages = -(-max(top, len(rows)) // len(rows)) * len(rows)
        return cls(tuple(tuple(r) for r in parsed), num_microbatches, num_stages, name)

    def to_strings(self) -> list[list[str]]:
        """Per rank, the action strings, e.g. ``[["0F0", "0F1", ...], ...]``."""
        return [[str(a) for a in row] for row in self.orders]

    # -- rendering ---------------------------------------------------------------------------
    def __str__(self) -> str:
        return format_orders(self)

    def grid(self) -> str:
        return format_grid(self)


def format_orders(schedule: Schedule) -> str:
    """One line per rank: ``rank 0: 0F0 0F1 ...``."""
    return "\n".join(f"rank {r}: " + " ".join(str(a) for a in row)
                     for r, row in enumerate(schedule.orders))


def format_grid(schedule: Schedule) -> str:
    """A step x rank table: row ``k`` shows every rank's ``k``-th action.

    Steps are positions in each rank's list, not times; use the simulator for times."""
    width = max([4] + [len(str(a)) for row in schedule.orders for a in row])
    header = "step " + " ".join(f"{'r' + str(r):>{width}}" for r in range(schedule.num_ranks))
    lines = [header]
    for step in range(max((len(row) for row in schedule.orders), default=0)):
        cells = [str(row[step]) if step < len(row) else "" for row in schedule.orders]
        lines.append(f"{step:>4} " + " ".join(f"{c:>{width}}" for c in cells))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Validation: every error names the offending action and says why it is wrong.
# ---------------------------------------------------------------------------------------------
def validate(schedule: Schedule) -> Schedule:
    """Check that ``schedule`` describes one complete training step.

    Rules: every (microbatch, stage) has exactly one ``F`` and one ``B`` -- and, if any ``W``
    appears, exactly one ``W`` -- all on the rank that owns the stage, and each after what
    it needs on its own stage (:func:`paralab.rules.same_stage_needs`: F, then B, then W).
    Returns the schedule so calls can be chained; raises :class:`ScheduleError` otherwise.
    This does not prove the ranks can't wait on each other forever: the simulator does.
    """
    from . import rules  # rules builds on Action, defined above

    p, m, n_stages = schedule.num_ranks, schedule.num_microbatches, schedule.num_stages
    if m < 1:
        raise ScheduleError(f"a schedule needs at least one microbatch, got {m}")
    ops = ("F", "B", "W") if schedule.splits_backward else ("F", "B")
    position: dict[Action, int] = {}  # action -> step on its rank (the rank is stage % p)
    claim = position.setdefault
    for rank, row in enumerate(schedule.orders):
        for index, action in enumerate(row):
            op, microbatch, stage = action
            if not (op in OPS and 0 <= microbatch < m and 0 <= stage < n_stages
                    and stage % p == rank):
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
    raise ScheduleError(
        f"rank {rank}, step {index}: {action} belongs to stage {action.stage}, "
        f"which lives on rank {owner} (rank r owns stages r, r+{p}, r+{2 * p}, ...)")


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


@gc_paused
def interleaved_one_f_one_b(p: int, m: int, v: int) -> Schedule:
    """Megatron-LM's interleaved 1F1B (Narayanan et al. 2021, section 2.2).

    Each rank holds ``v`` model chunks (stages ``r, r+p, ...``).  Microbatches go through
    the chunks in groups of ``p``: a rank runs forwards of microbatches 0..p-1 on its first
    chunk, then the same group on its second chunk, and so on, which is why ``m`` must be a
    multiple of ``p``.  The fill and drain are ``v`` times shorter, so the bubble overhead
    falls from (p-1)/m to (p-1)/(v m)."""
    _check_sizes(p, m, v)
    if m % p != 0:
        raise ScheduleError(
            f"interleaved 1F1B sends microbatches through the chunks in groups of p={p}, so m "
            f"must be a multiple of p; m={m} is not (try m={m + (-m) % p})")
    total = m * v  # (microbatch, chunk) pairs per rank

    def microbatch(k: int) -> int:
        return (k // (p * v)) * p + k % p

    def chunk_forward(k: int) -> int:
        return (k // p) % v

    orders = []
    for r in range(p):
        forwards = [F(microbatch(k), chunk_forward(k) * p + r) for k in range(total)]
        backwards = [B(microbatch(k), (v - 1 - chunk_forward(k)) * p + r) for k in range(total)]
        # Warm-up: enough forwards that the first backward of the last chunk can arrive.
        warmup = min((p - r - 1) * 2 + (v - 1) * p, total)
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


GENERATORS = {
    "gpipe": lambda p, m, v=1: gpipe(p, m),
    "1f1b": lambda p, m, v=1: one_f_one_b(p, m),
    "interleaved": lambda p, m, v=2: interleaved_one_f_one_b(p, m, v),
    "zb-h1": lambda p, m, v=1: zb_h1(p, m),
}


def build(name: str, p: int, m: int, v: int = 1) -> Schedule:
    """Build a schedule by its CLI name: ``gpipe``, ``1f1b``, ``interleaved``, ``zb-h1``."""
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
