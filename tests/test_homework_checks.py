"""The homework checks: right answers pass, and each known misconception is named.

These run the checks directly on values (no notebook, no grader), so they are fast; the
graded end-to-end behaviour is in tests/test_grading_homework.py.
"""

from fractions import Fraction
from pathlib import Path

import jupytext
import numpy as np
import pytest
import sympy as sp

from autograder import samples
from autograder.checks import Raised, encode, run_check
from autograder.checks import hw1_tensor_parallel as hw1
from autograder.checks import hw2_pipeline_bubbles as hw2
from paralab import launch, schedules, tp
from paralab.schedules import Action, Schedule

ROOT = Path(__file__).resolve().parents[1]
p, m, t_f, t_b = sp.symbols("p m t_f t_b")  # plain symbols, as a student may build them


def grade_ids(assignment):
    notebook = jupytext.read(ROOT / "solutions" / assignment / f"{assignment}.pct.py")
    return {c.metadata["nbgrader"]["grade_id"] for c in notebook.cells
            if c.metadata.get("nbgrader", {}).get("grade")}


@pytest.mark.parametrize("module,assignment", [(hw1, "hw1_tensor_parallel"),
                                               (hw2, "hw2_pipeline_bubbles")])
def test_every_test_cell_has_checks_and_every_check_is_used(module, assignment):
    assert set(module.GRADE_CELLS) == grade_ids(assignment)
    used = {key for keys in module.GRADE_CELLS.values() for key in keys}
    assert used == set(module.CHECKS)


def verdict(module, key, value):
    return module.CHECKS[key](value)


# -- hw2 -------------------------------------------------------------------------------------
@pytest.mark.parametrize("key,value", [
    ("T_total", 66), ("T_ideal", 48), ("time_ratio", 1.375), ("time_ratio", Fraction(11, 8)),
    ("T_total_16", 114), ("T_ideal_16", 96), ("time_ratio_16", 1.1875),
    ("min_m_5_percent", 57), ("one_f_one_b_T_total", 66), ("interleaved_T_total", 57),
    ("peak_gpipe", [8, 8, 8, 8]), ("peak_1f1b", [4, 3, 2, 1]),
    ("same_bubble", (Fraction(3, 11), Fraction(3, 11))),
    ("one_f_one_b_gains", {"peak_activation_memory", "allows_larger_m"}),
])
def test_hw2_right_answers_pass(key, value):
    assert verdict(hw2, key, value).passed


@pytest.mark.parametrize("key,value,phrase", [
    ("T_total", 48, "is T_ideal"),
    ("T_total", 22, "only the forward phase"),
    ("T_total", 72, "one slot too many"),
    ("T_total", 18, "is the bubble"),
    ("T_ideal", 66, "is T_total"),
    ("time_ratio", 0.375, "bubble/T_ideal"),
    ("time_ratio", 0.273, "bubble/T_total"),
    ("time_ratio", 8 / 11, "upside down"),
    ("time_ratio_16", 3 / 16, "bubble/T_ideal"),
    ("min_m_5_percent", 60, "bubble/T_ideal <= 5%"),
    ("min_m_5_percent", 56, "3/59 > 1/20"),
    ("one_f_one_b_T_total", 48, "does not remove the bubble"),
    ("one_f_one_b_T_total", 57, "INTERLEAVED"),
    ("one_f_one_b_T_total", 54, "leaves out the drain"),
    ("one_f_one_b_T_total", 50, "1F1B reorders GPipe's work"),
    ("interleaved_T_total", 33, "does not halve the whole step"),
    ("interleaved_T_total", 48, "shrinks the bubble, it does not remove it"),
    ("interleaved_T_total", 40, "simulate schedules.interleaved_one_f_one_b(4, 8, 2)"),
    ("T_total_formula", (p - 1) * t_f + m * (t_f + t_b), "leaves out the drain"),
    ("T_total_formula", (p - 1) * t_b + m * (t_f + t_b), "leaves out the fill"),
    ("T_total_formula", (m + p - 1) * t_f, "only the forward phase"),
    ("T_total_formula", m * p * t_f, "at the homework's p=4, m=8, t_f=2, t_b=4 it gives 64"),
    ("peak_1f1b", [4, 4, 4, 4], "gives every rank the first stage's p = 4"),
    ("peak_gpipe", [4, 3, 2, 1], "holds all m microbatches"),
    ("same_bubble", (0.2727, 0.375), "compares two different quantities"),
    ("peak_1f1b", [2, 2, 2, 2], "m/p = 2 per rank is a common claim"),
    ("peak_1f1b", [8, 8, 8, 8], "GPipe's memory"),
    ("peak_1f1b", [1, 2, 3, 4], "reversed"),
    ("peak_1f1b", [3, 2, 1, 0], "only the warm-up"),
    ("one_f_one_b_gains", {"bubble_at_equal_m", "peak_activation_memory"}, "exactly GPipe's"),
])
def test_hw2_misconceptions_are_named(key, value, phrase):
    result = verdict(hw2, key, value)
    assert not result.passed and phrase in result.message


