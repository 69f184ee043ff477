"""Checks of hw6_beyond_1f1b: ZB-H1 written by hand, DeepSeek-V3's bubble table, a
schedule under a memory budget, and the interview answer's claims.

Every expected value is computed from :mod:`paralab` (schedules, simulator, executor,
formulas), and so is every *wrong* value a known misconception produces: when a student's
answer equals one of those, the feedback names the misconception.
"""

from __future__ import annotations

from fractions import Fraction
from functools import lru_cache

import sympy as sp

from autograder.checks import (Probe, Verdict, as_real, each_size, formula_check,
                               make_checker, originality)
from paralab import formulas
from paralab.formulas import DEEPSEEK_SYMBOLS
from paralab.schedules import Action, Schedule, ScheduleError, build, dualpipe_v, validate
from paralab.schedules import one_f_one_b as reference_one_f_one_b
from paralab.schedules import zb_h1 as reference_zb_h1
from paralab.simulator import DeadlockError, simulate

# Answers are parsed with these names; the reference expressions use the same symbols.
PP, F, B, W, FB = (DEEPSEEK_SYMBOLS[name] for name in ("PP", "F", "B", "W", "FB"))
p, v = formulas.p, formulas.v
SYMBOLS = [PP, F, B, W, FB, p, v]

HIDDEN_SIZES = [(1, 1), (1, 3), (2, 1), (3, 2), (4, 4), (5, 7), (3, 9), (6, 4)]
ORIGINALITY_SIZE = (5, 7)
EXECUTOR_SIZE = (4, 8)

# Part B: per chunk, B the full backward (DeepSeek-V3's notation).
CHUNK_COSTS = {PP: 8, F: 2, B: 4, W: 2, FB: 5}
DUALPIPE_RANKS, DUALPIPE_M = 4, 16

# Part C.
CANDIDATES = ("1f1b", "zb-h1", "zb-h2", "zb-v", "interleaved", "dualpipev")
PICK_P, PICK_M, PICK_COST, PICK_FB = 4, 8, 1, Fraction(5, 2)
HIDDEN_BUDGETS = [(3.5, 2.5), (4, 2.5), (4.5, 2.5), (4.5, 3), (7, 3), (7, 2)]

# Part D.
GPT3 = {"gpipe": ("gpipe", dict(p=8, m=16), 30, 0), "1f1b": ("1f1b", dict(p=8, m=64), 9.8, 1),
        "interleaved": ("interleaved", dict(p=8, m=64, v=2), 5.3, 1)}


# -- Part A: ZB-H1 ---------------------------------------------------------------------------
def w_placed(p_value: int, m_value: int, may_owe) -> Schedule:
    """1F1B's order with a W after B's by the rule of part A, rank ``r`` owing up to
    ``may_owe(r)`` W's (``None``: every W at the end).  ``may_owe(r) = r`` is ZB-H1; the
    others are what the feedback recognises."""
    rows = []
    for r, row in enumerate(reference_one_f_one_b(p_value, m_value).orders):
        out, owed = [], []
        for action in row:
            out.append(action)
            if action.op == "B":
                owed.append(action.microbatch)
                limit = may_owe(r)
                if limit is not None and len(owed) > limit:
                    out.append(Action("W", owed.pop(0), r))
        out += [Action("W", i, r) for i in owed]
        rows.append(tuple(out))
    return Schedule(tuple(rows), m_value, p_value, "variant")


def held_until_w(schedule: Schedule) -> list[int]:
    """Per rank, the most microbatches whose saved tensors are held at once when they are
    freed only by W (a split backward still needs the stage input for W)."""
    peaks = []
    for row in schedule.orders:
        held = peak = 0
        for op, _, _ in row:
            held += {"F": 1, "W": -1}.get(op, 0)
            peak = max(peak, held)
        peaks.append(peak)
    return peaks


