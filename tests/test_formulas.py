"""The SymPy formulas against the simulator (exactly) and against real torch shapes.

Expected values come from the simulator, from torch tensors, or from arithmetic written out
here -- never from the formulas under test."""

from fractions import Fraction

import numpy as np
import pytest
import sympy as sp
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from paralab import formulas as fm
from paralab.schedules import build
from paralab.simulator import simulate

SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

ranks = st.integers(1, 8)
microbatches = st.integers(1, 32)
chunks = st.integers(1, 4)
costs = st.fractions(min_value=Fraction(1, 8), max_value=12, max_denominator=8)


def F(x) -> Fraction:
    """A SymPy number (from ``evaluate``) as an exact Fraction; anything else is an error."""
    assert isinstance(x, sp.Rational), f"not an exact rational: {x!r}"
    return Fraction(int(x.p), int(x.q))


def ev(expr, **values) -> Fraction:
    return F(fm.evaluate(expr, **values))


def gaps(events):
    """Idle intervals between consecutive events of one rank."""
    return [b.start - a.end for a, b in zip(events, events[1:])]


# -- GPipe / 1F1B ---------------------------------------------------------------------------------
@SETTINGS
@given(p=ranks, m=microbatches, t_f=costs, t_b=costs, data=st.data())
def test_gpipe_and_1f1b_match_the_simulator(p, m, t_f, t_b, data):
    with_w = data.draw(st.booleans(), "with_w")
    t_w = data.draw(costs, "t_w") if with_w else 0
    values = dict(p=p, m=m, t_f=t_f, t_b=t_b, t_w=t_w)
    for name, time in (("gpipe", fm.gpipe_time(with_w)), ("1f1b", fm.one_f_one_b_time(with_w))):
        t = simulate(build(name, p, m), t_f, t_b, t_w)
        assert ev(time, **values) == t.makespan
        assert ev(fm.ideal_time(with_w), **values) == t.ideal
        assert ev(fm.bubble_time(name, with_w), **values) == t.idle[0]
        assert len(set(t.idle)) == 1  # every rank waits the same
    t = simulate(build("1f1b", p, m), t_f, t_b)  # the ratios take t_b as the whole backward
    assert ev(fm.time_ratio(), p=p, m=m) == t.time_ratio
    assert ev(fm.bubble_overhead(), p=p, m=m) == t.bubble_overhead
    assert ev(fm.bubble_fraction(), p=p, m=m) == t.bubble_fraction
    g = simulate(build("gpipe", p, m), t_f, t_b)
    assert ev(fm.time_ratio("gpipe"), p=p, m=m) == g.time_ratio
    assert ev(fm.bubble_fraction("gpipe"), p=p, m=m) == g.bubble_fraction


@SETTINGS
@given(p=ranks, m=microbatches, t_f=costs, t_b=costs)
def test_the_parts_of_the_derivations_are_what_the_last_stage_sees(p, m, t_f, t_b):
    values = dict(p=p, m=m, t_f=t_f, t_b=t_b)
    g = fm.evaluate(fm.gpipe_time_derivation(), **values)
    t = simulate(build("gpipe", p, m), t_f, t_b)
    last = t.events_of(p - 1)
    assert last[0].start == F(g["fill"])
    assert all(gap == 0 for gap in gaps(last))
    assert last[m - 1].end - last[0].start == F(g["forward_steady"])  # its m forwards
    assert last[-1].end - last[m - 1].end == F(g["backward_steady"])  # its m backwards
    assert t.makespan - last[-1].end == F(g["drain"])
    assert F(g["total"]) == sum(F(g[k]) for k in ("fill", "forward_steady",
                                                  "backward_steady", "drain"))

    o = fm.evaluate(fm.one_f_one_b_time_derivation(), **values)
    t = simulate(build("1f1b", p, m), t_f, t_b)
    last = t.events_of(p - 1)
    assert last[0].start == F(o["fill"])
    assert all(gap == 0 for gap in gaps(last))
    assert last[-1].end - last[0].start == F(o["steady"])
    assert t.makespan - last[-1].end == F(o["drain"])


