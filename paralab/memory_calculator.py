"""A per-rank memory calculator for pipeline (+ tensor) parallel Transformer training.

Give it a model (``s, b, h, a, L``), a layout (``t`` tensor-parallel degree, sequence
parallelism, ``p`` stages, ``v`` chunks per rank, ``m`` microbatches, a schedule) and a
recomputation, and it gives every pipeline rank's bytes: weights, gradients and Adam's
state for its layers, and activations at its peak -- all from :func:`paralab.memory.rank_memory`,
the formulas the tests check against measured layers and measured pipelines.  Embeddings
and the output layer are left out.

In a notebook, :func:`calculator` shows sliders and redraws the bars as you move them
(ipywidgets).  Where no widget front-end is present -- the rendered book, nbconvert, a
terminal -- the same output shows as a static table for the starting values instead.
Whether one is present cannot be asked of the front-end, so the sliders are built when the
kernel was started by a Jupyter server (JupyterLab, Notebook: they set ``JPY_SESSION_NAME``)
and ipywidgets is installed; the table travels in the same output, so a Lab without the
widget extension shows the table too.  ``calculator(widgets=True/False)`` decides instead.
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass, replace

import matplotlib.pyplot as plt

from . import memory

SCHEDULES = ("gpipe", "1f1b", "interleaved")
PARTS = ("weights", "gradients", "optimizer", "activations")
COLORS = {"weights": "#4C72B0", "gradients": "#8172B3", "optimizer": "#937860",
          "activations": "#DD8452"}
GIB = 2 ** 30
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


@dataclass(frozen=True)
class Config:
    """A model and a layout.  Defaults: a GPT-3-sized stack (Brown et al. 2020: h=12288,
    96 heads, 96 layers, 2048 tokens) on 8 tensor-parallel x 8 pipeline ranks."""

    s: int = 2048
    b: int = 1
    h: int = 12288
    a: int = 96
    L: int = 96
    t: int = 8
    sp: bool = True
    p: int = 8
    v: int = 1
    m: int = 64
    schedule: str = "1f1b"
    recompute: str = "none"

    def problems(self) -> list[str]:
        """What makes this layout impossible, in words (empty when it is fine)."""
        out = []
        if self.schedule not in SCHEDULES:
            out.append(f"schedule must be one of {', '.join(SCHEDULES)}")
        if self.recompute not in memory.RECOMPUTE:
            out.append(f"recompute must be one of {', '.join(memory.RECOMPUTE)}")
        if self.h % self.a:
            out.append(f"h={self.h} is not divisible by a={self.a} heads")
        if self.a % self.t:
            out.append(f"a={self.a} heads do not split over t={self.t} ranks")
        chunks = self.p * (self.v if self.schedule == "interleaved" else 1)
        if self.L % chunks:
            out.append(f"L={self.L} layers do not split into {chunks} equal stages")
        if self.sp and self.t == 1:
            out.append("sequence parallelism needs t > 1")
        if self.sp and self.s % self.t:
            out.append(f"s={self.s} tokens do not split over t={self.t} ranks")
        if self.schedule == "interleaved" and self.m % self.p:
            out.append(f"interleaved 1F1B needs m a multiple of p (m={self.m}, p={self.p})")
        return out

    @property
    def strategy(self) -> str:
        words = (["tp"] if self.t > 1 else []) + (["sp"] if self.sp and self.t > 1 else [])
        words += [self.recompute] if self.recompute != "none" else []
        return "+".join(words) or "none"


def per_rank(config: Config) -> list[dict]:
    """Bytes on each pipeline rank: ``{"weights", "gradients", "optimizer",
    "activations", "total"}`` (integers; exact, from the formulas)."""
    problems = config.problems()
    if problems:
        raise ValueError("; ".join(problems))
    values = dict(s=config.s, b=config.b, h=config.h, a=config.a, L=config.L, t=config.t,
                  p=config.p, m=config.m, v=config.v if config.schedule == "interleaved" else 1)
    parts = memory.rank_memory(config.schedule, config.strategy)
    return [{k: int(memory.evaluate(x, r=rank, **values)) for k, x in parts.items()}
            for rank in range(config.p)]


def step_time_factor(config: Config):
    """Step time with this recomputation over the step time without, for a backward twice
    as long as the forward (the simulator agrees: ``tests/test_memory.py``)."""
    values = dict(p=config.p, m=config.m, t_f=1, t_b=2, s=config.s, h=config.h)
    if config.schedule == "interleaved":
        values["v"] = config.v
    with_it = memory.step_time_with_recompute(config.schedule, config.recompute)
    without = memory.step_time_with_recompute(config.schedule, "none")
    return memory.evaluate(with_it / without, **values)


def _gib(x: int) -> str:
    return f"{x / GIB:.2f}"


def describe(config: Config) -> str:
    layout = (f"t={config.t}{' with SP' if config.sp and config.t > 1 else ''}, p={config.p}, "
              f"m={config.m}, {config.schedule}"
              + (f" v={config.v}" if config.schedule == "interleaved" else ""))
    return (f"s={config.s}, b={config.b}, h={config.h}, a={config.a}, L={config.L}; {layout}; "
            f"recompute {config.recompute}")


def table_html(config: Config) -> str:
    """The per-rank table, in GiB, as HTML."""
    problems = config.problems()
    if problems:
        return f"<p><b>Not a valid layout:</b> {html.escape('; '.join(problems))}</p>"
    rows = per_rank(config)
    head = "".join(f"<th>{name} (GiB)</th>" for name in PARTS + ("total",))
    body = "".join(f"<tr><td>{rank}</td>" + "".join(f"<td>{_gib(row[k])}</td>"
                                                   for k in PARTS + ("total",)) + "</tr>"
                   for rank, row in enumerate(rows))
    factor = step_time_factor(config)
    return (f"<p>{html.escape(describe(config))}</p>"
            f"<table><tr><th>rank</th>{head}</tr>{body}</table>"
            f"<p>step time x {float(factor):.3f} for the recomputation (t_b = 2 t_f)</p>")


def table_text(config: Config) -> str:
    """The per-rank table, in GiB, as plain text."""
    problems = config.problems()
    if problems:
        return "not a valid layout: " + "; ".join(problems)
    lines = [describe(config), "rank " + " ".join(f"{k:>12}" for k in PARTS + ("total",))]
    for rank, row in enumerate(per_rank(config)):
        lines.append(f"{rank:>4} " + " ".join(f"{_gib(row[k]):>12}" for k in PARTS + ("total",)))
    return "\n".join(lines) + "\n(GiB)"


def bars(config: Config, ax=None, budget_gib: float | None = None):
    """Stacked bars, one per pipeline rank: model states and activations, in GiB."""
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 3))
    rows = per_rank(config)
    bottom = [0.0] * len(rows)
    for part in PARTS:
        heights = [row[part] / GIB for row in rows]
        ax.bar(range(len(rows)), heights, bottom=bottom, color=COLORS[part], label=part)
        bottom = [x + y for x, y in zip(bottom, heights)]
    if budget_gib is not None:
        ax.axhline(budget_gib, color="black", linestyle="--", linewidth=1, label="budget")
    ax.set_xticks(range(len(rows)))
    ax.set_xlabel("pipeline rank")
    ax.set_ylabel("GiB")
    ax.set_title(describe(config), fontsize=8)
    ax.legend(fontsize=8, loc="upper right")
    return ax


def tradeoff(config: Config, t_f=1, t_b=2, schedules_=SCHEDULES, v: int = 2) -> list[dict]:
    """Memory against time: for every schedule and recomputation, the simulated step time
    (:func:`paralab.simulator.simulate` with :func:`paralab.memory.recompute_costs`) and
    rank 0's bytes (the rank that holds the most).  Interleaved runs with ``v`` chunks."""
    from . import schedules
    from .simulator import simulate

    build = {"gpipe": lambda c: schedules.gpipe(c.p, c.m),
             "1f1b": lambda c: schedules.one_f_one_b(c.p, c.m),
             "interleaved": lambda c: schedules.interleaved_one_f_one_b(c.p, c.m, c.v)}
    points = []
    for name in schedules_:
        for recompute in memory.RECOMPUTE:
            c = replace(config, schedule=name, recompute=recompute,
                        v=v if name == "interleaved" else 1)
            costs = memory.recompute_costs(t_f, t_b, recompute, seq=c.s, hidden=c.h)
            points.append({"schedule": name, "recompute": recompute,
                           "step_time": simulate(build[name](c), *costs).makespan,
                           "rank0": per_rank(c)[0]})
    return points