def diagnose_schedule(value, p_value: int, m_value: int) -> Verdict:
    if not isinstance(value, Schedule):
        return Verdict(False, f"zb_h1 must return a paralab Schedule, got {type(value).__name__}")
    if (value.num_ranks, value.num_microbatches) != (p_value, m_value):
        return Verdict(False, f"zb_h1({p_value}, {m_value}) returned a schedule for "
                              f"{value.num_ranks} ranks and {value.num_microbatches} "
                              f"microbatches")
    try:
        validate(value)
        simulate(value, 1, 1, 1)
    except DeadlockError as e:
        return Verdict(False, f"zb_h1({p_value}, {m_value}) deadlocks: {e}")
    except ScheduleError as e:
        return Verdict(False, f"zb_h1({p_value}, {m_value}) is not a valid schedule: {e}")
    expected = reference_zb_h1(p_value, m_value)
    if value.orders == expected.orders:
        return Verdict(True, "correct")
    if not value.splits_backward:
        return Verdict(False, "there is no W: that is 1F1B, whose B computes both gradients; "
                              "ZB-H1 splits every backward into B and W")
    without_w = [[a for a in row if a.op != "W"] for row in value.orders]
    if without_w != [list(row) for row in reference_one_f_one_b(p_value, m_value).orders]:
        return Verdict(False, "the F's and B's are not in 1F1B's order (warm-up of p-r-1 "
                              "forwards, then one F and one B at a time): ZB-H1 keeps it, "
                              "which is why its memory is 1F1B's")
    if value.orders == w_placed(p_value, m_value, lambda r: 0).orders and p_value > 1:
        return Verdict(False, "every W runs right after its B: the backward is split, so "
                              "gradients leave a little earlier, but no W moves into a gap; "
                              "rank r may let up to r W's wait")
    if value.orders == w_placed(p_value, m_value, lambda r: None).orders:
        held, zb = held_until_w(value), held_until_w(expected)
        return Verdict(False, f"every W postponed to the end: each microbatch keeps what its "
                              f"W needs until then, so the ranks hold {held} microbatches at "
                              f"once instead of ZB-H1's {zb}; rank r may owe at most r W's")
    for shift, word in ((1, "r+1"), (-1, "r-1")):
        variant = w_placed(p_value, m_value, lambda r, s=shift: max(r + s, 0))
        if value.orders == variant.orders:
            return Verdict(False, f"rank r lets up to {word} W's wait; the rule is r, so "
                                  f"that rank 0 pays each W at once and the last rank owes "
                                  f"the most")
    for r, (got, want) in enumerate(zip(value.to_strings(), expected.to_strings())):
        if got != want:
            step = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b),
                        min(len(got), len(want)))
            return Verdict(False, f"valid, but rank {r} differs from ZB-H1 at step {step}: after "
                                  f"each B, run the W of the oldest microbatch owed unless "
                                  f"the rank owes at most r")
    return Verdict(False, "the schedule differs from ZB-H1")


def schedule_check(p_value, m_value):
    return lambda value: diagnose_schedule(value, p_value, m_value)


hidden_schedules_check = each_size(diagnose_schedule, HIDDEN_SIZES)


# The library's schedule generators: all of them could stand in for the student's order.
REFERENCE_GENERATORS = tuple(f"paralab.schedules:{name}" for name in (
    "gpipe", "one_f_one_b", "interleaved_one_f_one_b", "zb_h1", "zb_h2", "zb_v", "dualpipe_v",
    "build"))

PROBES = {
    # zb_h1 run once more, in a fresh process where the library's generators raise
    # ReferenceUnavailable: the order must be the student's own.
    "own_zb_h1": Probe(cells=("setup", "zb"), call="zb_h1(*checks.ORIGINALITY_SIZE)",
                       unavailable=REFERENCE_GENERATORS),
}


own_implementation_check = originality(
    lambda value: diagnose_schedule(value, *ORIGINALITY_SIZE),
    "zb_h1 must build the order itself, not call the library's schedule generators")


def _number(expected, misconceptions, hint):
    def check(value) -> Verdict:
        x = as_real(value)
        if x is None:
            return Verdict(False, f"expected a number, got {type(value).__name__}")
        if abs(x - float(expected)) <= 1e-9 * max(1.0, abs(float(expected))):
            return Verdict(True, "correct")
        for wrong, message in misconceptions:
            if abs(x - float(wrong)) <= 1e-9 * max(1.0, abs(float(wrong))):
                return Verdict(False, message)
        return Verdict(False, f"{value} is not right; {hint}")
    return check