def test_1f1b_does_not_shrink_the_bubble_it_bounds_memory():
    assert sp.simplify(fm.one_f_one_b_time() - fm.gpipe_time()) == 0
    assert sp.simplify(fm.one_f_one_b_time(True) - fm.gpipe_time(True)) == 0
    g, f = simulate(build("gpipe", 4, 8), 2, 4), simulate(build("1f1b", 4, 8), 2, 4)
    assert g.bubble_fraction == f.bubble_fraction
    assert max(f.peak_activations) < max(g.peak_activations)


def test_closed_forms_are_the_textbook_ones():
    p, m, v, t_f, t_b, t_w = fm.p, fm.m, fm.v, fm.t_f, fm.t_b, fm.t_w
    expected = {
        fm.gpipe_time(): (m + p - 1) * (t_f + t_b),
        fm.ideal_time(): m * (t_f + t_b),
        fm.bubble_time(): (p - 1) * (t_f + t_b),
        fm.bubble_time(with_w=True): (p - 1) * (t_f + t_b + t_w),
        fm.time_ratio(): (m + p - 1) / m,
        fm.bubble_overhead(): (p - 1) / m,
        fm.bubble_fraction(): (p - 1) / (m + p - 1),
        fm.interleaved_time(): m * (t_f + t_b) + (p - 1) * (t_f + t_b) / v,
        fm.interleaved_bubble_overhead(): (p - 1) / (v * m),
        fm.interleaved_bubble_fraction(): ((p - 1) / v) / (m + (p - 1) / v),
        fm.zb_h1_bubble(): (p - 1) * (t_f + t_b - t_w),
        fm.zb_h1_time(): m * (t_f + t_b + t_w) + (p - 1) * (t_f + t_b - t_w),
    }
    for derived, textbook in expected.items():
        assert sp.simplify(derived - textbook) == 0, (derived, textbook)


