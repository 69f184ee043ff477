"""The sample class and the mutant submissions: proof that the grader tells right from wrong.

* The **sample class** (``autograder/samples/class/``) is what ``make grade-sample`` grades:
  a handful of students who each show one thing a real class does -- everything right,
  classic misconceptions, a crash, a notebook that never finishes, edited tests, a broken
  file, a "1F1B" that is really GPipe.
* The **mutants** each change one answer of a correct submission in one well-known wrong
  way (a wrong number, a missing all-reduce, a wrong schedule...).  The tests grade them
  all and require each to lose exactly the points of the test cells it should fail.

Both are built from the release notebooks and the solutions by the transforms of
:mod:`autograder.corpus`, so they follow the assignments when these change;
``python -m autograder.samples build`` rewrites the committed sample class and the tests
fail if it drifted.  Expected scores are never typed: each sample and mutant names the
*checks* (answer keys) that must fail, and the expected score is the total minus what those
checks weigh in their test cells (a cell's points are split over its checks by the weights
of ``GRADE_CELLS``), read from the sources and the check modules.
"""

from __future__ import annotations

import csv
import os
import sys
from dataclasses import dataclass, field

from . import corpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASS_DIR = os.path.join(ROOT, "autograder", "samples", "class")
HW1, HW2 = "hw1_tensor_parallel", "hw2_pipeline_bubbles"


def notebooks(assignment: str, root: str = ROOT):
    """(release, source) notebooks of ``assignment``."""
    import jupytext
    release = corpus.load(os.path.join(root, "assignments", assignment, f"{assignment}.ipynb"))
    source = jupytext.read(os.path.join(root, "solutions", assignment, f"{assignment}.pct.py"))
    return release, source


def layout(assignment: str, root: str = ROOT) -> corpus.Layout:
    return corpus.Layout.of(notebooks(assignment, root)[1])


def solved(assignment: str, root: str = ROOT):
    return corpus.solved_notebook(*notebooks(assignment, root))


def expected_score(assignment: str, failing: set[str], root: str = ROOT) -> float:
    """Score of a submission of ``assignment`` whose checks ``failing`` fail and every other
    check passes: each test cell keeps the share of its points its passing checks weigh."""
    import importlib

    from .checks import cell_weights

    lay = layout(assignment, root)
    module = importlib.import_module(f"autograder.checks.{assignment}")
    unknown = set(failing) - set(module.CHECKS)
    if unknown:
        raise ValueError(f"not checks of {assignment}: {sorted(unknown)}")
    score = 0.0
    for gid, points in lay.tests.items():
        weights = cell_weights(module.GRADE_CELLS[gid])
        kept = sum(w for k, w in weights.items() if k not in failing)
        score += round(points * kept / sum(weights.values()), 3)
    return round(score, 3)


# -- wrong answers, as a student writes them --------------------------------------------------
GPIPE_AS_1F1B = '''def one_f_one_b(p, m):
    orders = []
    for r in range(p):
        actions = []
        for i in range(m):          # "1F1B": every forward first...
            actions.append(Action("F", i, r))
        for i in range(m):          # ...then every backward
            actions.append(Action("B", i, r))
        orders.append(tuple(actions))
    return Schedule(tuple(orders), num_microbatches=m, num_stages=p, name="1f1b")
'''

WARMUP_TOO_LONG = '''def one_f_one_b(p, m):
    orders = []
    for r in range(p):
        actions = []
        warmup = min(p - r, m)      # one forward too many before the first backward
        for i in range(warmup):
            actions.append(Action("F", i, r))
        for k in range(m - warmup):
            actions.append(Action("F", warmup + k, r))
            actions.append(Action("B", k, r))
        for i in range(m - warmup, m):
            actions.append(Action("B", i, r))
        orders.append(tuple(actions))
    return Schedule(tuple(orders), num_microbatches=m, num_stages=p, name="1f1b")
'''

ONLY_THE_VISIBLE_CASES = '''from paralab.schedules import Schedule as _S
_KNOWN = {
    (4, 8): ["0F0 0F1 0F2 0F3 0B0 0F4 0B1 0F5 0B2 0F6 0B3 0F7 0B4 0B5 0B6 0B7",
             "1F0 1F1 1F2 1B0 1F3 1B1 1F4 1B2 1F5 1B3 1F6 1B4 1F7 1B5 1B6 1B7",
             "2F0 2F1 2B0 2F2 2B1 2F3 2B2 2F4 2B3 2F5 2B4 2F6 2B5 2F7 2B6 2B7",
             "3F0 3B0 3F1 3B1 3F2 3B2 3F3 3B3 3F4 3B4 3F5 3B5 3F6 3B6 3F7 3B7"],
    (2, 3): ["0F0 0F1 0B0 0F2 0B1 0B2", "1F0 1B0 1F1 1B1 1F2 1B2"],
}


def one_f_one_b(p, m):
    # copied from the visible tests' output instead of written
    return _S.from_strings(_KNOWN[(p, m)], num_microbatches=m, num_stages=p, name="1f1b")
'''