def _lazy(build_check):
    """A check whose expected values are computed on its first use, not at import."""
    made = lru_cache(maxsize=None)(build_check)
    return lambda value: made()(value)


def _idle_checks():
    zb = simulate(reference_zb_h1(4, 8), 2, 2, 2)
    one = simulate(reference_one_f_one_b(4, 8), 2, 2, 2)
    values = dict(p=4, t_f=2, t_b=2, t_w=2)
    h2 = formulas.evaluate(formulas.zb_h2_bubble(), **values)
    unmoved = {simulate(w_placed(4, 8, owe), 2, 2, 2).idle[0] for owe in (lambda r: 0,
                                                                           lambda r: None)}
    zb_check = _number(zb.idle[0], [
        (one.idle[0], f"{one.idle[0]} is 1F1B's idle time: did your schedule split the "
                      f"backward at all?")] + [
        (idle, f"{idle} is the idle time of a split backward whose W's do not fill the gaps "
               f"(each right after its B, or all at the end): ZB-H1's rule moves them "
               f"where rank 0 would wait") for idle in sorted(unmoved)] + [
        (h2, f"{h2} is ZB-H2's bubble (p-1)(t_f+t_b-2t_w), with more warm-up forwards and "
             f"memory; ZB-H1's is (p-1)(t_f+t_b-t_w)"),
        (zb.makespan, f"{zb.makespan} is the step time; the idle time is the step time "
                      f"minus the rank's work")],
        "simulate(zb_h1(4, 8), 2, 2, 2).idle[0]")
    one_check = _number(one.idle[0], [
        (simulate(reference_one_f_one_b(4, 8), 2, 2).idle[0],
         "that leaves W out: 1F1B's B does both halves, pass t_w=2 as well"),
        (zb.idle[0], "that is ZB-H1's idle time, not 1F1B's")],
        "simulate(schedules.one_f_one_b(4, 8), 2, 2, 2).idle[0]")
    return zb_check, one_check


def executor_check(value) -> Verdict:
    """Run the recorded schedule on real processes; gradients must equal one process's."""
    p_value, m_value = EXECUTOR_SIZE
    verdict = diagnose_schedule(value, p_value, m_value)
    if not verdict.passed:
        return verdict
    from paralab import pipeline
    model = pipeline.PipelineModel()
    result = pipeline.run_pipeline(value, model, echo=False, timeout=60)
    _, reference = pipeline.reference_step(model, p_value, m_value)
    error = result.max_grad_error(reference)
    if error > 1e-10:
        return Verdict(False, f"gradients differ from a single process by {error:.3g}")
    return Verdict(True, f"ran on {p_value} processes with separate B and W passes: gradients "
                         f"equal a single process's")


# -- Part B: DeepSeek-V3's table ------------------------------------------------------------
TABLE = formulas.deepseek_table()


# A formula that is neither the report's nor a known mistake is shown with what it gives here.
AT_CHUNK_COSTS = dict(symbols={x.name: x for x in SYMBOLS},
                      evaluate=lambda x: x.subs(CHUNK_COSTS),
                      where="with PP=8, F=2, B=4, W=2, FB=5", right="the report's formula")


ZB_PAPER_FORM = (PP - 1) * (F + B - W)
MISREAD_B = "the Zero Bubble paper's (p-1)(F+B-W) takes B as the input-gradient part; with " \
            "the report's full B the same bubble is (PP-1)(F+B-2W)"
ZB1P_MISCONCEPTIONS = [
    (ZB_PAPER_FORM, MISREAD_B),
    (TABLE["1f1b"]["bubble"], "that is 1F1B's bubble: ZB1P fills part of it with W's"),
    ((PP - 1) * (F + B - 3 * W), "-3W belongs to DualPipe; ZB1P saves 2W per stage"),
]
DUALPIPE_MISCONCEPTIONS = [
    ((PP - 1) * (FB + B - 3 * W), "(PP-1) is a one-direction pipeline's count: DualPipe's "
                                  "bubble has PP/2-1 slots"),
    ((PP / 2 - 1) * (F + B - 3 * W), "the overlapped slots cost F&B (FB), not F"),
    (TABLE["zb1p"]["bubble"], "that is ZB1P's bubble"),
]