def test_hw2_formulas_are_graded_by_equivalence_not_by_string():
    assert verdict(hw2, "T_total_formula", m * t_f + m * t_b + (p - 1) * (t_f + t_b)).passed
    assert verdict(hw2, "bubble_fraction_formula", 1 - m / (m + p - 1)).passed
    assert verdict(hw2, "time_ratio_formula", 1 + (p - 1) / m).passed
    wrong = verdict(hw2, "bubble_overhead_formula", (p - 1) / (m + p - 1))
    assert not wrong.passed and "a different quantity" in wrong.message
    wrong = verdict(hw2, "T_total_formula", (m + p) * (t_f + t_b))
    assert not wrong.passed and "one slot too many" in wrong.message
    assert "got a number" in verdict(hw2, "T_ideal_formula", 48).message


def gpipe_named_1f1b(p_value, m_value):
    return Schedule(schedules.gpipe(p_value, m_value).orders, m_value, p_value, name="1f1b")


def test_hw2_schedule_diagnoses():
    assert verdict(hw2, "schedule_p4_m8", schedules.one_f_one_b(4, 8)).passed
    impostor = verdict(hw2, "schedule_p4_m8", gpipe_named_1f1b(4, 8))
    assert "no forward/backward interleaving" in impostor.message
    # One warm-up forward too many on every rank: valid, but holds one more microbatch.
    orders = []
    for r in range(4):
        warmup = min(4 - r, 8)
        row = [Action("F", i, r) for i in range(warmup)]
        for k in range(8 - warmup):
            row += [Action("F", warmup + k, r), Action("B", k, r)]
        orders.append(tuple(row + [Action("B", i, r) for i in range(8 - warmup, 8)]))
    greedy = verdict(hw2, "schedule_p4_m8", Schedule(tuple(orders), 8, 4))
    assert "check the warm-up length" in greedy.message
    crossed = Schedule.from_strings(["0F0 0B0 0F1 0B1", "1F1 1B1 1F0 1B0"])
    assert "deadlocks" in verdict(hw2, "schedule_p2_m3", crossed).message or \
        "returned a schedule for 2 ranks and 2 microbatches" in \
        verdict(hw2, "schedule_p2_m3", crossed).message
    hidden = [schedules.one_f_one_b(pp, mm) for pp, mm in hw2.HIDDEN_SIZES]
    assert verdict(hw2, "schedules_hidden", hidden).passed
    hidden[-1] = gpipe_named_1f1b(*hw2.HIDDEN_SIZES[-1])
    assert "p=6, m=4: no forward/backward" in verdict(hw2, "schedules_hidden", hidden).message


def students_one_f_one_b(p_value, m_value):
    """A student's own 1F1B: warm-up, steady 1F1B, cool-down."""
    orders = []
    for r in range(p_value):
        warmup = min(p_value - r - 1, m_value)
        row = [Action("F", i, r) for i in range(warmup)]
        for k in range(m_value - warmup):
            row += [Action("F", warmup + k, r), Action("B", k, r)]
        orders.append(tuple(row + [Action("B", i, r) for i in range(m_value - warmup, m_value)]))
    return Schedule(tuple(orders), m_value, p_value)


