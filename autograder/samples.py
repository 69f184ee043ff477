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
fail if it drifted.  Expected scores are never typed: they are the total minus the points
of the cells that must fail, read from the sources.
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


@dataclass
class Mutant:
    """A correct submission with some answer cells replaced; ``fails`` are the test cells
    that must then lose their points, ``feedback`` phrases the feedback must contain."""

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
        lay = layout(self.assignment, root)
        return lay.total - sum(lay.tests[t] for t in self.fails)


N = 8 * 128 * 1024  # B*S*d of hw1, as a student would write it in a wrong answer

MUTANTS = [
    # The solution computes the ratio from T_total, so a wrong T_total costs both.
    Mutant("t_total_is_t_ideal", HW2, {"a1": "T_total = 8 * (2 + 4)"},
           {"test_T_total", "test_time_ratio"}, ["is T_ideal"]),
    Mutant("ratio_is_bubble_overhead", HW2, {"a3": "time_ratio = 3 / 8"}, {"test_time_ratio"},
           ["a different quantity also called"]),
    Mutant("ratio_is_bubble_fraction", HW2, {"a3": "time_ratio = 3 / 11"},
           {"test_time_ratio"}, ["the idle share"]),
    Mutant("fill_of_p_slots", HW2,
           {"b1": "T_total_formula = (m + p) * (t_f + t_b)\nT_ideal_formula = m * (t_f + t_b)"},
           # B2-B4 are derived from B1's formula: the error carries through.
           {"test_T_formulas", "test_quantity_formulas", "test_quantities_p4_m8", "test_min_m"},
           ["one slot too many"]),
    Mutant("peak_m_over_p", HW2, {"c2": "peak_gpipe = [8, 8, 8, 8]\npeak_1f1b = [2, 2, 2, 2]"},
           {"test_peaks"}, ["m/p = 2 per rank is a common claim"]),
    Mutant("1f1b_shrinks_the_bubble", HW2,
           {"c4": 'one_f_one_b_gains = {"bubble_at_equal_m", "peak_activation_memory"}'},
           {"test_gains"}, ["exactly GPipe"]),
    Mutant("gpipe_called_1f1b", HW2, {"d": GPIPE_AS_1F1B},
           {"test_schedule_visible", "test_schedule_hidden", "test_schedule_executor"},
           ["no forward/backward interleaving"]),
    Mutant("warmup_too_long", HW2, {"d": WARMUP_TOO_LONG},
           {"test_schedule_visible", "test_schedule_hidden", "test_schedule_executor"},
           ["check the warm-up length"]),
    Mutant("only_the_visible_cases", HW2, {"d": ONLY_THE_VISIBLE_CASES},
           {"test_schedule_hidden"}),
    Mutant("delegates_to_the_library", HW2, {"d": DELEGATES}, {"test_schedule_hidden"}),
    Mutant("y_shard_is_full_y", HW1,
           {"a2": "X_shape = (B, S, d)\nY_shard_shape = (B, S, 4 * d)\nY_shape = (B, S, 4 * d)"
                  "\nZ_partial_shape = (B, S, d)\nZ_shape = (B, S, d)"},
           {"test_activation_shapes"}, ["that is the full Y"]),
    Mutant("row_row_needs_an_all_gather", HW1,
           {"c1": f"row_row_forward = [('all_gather', {4 * N}), ('all_reduce', {N})]\n"
                  f"row_row_backward = [('all_gather', {4 * N}), ('all_gather', {N})]"},
           {"test_row_row"}, ["GeLU is nonlinear"]),
    Mutant("missing_forward_all_reduce", HW1, {"d": f_and_g(g_forward="partial")},
           {"test_tp_ffn", "test_tp_ffn_hidden"}, ["missing all-reduce in g"]),
    Mutant("missing_backward_all_reduce", HW1, {"d": f_and_g(f_backward="grad")},
           {"test_tp_ffn", "test_tp_ffn_hidden"}, ["missing all-reduce in f"]),
    Mutant("bias_on_every_rank", HW1,
           {"d": f_and_g(tail="return ReduceFromTP.apply(F.linear(y_shard, w2_shard, b2))")},
           {"test_tp_ffn", "test_tp_ffn_hidden"}, ["off by (P-1) b2"]),
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
    fails: dict[str, set[str]]       # assignment -> test cells that must lose their points

    def expected_score(self, assignment: str, root: str = ROOT) -> float:
        if not any(name.startswith(assignment + "/") for name in self.files):
            return 0.0
        if self.status[assignment].startswith("^malformed"):
            return 0.0
        lay = layout(assignment, root)
        return lay.total - sum(lay.tests[t] for t in self.fails.get(assignment, set()))


def _file(assignment: str, nb) -> tuple[str, bytes]:
    return f"{assignment}/{assignment}.ipynb", corpus.dumps(nb)


def sample_class(root: str = ROOT) -> list[Sample]:
    good1, good2 = solved(HW1, root), solved(HW2, root)
    misconceptions1 = _apply(good1, "y_shard_is_full_y", "row_row_needs_an_all_gather")
    misconceptions2 = _apply(good2, "t_total_is_t_ideal", "ratio_is_bubble_overhead",
                             "peak_m_over_p", "1f1b_shrinks_the_bubble")
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
        Sample("ben", "classic misconceptions (T_ideal for T_total, the wrong 'bubble ratio', "
                      "m/p activations, 1F1B shrinks the bubble, the full Y on each rank, an "
                      "all-gather for row-row)",
               dict([_file(HW1, misconceptions1), _file(HW2, misconceptions2)]),
               {HW1: r"^graded$", HW2: r"^graded$"},
               {HW1: {"test_activation_shapes", "test_row_row"},
                HW2: {"test_T_total", "test_time_ratio", "test_peaks", "test_gains"}}),
        Sample("cleo", "a NameError in one answer cell", dict([_file(HW1, crash)]),
               {HW1: r"^graded$", HW2: r"^no submission$"}, {HW1: {"test_comm_col_row"}}),
        Sample("dan", "a loop that never ends", dict([_file(HW2, endless)]),
               {HW1: r"^no submission$",
                HW2: r"^graded; cell \d+ .*interrupted at the cell time limit$"},
               {HW2: {"test_min_m"}}),
        Sample("eve", "wrong answers, and their test cells edited to print 'all tests passed'",
               dict([_file(HW2, tampered)]),
               {HW1: r"^no submission$", HW2: r"^graded; tests tampered: restored "
                                               r"test_T_total, test_time_ratio$"},
               {HW2: {"test_T_total", "test_time_ratio"}}),
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
    for folder, _, files in os.walk(dest):
        for name in files:
            rel = os.path.relpath(os.path.join(folder, name), dest)
            if rel not in expected:
                problems.append(f"{rel} is not part of the sample class")
    return problems


def report(out: str) -> str:
    """The score table of ``out/grades.csv`` and where the feedback is, for people."""
    with open(os.path.join(out, "grades.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    width = max([7] + [len(r["student"]) for r in rows])
    lines = [f"{'student':<{width}}  {'assignment':<22} {'score':>11}  status"]
    for r in rows:
        score = f"{r['score']}/{r['max_score']}"
        lines.append(f"{r['student']:<{width}}  {r['assignment']:<22} {score:>11}  "
                     f"{r['status']}")
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
