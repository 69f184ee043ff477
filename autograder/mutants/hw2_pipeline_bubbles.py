"""Sample students and mutant submissions of hw2_pipeline_bubbles (see autograder/samples.py)."""

from autograder import corpus
from autograder.samples import Mutant, Work, apply, solved

ASSIGNMENT = "hw2_pipeline_bubbles"

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

SCHEDULE_CHECKS = {"schedule_p4_m8", "schedule_p2_m3", "schedules_hidden", "own_implementation",
                   "executor_p4_m8"}

MUTANTS = [
    # The solution computes the ratio from T_total, so a wrong T_total costs both.
    Mutant("t_total_is_t_ideal", ASSIGNMENT, {"a1": "T_total = 8 * (2 + 4)"},
           {"T_total", "time_ratio"}, ["is T_ideal"]),
    Mutant("ratio_is_bubble_overhead", ASSIGNMENT, {"a3": "time_ratio = 3 / 8"}, {"time_ratio"},
           ["a different quantity also called"]),
    Mutant("ratio_is_bubble_fraction", ASSIGNMENT, {"a3": "time_ratio = 3 / 11"},
           {"time_ratio"}, ["the idle share"]),
    # One wrong answer among right ones in the same test cell: only its share is lost.
    Mutant("m16_ratio_upside_down", ASSIGNMENT,
           {"a4": "T_total_16 = (16 + 4 - 1) * (2 + 4)\nT_ideal_16 = 16 * (2 + 4)\n"
                  "time_ratio_16 = T_ideal_16 / T_total_16"},
           {"time_ratio_16"}, ["the ratio upside down"]),
    Mutant("fill_of_p_slots", ASSIGNMENT,
           {"b1": "T_total_formula = (m + p) * (t_f + t_b)\nT_ideal_formula = m * (t_f + t_b)"},
           # B2-B4 are derived from B1's formula: the error carries through.
           {"T_total_formula", "time_ratio_formula", "bubble_overhead_formula",
            "bubble_fraction_formula", "quantities_p4_m8", "min_m_5_percent"},
           ["one slot too many"]),
    Mutant("no_drain_formula", ASSIGNMENT,
           {"b1": "T_total_formula = (p - 1) * t_f + m * (t_f + t_b)\n"
                  "T_ideal_formula = m * (t_f + t_b)"},
           {"T_total_formula", "time_ratio_formula", "bubble_overhead_formula",
            "bubble_fraction_formula", "quantities_p4_m8", "min_m_5_percent"},
           ["leaves out the drain"]),
    # Source 003's comparison, behind a wrong 1F1B time in the same cell: both are named.
    Mutant("1f1b_bubble_is_p_minus_1_over_m", ASSIGNMENT,
           {"c1": "one_f_one_b_T_total = 54\nsame_bubble = (3 / 11, 3 / 8)"},
           {"one_f_one_b_T_total", "same_bubble"},
           ["leaves out the drain", "compares two different quantities"]),
    Mutant("peak_m_over_p", ASSIGNMENT, {"c2": "peak_gpipe = [8, 8, 8, 8]\npeak_1f1b = [2, 2, 2, 2]"},
           {"peak_1f1b"}, ["m/p = 2 per rank is a common claim"]),
    Mutant("interleaving_halves_the_step", ASSIGNMENT, {"c3": "interleaved_T_total = 66 / 2"},
           {"interleaved_T_total"}, ["does not halve the whole step"]),
    Mutant("1f1b_shrinks_the_bubble", ASSIGNMENT,
           {"c4": 'one_f_one_b_gains = {"bubble_at_equal_m", "peak_activation_memory"}'},
           {"one_f_one_b_gains"}, ["exactly GPipe"]),
    Mutant("gpipe_called_1f1b", ASSIGNMENT, {"d": GPIPE_AS_1F1B}, SCHEDULE_CHECKS,
           ["no forward/backward interleaving"]),
    Mutant("warmup_too_long", ASSIGNMENT, {"d": WARMUP_TOO_LONG}, SCHEDULE_CHECKS,
           ["check the warm-up length"]),
    Mutant("only_the_visible_cases", ASSIGNMENT, {"d": ONLY_THE_VISIBLE_CASES},
           {"schedules_hidden", "own_implementation"}),
    # Right everywhere in the student's kernel; only the run without the library fails.
    Mutant("delegates_to_the_library", ASSIGNMENT, {"d": DELEGATES}, {"own_implementation"},
           ["must build the order itself"]),
    Mutant("checks_itself_with_the_simulator", ASSIGNMENT, {"d": SELF_CHECKING_1F1B}, set()),
]


def samples(root: str) -> list[Work]:
    """This assignment's notebooks of the sample class (besides the all-right one)."""
    good = solved(ASSIGNMENT, root)
    endless = corpus.replace_solution(good, "b4", (
        "# smallest m with bubble/T <= 5%: count up from 1\nm_ = 1\n"
        "while bubble_fraction_formula.subs({p: 4, m: m_}) > 0.05:\n"
        "    m_ = m_  # forgot to increment\nmin_m_5_percent = m_\n"))
    tampered = corpus.replace_solution(good, "a1", "T_total = 48")
    tampered = corpus.replace_solution(tampered, "a3", "time_ratio = 0.375")
    for test in ("test_T_total", "test_time_ratio"):
        tampered = corpus.tamper_test(tampered, test, 'print("all tests passed")')
    gpipe = next(m for m in MUTANTS if m.name == "gpipe_called_1f1b")
    return [
        Work("ben", "T_ideal for T_total, the wrong 'bubble ratio', 1F1B's bubble as (p-1)/m, "
                    "m/p activations, 1F1B shrinks the bubble",
             apply(good, MUTANTS, "t_total_is_t_ideal", "ratio_is_bubble_overhead",
                   "1f1b_bubble_is_p_minus_1_over_m", "peak_m_over_p",
                   "1f1b_shrinks_the_bubble"),
             r"^graded$", {"T_total", "time_ratio", "one_f_one_b_T_total", "same_bubble",
                           "peak_1f1b", "one_f_one_b_gains"}),
        Work("dan", "a loop that never ends", endless,
             r"^graded; cell \d+ .*interrupted at the cell time limit$", {"min_m_5_percent"}),
        Work("eve", "wrong answers, and their test cells edited to print 'all tests passed'",
             tampered, r"^graded; tests tampered: restored test_T_total, test_time_ratio$",
             {"T_total", "time_ratio"}),
        Work("gus", "a '1F1B' that is really GPipe", gpipe.notebook(root), r"^graded$",
             gpipe.fails),
    ]
