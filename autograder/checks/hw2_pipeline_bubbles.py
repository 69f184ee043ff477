"""Checks of hw2_pipeline_bubbles: GPipe timing, the three bubble quantities, 1F1B.

Every expected value is computed from :mod:`paralab` (formulas, simulator, executor), and so
is every *wrong* value a known misconception produces: when a student's answer equals one of
those, the feedback names the misconception instead of just saying "wrong".
"""

from __future__ import annotations


import sympy as sp

from autograder.checks import (Probe, Verdict, as_integer, as_real, each_size, formula_check,
                               make_checker, originality)
from paralab import formulas
from paralab.formulas import evaluate
from paralab.schedules import Schedule, ScheduleError, gpipe, validate
from paralab.schedules import one_f_one_b as reference_one_f_one_b
from paralab.simulator import DeadlockError, simulate

# Answers are parsed with the formulas' own symbols (same names and assumptions), so that
# simplify() can cancel the student's expression against the reference.
p, m, t_f, t_b = (formulas.SYMBOLS[name] for name in ("p", "m", "t_f", "t_b"))
SYMBOLS = [p, m, t_f, t_b]

HOMEWORK = dict(p=4, m=8, t_f=2, t_b=4)
HOMEWORK_16 = dict(HOMEWORK, m=16)

# Inputs of the hidden schedule tests (small and edge cases: one rank, one microbatch,
# fewer microbatches than ranks, odd sizes).
HIDDEN_SIZES = [(1, 1), (1, 3), (2, 1), (3, 2), (4, 4), (5, 7), (3, 9), (6, 4)]
GRADIENT_SIZES = (4, 8)

ALLOWED_GAINS = {"bubble_at_equal_m", "peak_activation_memory", "allows_larger_m",
                 "communication_volume"}


# -- numbers -----------------------------------------------------------------------------
def _is(value, target, rel=1e-6) -> bool:
    """``value`` equals ``target`` up to ``rel`` (misconceptions use a looser ``rel`` so that
    0.273 is recognised as 3/11)."""
    x = as_real(value)
    return x is not None and abs(x - float(target)) <= rel * max(1.0, abs(float(target)))


GPIPE_HINT = "derive it from fill + steady state + drain (lecture 02, section 2)"


def number_check(expected, misconceptions, hint=GPIPE_HINT):
    """``expected`` exactly (floats to 6 digits); known wrong values get their message,
    other wrong values ``hint`` (what to do for *this* question)."""
    def check(value) -> Verdict:
        if as_real(value) is None:
            return Verdict(False, f"expected a number, got {type(value).__name__}")
        if _is(value, expected):
            return Verdict(True, "correct")
        for wrong, message in misconceptions:
            if _is(value, wrong, rel=5e-3):
                return Verdict(False, message)
        return Verdict(False, f"{value} is not right; {hint}")
    return check


def timing_checks(values: dict) -> dict:
    total = evaluate(formulas.gpipe_time(), **values)
    ideal = evaluate(formulas.ideal_time(), **values)
    forward_phase = evaluate(formulas.gpipe_time().subs(t_b, 0), **values)
    backward_phase = evaluate(formulas.gpipe_time().subs(t_f, 0), **values)
    bubble = evaluate(formulas.bubble_time("gpipe"), **values)
    one_slot_too_many = evaluate((m + p) * (t_f + t_b), **values)
    all_work = evaluate(p * m * (t_f + t_b), **values)
    total_msgs = [
        (ideal, f"{ideal} is T_ideal = m(t_f+t_b): the fill and the drain add p-1 slots of "
                f"t_f+t_b that the ideal time does not have"),
        (forward_phase, f"{forward_phase} is only the forward phase (m+p-1) t_f; GPipe then "
                        f"runs every backward, which take (m+p-1) t_b more"),
        (backward_phase, f"{backward_phase} is only the backward phase (m+p-1) t_b"),
        (one_slot_too_many, f"{one_slot_too_many} = (m+p)(t_f+t_b) counts one slot too many: "
                            f"the fill is p-1 slots, not p"),
        (bubble, f"{bubble} is the bubble (p-1)(t_f+t_b), the idle time, not the step time"),
        (all_work, f"{all_work} = p m (t_f+t_b) is the work of all ranks added up, as if "
                   f"the stages never ran at the same time"),
    ]
    ideal_msgs = [
        (total, f"{total} is T_total; the ideal time has no fill or drain: m(t_f+t_b)"),
        (all_work, f"{all_work} adds up all p ranks; T_ideal is one rank's own work, "
                   f"m(t_f+t_b)"),
    ]
    ratio = total / ideal
    ratio_msgs = [
        (bubble / ideal, f"{float(bubble / ideal):g} is bubble/T_ideal = (p-1)/m, a different "
                         f"quantity also called 'bubble ratio' (Megatron-LM's); this question "
                         f"asks for T_total/T_ideal"),
        (bubble / total, f"{float(bubble / total):.4g} is bubble/T_total = (p-1)/(m+p-1), the "
                         f"idle share (GPipe paper's 'bubble'); this question asks for "
                         f"T_total/T_ideal"),
        (ideal / total, f"{float(ideal / total):.4g} is T_ideal/T_total: the ratio upside down"),
    ]
    return {"total": number_check(total, total_msgs), "ideal": number_check(ideal, ideal_msgs),
            "ratio": number_check(ratio, ratio_msgs)}


