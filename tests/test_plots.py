"""Plots build on a headless backend, and draw what the timeline says."""

from collections import Counter
from fractions import Fraction

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from paralab import plots  # noqa: E402
from paralab.schedules import Action, build  # noqa: E402
from paralab.simulator import simulate  # noqa: E402
from paralab.timeline import Event, Timeline  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def boxes(ax):
    """Gantt boxes by their gid "<rank> <action>"."""
    return {r.get_gid(): r for r in ax.patches if isinstance(r, Rectangle) and r.get_gid()}


def test_gantt_draws_one_box_per_action_with_colour_per_op():
    t = simulate(build("zb-h1", 4, 8), 2, 2, 1)
    ax = plots.gantt(t)
    drawn = boxes(ax)
    assert len(drawn) == len(t.events) == 4 * 8 * 3
    per_rank = Counter(int(gid.split()[0]) for gid in drawn)
    assert per_rank == {r: len(t.events_of(r)) for r in range(4)}
    colours = {}
    for gid, box in drawn.items():
        op = Action.parse(gid.split()[1]).op
        colours.setdefault(op, set()).add(to_hex(box.get_facecolor()))
    assert all(len(c) == 1 for c in colours.values())          # one colour per op
    assert len({c.pop() for c in colours.values()}) == 3       # three different colours
    # Geometry: the box of 3B5 sits on rank 3's row, from its start to its end.
    event = t.event("3B5")
    box = drawn["3 3B5"]
    assert box.get_x() == pytest.approx(float(event.start))
    assert box.get_width() == pytest.approx(float(event.end - event.start))
    assert box.get_y() + box.get_height() / 2 == pytest.approx(3)
    # rank 0 on top: the y axis runs downwards
    bottom, top = ax.get_ylim()
    assert bottom > top


def test_gantt_labels_microbatches_and_legend_and_title():
    t = simulate(build("1f1b", 3, 4), 1, 2)
    ax = plots.gantt(t)
    texts = Counter(x.get_text() for x in ax.texts)
    assert texts == Counter(str(e.action.microbatch) for e in t.events)
    legend = [x.get_text() for x in ax.get_legend().get_texts()]
    assert any(s.startswith("F") for s in legend) and any(s.startswith("B") for s in legend)
    assert not any(s.startswith("W") for s in legend)  # no W in 1F1B
    assert "1f1b" in ax.get_title() and "simulated" in ax.get_title()
    assert [x.get_text() for x in ax.get_yticklabels()] == ["rank 0", "rank 1", "rank 2"]


def test_gantt_marks_chunks_with_hatches():
    t = simulate(build("interleaved", 2, 4, 2), 2, 4)
    drawn = boxes(plots.gantt(t))
    hatch_of_chunk = {}
    for gid, box in drawn.items():
        chunk = Action.parse(gid.split()[1]).stage // 2
        hatch_of_chunk.setdefault(chunk, set()).add(box.get_hatch() or "")
    assert all(len(h) == 1 for h in hatch_of_chunk.values())
    assert hatch_of_chunk[0] != hatch_of_chunk[1]


def measured_timeline():
    """A hand-made 'measured' timeline: float seconds with a non-zero origin."""
    s = build("gpipe", 2, 1)
    t0 = 1000.0
    events = (Event(0, Action("F", 0, 0), t0, t0 + 0.1),
              Event(1, Action("F", 0, 1), t0 + 0.12, t0 + 0.2),
              Event(1, Action("B", 0, 1), t0 + 0.2, t0 + 0.4),
              Event(0, Action("B", 0, 0), t0 + 0.41, t0 + 0.6))
    return Timeline(s, events, source="measured", unit="s")


def test_gantt_of_a_measured_timeline_starts_at_zero_and_shows_the_unit():
    t = measured_timeline()
    ax = plots.gantt(t)
    assert "measured" in ax.get_title()
    assert ax.get_xlabel() == "time (s)"
    assert boxes(ax)["0 0F0"].get_x() == pytest.approx(0)
    assert boxes(ax)["0 0B0"].get_x() == pytest.approx(0.41)


def test_compare_gantt_shares_the_time_axis(tmp_path):
    g = simulate(build("gpipe", 4, 8), 2, 4)
    f = simulate(build("1f1b", 4, 8), 2, 4)
    fig = plots.compare_gantt({"GPipe": g, "1F1B": f})
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["GPipe", "1F1B"]
    assert axes[0].get_shared_x_axes().joined(axes[0], axes[1])
    assert len(boxes(axes[0])) == len(g.events) and len(boxes(axes[1])) == len(f.events)
    out = tmp_path / "compare.png"
    fig.savefig(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_activations_plot_follows_the_timeline():
    t = simulate(build("1f1b", 4, 8), 2, 4)
    ax = plots.activations_plot(t)
    lines = ax.get_lines()
    assert len(lines) == 4
    for rank, line in enumerate(lines):
        assert max(line.get_ydata()) == t.peak_activations[rank]
        assert line.get_xdata()[-1] == pytest.approx(float(t.makespan))
    assert [x.get_text() for x in ax.get_legend().get_texts()] == [f"rank {r}" for r in range(4)]


def test_bubble_vs_m_plot_has_the_three_ratios(tmp_path):
    ax = plots.bubble_vs_m_plot(4, range(1, 17))
    lines = ax.get_lines()
    curves = {line.get_label(): line for line in lines if not line.get_label().startswith("_")}
    assert len(curves) == 3
    at_8 = {label: float(line.get_ydata()[7]) for label, line in curves.items()}
    # p = 4, m = 8: the homework's 1.375, 0.375 and 3/11, computed here by hand.
    assert sorted(at_8.values()) == pytest.approx(sorted([(8 + 3) / 8, 3 / 8, 3 / 11]))
    assert any("T / T_ideal" in label for label in curves)
    ax.figure.savefig(tmp_path / "bubble.png")


def test_large_timelines_are_drawn_without_labels():
    t = simulate(build("1f1b", 8, 300), 1, 2)
    assert len(t.events) > plots.MAX_LABELLED_BOXES
    ax = plots.gantt(t)
    assert not ax.texts and not boxes(ax)
    assert len(ax.collections) == 8 * 2  # one strip per rank and op


def test_a_gantt_can_be_saved(tmp_path):
    t = simulate(build("interleaved", 2, 2, 2), Fraction(1, 3), Fraction(1, 2))
    ax = plots.gantt(t, title="custom")
    assert ax.get_title() == "custom"
    out = tmp_path / "gantt.png"
    ax.figure.savefig(out)
    assert out.stat().st_size > 1000