DELEGATES = '''from paralab import schedules as _lib


def one_f_one_b(p, m):
    return _lib.one_f_one_b(p, m)
'''

# An honest student who runs the simulator on their own schedule before returning it: using
# the simulator, the validator and the plots is always allowed.
SELF_CHECKING_1F1B = '''def one_f_one_b(p, m):
    orders = []
    for r in range(p):
        warmup = min(p - r - 1, m)
        actions = [Action("F", i, r) for i in range(warmup)]
        for k in range(m - warmup):
            actions += [Action("F", warmup + k, r), Action("B", k, r)]
        actions += [Action("B", i, r) for i in range(m - warmup, m)]
        orders.append(tuple(actions))
    schedule = Schedule(tuple(orders), num_microbatches=m, num_stages=p, name="1f1b")
    simulate(schedule, 1, 1)  # my own sanity check: raises if the order deadlocks
    return validate(schedule)
'''

TRANSPOSED_SHARDS = '''def weight_shard_shapes(d, P):
    # in PyTorch's nn.Linear layout (out x in) instead of the math convention (in x out)
    return (4 * d // P, d), (d, 4 * d // P)


W1_shard_shape, W2_shard_shape = weight_shard_shapes(d, P)
'''

F_AND_G = '''class CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return {f_backward}


class ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, partial):
        return {g_forward}

    @staticmethod
    def backward(ctx, grad):
        return grad


def tp_ffn(x, w1_shard, b1_shard, w2_shard, b2):
    x = CopyToTP.apply(x)
    y_shard = F.gelu(F.linear(x, w1_shard, b1_shard))
    {tail}
'''
ALL_REDUCE_BACKWARD = 'comm.all_reduce(grad, phase="backward")'
ALL_REDUCE_FORWARD = 'comm.all_reduce(partial, phase="forward")'
GOOD_TAIL = "return ReduceFromTP.apply(F.linear(y_shard, w2_shard)) + b2"


def f_and_g(f_backward=ALL_REDUCE_BACKWARD, g_forward=ALL_REDUCE_FORWARD, tail=GOOD_TAIL):
    return F_AND_G.format(f_backward=f_backward, g_forward=g_forward, tail=tail)


TP_FROM_THE_LIBRARY = '''from paralab import tp as _tp


def tp_ffn(x, w1_shard, b1_shard, w2_shard, b2):
    x = _tp.copy_to_tp(x)
    y_shard = F.gelu(F.linear(x, w1_shard, b1_shard))
    return _tp.reduce_from_tp(F.linear(y_shard, w2_shard)) + b2
'''


@dataclass
class Mutant:
    """A correct submission with some answer cells replaced; ``fails`` are the checks
    (answer keys) that must then fail, ``feedback`` phrases the feedback must contain."""

    name: str
    assignment: str
    answers: dict[str, str]
    fails: set[str]
    feedback: list[str] = field(default_factory=list)

    def notebook(self, root: str = ROOT):
        nb = solved(self.assignment, root)
        for cell, code in self.answers.items():
            nb = corpus.replace_solution(nb, cell, code)
        return nb

    def expected_score(self, root: str = ROOT) -> float:
        return expected_score(self.assignment, self.fails, root)


N = 8 * 128 * 1024  # B*S*d of hw1, as a student would write it in a wrong answer

SCHEDULE_CHECKS = {"schedule_p4_m8", "schedule_p2_m3", "schedules_hidden", "own_implementation",
                   "executor_p4_m8"}
TP_FFN_CHECKS = {"tp_ffn_p4", "tp_ffn_hidden", "own_implementation"}