def number_b(name: str):
    expected = TABLE[name]["bubble"].subs(CHUNK_COSTS)
    input_only = {**CHUNK_COSTS, B: CHUNK_COSTS[B] - CHUNK_COSTS[W]}
    wrong = {
        "zb1p": [(ZB_PAPER_FORM.subs(CHUNK_COSTS), MISREAD_B),
                 (TABLE[name]["bubble"].subs(input_only),
                  "that puts the input-gradient part (B-W) where the report's formula wants "
                  "the full backward B")],
        "dualpipe": [(((PP - 1) * (FB + B - 3 * W)).subs(CHUNK_COSTS),
                      "(PP-1) slots is a one-direction pipeline's count: DualPipe has PP/2-1"),
                     (TABLE[name]["bubble"].subs(input_only),
                      "that puts the input-gradient part (B-W) where the formula wants the "
                      "full backward B")],
        "1f1b": [(TABLE[name]["bubble"].subs(input_only),
                  "1F1B's B is the full backward: (PP-1)(F+B) with B=4"),
                 (((PP - 1) * (F + B + W)).subs(CHUNK_COSTS),
                  "(PP-1)(F+B+W) counts W twice: the report's B already includes it")],
    }[name]
    return _number(expected, wrong, f"substitute PP=8, F=2, B=4, W=2, FB=5 into the "
                                    f"report's {name} bubble")


def zb_costs_check(value) -> Verdict:
    expected = (CHUNK_COSTS[F], CHUNK_COSTS[B] - CHUNK_COSTS[W], CHUNK_COSTS[W])
    if not isinstance(value, (tuple, list)) or len(value) != 3 or \
            any(as_real(x) is None for x in value):
        return Verdict(False, "expected a tuple of three numbers (t_f, t_b, t_w)")
    got = tuple(as_real(x) for x in value)
    if got == tuple(float(x) for x in expected):
        return Verdict(True, "correct: the Zero Bubble paper's t_b is B - W")
    if got == (CHUNK_COSTS[F], CHUNK_COSTS[B], CHUNK_COSTS[W]):
        return Verdict(False, "t_b is the input-gradient backward only: the report's full B "
                              "is t_b + t_w")
    return Verdict(False, f"{tuple(value)} is not right: t_f = F, t_w = W, and t_b + t_w = B")


def _dualpipe_simulated():
    S = 2 * DUALPIPE_RANKS
    schedule = dualpipe_v(DUALPIPE_RANKS, DUALPIPE_M)
    f, b, w, fb = (CHUNK_COSTS[x] for x in (F, B, W, FB))
    right = max(simulate(schedule, [f] * S, [b - w] * S, [w] * S, t_fb=[fb] * S).idle)
    per_rank = max(simulate(schedule, f, b - w, w, t_fb=fb).idle)
    full_b = max(simulate(schedule, [f] * S, [b] * S, [w] * S, t_fb=[fb] * S).idle)
    return _number(right, [
        (per_rank, f"{per_rank}: a number is one rank's share, split over its two chunks, "
                   f"so every chunk cost half; pass a list with each stage's cost"),
        (full_b, f"{full_b}: the simulator's t_b is the input-gradient part (B - W) when the "
                 f"schedule splits backwards, not the full B")],
        "simulate dualpipe_v(4, 16) with per-stage lists and take max(timeline.idle)")


# -- Part C: a schedule under a memory budget -------------------------------------------------
def _candidates(t_fb):
    out = {}
    for name in CANDIDATES:
        schedule = build(name, PICK_P, PICK_M, 2 if name == "interleaved" else 1)
        timeline = simulate(schedule, PICK_COST, PICK_COST, PICK_COST,
                            t_fb=Fraction(t_fb) if schedule.fused else None)
        peak = max(timeline.peak_activations)
        out[name] = (timeline.makespan, Fraction(peak, schedule.chunks), peak)
    return out


