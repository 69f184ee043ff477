"""Timelines: when each action of a schedule ran, and what follows from that.

The simulator produces a timeline from a cost model; the pipeline executor produces one by
measuring real processes.  Both have the same shape, so every metric below (makespan,
bubble, activation memory) and every plot works on either, and the two can be compared
action by action.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from functools import cached_property
from itertools import accumulate
from math import lcm
from typing import Any

from .schedules import Action, Schedule, gc_paused


@dataclass(frozen=True, slots=True)
class Event:
    """One action on one rank, from ``start`` to ``end`` (any consistent time unit).

    Slotted: a large simulated step has a million of them, and without a ``__dict__`` each
    takes a third of the memory and is quicker to create and to free."""

    rank: int
    action: Action
    start: Any
    end: Any

    @property
    def duration(self):
        return self.end - self.start


_new = object.__new__
_set_rank, _set_action = Event.rank.__set__, Event.action.__set__
_set_start, _set_end = Event.start.__set__, Event.end.__set__


def make_event(rank: int, action: Action, start, end) -> Event:
    """``Event(rank, action, start, end)`` without the frozen-dataclass ``__init__``.

    Equal to the normal constructor's result; about three times faster, which matters for
    the million events of a large simulated schedule."""
    event = _new(Event)
    _set_rank(event, rank)
    _set_action(event, action)
    _set_start(event, start)
    _set_end(event, end)
    return event


@dataclass(frozen=True)
class Timeline:
    """Start and end of every action of ``schedule``.

    Definitions used throughout the course (p ranks, makespan T):

    * ``busy[r]``: time rank r spends computing; ``idle[r] = T - busy[r]``.
    * ``ideal``: the busiest rank's compute time -- the step time if there were no bubble
      (``m * (t_f + t_b)`` for balanced stages).
    * ``time_ratio = T / ideal`` -- what the homework calls "bubble ratio" (1.375).
    * ``bubble_fraction = sum(idle) / (p * T)`` -- the idle share of the whole run
      (GPipe paper's (p-1)/(m+p-1), 3/11 in the homework).
    * ``bubble_overhead = sum(idle) / sum(busy)`` -- idle time per unit of useful work
      (Megatron-LM's (p-1)/m, 0.375 in the homework).
    """

    schedule: Schedule
    events: tuple[Event, ...]
    source: str = "simulated"
    unit: str = ""
    meta: dict = field(default_factory=dict, compare=False)

    # -- a fast exact clock ------------------------------------------------------------------
    @cached_property
    def _clock(self) -> tuple:
        """``(scale, starts, ends)``: every event's start and end on one fast clock.

        A large simulated step has a million Fraction times, and Fraction comparisons and
        sums are slow; so when some time is a Fraction and all are ints or Fractions, the
        times are re-expressed exactly as integer counts of ``1/scale`` ticks.  Otherwise
        (only ints; or floats, e.g. measured times) the clock is the times themselves and
        ``scale`` is None."""
        starts = [e.start for e in self.events]
        ends = [e.end for e in self.events]
        # Simulated events share time objects, so convert each distinct object once.
        distinct = {id(t): t for t in starts}
        distinct.update({id(t): t for t in ends})
        values = distinct.values()
        if not (any(isinstance(t, Fraction) for t in values)
                and all(isinstance(t, (int, Fraction)) for t in values)):
            return None, starts, ends
        scale = lcm(*{t.denominator for t in values})
        tick = {i: t.numerator * (scale // t.denominator) for i, t in distinct.items()}
        return scale, [tick[id(t)] for t in starts], [tick[id(t)] for t in ends]

    @cached_property
    def _columns(self) -> tuple[list, list]:
        """``(ranks, actions)``: every event's rank and action, as two lists."""
        return [e.rank for e in self.events], [e.action for e in self.events]

    def _preset(self, scale, starts: list, ends: list, ranks: list, actions: list,
                busy: list | None, distinct_changes: bool) -> None:
        """Adopt what the simulator already has, in event order -- its integer clock
        (``scale`` None when the ticks are the times themselves), ranks, actions and, if
        given, each rank's busy ticks -- so that no metric needs a second pass over the
        events.  The simulator's events are also each rank's schedule row in order (so every
        forward comes before its backward); ``distinct_changes`` says that no forward or
        backward takes zero time (see :meth:`_peaks_in_order`)."""
        self.__dict__.update(_clock=(scale, starts, ends), _columns=(ranks, actions),
                             _in_schedule_order=True, _distinct_changes=distinct_changes)
        if busy is not None:
            self.__dict__["_busy_ticks"] = busy

    def _time(self, ticks):
        """Back from the clock to a time."""
        scale = self._clock[0]
        return ticks if scale is None else Fraction(ticks, scale)

    # -- basic quantities -------------------------------------------------------------------
    @cached_property
    def _first(self) -> int:
        """Index of the first event to start (the first of them on ties, like ``min``)."""
        starts = self._clock[1]
        return starts.index(min(starts))

    @cached_property
    def _origin_tick(self):
        return self._clock[1][self._first] if self.events else 0

    @cached_property
    def origin(self):
        return self.events[self._first].start if self.events else 0

    @cached_property
    def makespan(self):
        if not self.events:
            return 0 - self.origin
        ends = self._clock[2]
        return self.events[ends.index(max(ends))].end - self.origin

    @cached_property
    def _busy_ticks(self) -> list:
        _, starts, ends = self._clock
        totals = [0] * self.schedule.num_ranks
        for rank, start, end in zip(self._columns[0], starts, ends):
            totals[rank] += end - start
        return totals

    @cached_property
    def busy(self) -> list:
        return [self._time(t) for t in self._busy_ticks]

    @cached_property
    def idle(self) -> list:
        return [self.makespan - b for b in self.busy]

    @cached_property
    def ideal(self):
        return max(self.busy)

    @cached_property
    def spans(self) -> list:
        """Per rank, from the start of its first action to the end of its last one."""
        _, starts, ends = self._clock
        first, last = [None] * self.schedule.num_ranks, [None] * self.schedule.num_ranks
        for rank, start, end in zip(self._columns[0], starts, ends):
            if first[rank] is None or start < first[rank]:
                first[rank] = start
            if last[rank] is None or end > last[rank]:
                last[rank] = end
        return [self._time(0 if a is None else b - a) for a, b in zip(first, last)]

    @cached_property
    def span_idle(self) -> list:
        """Per rank, the idle time *inside* its span: ``spans[r] - busy[r]``.

        ``idle`` counts a rank's wait before its first action and after its last one; a
        training loop that starts the next step's forwards on each rank as soon as that
        rank is done (no global synchronisation between steps) does not lose them, and
        then the largest ``span_idle`` is what each step costs beyond its work.  That is
        the bubble the Zero Bubble paper gives for ZB-H2, whose ranks start and end at
        staggered times; for 1F1B and ZB-H1, rank 0 works from the first instant to the
        last, so its ``span_idle`` is its ``idle``."""
        return [s - b for s, b in zip(self.spans, self.busy)]

    @property
    def time_ratio(self):
        return _ratio(self.makespan, self.ideal)

    @property
    def bubble_fraction(self):
        return _ratio(sum(self.idle), self.schedule.num_ranks * self.makespan)

    @property
    def bubble_overhead(self):
        return _ratio(sum(self.idle), sum(self.busy))

    @cached_property
    def _by_rank(self) -> dict[int, list[int]]:
        """Per rank, the indices of its events sorted by start (stable for ties)."""
        rows: dict[int, list[int]] = {r: [] for r in range(self.schedule.num_ranks)}
        for i, e in enumerate(self.events):
            rows.setdefault(e.rank, []).append(i)
        starts = self._clock[1]
        for row in rows.values():
            row.sort(key=starts.__getitem__)
        return rows

    @cached_property
    def _by_action(self) -> dict:
        index: dict = {}
        for e in self.events:
            index.setdefault(e.action, e)  # the first one, as a linear search would find
        return index

    def events_of(self, rank: int) -> list[Event]:
        """The events of ``rank``, sorted by start time."""
        events = self.events
        return [events[i] for i in self._by_rank.get(rank, ())]

    def event(self, action: Action | str) -> Event:
        action = Action.parse(action)
        try:
            return self._by_action[action]
        except KeyError:
            raise KeyError(f"{action} is not in this timeline") from None

    # -- activation memory ----------------------------------------------------------------------
    def _held(self, rank: int) -> list[tuple[int, int, tuple]]:
        """``(index of F, index of B, (microbatch, stage))`` per backward on ``rank``."""
        events = self.events
        row = self._by_rank.get(rank, ())
        forward = {}
        for i in row:
            op, microbatch, stage = events[i].action
            if op == "F":
                forward[(microbatch, stage)] = i
        held = []
        for i in row:
            op, microbatch, stage = events[i].action
            if op == "B":
                key = (microbatch, stage)
                held.append((forward[key], i, key))
        return held

    def activation_intervals(self, rank: int) -> list[tuple[Any, Any, Action]]:
        """Per (microbatch, stage) on ``rank``: the interval its activations are held.

        Held from the start of the forward (which saves them) to the end of the backward
        that consumes them (``B``; with a split backward, W needs only a little of it)."""
        events = self.events
        return [(events[f].start, events[b].end, Action("F", *key))
                for f, b, key in self._held(rank)]

    def activations_over_time(self, rank: int) -> list[tuple[Any, int]]:
        """Step function ``[(time, count after time), ...]`` of activations held by ``rank``.

        At equal times a release counts before an acquire, so a backward that ends exactly
        when the next forward starts does not count twice."""
        events = self.events
        _, starts, ends = self._clock
        changes = []
        for f, b, _ in self._held(rank):
            changes.append((starts[f], +1, events[f].start))
            changes.append((ends[b], -1, events[b].end))
        changes.sort(key=_tick_and_delta)
        steps, count = [(self.origin, 0)], 0
        last = self._origin_tick
        for tick, delta, time in changes:
            count += delta
            if tick == last:
                steps[-1] = (time, count)
            else:
                steps.append((time, count))
                last = tick
        return steps

    @cached_property
    @gc_paused
    def peak_activations(self) -> list[int]:
        """Per rank, the most (microbatch, stage) activations held at once.

        The same numbers as the maximum of :meth:`activations_over_time`, in one pass over
        the events: on a rank whose actions run one after another, in the order they are
        listed, the acquires and releases already come sorted by time."""
        peaks = self._peaks_in_order()
        if peaks is None:  # overlapping or unordered events, or unpaired F/B: sort instead
            peaks = [max(c for _, c in self.activations_over_time(r))
                     for r in range(self.schedule.num_ranks)]
        return peaks

    def _peaks_in_order(self) -> list[int] | None:
        """``peak_activations`` for the usual timeline, or None when its shortcut does not
        apply: on some rank the times of the changes (a forward's start, +1; a backward's
        end, -1) do not grow in event order, or a forward and its backward do not pair up."""
        p = self.schedule.num_ranks
        in_order = self.__dict__.get("_in_schedule_order", False)
        if in_order and self.__dict__.get("_distinct_changes", False):
            # When no F or B takes zero time, the only changes of a rank that share a time
            # are a backward's end and the next forward's start: a release, then an acquire,
            # which cannot raise the maximum.  So the peak is the largest running sum of +1
            # (F) and -1 (B) along the rank's own order, times aside.
            delta = {"F": 1, "B": -1, "W": 0}
            return [max(accumulate([delta[a[0]] for a in row], initial=0))
                    for row in self.schedule.orders]
        ranks, actions = self._columns
        if not in_order and not _paired(ranks, actions, p):
            return None
        _, starts, ends = self._clock
        count, peak, last = [0] * p, [0] * p, [None] * p
        for rank, action, start, end in zip(ranks, actions, starts, ends):
            op = action[0]
            if op == "F":
                tick, delta = start, 1
            elif op == "B":
                tick, delta = end, -1
            else:
                continue
            previous = last[rank]
            if previous is None or tick > previous:
                # every change at the previous time is in: that count was reached
                if count[rank] > peak[rank]:
                    peak[rank] = count[rank]
                last[rank] = tick
            elif tick < previous:
                return None
            count[rank] += delta
        return [max(c, k) for c, k in zip(count, peak)]

    # -- summaries -----------------------------------------------------------------------------
    def summary(self, order: bool = True) -> dict:
        """Plain-JSON summary (numbers as int when whole, else float).  ``order=False``
        leaves out every rank's action list (the only part that grows with the schedule)."""
        summary = {
            "schedule": self.schedule.name,
            "stages": self.schedule.num_ranks,
            "microbatches": self.schedule.num_microbatches,
            "chunks": self.schedule.chunks,
            "makespan": as_number(self.makespan),
            "ideal": as_number(self.ideal),
            "time_ratio": as_number(self.time_ratio),
            "bubble_fraction": as_number(self.bubble_fraction),
            "bubble_overhead": as_number(self.bubble_overhead),
            "busy": [as_number(b) for b in self.busy],
            "idle": [as_number(i) for i in self.idle],
            "peak_activations": self.peak_activations,
        }
        if order:
            summary["order"] = self.schedule.to_strings()
        return summary

    def ascii(self, width: int = 100) -> str:
        """A text Gantt chart: one row per rank, one character per time quantum."""
        if not self.events:
            return "(empty timeline)"
        scale = float(self.makespan) / width if self.makespan else 1.0
        lines = []
        for r in range(self.schedule.num_ranks):
            row = [" "] * width
            for e in self.events_of(r):
                lo = int(round(float(e.start - self.origin) / scale))
                hi = max(lo + 1, int(round(float(e.end - self.origin) / scale)))
                for x in range(lo, min(hi, width)):
                    row[x] = e.action.op if x == lo else e.action.op.lower()
            lines.append(f"rank {r} |" + "".join(row) + "|")
        return "\n".join(lines)


def _paired(ranks: list, actions: list, p: int) -> bool:
    """Whether, on every rank ``0..p-1``, each forward comes before its backward and each
    backward after its forward, once each (what :func:`~paralab.schedules.validate` ensures
    for a schedule's own order)."""
    held: list[set] = [set() for _ in range(p)]
    for rank, (op, microbatch, stage) in zip(ranks, actions):
        if not 0 <= rank < p:
            return False
        if op == "F":
            if (microbatch, stage) in held[rank]:
                return False
            held[rank].add((microbatch, stage))
        elif op == "B":
            if (microbatch, stage) not in held[rank]:
                return False
            held[rank].remove((microbatch, stage))
    return not any(held)


def _tick_and_delta(change: tuple):
    return change[0], change[1]


def _ratio(a, b):
    if b == 0:
        return 0
    if isinstance(a, (int, Fraction)) and isinstance(b, (int, Fraction)):
        return Fraction(a, 1) / b
    return a / b


def as_number(x):
    """Fraction/int/float -> int when whole, else float (for JSON and printing)."""
    if isinstance(x, Fraction):
        return int(x) if x.denominator == 1 else float(x)
    if isinstance(x, float) and x.is_integer():
        return int(x)
    return x