MUTANTS = [
    # The solution computes the ratio from T_total, so a wrong T_total costs both.
    Mutant("t_total_is_t_ideal", HW2, {"a1": "T_total = 8 * (2 + 4)"},
           {"T_total", "time_ratio"}, ["is T_ideal"]),
    Mutant("ratio_is_bubble_overhead", HW2, {"a3": "time_ratio = 3 / 8"}, {"time_ratio"},
           ["a different quantity also called"]),
    Mutant("ratio_is_bubble_fraction", HW2, {"a3": "time_ratio = 3 / 11"},
           {"time_ratio"}, ["the idle share"]),
    # One wrong answer among right ones in the same test cell: only its share is lost.
    Mutant("m16_ratio_upside_down", HW2,
           {"a4": "T_total_16 = (16 + 4 - 1) * (2 + 4)\nT_ideal_16 = 16 * (2 + 4)\n"
                  "time_ratio_16 = T_ideal_16 / T_total_16"},
           {"time_ratio_16"}, ["the ratio upside down"]),
    Mutant("fill_of_p_slots", HW2,
           {"b1": "T_total_formula = (m + p) * (t_f + t_b)\nT_ideal_formula = m * (t_f + t_b)"},
           # B2-B4 are derived from B1's formula: the error carries through.
           {"T_total_formula", "time_ratio_formula", "bubble_overhead_formula",
            "bubble_fraction_formula", "quantities_p4_m8", "min_m_5_percent"},
           ["one slot too many"]),
    Mutant("no_drain_formula", HW2,
           {"b1": "T_total_formula = (p - 1) * t_f + m * (t_f + t_b)\n"
                  "T_ideal_formula = m * (t_f + t_b)"},
           {"T_total_formula", "time_ratio_formula", "bubble_overhead_formula",
            "bubble_fraction_formula", "quantities_p4_m8", "min_m_5_percent"},
           ["leaves out the drain"]),
    # Source 003's comparison, behind a wrong 1F1B time in the same cell: both are named.
    Mutant("1f1b_bubble_is_p_minus_1_over_m", HW2,
           {"c1": "one_f_one_b_T_total = 54\nsame_bubble = (3 / 11, 3 / 8)"},
           {"one_f_one_b_T_total", "same_bubble"},
           ["leaves out the drain", "compares two different quantities"]),
    Mutant("peak_m_over_p", HW2, {"c2": "peak_gpipe = [8, 8, 8, 8]\npeak_1f1b = [2, 2, 2, 2]"},
           {"peak_1f1b"}, ["m/p = 2 per rank is a common claim"]),
    Mutant("interleaving_halves_the_step", HW2, {"c3": "interleaved_T_total = 66 / 2"},
           {"interleaved_T_total"}, ["does not halve the whole step"]),
    Mutant("1f1b_shrinks_the_bubble", HW2,
           {"c4": 'one_f_one_b_gains = {"bubble_at_equal_m", "peak_activation_memory"}'},
           {"one_f_one_b_gains"}, ["exactly GPipe"]),
    Mutant("gpipe_called_1f1b", HW2, {"d": GPIPE_AS_1F1B}, SCHEDULE_CHECKS,
           ["no forward/backward interleaving"]),
    Mutant("warmup_too_long", HW2, {"d": WARMUP_TOO_LONG}, SCHEDULE_CHECKS,
           ["check the warm-up length"]),
    Mutant("only_the_visible_cases", HW2, {"d": ONLY_THE_VISIBLE_CASES},
           {"schedules_hidden", "own_implementation"}),
    # Right everywhere in the student's kernel; only the run without the library fails.
    Mutant("delegates_to_the_library", HW2, {"d": DELEGATES}, {"own_implementation"},
           ["must build the order itself"]),
    Mutant("checks_itself_with_the_simulator", HW2, {"d": SELF_CHECKING_1F1B}, set()),
    Mutant("transposed_weight_shards", HW1, {"a1": TRANSPOSED_SHARDS},
           {"weight_shard_shapes_hidden"}, ["nn.Linear.weight layout"]),
    Mutant("y_shard_is_full_y", HW1,
           {"a2": "X_shape = (B, S, d)\nY_shard_shape = (B, S, 4 * d)\nY_shape = (B, S, 4 * d)"
                  "\nZ_partial_shape = (B, S, d)\nZ_shape = (B, S, d)"},
           {"Y_shard_shape"}, ["that is the full Y"]),
    Mutant("row_row_needs_an_all_gather", HW1,
           {"c1": f"row_row_forward = [('all_gather', {4 * N}), ('all_reduce', {N})]\n"
                  f"row_row_backward = [('all_gather', {4 * N}), ('all_gather', {N})]"},
           {"row_row_forward"}, ["GeLU is nonlinear"]),
    Mutant("col_col_all_to_all", HW1,
           {"c2": f"col_col_forward = [('all_to_all', {4 * N})]\n"
                  f"col_col_backward = [('all_reduce', {4 * N}), ('all_reduce', {N})]"},
           {"col_col_forward"}, ["an all-to-all or a scatter does not give Linear2"]),
    Mutant("missing_forward_all_reduce", HW1, {"d": f_and_g(g_forward="partial")},
           TP_FFN_CHECKS, ["missing all-reduce in g"]),
    Mutant("missing_backward_all_reduce", HW1, {"d": f_and_g(f_backward="grad")},
           TP_FFN_CHECKS, ["missing all-reduce in f"]),
    # On one rank (the originality run) the bias is added once either way: only the
    # multi-rank runs catch it.
    Mutant("bias_on_every_rank", HW1,
           {"d": f_and_g(tail="return ReduceFromTP.apply(F.linear(y_shard, w2_shard, b2))")},
           {"tp_ffn_p4", "tp_ffn_hidden"}, ["off by (P-1) b2"]),
    Mutant("tp_ffn_from_the_library", HW1, {"d": TP_FROM_THE_LIBRARY}, {"own_implementation"},
           ["write f and g yourself"]),
]