def test_hw2_own_implementation_verdicts():
    unavailable = Raised("ReferenceUnavailable", "paralab.schedules:one_f_one_b is not "
                                                 "available in this test: write it yourself")
    result = verdict(hw2, "own_implementation", unavailable)
    assert not result.passed and "must build the order itself" in result.message
    assert "paralab.schedules:one_f_one_b" in result.message
    own = students_one_f_one_b(*hw2.ORIGINALITY_SIZE)
    assert verdict(hw2, "own_implementation", own).passed
    crashed = run_check(hw2.CHECKS, "own_implementation", encode(Raised("KeyError", "(5, 7)")))
    assert not crashed.passed and "KeyError" in crashed.message


# -- hw1 -------------------------------------------------------------------------------------
@pytest.mark.parametrize("key,value,phrase", [
    ("Y_shard_shape", (8, 128, 4096), "the full Y"),
    ("W1_shard_shape", (256, 4096), "ROW shard"),
    ("W1_shard_shape", (1024, 4096), "whole W1"),
    ("W2_shard_shape", (4096, 256), "COLUMN shard"),
    ("Z_partial_shape", (8, 128, 256), "full-size partial sum"),
    ("X_shape", (8, 128, 256), "needs the WHOLE input"),
])
def test_hw1_shape_misconceptions(key, value, phrase):
    result = verdict(hw1, key, value)
    assert not result.passed and phrase in result.message


def test_hw1_right_shapes_pass():
    for key, value in [("W1_shard_shape", (1024, 1024)), ("Y_shape", (8, 128, 4096)),
                       ("Z_shape", [8, 128, 1024])]:
        assert verdict(hw1, key, value).passed


def col_row(**overrides):
    n = 8 * 128 * 1024
    table = {"linear1.forward": None, "linear1.backward": ("all_reduce", n),
             "linear2.forward": ("all_reduce", n), "linear2.backward": None}
    table.update(overrides)
    return table


@pytest.mark.parametrize("overrides,phrase", [
    ({"linear1.forward": ("all_reduce", 8 * 128 * 1024)}, "X is replicated"),
    # With P = 4, B*S*4d elements of Y happen to equal Z's size in fp32 bytes: name both.
    ({"linear2.forward": ("all_reduce", 8 * 128 * 4096)}, "size of Y (B*S*4d elements) - or "
                                                          "this tensor's size in bytes"),
    ({"linear2.forward": ("all_gather", 8 * 128 * 1024)}, "partial sums"),
    ({"linear1.backward": None}, "communication IS needed"),
])
def test_hw1_communication_misconceptions(overrides, phrase):
    assert verdict(hw1, "comm_col_row", col_row()).passed
    result = verdict(hw1, "comm_col_row", col_row(**overrides))
    assert not result.passed and phrase in result.message


def test_hw1_bytes_and_traffic():
    assert verdict(hw1, "allreduce_bytes_fp32", 4 * 2 ** 20).passed
    assert "number of elements" in verdict(hw1, "allreduce_bytes_fp32", 2 ** 20).message
    assert verdict(hw1, "ring_traffic_bytes", 6 * 2 ** 20).passed
    assert "naive figure" in verdict(hw1, "ring_traffic_bytes", 8 * 2 ** 20).message


def test_hw1_row_row_seed_error_is_recognised():
    n, big = 8 * 128 * 1024, 8 * 128 * 4096
    assert verdict(hw1, "row_row_forward", [("all_reduce", big), ("all_reduce", n)]).passed
    # The source material's answer: Linear2 needs an all-gather.
    seed = verdict(hw1, "row_row_forward", [("all_gather", big), ("all_reduce", n)])
    assert not seed.passed and "GeLU is nonlinear" in seed.message
    col = verdict(hw1, "col_col_forward", [("all_reduce", n)])
    assert not col.passed and "WHOLE Y" in col.message


