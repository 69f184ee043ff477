"""hw6's checks: right answers pass, and each known misconception is named (run on values,
no notebook; the graded end-to-end behaviour is in tests/test_grading_homework.py)."""

from fractions import Fraction
from pathlib import Path

import jupytext
import pytest
import sympy as sp

from autograder.checks import Raised, encode, run_check
from autograder.checks import hw6_beyond_1f1b as hw6
from autograder.mutants import hw6_beyond_1f1b as mutants
from paralab import schedules
from paralab.schedules import Action, Schedule

ROOT = Path(__file__).resolve().parents[1]
# Plain symbols, as a student builds them (other assumptions than the references').
PP, F, B, W, FB, p, v = sp.symbols("PP F B W FB p v", positive=True)


def verdict(key, value):
    """The check as the grader runs it: on the recorded and decoded answer."""
    return run_check(hw6.CHECKS, key, encode(value), hw6.SYMBOLS)


def test_every_test_cell_has_checks_and_every_check_is_used():
    notebook = jupytext.read(ROOT / "solutions" / "hw6_beyond_1f1b" / "hw6_beyond_1f1b.pct.py")
    cells = {c.metadata["nbgrader"]["grade_id"] for c in notebook.cells
             if c.metadata.get("nbgrader", {}).get("grade")}
    assert set(hw6.GRADE_CELLS) == cells
    assert {k for keys in hw6.GRADE_CELLS.values() for k in keys} == set(hw6.CHECKS)
    assert set(hw6.PROBES) <= set(hw6.CHECKS)


def test_the_misconception_orders_are_built_by_the_rule_zb_h1_follows():
    for p_value in range(1, 7):
        for m_value in range(1, 12):
            assert hw6.w_placed(p_value, m_value, lambda r: r).orders == \
                schedules.zb_h1(p_value, m_value).orders


# -- part A ---------------------------------------------------------------------------------
def test_the_library_order_passes_everywhere():
    assert verdict("zb_p4_m8", schedules.zb_h1(4, 8)).passed
    assert verdict("zb_p3_m5", schedules.zb_h1(3, 5)).passed
    assert verdict("zb_hidden", [schedules.zb_h1(a, b) for a, b in hw6.HIDDEN_SIZES]).passed
    assert verdict("own_zb_h1", schedules.zb_h1(*hw6.ORIGINALITY_SIZE)).passed


@pytest.mark.parametrize("owe,phrase", [
    (lambda r: 0, "every W runs right after its B"),
    (lambda r: None, "every W postponed to the end"),
    (lambda r: r + 1, "up to r+1 W's wait"),
    (lambda r: max(r - 1, 0), "up to r-1 W's wait"),
])
def test_misplaced_ws_are_named(owe, phrase):
    got = verdict("zb_p4_m8", hw6.w_placed(4, 8, owe))
    assert not got.passed and phrase in got.message


def test_other_wrong_orders_are_explained():
    no_w = verdict("zb_p4_m8", schedules.one_f_one_b(4, 8))
    assert "there is no W" in no_w.message
    gpipe_with_w = Schedule(tuple(tuple(list(row) + [Action("W", i, r) for i in range(8)])
                                  for r, row in enumerate(schedules.gpipe(4, 8).orders)), 8, 4)
    assert "not in 1F1B's order" in verdict("zb_p4_m8", gpipe_with_w).message
    swapped = [list(row) for row in schedules.zb_h1(4, 8).orders]
    k = next(i for i, a in enumerate(swapped[3]) if a.op == "W")
    swapped[3][k], swapped[3][k + 1] = swapped[3][k + 1], swapped[3][k]
    got = verdict("zb_p4_m8", Schedule(tuple(map(tuple, swapped)), 8, 4))
    assert "rank 3 differs from ZB-H1 at step" in got.message
    rows = [list(row) for row in schedules.zb_h1(4, 8).orders]
    rows[0].pop()  # rank 0's last W
    broken = verdict("zb_p4_m8", Schedule(tuple(map(tuple, rows)), 8, 4))
    assert "not a valid schedule: 0W7 is missing" in broken.message
    assert "returned a schedule for 2 ranks" in verdict("zb_p4_m8", schedules.zb_h1(2, 8)).message


def test_delegating_is_refused_by_the_probe():
    raised = Raised("ReferenceUnavailable", "paralab.schedules.zb_h1 is not available here")
    got = run_check(hw6.CHECKS, "own_zb_h1", encode(raised), hw6.SYMBOLS)
    assert not got.passed and "must build the order itself" in got.message


def test_idle_times():
    assert verdict("zb_idle", 6).passed and verdict("one_f_one_b_idle", 18).passed
    assert "1F1B's idle time" in verdict("zb_idle", 18).message
    assert "ZB-H2's bubble" in verdict("zb_idle", 0).message
    assert "W's do not fill the gaps" in verdict("zb_idle", 12).message
    assert "leaves W out" in verdict("one_f_one_b_idle", 12).message


# -- part B ------------------------------------------------------------------------------------
def test_the_report_formulas_in_any_form():
    assert verdict("zb1p_bubble", (PP - 1) * F + (PP - 1) * (B - 2 * W)).passed
    assert verdict("dualpipe_bubble", (PP - 2) * (FB + B - 3 * W) / 2).passed
    assert "takes B as the input-gradient part" in \
        verdict("zb1p_bubble", (PP - 1) * (F + B - W)).message
    assert "one-direction pipeline's count" in \
        verdict("dualpipe_bubble", (PP - 1) * (FB + B - 3 * W)).message
    assert "not F" in verdict("dualpipe_bubble", (PP / 2 - 1) * (F + B - 3 * W)).message
    assert "got a number" in verdict("zb1p_bubble", 14).message