MUTANT = {mutant.name: mutant for mutant in MUTANTS}


def _apply(nb, *names):
    for name in names:
        for cell, code in MUTANT[name].answers.items():
            nb = corpus.replace_solution(nb, cell, code)
    return nb


# -- the sample class ------------------------------------------------------------------------
@dataclass
class Sample:
    """One student of the sample class: what they submit and what the grader must say."""

    student: str
    about: str
    files: dict[str, bytes]          # "<assignment>/<file>" -> content
    status: dict[str, str]           # assignment -> regular expression for the status
    fails: dict[str, set[str]]       # assignment -> checks (answer keys) that must fail

    def expected_score(self, assignment: str, root: str = ROOT) -> float:
        if not any(name.startswith(assignment + "/") for name in self.files):
            return 0.0
        if self.status[assignment].startswith("^malformed"):
            return 0.0
        return expected_score(assignment, self.fails.get(assignment, set()), root)

    def explain(self, assignment: str) -> str:
        """Why the expected score is what it is, for the report."""
        if not any(name.startswith(assignment + "/") for name in self.files):
            return "no submission"
        if self.status[assignment].startswith("^malformed"):
            return "the notebook cannot be read: nothing to grade"
        failing = sorted(self.fails.get(assignment, set()))
        if not failing:
            return "every check passes"
        return "loses " + ", ".join(failing)


def _file(assignment: str, nb) -> tuple[str, bytes]:
    return f"{assignment}/{assignment}.ipynb", corpus.dumps(nb)


def sample_class(root: str = ROOT) -> list[Sample]:
    good1, good2 = solved(HW1, root), solved(HW2, root)
    misconceptions1 = _apply(good1, "y_shard_is_full_y", "row_row_needs_an_all_gather",
                             "col_col_all_to_all")
    misconceptions2 = _apply(good2, "t_total_is_t_ideal", "ratio_is_bubble_overhead",
                             "1f1b_bubble_is_p_minus_1_over_m", "peak_m_over_p",
                             "1f1b_shrinks_the_bubble")
    crash = corpus.replace_solution(good1, "b1", "comm_col_row = {\n    'linear1.forward': None,\n"
                                                 "    'linear1.backward': ('all_reduce', "
                                                 "B * S * d_model),\n}\n")
    endless = corpus.replace_solution(good2, "b4", (
        "# smallest m with bubble/T <= 5%: count up from 1\nm_ = 1\n"
        "while bubble_fraction_formula.subs({p: 4, m: m_}) > 0.05:\n"
        "    m_ = m_  # forgot to increment\nmin_m_5_percent = m_\n"))
    tampered = corpus.replace_solution(good2, "a1", "T_total = 48")
    tampered = corpus.replace_solution(tampered, "a3", "time_ratio = 0.375")
    for test in ("test_T_total", "test_time_ratio"):
        tampered = corpus.tamper_test(tampered, test, 'print("all tests passed")')
    return [
        Sample("ada", "every answer right", dict([_file(HW1, good1), _file(HW2, good2)]),
               {HW1: r"^graded$", HW2: r"^graded$"}, {}),
        Sample("ben", "the source material's classic mistakes (T_ideal for T_total, the wrong "
                      "'bubble ratio', 1F1B's bubble as (p-1)/m, m/p activations, 1F1B shrinks "
                      "the bubble, the full Y on each rank, an all-gather for row-row, an "
                      "all-to-all for col-col), next to right answers in the same test cells",
               dict([_file(HW1, misconceptions1), _file(HW2, misconceptions2)]),
               {HW1: r"^graded$", HW2: r"^graded$"},
               {HW1: {"Y_shard_shape", "row_row_forward", "col_col_forward"},
                HW2: {"T_total", "time_ratio", "one_f_one_b_T_total", "same_bubble",
                      "peak_1f1b", "one_f_one_b_gains"}}),
        Sample("cleo", "a NameError in one answer cell", dict([_file(HW1, crash)]),
               {HW1: r"^graded$", HW2: r"^no submission$"}, {HW1: {"comm_col_row"}}),
        Sample("dan", "a loop that never ends", dict([_file(HW2, endless)]),
               {HW1: r"^no submission$",
                HW2: r"^graded; cell \d+ .*interrupted at the cell time limit$"},
               {HW2: {"min_m_5_percent"}}),
        Sample("eve", "wrong answers, and their test cells edited to print 'all tests passed'",
               dict([_file(HW2, tampered)]),
               {HW1: r"^no submission$", HW2: r"^graded; tests tampered: restored "
                                               r"test_T_total, test_time_ratio$"},
               {HW2: {"T_total", "time_ratio"}}),
        Sample("finn", "a notebook file cut in the middle",
               {f"{HW1}/{HW1}.ipynb": corpus.corrupt_json(corpus.dumps(good1))},
               {HW1: r"^malformed notebook", HW2: r"^no submission$"}, {}),
        Sample("gus", "a '1F1B' that is really GPipe",
               dict([_file(HW2, _apply(good2, "gpipe_called_1f1b"))]),
               {HW1: r"^no submission$", HW2: r"^graded$"},
               {HW2: MUTANT["gpipe_called_1f1b"].fails}),
    ]


