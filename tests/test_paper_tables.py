"""The papers' bubble tables, reproduced by the simulator under the papers' own cost
definitions: Zero Bubble (Qi et al. 2024) for 1F1B, ZB-H1 and ZB-H2; DeepSeek-V3's Table 2
for 1F1B, ZB1P and DualPipe(V)."""


import sympy as sp
from hypothesis import given, settings, strategies as st

from paralab import formulas as fm
from paralab.formulas import DEEPSEEK_SYMBOLS as DS
from paralab.schedules import dualpipe_v, one_f_one_b, zb_h1, zb_h2, zb_v
from paralab.simulator import simulate

small = st.integers(1, 5)


@st.composite
def zb_costs(draw):
    """The Zero Bubble paper's setting: t_b the input-gradient backward, t_w <= t_f, t_b."""
    t_f, t_b = draw(small), draw(small)
    return t_f, t_b, draw(st.integers(1, min(t_f, t_b)))


# -- Zero Bubble, section 2 ------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(p=st.integers(2, 6), extra=st.integers(0, 6), costs=zb_costs())
def test_the_zero_bubble_table(p, extra, costs):
    t_f, t_b, t_w = costs
    m = 2 * p - 1 + extra
    values = dict(p=p, t_f=t_f, t_b=t_b, t_w=t_w)
    table = fm.zb_paper_table()
    one = simulate(one_f_one_b(p, m), t_f, t_b, t_w)   # B does both halves
    h1 = simulate(zb_h1(p, m), t_f, t_b, t_w)
    h2 = simulate(zb_h2(p, m), t_f, t_b, t_w)
    # 1F1B and ZB-H1: rank 0 works from the first instant to the last, so its idle time
    # is its idle time inside its span, and every rank idles as long.
    assert one.idle == [fm.evaluate(table["1f1b"]["bubble"], **values)] * p
    assert h1.idle == [fm.evaluate(table["zb-h1"]["bubble"], **values)] * p
    assert h1.span_idle[0] == h1.idle[0]
    # ZB-H2: a parallelogram; its bubble is the idle time inside a rank's span, largest
    # on rank 0 -- zero when t_f + t_b = 2 t_w.
    assert max(h2.span_idle) == h2.span_idle[0] == fm.evaluate(table["zb-h2"]["bubble"], **values)
    for t, name in ((one, "1f1b"), (h1, "zb-h1"), (h2, "zb-h2")):
        assert t.peak_activations[0] == fm.evaluate(table[name]["peak_activations"], p=p)


def test_zb_h2_has_zero_bubble_when_the_three_costs_are_equal():
    t = simulate(zb_h2(4, 8), 1, 1, 1)
    assert t.span_idle == [0, 0, 0, 0]
    # ...which is not zero idle: rank r starts r forwards late, the next step fills that
    assert t.idle == [3, 3, 3, 3] and t.spans == [24, 24, 24, 24]


def test_zb_v_has_zero_bubble_at_equal_costs_and_1f1bs_memory():
    # ZB-V (Qi et al. 2024, section 6) with chunks of F = B = W: no idle inside any span,
    # and 2p half-size chunks held at most -- what 1F1B's rank 0 holds, p full stages.
    for p, m in [(2, 4), (4, 8), (4, 12), (5, 10)]:
        t = simulate(zb_v(p, m), [1] * 2 * p, [1] * 2 * p, [1] * 2 * p)
        assert t.span_idle == [0] * p
        assert t.peak_activations == [2 * p] * p


# -- DeepSeek-V3, Table 2 -----------------------------------------------------------------------------
@st.composite
def deepseek_costs(draw):
    """Chunk costs as in the report, of a balanced model: the forward costs what the
    input-gradient part of the backward costs (F = B - W), W <= F, and the overlapped F&B
    between the longer of its parts and their sum."""
    f = draw(small)
    w = draw(st.integers(1, f))
    b = f + w
    return f, b, w, draw(st.integers(b, f + b))


def chunk_costs(stages, f, b, w):
    """Our simulator's per-stage costs from DeepSeek's per-chunk F, full B, W."""
    return [f] * stages, [b - w] * stages, [w] * stages


