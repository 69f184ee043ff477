"""Pictures of timelines: Gantt charts, activation memory, and the bubble against m.

Everything takes a :class:`~paralab.timeline.Timeline`, so a simulated step and a measured
one are drawn the same way and can be put side by side (:func:`compare_gantt`).  Functions
draw into ``ax`` when given one and return the Axes (or the Figure for several Axes); they
never call ``show()``, so they work in notebooks and on headless machines (Agg) alike.

Each box of a Gantt chart is a ``Rectangle`` whose ``gid`` is ``"<rank> <action>"`` (e.g.
``"2 5B1"``), so tests -- and curious students -- can find the box of any action.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt
from matplotlib.patches import Patch, Rectangle

from . import formulas
from .timeline import Timeline

OP_COLORS = {"F": "#4C72B0", "B": "#DD8452", "W": "#55A868"}
OP_NAMES = {"F": "F (forward)", "B": "B (backward)", "W": "W (weight gradient)"}
CHUNK_HATCHES = ("", "//", "\\\\", "xx", "..", "++", "oo", "--")

#: Above this many events a Gantt chart draws one unlabelled strip per rank and op, not a
#: labelled box per action (a million labelled boxes help nobody and take minutes).
MAX_LABELLED_BOXES = 4000


def _new_axes(ax, figsize=(10, 3)):
    if ax is not None:
        return ax
    _, ax = plt.subplots(figsize=figsize)
    return ax


def _title(timeline: Timeline) -> str:
    s = timeline.schedule
    sizes = f"p={s.num_ranks}, m={s.num_microbatches}"
    if s.chunks > 1:
        sizes += f", v={s.chunks}"
    return f"{s.name} ({sizes}), {timeline.source}"


def _time_label(timeline: Timeline) -> str:
    return f"time ({timeline.unit})" if timeline.unit else "time"


def chunk_of(timeline: Timeline, stage: int) -> int:
    """Which of its rank's chunks ``stage`` is (0 for the first, ``v-1`` for the last)."""
    return stage // timeline.schedule.num_ranks


def gantt(timeline: Timeline, ax=None, title: str | None = None, labels: bool = True):
    """Gantt chart of ``timeline``: one row per rank (rank 0 on top), time on x.

    F, B and W boxes have their own colour; each box shows its microbatch; with several
    chunks per rank, each chunk has its own hatch.  Returns the Axes."""
    ax = _new_axes(ax, figsize=(10, 0.6 * timeline.schedule.num_ranks + 1.2))
    p = timeline.schedule.num_ranks
    origin = float(timeline.origin)
    height = 0.8
    chunks = timeline.schedule.chunks
    events = timeline.events
    if len(events) <= MAX_LABELLED_BOXES:
        for op in ("F", "B", "W"):
            mine = [e for e in events if e.action.op == op]
            if not mine:
                continue
            lefts = [float(e.start) - origin for e in mine]
            widths = [float(e.end - e.start) for e in mine]
            boxes = ax.barh([e.rank for e in mine], widths, left=lefts, height=height,
                            color=OP_COLORS[op], edgecolor="black", linewidth=0.5)
            for e, box, left, width in zip(mine, boxes, lefts, widths):
                box.set_gid(f"{e.rank} {e.action}")
                if chunks > 1:
                    box.set_hatch(CHUNK_HATCHES[chunk_of(timeline, e.action.stage)
                                                % len(CHUNK_HATCHES)])
                if labels:
                    ax.text(left + width / 2, e.rank, str(e.action.microbatch), ha="center",
                            va="center", fontsize=7, clip_on=True,
                            color="black" if op == "W" else "white")
        _outline_units(timeline, ax, origin, height)
    else:
        for rank in range(p):
            for op in ("F", "B", "W"):
                spans = [(float(e.start) - origin, float(e.end - e.start))
                         for e in timeline.events_of(rank) if e.action.op == op]
                if spans:
                    ax.broken_barh(spans, (rank - height / 2, height), facecolors=OP_COLORS[op])
    ax.set_yticks(range(p))
    ax.set_yticklabels([f"rank {r}" for r in range(p)])
    ax.set_ylim(p - 0.5, -0.5)  # rank 0 on top
    ax.set_xlim(0, max(float(timeline.makespan), 1e-12))
    ax.set_xlabel(_time_label(timeline))
    ax.set_title(title if title is not None else _title(timeline))
    present = [op for op in ("F", "B", "W") if any(e.action.op == op for e in events)]
    handles = [Patch(facecolor=OP_COLORS[op], edgecolor="black", label=OP_NAMES[op])
               for op in present]
    if chunks > 1:
        handles += [Patch(facecolor="white", edgecolor="black", label=f"chunk {c}",
                          hatch=CHUNK_HATCHES[c % len(CHUNK_HATCHES)]) for c in range(chunks)]
    if timeline.schedule.fused:
        handles.append(Patch(facecolor="none", edgecolor="black", linewidth=2,
                             label="fused unit (F&B, or B+W)"))
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8,
                  frameon=False)
    return ax