# -- interleaved ----------------------------------------------------------------------------------
@SETTINGS
@given(p=ranks, v=chunks, t_f=costs, t_b=costs, data=st.data())
def test_interleaved_matches_the_simulator(p, v, t_f, t_b, data):
    m = p * data.draw(st.integers(1, 32 // p), "m // p")  # m must be a multiple of p
    t = simulate(build("interleaved", p, m, v), t_f, t_b)
    values = dict(p=p, m=m, v=v, t_f=t_f, t_b=t_b)
    assert ev(fm.interleaved_time(), **values) == t.makespan
    assert ev(fm.step_time("interleaved"), **values) == t.makespan
    assert ev(fm.interleaved_bubble_overhead(), p=p, m=m, v=v) == t.bubble_overhead
    assert ev(fm.interleaved_bubble_fraction(), p=p, m=m, v=v) == t.bubble_fraction
    assert ev(fm.time_ratio("interleaved"), p=p, m=m, v=v) == t.time_ratio
    parts = fm.evaluate(fm.interleaved_time_derivation(), **values)
    last = t.events_of(p - 1)
    assert last[0].start == F(parts["fill"])
    assert all(gap == 0 for gap in gaps(last))
    assert t.makespan - last[-1].end == F(parts["drain"])


# -- ZB-H1 ----------------------------------------------------------------------------------------
@SETTINGS
@given(p=ranks, extra=st.integers(0, 24), t_f=costs, t_b=costs,
       share=st.fractions(min_value=0, max_value=1, max_denominator=6))
def test_zb_h1_matches_the_simulator_where_valid(p, extra, t_f, t_b, share):
    m = p + extra                     # validity: m >= p
    t_w = min(t_f, t_b) * share       # validity: t_w <= min(t_f, t_b)
    values = dict(p=p, m=m, t_f=t_f, t_b=t_b, t_w=t_w)
    zb = simulate(build("zb-h1", p, m), t_f, t_b, t_w)
    one = simulate(build("1f1b", p, m), t_f, t_b, t_w)  # its B also computes W
    assert ev(fm.zb_h1_time(), **values) == zb.makespan
    assert ev(fm.zb_h1_bubble(), **values) == zb.idle[0]
    assert ev(fm.bubble_time(with_w=True), **values) == one.idle[0]
    assert ev(fm.bubble_fraction("zb-h1"), **values) == zb.bubble_fraction
    for name, timeline in (("zb-h1", zb), ("1f1b", one)):
        parts = fm.evaluate(fm.rank0_idle_derivation(name), **values)
        waits = [g for g in gaps(timeline.events_of(0)) if g > 0]
        assert (waits[0] if waits else 0) == F(parts["first_gradient_wait"])
        assert sum(waits[1:]) == F(parts["cooldown_waits"])
        assert timeline.events_of(0)[-1].end == timeline.makespan


def test_both_derivations_of_the_1f1b_bubble_agree():
    assert sp.simplify(fm.rank0_idle_derivation("1f1b")["total"]
                       - fm.bubble_time(with_w=True)) == 0


def test_zb_h1_idle_is_a_third_of_1f1b_when_costs_are_equal():
    values = dict(p=4, m=8, t_f=2, t_b=2, t_w=2)
    assert fm.evaluate(fm.zb_h1_bubble() / fm.bubble_time(with_w=True), **values) == \
        sp.Rational(1, 3)
    zb = simulate(build("zb-h1", 4, 8), 2, 2, 2)
    one = simulate(build("1f1b", 4, 8), 2, 2, 2)
    assert zb.idle[0] * 3 == one.idle[0] == 3 * (2 + 2 + 2)


# -- activation memory ----------------------------------------------------------------------------
@SETTINGS
@given(p=ranks, m=microbatches, v=chunks)
def test_peak_activations_match_the_simulator(p, m, v):
    for name in ("gpipe", "1f1b", "zb-h1"):
        t = simulate(build(name, p, m), 1, 2, 1)
        assert [ev(fm.peak_activations(name), p=p, m=m, r=rank) for rank in range(p)] == \
            t.peak_activations
    if m % p == 0:
        t = simulate(build("interleaved", p, m, v), 1, 2)
        assert [ev(fm.peak_activations("interleaved"), p=p, m=m, v=v, r=rank)
                for rank in range(p)] == t.peak_activations


# -- the homework numbers -------------------------------------------------------------------------
def test_homework_pipeline_numbers():
    hw = dict(p=4, m=8, t_f=2, t_b=4)
    assert fm.evaluate(fm.gpipe_time(), **hw) == (8 + 4 - 1) * (2 + 4) == 66
    assert fm.evaluate(fm.one_f_one_b_time(), **hw) == 66
    assert fm.evaluate(fm.ideal_time(), **hw) == 8 * (2 + 4) == 48
    assert fm.evaluate(fm.time_ratio(), p=4, m=8) == sp.Rational(11, 8)
    assert float(fm.evaluate(fm.time_ratio(), p=4, m=8)) == 1.375
    assert fm.evaluate(fm.bubble_overhead(), p=4, m=8) == sp.Rational(3, 8)
    assert fm.evaluate(fm.bubble_fraction(), p=4, m=8) == sp.Rational(3, 11)
    hw16 = dict(hw, m=16)
    assert fm.evaluate(fm.gpipe_time(), **hw16) == 114
    assert fm.evaluate(fm.ideal_time(), **hw16) == 96
    assert fm.evaluate(fm.time_ratio(), p=4, m=16) == sp.Rational(19, 16)
    assert fm.evaluate(fm.interleaved_time(), v=2, **hw) == 57
    assert fm.evaluate(fm.interleaved_time(), v=4, **hw) == sp.Rational(105, 2)
    # The same numbers from the simulator, so the two can never drift apart silently.
    assert simulate(build("interleaved", 4, 8, 2), 2, 4).makespan == 57
    assert simulate(build("interleaved", 4, 8, 4), 2, 4).makespan == Fraction(105, 2)


def test_gpt3_scale_check_numbers():
    assert fm.evaluate(fm.bubble_fraction(), p=8, m=16) == sp.Rational(7, 23)
    assert fm.evaluate(fm.bubble_fraction(), p=8, m=64) == sp.Rational(7, 71)
    assert fm.evaluate(fm.interleaved_bubble_fraction(), p=8, m=64, v=2) == \
        sp.Rational(7, 135)
    t = simulate(build("interleaved", 8, 64, 2), 1, 2)
    assert t.bubble_fraction == Fraction(7, 135)


# -- solving for m --------------------------------------------------------------------------------
def brute_force_min_m(p, target, ratio, step=1):
    m = step
    while ratio(p, m) > target:
        m += step
    return m


def test_min_microbatches_homework():
    assert fm.min_microbatches(4, 0.05) == 57
    assert fm.min_microbatches(4, Fraction(1, 20)) == 57
    assert fm.min_microbatches(4, "5/100") == 57
    # Check it on the simulator: 57 microbatches reach 5 %, 56 do not.
    assert simulate(build("1f1b", 4, 57), 1, 1).bubble_fraction <= Fraction(5, 100)
    assert simulate(build("1f1b", 4, 56), 1, 1).bubble_fraction > Fraction(5, 100)
    assert fm.min_microbatches(4, 0.05, "bubble_overhead") == 60
    assert fm.min_microbatches(4, 1.05, "time_ratio") == 60


@settings(max_examples=25, deadline=None)
@given(p=st.integers(1, 16), target=st.fractions(min_value=Fraction(1, 200),
                                                  max_value=Fraction(3, 2), max_denominator=200))
def test_min_microbatches_is_the_first_that_reaches_the_target(p, target):
    def fraction(p_, m_):
        return Fraction(p_ - 1, m_ + p_ - 1)

    def overhead(p_, m_):
        return Fraction(p_ - 1, m_)

    assert fm.min_microbatches(p, target) == brute_force_min_m(p, target, fraction)
    assert fm.min_microbatches(p, target, "bubble_overhead") == \
        brute_force_min_m(p, target, overhead)
    assert fm.min_microbatches(p, target, "bubble_fraction", v_value=2) == \
        brute_force_min_m(p, target, lambda p_, m_: Fraction(p_ - 1, 2 * m_ + p_ - 1), step=p)


def test_min_microbatches_explains_unreachable_targets():
    with pytest.raises(ValueError, match="time_ratio"):
        fm.min_microbatches(4, 0.5, "time_ratio")  # T/T_ideal never drops below 1
    with pytest.raises(ValueError, match="quantity"):
        fm.min_microbatches(4, 0.05, "bubble")


# -- evaluate -------------------------------------------------------------------------------------
def test_evaluate_is_exact_and_checks_names():
    value = fm.evaluate(fm.gpipe_time(), p=4, m=8, t_f="1/3", t_b=0.5)
    assert value == sp.Rational(11 * 5, 6) and isinstance(value, sp.Rational)
    assert fm.evaluate(fm.collective_traffic("all_reduce", fm.B * fm.S * fm.d) * fm.e,
                       B=1, S=1, d=4, P=4, bytes_per_element=2) == 12
    assert fm.evaluate(fm.gpipe_time(), p=np.int64(4), m=8, t_f=np.float64(0.5), t_b=2) == \
        sp.Rational(11 * 5, 2)
    partial = fm.evaluate(fm.gpipe_time(), p=4, t_f=1, t_b=1)
    assert sp.simplify(partial - 2 * (fm.m + 3)) == 0
    with pytest.raises(ValueError, match="unknown symbol name"):
        fm.evaluate(fm.gpipe_time(), q=1)
    shapes = fm.evaluate(fm.ffn_shapes("col-row"), B=8, S=128, d=1024, P=4)
    assert list(shapes) == list(fm.ffn_shapes("col-row"))  # order kept


# -- tensor parallelism ---------------------------------------------------------------------------
HW = dict(B=8, S=128, d=1024, P=4)


def torch_ffn(variant, B, S, d, P, device="cpu"):
    """The FFN split over P ranks, each rank's tensors built with torch.chunk; returns the
    named per-rank (rank 0) and full tensors, and the single-process reference Z."""
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        if device == "meta":
            return torch.empty(*shape, device="meta")
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    X, W1, W2 = rand(B, S, d), rand(d, 4 * d), rand(4 * d, d)
    gelu = torch.nn.functional.gelu
    t = {"X": X, "W1": W1, "W2": W2}
    if variant == "col-row":
        w1 = torch.chunk(W1, P, dim=1)
        w2 = torch.chunk(W2, P, dim=0)
        y = [gelu(X @ w) for w in w1]
        z = [yi @ wi for yi, wi in zip(y, w2)]
        t.update(W1_shard=w1[0], Y_shard=y[0], Y=torch.cat(y, -1), W2_shard=w2[0],
                 Z_partial=z[0], Z=sum(z))
    elif variant == "row-row":
        xs = torch.chunk(X, P, dim=-1)
        w1 = torch.chunk(W1, P, dim=0)
        y_partial = [xi @ wi for xi, wi in zip(xs, w1)]
        Y = gelu(sum(y_partial))
        ys = torch.chunk(Y, P, dim=-1)
        w2 = torch.chunk(W2, P, dim=0)
        z = [yi @ wi for yi, wi in zip(ys, w2)]
        t.update(X_shard=xs[0], W1_shard=w1[0], Y_partial=y_partial[0], Y=Y, Y_shard=ys[0],
                 W2_shard=w2[0], Z_partial=z[0], Z=sum(z))
    elif variant == "col-col":
        w1 = torch.chunk(W1, P, dim=1)
        y = [gelu(X @ w) for w in w1]
        Y = torch.cat(y, -1)
        w2 = torch.chunk(W2, P, dim=1)
        z = [Y @ w for w in w2]
        t.update(W1_shard=w1[0], Y_shard=y[0], Y=Y, W2_shard=w2[0], Z_shard=z[0],
                 Z=torch.cat(z, -1))
    reference = None if device == "meta" else gelu(X @ W1) @ W2
    return t, reference


@pytest.mark.parametrize("variant", ["col-row", "row-row", "col-col"])
def test_ffn_shapes_match_torch_at_homework_size(variant):
    tensors, _ = torch_ffn(variant, device="meta", **HW)  # shapes only, no arithmetic
    shapes = fm.evaluate(fm.ffn_shapes(variant), **HW)
    assert set(shapes) == set(tensors)
    for name, shape in shapes.items():
        assert tuple(int(x) for x in shape) == tuple(tensors[name].shape), name


@pytest.mark.parametrize("variant", ["col-row", "row-row", "col-col"])
def test_ffn_split_computes_the_same_z(variant):
    small = dict(B=2, S=3, d=8, P=4)
    tensors, reference = torch_ffn(variant, **small)
    torch.testing.assert_close(tensors["Z"], reference)
    shapes = fm.evaluate(fm.ffn_shapes(variant), **small)
    for name, shape in shapes.items():
        assert tuple(int(x) for x in shape) == tuple(tensors[name].shape), name


def test_homework_tp_numbers():
    shapes = fm.evaluate(fm.ffn_shapes("col-row"), **HW)
    assert shapes["W1_shard"] == (1024, 1024)
    assert shapes["Y"] == (8, 128, 4096)
    (forward,) = [c for c in fm.ffn_collectives("col-row") if c.phase == "forward"]
    assert fm.evaluate(forward.elements, **HW) == 8 * 128 * 1024 == 1_048_576
    assert fm.evaluate(forward.elements * fm.e, e=4, **HW) == 4 * 2 ** 20  # 4 MiB in fp32


# What each variant must communicate, written from the layer definitions (see the docstring
# of ffn_collectives): (layer, phase, op, tensor whose full size is moved).
EXPECTED_COLLECTIVES = {
    "col-row": [("linear2", "forward", "all_reduce", "Z"),
                ("linear1", "backward", "all_reduce", "X")],
    "row-row": [("linear1", "forward", "all_reduce", "Y"),
                ("linear2", "forward", "all_reduce", "Z"),
                ("linear2", "backward", "all_gather", "Y"),
                ("linear1", "backward", "all_gather", "X")],
    "col-col": [("linear2", "forward", "all_gather", "Y"),
                ("linear2", "forward", "all_gather", "Z"),
                ("linear2", "backward", "all_reduce", "Y"),
                ("linear1", "backward", "all_reduce", "X")],
}


@pytest.mark.parametrize("variant", sorted(EXPECTED_COLLECTIVES))
def test_ffn_collectives_move_the_right_tensors(variant):
    tensors, _ = torch_ffn(variant, device="meta", **HW)
    records = fm.ffn_collectives(variant)
    assert [(c.layer, c.phase, c.op) for c in records] == \
        [e[:3] for e in EXPECTED_COLLECTIVES[variant]]
    for record, expected in zip(records, EXPECTED_COLLECTIVES[variant]):
        assert fm.evaluate(record.elements, **HW) == tensors[expected[3]].numel()
        assert record.tensor.endswith(expected[3])  # "Z", or "dL/dX" for X's gradient
    if variant == "col-col":
        without = fm.ffn_collectives(variant, output_gathered=False)
        assert [c.tensor for c in records if c not in without] == ["Z"]


def test_backward_gradients_are_partial_sums_where_the_records_say_all_reduce():
    # col-row: each rank's Linear1 sees all of X but only its columns of W1, so its dL/dX is
    # a partial sum; the sum over ranks is the true gradient (hence the all-reduce).
    torch.manual_seed(0)
    B_, S_, d_, P_ = 2, 3, 8, 4
    X = torch.randn(B_, S_, d_, dtype=torch.float64, requires_grad=True)
    W1, W2 = torch.randn(d_, 4 * d_, dtype=torch.float64), torch.randn(4 * d_, d_,
                                                                      dtype=torch.float64)
    gelu = torch.nn.functional.gelu
    (gelu(X @ W1) @ W2).sum().backward()
    reference = X.grad.clone()
    partial = []
    for w1, w2 in zip(torch.chunk(W1, P_, 1), torch.chunk(W2, P_, 0)):
        x = X.detach().clone().requires_grad_()
        (gelu(x @ w1) @ w2).sum().backward()
        partial.append(x.grad)
    assert not torch.allclose(partial[0], reference)
    torch.testing.assert_close(sum(partial), reference)
    # col-col: Linear2 gets the full Y; each rank's dL/dY covers only its columns of W2.
    Y = gelu(X.detach() @ W1).requires_grad_()
    (Y @ W2).sum().backward()
    reference_y = Y.grad.clone()
    partial_y = []
    for w2 in torch.chunk(W2, P_, 1):
        y = Y.detach().clone().requires_grad_()
        (y @ w2).sum().backward()
        partial_y.append(y.grad)
    torch.testing.assert_close(sum(partial_y), reference_y)


def ring_all_reduce_sent(P_, N):
    """Run a ring all-reduce on P_ lists of N numbers: a reduce-scatter then an all-gather,
    each P_-1 steps of one chunk.  Returns the per-rank elements sent in each of the two
    phases and the resulting data."""
    data = [[(rank + 1) * (i + 1) for i in range(N)] for rank in range(P_)]
    bounds = [(k * N // P_, (k + 1) * N // P_) for k in range(P_)]
    sent = [0] * P_
    phases = []
    for step in range(P_ - 1):  # reduce-scatter
        messages = []
        for rank in range(P_):
            lo, hi = bounds[(rank - step) % P_]
            messages.append(((rank + 1) % P_, lo, data[rank][lo:hi]))
            sent[rank] += hi - lo
        for dst, lo, chunk in messages:
            for j, x in enumerate(chunk):
                data[dst][lo + j] += x
    phases.append(sent)
    sent = [0] * P_
    for step in range(P_ - 1):  # all-gather of the reduced chunks
        messages = []
        for rank in range(P_):
            lo, hi = bounds[(rank + 1 - step) % P_]
            messages.append(((rank + 1) % P_, lo, data[rank][lo:hi]))
            sent[rank] += hi - lo
        for dst, lo, chunk in messages:
            data[dst][lo:lo + len(chunk)] = chunk
    phases.append(sent)
    return phases, data


@pytest.mark.parametrize("P_", [2, 4, 8])
def test_collective_traffic_matches_a_ring(P_):
    N = 8 * P_
    (scatter, gather), data = ring_all_reduce_sent(P_, N)
    total = sum(range(1, P_ + 1))
    assert all(row == [total * (i + 1) for i in range(N)] for row in data)
    assert [a + b for a, b in zip(scatter, gather)] == \
        [fm.collective_traffic("all_reduce", N, P_)] * P_
    assert scatter == [fm.collective_traffic("reduce_scatter", N, P_)] * P_
    assert gather == [fm.collective_traffic("all_gather", N, P_)] * P_
    with pytest.raises(ValueError, match="unknown collective"):
        fm.collective_traffic("broadcast", N, P_)


def test_ffn_traffic_compares_the_variants():
    col_row = fm.evaluate(fm.ffn_traffic("col-row"), **HW)
    row_row = fm.evaluate(fm.ffn_traffic("row-row"), **HW)
    n = 8 * 128 * 1024
    # Ring traffic per rank with P=4: all-reduce 2*3/4 of the tensor, all-gather 3/4.
    assert F(col_row) == 2 * Fraction(2 * 3, 4) * n          # two all-reduces of B*S*d
    assert F(row_row) == Fraction(2 * 3, 4) * (4 * n + n) + Fraction(3, 4) * (4 * n + n)
    assert col_row < row_row