@settings(max_examples=40, deadline=None)
@given(p=st.integers(2, 5), extra=st.integers(0, 5), costs=deepseek_costs())
def test_the_deepseek_table(p, extra, costs):
    f, b, w, fb = costs
    table = fm.deepseek_table()

    def row(name, stages):
        return {key: expr.subs({DS["PP"]: stages, DS["F"]: f, DS["B"]: b, DS["W"]: w,
                                DS["FB"]: fb}) for key, expr in table[name].items()}

    # 1F1B and ZB1P (= ZB-H1) on PP = p ranks, one chunk each.
    m = p + extra
    one = simulate(one_f_one_b(p, m), *chunk_costs(p, f, b, w))
    zb1p = simulate(zb_h1(p, m), *chunk_costs(p, f, b, w))
    for t, name in ((one, "1f1b"), (zb1p, "zb1p")):
        expected = row(name, p)
        assert max(t.idle) == expected["bubble"]
        assert t.peak_activations[0] == expected["activations"]
        assert len(t.schedule.stages_of(0)) == expected["parameters"]
    # DualPipe: DualPipeV on p ranks holds PP = 2p chunks, two per rank.
    m = 2 * p + extra
    dual = simulate(dualpipe_v(p, m), *chunk_costs(2 * p, f, b, w), t_fb=[fb] * 2 * p)
    expected = row("dualpipe", 2 * p)
    assert max(dual.idle) == expected["bubble"]
    assert max(dual.peak_activations) == expected["activations"]
    assert len(dual.schedule.stages_of(0)) == expected["parameters"]


def test_the_deepseek_table_assumes_a_balanced_model():
    # With a forward cheaper than the input-gradient backward (F=2, B-W=3), DualPipeV's
    # simulated bubble is smaller than the table's formula: the formula is a statement
    # about balanced costs, not an identity.
    p, f, b, w, fb = 4, 2, 4, 1, 5
    t = simulate(dualpipe_v(p, 8), *chunk_costs(2 * p, f, b, w), t_fb=[fb] * 2 * p)
    formula = fm.deepseek_table()["dualpipe"]["bubble"].subs(
        {DS["PP"]: 2 * p, DS["F"]: f, DS["B"]: b, DS["W"]: w, DS["FB"]: fb})
    assert (max(t.idle), formula) == (16, 18)


def test_two_papers_one_number():
    # DeepSeek's ZB1P row, with its B the full backward (B = t_b + t_w), is the Zero Bubble
    # paper's ZB-H1 bubble, whose t_b is the input-gradient part only.
    zb1p = fm.deepseek_table()["zb1p"]["bubble"]
    assert sp.simplify(fm.from_deepseek(zb1p) - fm.zb_h1_bubble()) == 0
    one = fm.deepseek_table()["1f1b"]["bubble"]
    assert sp.simplify(fm.from_deepseek(one) - fm.bubble_time("1f1b", with_w=True)) == 0
    # The confusion users report: the Zero Bubble paper's (p-1)(F+B-W) read with DeepSeek's
    # full B overestimates by (p-1) t_w; DeepSeek's (p-1)(F+B-2W) read with the input-only
    # B gives ZB-H2's bubble instead.
    mixed_up = fm.from_deepseek((DS["PP"] - 1) * (DS["F"] + DS["B"] - DS["W"]))
    assert sp.simplify(mixed_up - fm.zb_h1_bubble() - (fm.p - 1) * fm.t_w) == 0
    input_only = ((fm.p - 1) * (fm.t_f + fm.t_b - 2 * fm.t_w))
    assert sp.simplify(input_only - fm.zb_h2_bubble()) == 0


def test_the_homework_numbers_of_the_tables():
    # p=4 (PP=8 stages for DualPipe), F=2, B=4 (full), W=2, F&B=5 per chunk.
    table = fm.deepseek_table()
    at = {DS["F"]: 2, DS["B"]: 4, DS["W"]: 2, DS["FB"]: 5}
    assert table["zb1p"]["bubble"].subs({**at, DS["PP"]: 8}) == 7 * 2
    assert table["dualpipe"]["bubble"].subs({**at, DS["PP"]: 8}) == 3 * 3
    t = simulate(dualpipe_v(4, 16), *chunk_costs(8, 2, 4, 2), t_fb=[5] * 8)
    assert max(t.idle) == 9