# -- formulas -----------------------------------------------------------------------------
# A formula that is neither right nor a known mistake is shown with what it gives here.
AT_HOMEWORK = dict(symbols=formulas.SYMBOLS, evaluate=lambda x: evaluate(x, **HOMEWORK),
                   where="at the homework's p=4, m=8, t_f=2, t_b=4")


T_TOTAL = formulas.gpipe_time()
T_IDEAL = formulas.ideal_time()
QUANTITIES = {
    "time_ratio": formulas.time_ratio("gpipe"),
    "bubble_overhead": formulas.bubble_overhead("gpipe"),
    "bubble_fraction": formulas.bubble_fraction("gpipe"),
}
_DESCRIBE = {
    "time_ratio": "T_total/T_ideal = (m+p-1)/m",
    "bubble_overhead": "bubble/T_ideal = (p-1)/m",
    "bubble_fraction": "bubble/T_total = (p-1)/(m+p-1)",
}


def quantity_formula_check(name):
    others = [(expr, f"that is {_DESCRIBE[other]}, a different quantity also called 'bubble "
                     f"ratio'; {name} is {_DESCRIBE[name].split(' = ')[0]}")
              for other, expr in QUANTITIES.items() if other != name]
    return formula_check(QUANTITIES[name], others, **AT_HOMEWORK)


def quantities_p4_m8(value) -> Verdict:
    if not isinstance(value, dict) or set(value) != set(QUANTITIES):
        return Verdict(False, f"expected a dict with exactly the keys {sorted(QUANTITIES)}")
    expected = {k: evaluate(e, p=4, m=8) for k, e in QUANTITIES.items()}
    for key, want in expected.items():
        if not _is(value[key], want):
            swapped = [k for k, w in expected.items()
                       if k != key and _is(value[key], w, rel=5e-3)]
            if swapped:
                return Verdict(False, f"{key}: {value[key]} is the value of {swapped[0]} "
                                      f"({_DESCRIBE[swapped[0]]}) - the three are easy to mix "
                                      f"up; {key} is {_DESCRIBE[key]}")
            return Verdict(False, f"{key}: {value[key]} is not right")
    return Verdict(True, "correct: three different numbers, all called 'bubble ratio'")


def min_m_check(value) -> Verdict:
    target = sp.Rational(1, 20)
    expected = formulas.min_microbatches(4, target, "bubble_fraction")
    value = as_integer(value)
    if value is None:
        return Verdict(False, "expected a whole number of microbatches")
    if value == expected:
        return Verdict(True, "correct")
    if value == formulas.min_microbatches(4, target, "bubble_overhead"):
        return Verdict(False, f"m={value} makes bubble/T_ideal <= 5%; the question asks for "
                              f"the idle share bubble/T_total, which is smaller for the same m")
    share = evaluate(QUANTITIES["bubble_fraction"], p=4, m=value) if value > 0 else None
    if share is not None and share > target:
        return Verdict(False, f"with m={value} the idle share is {share} > 1/20")
    return Verdict(False, f"m={value} works but is not the smallest m that does")