def _outline_units(timeline: Timeline, ax, origin: float, height: float) -> None:
    """Frame each fused unit (an overlapped F&B, or a full backward B+W): its parts are
    drawn one after the other, the frame says they run as one.  ``gid`` is
    ``"<rank> unit <text>"``, e.g. ``"0 unit 3F5+4B1+4W1"``."""
    schedule = timeline.schedule
    for rank, units in enumerate(schedule.fused):
        row = schedule.orders[rank]
        for start, length in units:
            parts = [timeline.event(a) for a in row[start:start + length]]
            left = float(min(e.start for e in parts)) - origin
            width = float(max(e.end for e in parts)) - origin - left
            frame = Rectangle((left, rank - height / 2 - 0.06), width, height + 0.12,
                              fill=False, edgecolor="black", linewidth=1.8)
            frame.set_gid(f"{rank} unit " + "+".join(str(a) for a in row[start:start + length]))
            ax.add_patch(frame)


def compare_gantt(timelines: Mapping[str, Timeline], figsize=None):
    """Several Gantt charts stacked, sharing the time axis (e.g. simulated vs measured, or
    GPipe vs 1F1B); each is titled with its key.  Returns the Figure."""
    if not timelines:
        raise ValueError("compare_gantt needs at least one timeline")
    rows = sum(t.schedule.num_ranks for t in timelines.values())
    figsize = figsize or (10, 0.6 * rows + 1.5 * len(timelines))
    fig, axes = plt.subplots(len(timelines), 1, sharex=True, figsize=figsize, squeeze=False)
    for ax, (name, timeline) in zip(axes[:, 0], timelines.items()):
        gantt(timeline, ax=ax, title=name)
    right = max(float(t.makespan) for t in timelines.values())
    axes[0, 0].set_xlim(0, max(right, 1e-12))
    for ax in axes[:-1, 0]:
        ax.set_xlabel("")
    fig.tight_layout()
    return fig


def activations_plot(timeline: Timeline, ax=None, title: str | None = None):
    """Activations held over time, one step curve per rank (from
    :meth:`Timeline.activations_over_time`).  Returns the Axes."""
    ax = _new_axes(ax, figsize=(8, 3))
    origin = float(timeline.origin)
    end = float(timeline.makespan)
    for rank in range(timeline.schedule.num_ranks):
        steps = timeline.activations_over_time(rank)
        xs = [float(t) - origin for t, _ in steps] + [end]
        ys = [c for _, c in steps] + [steps[-1][1]]
        ax.step(xs, ys, where="post", label=f"rank {rank}")
    ax.set_xlabel(_time_label(timeline))
    unit = " (chunks)" if timeline.schedule.chunks > 1 else ""
    ax.set_ylabel(f"activations held{unit}")
    ax.set_title(title if title is not None else "activations, " + _title(timeline))
    ax.legend(fontsize=8, frameon=False)
    return ax


def bubble_vs_m_plot(p: int, ms: Sequence[int], ax=None, v: int | None = None):
    """The three "bubble ratios" against m for ``p`` ranks, from :mod:`paralab.formulas`
    (interleaved with ``v`` chunks when given).  Note ``T/T_ideal - 1 = bubble/T_ideal``:
    the top two curves are the same curve shifted by one.  Returns the Axes."""
    ax = _new_axes(ax, figsize=(7, 4))
    schedule = "1f1b" if v is None else "interleaved"
    curves = {
        "T / T_ideal  (time ratio)": formulas.time_ratio(schedule),
        "bubble / T_ideal  (bubble overhead, Megatron-LM)": formulas.bubble_overhead(schedule),
        "bubble / T  (bubble fraction, GPipe)": formulas.bubble_fraction(schedule),
    }
    values = {"p": p} if v is None else {"p": p, "v": v}
    ms = list(ms)
    for label, expr in curves.items():
        ys = [float(formulas.evaluate(expr, m=mm, **values)) for mm in ms]
        ax.plot(ms, ys, marker="o", markersize=3, label=label)
    ax.set_xlabel("microbatches m")
    ax.set_ylabel("ratio")
    ax.set_title(f"bubble vs m, p={p}" + (f", interleaved v={v}" if v else ""))
    ax.axhline(1, color="grey", linewidth=0.5)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, frameon=False)
    return ax
