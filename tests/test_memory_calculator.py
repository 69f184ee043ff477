"""The per-rank memory calculator: the formulas' numbers, as sliders or as a static table."""

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
import sympy as sp  # noqa: E402

from paralab import memory, memory_calculator as calc  # noqa: E402


def test_per_rank_numbers_are_the_formulas():
    config = calc.Config(s=1024, b=2, h=4096, a=32, L=32, t=4, sp=True, p=4, m=16,
                         schedule="1f1b", recompute="selective")
    rows = calc.per_rank(config)
    values = dict(s=1024, b=2, h=4096, a=32, L=32, t=4, p=4, m=16, v=1)
    for rank, row in enumerate(rows):
        expected = memory.evaluate(memory.rank_memory("1f1b", "tp+sp+selective", rank=rank),
                                   **values)
        assert row == {k: int(x) for k, x in expected.items()}
    # 1F1B: rank r holds p - r microbatches of L/p layers of 34 sbh/t bytes each
    per_layer = 34 * 1024 * 2 * 4096 // 4
    assert [row["activations"] for row in rows] == [(4 - r) * 8 * per_layer for r in range(4)]


def test_interleaving_costs_the_first_stage_1_plus_p_minus_1_over_pv():
    plain = calc.per_rank(calc.Config(schedule="1f1b"))[0]["activations"]
    interleaved = calc.per_rank(calc.Config(schedule="interleaved", v=2))[0]["activations"]
    assert interleaved * 16 == plain * (16 + 7)  # 1 + (8-1)/(8*2)


def test_impossible_layouts_are_explained():
    assert calc.Config(L=90).problems() == ["L=90 layers do not split into 8 equal stages"]
    assert "needs t > 1" in calc.Config(t=1, sp=True).problems()[0]
    assert "multiple of p" in calc.Config(schedule="interleaved", v=2, m=12).problems()[0]
    with pytest.raises(ValueError, match="do not split over t=3"):
        calc.calculator(t=3)
    assert calc.table_html(calc.Config(L=90)).startswith("<p><b>Not a valid layout:")


def test_without_a_widget_front_end_the_output_is_the_static_table():
    shown = calc.calculator(widgets=False)._repr_mimebundle_()
    assert set(shown) == {"text/plain", "text/html"}
    assert "<table>" in shown["text/html"] and "activations (GiB)" in shown["text/html"]
    assert shown["text/plain"].splitlines()[2].split()[0] == "0"


def test_with_widgets_the_table_travels_with_the_sliders(monkeypatch):
    monkeypatch.setenv("JPY_SESSION_NAME", "lecture.ipynb")  # a kernel started by Jupyter
    view = calc.calculator()
    shown = view._repr_mimebundle_()
    assert calc.WIDGET_VIEW in shown and "<table>" in shown["text/html"]
    controls = {c.description: c for box in view.widget.children[0].children
                for c in box.children}
    assert set(controls) == {"s", "b", "h", "a", "L", "t", "sequence parallel", "p", "v", "m",
                             "schedule", "recompute"}
    controls["recompute"].value = "full"  # redraws without error
    controls["L"].value = 88              # an impossible layout is reported, not raised


def test_recomputation_costs_step_time():
    assert calc.step_time_factor(calc.Config(recompute="none")) == 1
    full = calc.step_time_factor(calc.Config(recompute="full"))
    assert full == memory.evaluate(memory.step_time_with_recompute("1f1b", "full")
                                   / memory.step_time_with_recompute("1f1b", "none"),
                                   p=8, m=64, t_f=1, t_b=2)
    assert full == sp.Rational(4, 3)  # the backward goes from 2 t_f to 3 t_f


def test_bars_draw_one_stack_per_rank():
    ax = calc.bars(calc.Config(p=4, L=96), budget_gib=80)
    assert len(ax.patches) == 4 * len(calc.PARTS)