# -- 1F1B and friends ---------------------------------------------------------------------
def peak_check(schedule_name):
    expected = [int(evaluate(formulas.peak_activations(schedule_name, r), p=4, m=8))
                for r in range(4)]
    gpipe_peak = [int(evaluate(formulas.peak_activations("gpipe", r), p=4, m=8))
                  for r in range(4)]

    def check(value) -> Verdict:
        if not isinstance(value, (list, tuple)) or len(value) != 4:
            return Verdict(False, "expected a list of 4 numbers, one per rank 0..3")
        value = [as_integer(x) if as_integer(x) is not None else x for x in value]
        if value == expected:
            return Verdict(True, "correct")
        if schedule_name == "1f1b":
            if value == [expected[0]] * len(expected):
                return Verdict(False, f"{value} gives every rank the first stage's p = "
                                      f"{expected[0]} microbatches; rank r holds only p-r: a "
                                      f"later stage gets its first gradient sooner, after a "
                                      f"shorter warm-up, so it frees activations earlier")
            if value == [8 // 4] * 4:
                return Verdict(False, "m/p = 2 per rank is a common claim, and wrong: rank r "
                                      "runs p-r-1 warm-up forwards plus one more before its "
                                      "first backward frees anything, so it holds p-r, "
                                      "whatever m is")
            if value == gpipe_peak:
                return Verdict(False, "that is GPipe's memory (all m microbatches); 1F1B "
                                      "starts backwards early")
            if value == expected[::-1]:
                return Verdict(False, "reversed: the FIRST stage holds the most (its warm-up "
                                      "is the longest), the last stage only one")
            if value == [x - 1 for x in expected]:
                return Verdict(False, "that counts only the warm-up forwards; the first "
                                      "forward of the steady state also runs before the "
                                      "first backward")
        if schedule_name == "gpipe" and value != gpipe_peak:
            return Verdict(False, f"{value} is not GPipe's: every rank runs all m forwards "
                                  f"before its first backward, so it holds all m "
                                  f"microbatches at once")
        return Verdict(False, f"{value} is not right; simulate the schedule and look at "
                              f"Timeline.peak_activations")
    return check


def gains_check(value) -> Verdict:
    if not isinstance(value, (set, frozenset, list, tuple)) or not set(value) <= ALLOWED_GAINS:
        return Verdict(False, f"expected a set of names from {sorted(ALLOWED_GAINS)}")
    value = set(value)
    if "bubble_at_equal_m" in value:
        return Verdict(False, "at equal m, 1F1B's bubble is exactly GPipe's (p-1)(t_f+t_b): "
                              "the claim that 1F1B shrinks the bubble is a known error of the "
                              "source material")
    if "communication_volume" in value:
        return Verdict(False, "1F1B sends exactly the same activations and gradients as GPipe, "
                              "only in a different order")
    if value != {"peak_activation_memory", "allows_larger_m"}:
        return Verdict(False, "incomplete: what does 1F1B change, and what does that allow?")
    return Verdict(True, "correct: less memory, which lets you raise m - and that shrinks "
                         "the bubble")


def same_bubble_check(value) -> Verdict:
    """(GPipe bubble fraction, 1F1B bubble fraction) for p=4, m=8."""
    expected = [simulate(s(4, 8), 2, 4).bubble_fraction for s in (gpipe, reference_one_f_one_b)]
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        return Verdict(False, "expected a pair (GPipe's, 1F1B's)")
    if all(_is(v, e) for v, e in zip(value, expected)):
        return Verdict(True, "correct: the same bubble")
    if _is(value[1], QUANTITIES["bubble_overhead"].subs({p: 4, m: 8}), rel=5e-3):
        return Verdict(False, "(p-1)/m for 1F1B next to (p-1)/(m+p-1) for GPipe compares two "
                              "different quantities, not two schedules (a known error of the "
                              "source material); at equal m both have bubble/T = (p-1)/(m+p-1)")
    return Verdict(False, f"{value} is not right; both schedules have the same idle time")


# -- the student's 1F1B generator -----------------------------------------------------------
def diagnose_schedule(value, p_value, m_value) -> Verdict:
    if not isinstance(value, Schedule):
        return Verdict(False, f"one_f_one_b must return a paralab Schedule, got "
                              f"{type(value).__name__}")
    if (value.num_ranks, value.num_microbatches) != (p_value, m_value):
        return Verdict(False, f"one_f_one_b({p_value}, {m_value}) returned a schedule for "
                              f"{value.num_ranks} ranks and {value.num_microbatches} "
                              f"microbatches")
    try:
        validate(value)
        timeline = simulate(value, 2, 4)
    except DeadlockError as e:
        return Verdict(False, f"one_f_one_b({p_value}, {m_value}) deadlocks: {e}")
    except ScheduleError as e:
        return Verdict(False, f"one_f_one_b({p_value}, {m_value}) is not a valid schedule: {e}")
    expected = reference_one_f_one_b(p_value, m_value)
    if value.orders == expected.orders:
        return Verdict(True, "correct")
    peaks = [int(evaluate(formulas.peak_activations("1f1b", r), p=p_value, m=m_value))
             for r in range(p_value)]
    if value.orders == gpipe(p_value, m_value).orders or (
            timeline.peak_activations == [m_value] * p_value and m_value > 1 and p_value > 1):
        return Verdict(False, f"no forward/backward interleaving: this is GPipe's order, "
                              f"peak activations are m={m_value} on every rank, not p-r "
                              f"{peaks}")
    if timeline.peak_activations != peaks:
        return Verdict(False, f"valid, but rank peaks {timeline.peak_activations} are not "
                              f"1F1B's p-r {peaks}: check the warm-up length p-r-1")
    for r, (got, want) in enumerate(zip(value.to_strings(), expected.to_strings())):
        if got != want:
            step = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
            return Verdict(False, f"valid and as memory-frugal as 1F1B, but rank {r} differs "
                                  f"from the Megatron order at step {step}: run backwards in "
                                  f"microbatch order, one per forward in the steady state")
    return Verdict(False, "the schedule differs from 1F1B")


def schedule_check(p_value, m_value):
    return lambda value: diagnose_schedule(value, p_value, m_value)


hidden_schedules_check = each_size(diagnose_schedule, HIDDEN_SIZES)


def executor_check(value) -> Verdict:
    """Run the recorded schedule on real processes; gradients must equal one process's."""
    p_value, m_value = GRADIENT_SIZES
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
    expected = simulate(value, 1, 2).peak_activations
    if result.peak_activations != expected:
        return Verdict(False, f"measured peaks {result.peak_activations} differ from the "
                              f"simulated {expected}")
    return Verdict(True, f"ran on {p_value} processes: gradients equal a single process's, "
                         f"measured peak activations {result.peak_activations}")


ORIGINALITY_SIZE = (5, 7)

# The library's schedule generators: the reference answer of part D.
REFERENCE_GENERATORS = tuple(f"paralab.schedules:{name}" for name in (
    "gpipe", "one_f_one_b", "interleaved_one_f_one_b", "zb_h1", "build"))

PROBES = {
    # one_f_one_b run once more, in a fresh process where the library's generators raise
    # ReferenceUnavailable: the order must be the student's own.  Everything else of the
    # library (simulate, validate, the plots) works as usual there.
    "own_implementation": Probe(cells=("setup", "d"),
                                call="one_f_one_b(*checks.ORIGINALITY_SIZE)",
                                unavailable=REFERENCE_GENERATORS),
}


own_implementation_check = originality(
    lambda value: diagnose_schedule(value, *ORIGINALITY_SIZE),
    "one_f_one_b must build the order itself, not call the library's schedule generators")


_T16 = timing_checks(HOMEWORK_16)
_T8 = timing_checks(HOMEWORK)

CHECKS = {
    "T_total": _T8["total"],
    "T_ideal": _T8["ideal"],
    "time_ratio": _T8["ratio"],
    "T_total_16": _T16["total"],
    "T_ideal_16": _T16["ideal"],
    "time_ratio_16": _T16["ratio"],
    "T_total_formula": formula_check(T_TOTAL, [
        (T_IDEAL, "that is T_ideal; the fill and drain add (p-1)(t_f+t_b)"),
        ((m + p) * (t_f + t_b), "(m+p)(t_f+t_b) counts one slot too many: the fill is p-1 "
                                "slots"),
        (formulas.bubble_time("gpipe"), "that is the bubble alone, not the step time"),
        (T_IDEAL + (p - 1) * t_f, "that leaves out the drain: after the last forward, the "
                                  "last microbatch's backward still crosses p-1 stages, "
                                  "(p-1) t_b"),
        (T_IDEAL + (p - 1) * t_b, "that leaves out the fill: the last stage waits (p-1) t_f "
                                  "for microbatch 0's forward to reach it"),
        ((m + p - 1) * t_f, "that is only the forward phase; GPipe then runs every "
                            "backward, (m+p-1) t_b more")], **AT_HOMEWORK),
    "T_ideal_formula": formula_check(T_IDEAL, [
        (T_TOTAL, "that is T_total; the ideal has no fill or drain")], **AT_HOMEWORK),
    "time_ratio_formula": quantity_formula_check("time_ratio"),
    "bubble_overhead_formula": quantity_formula_check("bubble_overhead"),
    "bubble_fraction_formula": quantity_formula_check("bubble_fraction"),
    "quantities_p4_m8": quantities_p4_m8,
    "min_m_5_percent": min_m_check,
    "one_f_one_b_T_total": number_check(
        evaluate(formulas.one_f_one_b_time(), **HOMEWORK),
        [(evaluate(formulas.ideal_time(), **HOMEWORK),
          "1F1B does not remove the bubble: it has the same fill and drain as GPipe"),
         (evaluate(formulas.interleaved_time(), **HOMEWORK, v=2),
          "that is the INTERLEAVED schedule with v=2; plain 1F1B has GPipe's step time"),
         (evaluate(formulas.ideal_time() + (p - 1) * t_f, **HOMEWORK),
          "(p-1) t_f + m (t_f+t_b) leaves out the drain: after the last forward, the last "
          "microbatch's gradient still takes (p-1) t_b to flow back to stage 0")],
        hint="1F1B reorders GPipe's work without changing its dependencies: simulate "
             "schedules.one_f_one_b(4, 8) with t_f=2, t_b=4 and read the makespan"),
    "same_bubble": same_bubble_check,
    "peak_gpipe": peak_check("gpipe"),
    "peak_1f1b": peak_check("1f1b"),
    "interleaved_T_total": number_check(
        evaluate(formulas.interleaved_time(), **HOMEWORK, v=2),
        [(evaluate(formulas.gpipe_time(), **HOMEWORK),
          "that is the non-interleaved time; with v chunks the fill and drain are v times "
          "shorter"),
         (evaluate(formulas.gpipe_time(), **HOMEWORK) / 2,
          "interleaving does not halve the whole step: the work m(t_f+t_b) stays, only the "
          "bubble (p-1)(t_f+t_b) is divided by v"),
         (evaluate(formulas.ideal_time(), **HOMEWORK),
          "interleaving shrinks the bubble, it does not remove it: (p-1)(t_f+t_b)/v remains")],
        hint="with v=2 each chunk costs t_f/2 and t_b/2: simulate "
             "schedules.interleaved_one_f_one_b(4, 8, 2) with t_f=2, t_b=4"),
    "one_f_one_b_gains": gains_check,
    "schedule_p4_m8": schedule_check(4, 8),
    "schedule_p2_m3": schedule_check(2, 3),
    "schedules_hidden": hidden_schedules_check,
    "own_implementation": own_implementation_check,
    "executor_p4_m8": executor_check,
}
# executor_check runs the recorded schedule on 4 real ranks: the clean re-check starts
# the launcher's forkserver while the notebooks still run (autograder/recheck.py)
STARTS_WORLDS = True

GRADE_CELLS = {
    "test_T_total": ["T_total"],
    "test_T_ideal": ["T_ideal"],
    "test_time_ratio": ["time_ratio"],
    "test_m16": {"T_total_16": 2, "T_ideal_16": 1, "time_ratio_16": 1},
    "test_T_formulas": {"T_total_formula": 2, "T_ideal_formula": 1},
    "test_quantity_formulas": ["time_ratio_formula", "bubble_overhead_formula",
                               "bubble_fraction_formula"],
    "test_quantities_p4_m8": ["quantities_p4_m8"],
    "test_min_m": ["min_m_5_percent"],
    "test_one_f_one_b_time": ["one_f_one_b_T_total", "same_bubble"],
    "test_peaks": ["peak_gpipe", "peak_1f1b"],
    "test_interleaved": ["interleaved_T_total"],
    "test_gains": ["one_f_one_b_gains"],
    "test_schedule_visible": ["schedule_p4_m8", "schedule_p2_m3"],
    "test_schedule_hidden": ["schedules_hidden", "own_implementation"],
    "test_schedule_executor": ["executor_p4_m8"],
}

check = make_checker(CHECKS, symbols=SYMBOLS)