def _best(budget, t_fb, memory=lambda c: c[1]):
    fitting = [(c[0], name) for name, c in _candidates(t_fb).items()
               if memory(c) <= Fraction(budget)]
    return min(fitting)[1] if fitting else None


def pick_diagnosis(value, budget, t_fb) -> Verdict:
    if value is not None and value not in CANDIDATES:
        return Verdict(False, f"expected one of {list(CANDIDATES)} or None, got {value!r}")
    expected = _best(budget, t_fb)
    if value == expected:
        return Verdict(True, "correct")
    candidates = _candidates(t_fb)
    if value is not None and candidates[value][1] > Fraction(budget):
        return Verdict(False, f"{value} needs {candidates[value][1]} stage-activations, over "
                              f"the budget: the fastest schedule is no use if it does not fit")
    if value == _best(budget, t_fb, memory=lambda c: c[2]):
        return Verdict(False, f"{value} fits, but a faster one fits too: a chunk of a "
                              f"two-chunk schedule is half a stage, so count its activations "
                              f"half")
    if value is None:
        return Verdict(False, "some candidate fits the budget")
    return Verdict(False, f"{value} fits, but is not the fastest that does: compare the "
                          f"simulated makespans")


def pick_check(budget, t_fb=PICK_FB):
    return lambda value: pick_diagnosis(value, budget, t_fb)


def hidden_pick_check(value) -> Verdict:
    if not isinstance(value, list) or len(value) != len(HIDDEN_BUDGETS):
        return Verdict(False, "expected one answer per hidden budget")
    for answer, (budget, t_fb) in zip(value, HIDDEN_BUDGETS):
        verdict = pick_diagnosis(answer, budget, t_fb)
        if not verdict.passed:
            return Verdict(False, f"another budget or F&B cost: {verdict.message}")
    return Verdict(True, f"correct on all {len(HIDDEN_BUDGETS)} hidden budgets")


# -- Part D: the interview answer --------------------------------------------------------------
# A factor that is neither right nor a known mistake is shown with what it gives for
# GPT-3's p=8 with v=4 chunks, where "v=2 only" claims stand out.
AT_GPT3_V4 = dict(symbols={x.name: x for x in SYMBOLS},
                  evaluate=lambda x: x.subs({p: 8, v: 4}), where="at p=8, v=4")


# 1F1B's bubble over interleaving's, both from the formulas; and the messages of all ranks:
# v p - 1 stage boundaries instead of p - 1, each crossed by one activation and one gradient.
BUBBLE_FACTOR = sp.simplify(formulas.bubble_time("1f1b")
                            / (formulas.interleaved_time() - formulas.ideal_time()))
TOTAL_FACTOR = (v * p - 1) / (p - 1)
HALF = "'about half' is the case v=2 only: with v chunks the fill and drain are v times " \
       "shorter"
DOUBLE = "'doubles' is the case v=2 only: each of the v chunks sends its own activations " \
         "and gradients"


def gpt3_check(value) -> Verdict:
    if not isinstance(value, dict) or set(value) != set(GPT3):
        return Verdict(False, f"expected a dict with exactly the keys {sorted(GPT3)}")
    for key, (name, values, claimed, digits) in GPT3.items():
        want = formulas.evaluate(formulas.bubble_fraction(name), **values)
        got = as_real(value[key])
        if got is None:
            return Verdict(False, f"{key}: expected a number")
        if abs(got - float(want)) <= 1e-9:
            continue
        overhead = formulas.evaluate(formulas.bubble_overhead(name), **values)
        if abs(got - float(overhead)) <= 1e-9:
            return Verdict(False, f"{key}: {value[key]} is bubble/T_ideal = (p-1)/(vm); the "
                                  f"answer's figures are shares of the step, bubble/T")
        if abs(got - claimed / 100) <= 1e-9:
            return Verdict(False, f"{key}: {value[key]} is the answer's rounded claim; give "
                                  f"the exact fraction bubble/T")
        return Verdict(False, f"{key}: {value[key]} is not bubble/T for this schedule")
    return Verdict(True, "correct")


