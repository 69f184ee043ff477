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
from typing import Any

from .schedules import Action, Schedule


@dataclass(frozen=True)
class Event:
    """One action on one rank, from ``start`` to ``end`` (any consistent time unit)."""

    rank: int
    action: Action
    start: Any
    end: Any

    @property
    def duration(self):
        return self.end - self.start


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

    # -- basic quantities -------------------------------------------------------------------
    @cached_property
    def origin(self):
        return min((e.start for e in self.events), default=0)

    @cached_property
    def makespan(self):
        return max((e.end for e in self.events), default=0) - self.origin

    @cached_property
    def busy(self) -> list:
        totals = [0] * self.schedule.num_ranks
        for e in self.events:
            totals[e.rank] += e.duration
        return totals

    @cached_property
    def idle(self) -> list:
        return [self.makespan - b for b in self.busy]

    @cached_property
    def ideal(self):
        return max(self.busy)

    @property
    def time_ratio(self):
        return _ratio(self.makespan, self.ideal)

    @property
    def bubble_fraction(self):
        return _ratio(sum(self.idle), self.schedule.num_ranks * self.makespan)

    @property
    def bubble_overhead(self):
        return _ratio(sum(self.idle), sum(self.busy))

    def events_of(self, rank: int) -> list[Event]:
        return sorted((e for e in self.events if e.rank == rank), key=lambda e: e.start)

    def event(self, action: Action | str) -> Event:
        action = Action.parse(action)
        for e in self.events:
            if e.action == action:
                return e
        raise KeyError(f"{action} is not in this timeline")

    # -- activation memory ----------------------------------------------------------------------
    def activation_intervals(self, rank: int) -> list[tuple[Any, Any, Action]]:
        """Per (microbatch, stage) on ``rank``: the interval its activations are held.

        Held from the start of the forward (which saves them) to the end of the backward
        that consumes them (``B``; with a split backward, W needs only a little of it)."""
        starts = {}
        intervals = []
        for e in self.events_of(rank):
            if e.action.op == "F":
                starts[(e.action.microbatch, e.action.stage)] = e.start
        for e in self.events_of(rank):
            if e.action.op == "B":
                key = (e.action.microbatch, e.action.stage)
                intervals.append((starts[key], e.end, Action("F", *key)))
        return intervals

    def activations_over_time(self, rank: int) -> list[tuple[Any, int]]:
        """Step function ``[(time, count after time), ...]`` of activations held by ``rank``.

        At equal times a release counts before an acquire, so a backward that ends exactly
        when the next forward starts does not count twice."""
        changes = []
        for start, end, _ in self.activation_intervals(rank):
            changes.append((start, +1))
            changes.append((end, -1))
        changes.sort(key=lambda c: (c[0], c[1]))
        steps, count = [(self.origin, 0)], 0
        for time, delta in changes:
            count += delta
            if steps and steps[-1][0] == time:
                steps[-1] = (time, count)
            else:
                steps.append((time, count))
        return steps

    @cached_property
    def peak_activations(self) -> list[int]:
        """Per rank, the most (microbatch, stage) activations held at once."""
        return [max(c for _, c in self.activations_over_time(r))
                for r in range(self.schedule.num_ranks)]

    # -- summaries -----------------------------------------------------------------------------
    def summary(self) -> dict:
        """Plain-JSON summary (numbers as int when whole, else float)."""
        return {
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
            "order": self.schedule.to_strings(),
        }

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