def tradeoff_plot(points: list[dict], ax=None):
    """Rank 0's memory (GiB) against the simulated step time, one marker per schedule, one
    colour per recomputation."""
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    markers = {"gpipe": "s", "1f1b": "o", "interleaved": "^"}
    colors = {"none": "#C44E52", "selective": "#DD8452", "full": "#4C72B0"}
    for point in points:
        ax.scatter(float(point["step_time"]), point["rank0"]["total"] / GIB,
                   marker=markers[point["schedule"]], color=colors[point["recompute"]], s=60,
                   label=f"{point['schedule']}, recompute {point['recompute']}")
    ax.set_xlabel("simulated step time")
    ax.set_ylabel("rank 0 memory (GiB)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    return ax


class Calculator:
    """What :func:`calculator` returns: sliders and bars where widgets render, the static
    table for the starting values everywhere else (the display picks the richest form the
    front-end supports; nbconvert skips a widget whose state it does not have)."""

    def __init__(self, config: Config, widget=None):
        self.config, self.widget = config, widget

    def _repr_mimebundle_(self, include=None, exclude=None):
        bundle = {"text/plain": table_text(self.config), "text/html": table_html(self.config)}
        if self.widget is not None:
            view = self.widget._repr_mimebundle_()
            if WIDGET_VIEW in view:
                bundle[WIDGET_VIEW] = view[WIDGET_VIEW]
        return bundle


def _widget(config: Config):
    try:
        import ipywidgets as w
    except ImportError:  # no widgets: the static table only
        return None
    powers = lambda lo, hi: [2 ** k for k in range(lo, hi + 1)]  # noqa: E731
    controls = {
        "s": w.SelectionSlider(options=powers(7, 15), value=config.s, description="s"),
        "b": w.SelectionSlider(options=powers(0, 6), value=config.b, description="b"),
        "h": w.SelectionSlider(options=sorted({*powers(9, 15), config.h}), value=config.h,
                               description="h"),
        "a": w.SelectionSlider(options=sorted({*powers(3, 7), 96, config.a}), value=config.a,
                               description="a"),
        "L": w.IntSlider(value=config.L, min=8, max=128, step=8, description="L"),
        "t": w.SelectionSlider(options=[1, 2, 4, 8], value=config.t, description="t"),
        "sp": w.Checkbox(value=config.sp, description="sequence parallel"),
        "p": w.SelectionSlider(options=[1, 2, 4, 8, 16], value=config.p, description="p"),
        "v": w.SelectionSlider(options=[1, 2, 3, 4], value=config.v, description="v"),
        "m": w.SelectionSlider(options=sorted({*powers(0, 8), config.m}), value=config.m,
                               description="m"),
        "schedule": w.Dropdown(options=SCHEDULES, value=config.schedule,
                               description="schedule"),
        "recompute": w.Dropdown(options=memory.RECOMPUTE, value=config.recompute,
                                description="recompute"),
    }
    out = w.Output()

    def redraw(_=None):
        current = Config(**{k: c.value for k, c in controls.items()})
        out.clear_output(wait=True)
        with out:
            problems = current.problems()
            if problems:
                print("not a valid layout: " + "; ".join(problems))
                return
            bars(current)
            plt.show()
            print(f"step time x {float(step_time_factor(current)):.3f} for the "
                  f"recomputation (t_b = 2 t_f)")

    for control in controls.values():
        control.observe(redraw, names="value")
    redraw()
    names = list(controls)
    return w.VBox([w.HBox([w.VBox([controls[k] for k in names[:6]]),
                           w.VBox([controls[k] for k in names[6:]])]), out])


def calculator(widgets: bool | None = None, **values) -> Calculator:
    """The calculator, starting from ``Config(**values)``: display it.  ``widgets``: build
    the sliders (``True``), show only the static table (``False``), or decide from the
    kernel's environment (``None``, see the module docstring)."""
    config = replace(Config(), **values)
    problems = config.problems()
    if problems:
        raise ValueError("; ".join(problems))
    if widgets is None:
        widgets = "JPY_SESSION_NAME" in os.environ
    return Calculator(config, _widget(config) if widgets else None)