def wrong_claims_check(value) -> Verdict:
    if not isinstance(value, (set, frozenset, list, tuple)) or not set(value) <= set(GPT3):
        return Verdict(False, f"expected a set of keys from {sorted(GPT3)}")
    expected = set()
    for key, (name, values, claimed, digits) in GPT3.items():
        share = formulas.evaluate(formulas.bubble_fraction(name), **values)
        if round(100 * float(share), digits) != claimed:
            expected.add(key)
    value = set(value)
    if value == expected:
        return Verdict(True, "correct: two rounding slips, the figures themselves are "
                             "bubble/T")
    if "gpipe" in value:
        return Verdict(False, "30 % is right to the percent (7/23 is 30.4 %)")
    return Verdict(False, "incomplete: compare each exact share with the claim, rounded as "
                          "the claim is written")



CHECKS = {
    "zb_p4_m8": schedule_check(4, 8),
    "zb_p3_m5": schedule_check(3, 5),
    "zb_hidden": hidden_schedules_check,
    "own_zb_h1": own_implementation_check,
    "zb_idle": _lazy(lambda: _idle_checks()[0]),
    "one_f_one_b_idle": _lazy(lambda: _idle_checks()[1]),
    "zb_executor": executor_check,
    "zb1p_bubble": formula_check(TABLE["zb1p"]["bubble"], ZB1P_MISCONCEPTIONS,
                                 **AT_CHUNK_COSTS),
    "dualpipe_bubble": formula_check(TABLE["dualpipe"]["bubble"], DUALPIPE_MISCONCEPTIONS,
                                     **AT_CHUNK_COSTS),
    "one_f_one_b_ms": number_b("1f1b"),
    "zb1p_ms": number_b("zb1p"),
    "dualpipe_ms": number_b("dualpipe"),
    "zb_paper_costs": zb_costs_check,
    "dualpipe_simulated": _lazy(_dualpipe_simulated),
    "pick_4": pick_check(4),
    "pick_4_5": pick_check(Fraction(9, 2)),
    "pick_hidden": hidden_pick_check,
    "bubble_factor": formula_check(BUBBLE_FACTOR, [
        (2, HALF), (1 / v, "upside down: interleaving divides the bubble by v")], **AT_GPT3_V4),
    "messages_factor_middle": formula_check(v, [
        (2, DOUBLE),
        (TOTAL_FACTOR, "that is all ranks together; a middle rank sends v times as many")],
        **AT_GPT3_V4),
    "messages_factor_total": formula_check(TOTAL_FACTOR, [
        (v, "v is right for a middle rank; the first and last ranks start sending gradients "
            "or activations from their extra chunks, so all together send (vp-1)/(p-1) times "
            "as many (vp-1 stage boundaries instead of p-1)"),
        (2, DOUBLE)], **AT_GPT3_V4),
    "gpt3_bubbles": gpt3_check,
    "wrong_claims": wrong_claims_check,
}

GRADE_CELLS = {
    "test_zb_visible": ["zb_p4_m8", "zb_p3_m5"],
    "test_zb_hidden": ["zb_hidden", "own_zb_h1"],
    "test_zb_idle": ["zb_idle", "one_f_one_b_idle"],
    "test_zb_executor": ["zb_executor"],
    "test_b_formulas": ["zb1p_bubble", "dualpipe_bubble"],
    "test_b_numbers": ["one_f_one_b_ms", "zb1p_ms", "dualpipe_ms"],
    "test_b_costs": ["zb_paper_costs"],
    "test_b_simulated": ["dualpipe_simulated"],
    "test_pick_visible": ["pick_4", "pick_4_5"],
    "test_pick_hidden": ["pick_hidden"],
    "test_d_factors": ["bubble_factor", "messages_factor_middle", "messages_factor_total"],
    "test_d_gpt3": ["gpt3_bubbles", "wrong_claims"],
}

check = make_checker(CHECKS, symbols=SYMBOLS)
