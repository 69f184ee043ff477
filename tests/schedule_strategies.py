"""Hypothesis strategies shared by the schedule, rules, lowering and simulator tests."""

from hypothesis import strategies as st

from paralab.schedules import build

KINDS = ["gpipe", "1f1b", "interleaved", "zb-h1"]


@st.composite
def generated_schedules(draw, max_p: int = 6, max_m: int = 12, max_v: int = 3):
    """A schedule from one of the generators, at sizes they accept (interleaved: m a
    multiple of p, and v chunks per rank)."""
    kind = draw(st.sampled_from(KINDS))
    p, m = draw(st.integers(1, max_p)), draw(st.integers(1, max_m))
    if kind == "interleaved":
        return build(kind, p, m * p, draw(st.integers(1, max_v)))
    return build(kind, p, m)


NEW_KINDS = ["interleaved-any-m", "zb-h2", "zb-v", "dualpipev"]


@st.composite
def new_schedules(draw, max_p: int = 5, max_m: int = 12, max_v: int = 3):
    """A schedule from one of the generators beyond 1F1B, at sizes they accept:
    interleaving with any m >= p, ZB-H2, ZB-V (V placement) and DualPipeV (V placement,
    fused units, m >= 2p)."""
    kind = draw(st.sampled_from(NEW_KINDS))
    p = draw(st.integers(1, max_p))
    if kind == "interleaved-any-m":
        return build("interleaved", p, draw(st.integers(p, max(p, max_m))),
                     draw(st.integers(1, max_v)))
    if kind == "dualpipev":
        return build(kind, p, draw(st.integers(2 * p, max(2 * p, max_m))))
    return build(kind, p, draw(st.integers(1, max_m)))