def write_class(dest: str = CLASS_DIR, root: str = ROOT) -> list[str]:
    """Write the sample class under ``dest``; returns the files written."""
    written = []
    for sample in sample_class(root):
        for name, data in sample.files.items():
            path = os.path.join(dest, sample.student, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
            written.append(path)
    return written


def drift(dest: str = CLASS_DIR, root: str = ROOT) -> list[str]:
    """Files of the committed sample class that differ from what the builders make."""
    problems = []
    expected = {}
    for sample in sample_class(root):
        for name, data in sample.files.items():
            expected[os.path.join(sample.student, name)] = data
    for rel, data in expected.items():
        path = os.path.join(dest, rel)
        if not os.path.exists(path):
            problems.append(f"{rel} is missing")
        elif open(path, "rb").read() != data:
            problems.append(f"{rel} differs from what the builders make")
    from .course import EDITOR_DIRS, _editor_dropping

    for folder, dirs, files in os.walk(dest):
        dirs[:] = [d for d in dirs if d not in EDITOR_DIRS]
        for name in files:
            if _editor_dropping(name):
                continue
            rel = os.path.relpath(os.path.join(folder, name), dest)
            if rel not in expected:
                problems.append(f"{rel} is not part of the sample class")
    return problems


def report(out: str) -> str:
    """The score table of ``out/grades.csv`` and where the feedback is, for people.  For the
    students of the sample class it also says what each one shows and which checks it must
    fail (every other check passes: a test cell keeps the share of its points its passing
    checks weigh)."""
    with open(os.path.join(out, "grades.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    samples = {s.student: s for s in sample_class()}
    width = max([7] + [len(r["student"]) for r in rows])
    lines = [f"{'student':<{width}}  {'assignment':<22} {'score':>11}  status"]
    for r in rows:
        score = f"{r['score']}/{r['max_score']}"
        lines.append(f"{r['student']:<{width}}  {r['assignment']:<22} {score:>11}  "
                     f"{r['status']}")
        sample = samples.get(r["student"])
        if sample is not None and r["assignment"] in sample.status:
            expected = sample.expected_score(r["assignment"])
            verdict = "as expected" if float(r["score"]) == expected else "NOT AS EXPECTED"
            lines.append(f"{'':<{width}}  {'':<22} {'':>11}  expected {expected:g} "
                         f"({verdict}): {sample.explain(r['assignment'])}")
    if samples.keys() & {r["student"] for r in rows}:
        lines.append("\nthe sample class: " + "; ".join(f"{s.student}: {s.about}"
                                                        for s in samples.values()))
    lines.append(f"\nfeedback: {os.path.join(out, 'feedback')}/<student>/<assignment>/*.html")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    usage = "usage: python -m autograder.samples build | check | report OUT"
    if argv[:1] == ["build"]:
        for path in write_class():
            print(os.path.relpath(path, ROOT))
        return 0
    if argv[:1] == ["check"]:
        problems = drift()
        print("\n".join(problems) or "the sample class is up to date")
        return 1 if problems else 0
    if argv[:1] == ["report"] and len(argv) == 2:
        print(report(argv[1]))
        return 0
    print(usage, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