@pytest.mark.parametrize("key,right,wrong,phrase", [
    ("one_f_one_b_ms", 42, 56, "counts W twice"),
    ("zb1p_ms", 14, 28, "takes B as the input-gradient part"),
    ("zb1p_ms", 14, 0, "input-gradient part (B-W)"),
    ("dualpipe_ms", 9, 21, "one-direction pipeline's count"),
])
def test_the_report_numbers(key, right, wrong, phrase):
    assert verdict(key, right).passed and verdict(key, float(right)).passed
    got = verdict(key, wrong)
    assert not got.passed and phrase in got.message


def test_costs_in_the_zero_bubble_papers_notation():
    assert verdict("zb_paper_costs", (2, 2, 2)).passed
    assert "input-gradient backward only" in verdict("zb_paper_costs", (2, 4, 2)).message


def test_dualpipe_simulated():
    assert verdict("dualpipe_simulated", 9).passed
    assert "one rank's share" in verdict("dualpipe_simulated", Fraction(9, 2)).message


# -- part C ------------------------------------------------------------------------------------
def test_picking_a_schedule():
    assert verdict("pick_4", "zb-v").passed and verdict("pick_4_5", "dualpipev").passed
    assert "over the budget" in verdict("pick_4", "dualpipev").message
    assert "count its activations half" in verdict("pick_4", "zb-h1").message
    assert "not the fastest" in verdict("pick_4", "1f1b").message
    assert "expected one of" in verdict("pick_4", "zb-h3").message
    answers = [hw6._best(b, f) for b, f in hw6.HIDDEN_BUDGETS]
    assert None in answers and len(set(answers)) == 3   # the hidden budgets tell them apart
    assert verdict("pick_hidden", answers).passed


# -- part D ------------------------------------------------------------------------------------
def test_interleaving_factors():
    assert verdict("bubble_factor", v).passed and verdict("messages_factor_middle", v).passed
    assert verdict("messages_factor_total", (v * p - 1) / (p - 1)).passed
    assert "the case v=2 only" in verdict("bubble_factor", 2).message
    assert "the case v=2 only" in verdict("messages_factor_middle", 2).message
    assert "v is right for a middle rank" in verdict("messages_factor_total", v).message
    assert "upside down" in verdict("bubble_factor", 1 / v).message
    assert verdict("bubble_factor", v + 1).message == (
        "v + 1 is not equivalent to the right formula: at p=8, v=4 it gives 5, the right one 4")
    assert "expected a formula in v, got a number" in verdict("bubble_factor", 3).message


def test_gpt3_numbers():
    right = {"gpipe": Fraction(7, 23), "1f1b": Fraction(7, 71), "interleaved": Fraction(7, 135)}
    assert verdict("gpt3_bubbles", right).passed
    assert verdict("gpt3_bubbles", {k: float(x) for k, x in right.items()}).passed
    over = {"gpipe": Fraction(7, 16), "1f1b": Fraction(7, 64), "interleaved": Fraction(7, 128)}
    assert "bubble/T_ideal" in verdict("gpt3_bubbles", over).message
    rounded = {**right, "1f1b": 0.098}
    assert "rounded claim" in verdict("gpt3_bubbles", rounded).message
    assert verdict("wrong_claims", {"1f1b", "interleaved"}).passed
    assert "30 % is right" in verdict("wrong_claims", {"gpipe", "1f1b", "interleaved"}).message


def test_mutants_name_only_checks_that_exist():
    for mutant in mutants.MUTANTS:
        assert mutant.fails <= set(hw6.CHECKS), mutant.name


def test_the_probe_takes_every_generator_away_and_leaves_the_rest(tmp_path):
    import os
    import subprocess
    import sys

    from autograder import probes

    (probe,) = hw6.PROBES.values()
    stripped = probes.strip_library(str(ROOT / "paralab"), probe.unavailable,
                                    str(tmp_path / "copy"))
    code = (mutants.COUNTING_AND_CHECKING
            + "\nprint(zb_h1(5, 7).to_strings() == ZB)\n"
            + "for name in ('zb_h1', 'zb_h2', 'zb_v', 'dualpipe_v', 'one_f_one_b', 'build'):\n"
            + "    try:\n        getattr(schedules, name)\n        (getattr(schedules, name)"
            + "(2, 2) if name != 'build' else schedules.build('zb-h1', 2, 2))\n"
            + "    except paralab.ReferenceUnavailable:\n        print('unavailable', name)\n")
    prelude = ("import paralab\nfrom paralab import schedules\n"
               "from paralab.schedules import Action, Schedule, validate\n"
               "from paralab.simulator import simulate\n"
               f"ZB = {schedules.zb_h1(5, 7).to_strings()!r}\n")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(stripped), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True,
                          text=True, env=env, cwd=os.path.dirname(stripped), timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.split("\n")
    assert lines[0] == "True"  # the student's own order, built without the generators
    assert {line.split()[1] for line in lines if line.startswith("unavailable")} == \
        {"zb_h1", "zb_h2", "zb_v", "dualpipe_v", "one_f_one_b", "build"}