@pytest.mark.parametrize("value,phrase", [
    ([("all_gather", 4 * 8 * 128 * 1024)], "missing the all_gather of Z"),
    ([("all_gather", 4 * 8 * 128 * 1024), ("all_reduce", 8 * 128 * 1024)],
     "all_reduce of B*S*d elements (Z) is not the right collective"),
    ([("all_to_all", 4 * 8 * 128 * 1024)], "an all-to-all or a scatter does not give"),
    ([("scatter", 4 * 8 * 128 * 1024), ("all_gather", 8 * 128 * 1024)], "all-to-all or a scatter"),
])
def test_hw1_col_col_forward_says_what_is_wrong_with_that_answer(value, phrase):
    result = verdict(hw1, "col_col_forward", value)
    assert not result.passed and phrase in result.message
    assert "backward" not in result.message  # a forward answer is told about the forward


def test_hw1_weight_shards_are_told_apart_on_other_tp_degrees():
    right = [((d_, 4 * d_ // p_), (4 * d_ // p_, d_)) for d_, p_ in hw1.HIDDEN_SHAPE_CASES]
    assert verdict(hw1, "weight_shard_shapes_hidden", right).passed
    assert all(4 * d_ // p_ != d_ for d_, p_ in hw1.HIDDEN_SHAPE_CASES)  # P = 4 cannot tell
    transposed = [(w2, w1) for w1, w2 in right]
    result = verdict(hw1, "weight_shard_shapes_hidden", transposed)
    assert not result.passed and "nn.Linear.weight layout" in result.message
    floats = [((d_, 4 * d_ / p_), (4 * d_ / p_, d_)) for d_, p_ in hw1.HIDDEN_SHAPE_CASES]
    assert verdict(hw1, "weight_shard_shapes_hidden", floats).passed


@pytest.mark.parametrize("key,value", [
    ("W1_shard_shape", (1024, 1024.0)), ("W1_shard_shape", (sp.Integer(1024), np.int64(1024))),
    ("allreduce_bytes_fp32", 4194304.0), ("allreduce_bytes_fp32", np.int64(4194304)),
    ("ring_traffic_bytes", sp.Integer(6291456)),
    ("comm_col_row", {"linear1.forward": None, "linear1.backward": ("all_reduce", 1048576.0),
                      "linear2.forward": ["all_reduce", np.int64(1048576)],
                      "linear2.backward": None}),
])
def test_hw1_integers_may_be_written_any_common_way(key, value):
    assert verdict(hw1, key, value).passed


@pytest.mark.parametrize("key,value", [
    ("min_m_5_percent", 57.0), ("min_m_5_percent", sp.Integer(57)),
    ("min_m_5_percent", np.int64(57)), ("T_total", np.float64(66)), ("T_total", sp.Integer(66)),
    ("peak_1f1b", [4.0, 3, sp.Integer(2), np.int32(1)]), ("time_ratio", sp.Rational(11, 8)),
])
def test_hw2_numbers_may_be_written_any_common_way(key, value):
    assert verdict(hw2, key, value).passed


def test_hw2_non_integers_are_refused_where_an_integer_is_asked():
    assert not verdict(hw2, "min_m_5_percent", 57.5).passed
    assert not verdict(hw2, "min_m_5_percent", True).passed


# The student's f/g, in three versions, run for real on 2 processes.
class GoodF(__import__("torch").autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        from paralab import comm
        return comm.all_reduce(grad, phase="backward")


class GoodG(__import__("torch").autograd.Function):
    @staticmethod
    def forward(ctx, x):
        from paralab import comm
        return comm.all_reduce(x, phase="forward")

    @staticmethod
    def backward(ctx, grad):
        return grad


class ForgetfulF(GoodF):
    @staticmethod
    def backward(ctx, grad):
        return grad


def make_ffn(f, g, bias_on_every_rank=False):
    import torch.nn.functional as F

    def tp_ffn(x, w1, b1, w2, b2):
        y = F.gelu(F.linear(f.apply(x), w1, b1))
        if bias_on_every_rank:
            return g.apply(F.linear(y, w2, b2))
        return g.apply(F.linear(y, w2)) + b2
    return tp_ffn


@pytest.mark.parametrize("ffn,phrase", [
    (make_ffn(GoodF, GoodG), None),
    (make_ffn(ForgetfulF, GoodG), "missing all-reduce in f's backward"),
    (make_ffn(GoodF, GoodG, bias_on_every_rank=True), "off by (P-1) b2"),
])
def test_hw1_tp_ffn_check_on_real_runs(ffn, phrase):
    case = (2, 2, 3, 8, 0)
    results = launch.run(hw1.tp_ffn_worker, 2, ffn, case, echo=False)
    result = hw1.tp_ffn_check(case)(results)
    if phrase is None:
        assert result.passed, result.message
    else:
        assert not result.passed and phrase in result.message


def test_hw1_own_implementation():
    good = [hw1.tp_ffn_worker(0, 1, make_ffn(GoodF, GoodG), hw1.ORIGINALITY_CASE)]
    assert verdict(hw1, "own_implementation", good).passed
    result = verdict(hw1, "own_implementation",
                     Raised("ReferenceUnavailable", "paralab.tp:copy_to_tp is not available"))
    assert not result.passed and "yourself" in result.message


def test_hw1_reference_layers_pass_the_check():
    """paralab.tp's own operators, wrapped as a student would, satisfy the check."""
    def ffn(x, w1, b1, w2, b2):
        import torch.nn.functional as F
        y = F.gelu(F.linear(tp.copy_to_tp(x), w1, b1))
        return tp.reduce_from_tp(F.linear(y, w2)) + b2
    results = launch.run(hw1.tp_ffn_worker, 4, ffn, hw1.VISIBLE_CASE, echo=False)
    assert hw1.tp_ffn_check(hw1.VISIBLE_CASE)(results).passed


# -- what a student sees ------------------------------------------------------------------------
@pytest.mark.slow
def test_a_student_sees_every_check_of_a_cell_in_one_line_each(tmp_path):
    """The notebook of a student with the sources' classic mistakes next to right answers,
    run as in JupyterLab: every check of a cell prints its line (no traceback, nothing
    hidden behind the first failure), wrong answers on stderr with their misconception."""
    from nbclient import NotebookClient

    from autograder.mutants import hw2_pipeline_bubbles as hw2_mutants
    nb = samples.apply(samples.solved("hw2_pipeline_bubbles"), hw2_mutants.MUTANTS,
                       "m16_ratio_upside_down", "1f1b_bubble_is_p_minus_1_over_m")
    NotebookClient(nb, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    cells = {c.metadata.get("nbgrader", {}).get("grade_id"): c for c in nb.cells}

    def lines(grade_id):
        out = []
        for o in cells[grade_id].outputs:
            assert o.output_type == "stream", o  # no error output, no traceback
            out += [(o.name, line) for line in o.text.splitlines()]
        return out

    assert lines("test_m16") == [
        ("stdout", "\u2713 T_total_16: correct"), ("stdout", "\u2713 T_ideal_16: correct"),
        ("stderr", lines("test_m16")[2][1])]
    assert lines("test_m16")[2][1].startswith("\u2717 time_ratio_16: ")
    assert "upside down" in lines("test_m16")[2][1]
    both = lines("test_one_f_one_b_time")
    assert [name for name, _ in both] == ["stderr", "stderr"]
    assert "leaves out the drain" in both[0][1]
    assert "compares two different quantities" in both[1][1]  # not hidden by the first
    assert all(name == "stdout" for name, _ in lines("test_peaks"))


def test_mutants_are_packed_without_overlap():
    """The grading tests grade packs of mutants; a pack is only sound if its mutants touch
    different answers and fail different checks, and honest variants stay among themselves."""
    mutants = samples.all_mutants()
    packs = samples.packs(mutants)
    assert sorted(m.name for p in packs for m in p.mutants) == sorted(m.name for m in mutants)
    assert len(packs) < len(mutants)
    for pack in packs:
        assert {m.assignment for m in pack.mutants} == {pack.assignment}
        assert len({bool(m.fails) for m in pack.mutants}) == 1, pack.name
        for i, a in enumerate(pack.mutants):
            for b in pack.mutants[i + 1:]:
                assert not a.fails & b.fails and not set(a.answers) & set(b.answers), pack.name
        assert pack.fails == set().union(*(m.fails for m in pack.mutants))
    # the pack's notebook carries every member's answers
    pack = next(p for p in packs if len(p.mutants) > 1)
    text = "\n".join(cell.source for cell in pack.notebook().cells)
    for mutant in pack.mutants:
        for code in mutant.answers.values():
            assert code.strip() in text, mutant.name
