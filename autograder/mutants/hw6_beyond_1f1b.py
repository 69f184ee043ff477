"""Sample students and mutant submissions of hw6_beyond_1f1b (see autograder/samples.py)."""

from autograder.samples import Mutant, Work, apply, solved

ASSIGNMENT = "hw6_beyond_1f1b"


def _zb(rule: str) -> str:
    """A student's zb_h1 that places W's by ``rule`` (Python for the body after a B)."""
    return f'''def zb_h1(p, m):
    orders = []
    for r in range(p):
        actions = []
        warmup = min(p - r - 1, m)
        owed = []

        def backward(i):
            actions.append(Action("B", i, r))
            owed.append(i)
{rule}
        for i in range(warmup):
            actions.append(Action("F", i, r))
        for k in range(m - warmup):
            actions.append(Action("F", warmup + k, r))
            backward(k)
        for i in range(m - warmup, m):
            backward(i)
        actions += [Action("W", i, r) for i in owed]
        orders.append(tuple(actions))
    return Schedule(tuple(orders), num_microbatches=m, num_stages=p, name="zb-h1")
'''


# "Split the backward" read as: run W right after its B, everywhere.
W_RIGHT_AFTER_B = _zb('''            actions.append(Action("W", owed.pop(0), r))
''')
# "W can go anywhere": every W at the end.
ALL_W_AT_THE_END = _zb("            pass\n")
# 1F1B handed in as ZB-H1: no W at all.
NO_W = '''def zb_h1(p, m):
    orders = []
    for r in range(p):
        warmup = min(p - r - 1, m)
        actions = [Action("F", i, r) for i in range(warmup)]
        for k in range(m - warmup):
            actions += [Action("F", warmup + k, r), Action("B", k, r)]
        actions += [Action("B", i, r) for i in range(m - warmup, m)]
        orders.append(tuple(actions))
    return Schedule(tuple(orders), num_microbatches=m, num_stages=p, name="zb-h1")
'''
DELEGATES = '''from paralab import schedules as _lib


def zb_h1(p, m):
    return _lib.zb_h1(p, m)
'''
# An honest student: the same order, written as "count the W's owed", checked with the
# simulator and the validator before returning (both always allowed).
COUNTING_AND_CHECKING = '''def zb_h1(p, m):
    orders = []
    for r in range(p):
        warmup = min(p - r - 1, m)
        actions = [Action("F", i, r) for i in range(warmup)]
        paid = 0
        backwards = list(range(m))
        forwards = list(range(warmup, m))
        for k in backwards:
            if forwards and forwards[0] <= k + warmup:
                actions.append(Action("F", forwards.pop(0), r))
            actions.append(Action("B", k, r))
            if (k + 1) - paid > r:
                actions.append(Action("W", paid, r))
                paid += 1
        actions += [Action("W", i, r) for i in range(paid, m)]
        orders.append(tuple(actions))
    schedule = Schedule(tuple(orders), num_microbatches=m, num_stages=p, name="zb-h1")
    simulate(schedule, 1, 1, 1)
    return validate(schedule)
'''

PICK_IGNORES_MEMORY = '''def pick_schedule(budget, t_fb=2.5):
    timelines = {}
    for name in checks.CANDIDATES:
        schedule = schedules.build(name, 4, 8, 2 if name == "interleaved" else 1)
        timelines[name] = simulate(schedule, 1, 1, 1, t_fb=t_fb if schedule.fused else None)
    return min(timelines, key=lambda name: timelines[name].makespan)  # the fastest
'''
PICK_CHUNKS_AS_STAGES = '''def pick_schedule(budget, t_fb=2.5):
    best = None
    for name in checks.CANDIDATES:
        schedule = schedules.build(name, 4, 8, 2 if name == "interleaved" else 1)
        timeline = simulate(schedule, 1, 1, 1, t_fb=t_fb if schedule.fused else None)
        memory = max(timeline.peak_activations)  # every chunk counted as a whole stage
        if memory <= budget and (best is None or timeline.makespan < best[0]):
            best = (timeline.makespan, name)
    return None if best is None else best[1]
'''

ZB_CHECKS = {"zb_p4_m8", "zb_p3_m5", "zb_hidden", "own_zb_h1", "zb_executor"}

MUTANTS = [
    # A2 simulates the student's zb_h1, so a wrong order costs its idle time too.
    Mutant("w_right_after_b", ASSIGNMENT, {"zb": W_RIGHT_AFTER_B}, ZB_CHECKS | {"zb_idle"},
           ["no W moves into a gap", "W's do not fill the gaps"]),
    Mutant("all_w_at_the_end", ASSIGNMENT, {"zb": ALL_W_AT_THE_END}, ZB_CHECKS | {"zb_idle"},
           ["every W postponed to the end", "W's do not fill the gaps"]),
    Mutant("zb_h1_without_w", ASSIGNMENT, {"zb": NO_W}, ZB_CHECKS | {"zb_idle"},
           ["there is no W"]),
    Mutant("delegates_to_the_library", ASSIGNMENT, {"zb": DELEGATES}, {"own_zb_h1"},
           ["must build the order itself"]),
    Mutant("zb_h1_counting_and_checking_itself", ASSIGNMENT, {"zb": COUNTING_AND_CHECKING},
           set()),
    # The Zero Bubble paper's form with DeepSeek's full B; B2's number follows from B1.
    Mutant("zb1p_in_the_wrong_notation", ASSIGNMENT,
           {"b1": "zb1p_bubble = (PP - 1) * (F + B - W)\n"
                  "dualpipe_bubble = (PP / 2 - 1) * (FB + B - 3 * W)"},
           {"zb1p_bubble", "zb1p_ms"}, ["takes B as the input-gradient part"]),
    Mutant("dualpipe_with_pp_minus_1", ASSIGNMENT,
           {"b1": "zb1p_bubble = (PP - 1) * (F + B - 2 * W)\n"
                  "dualpipe_bubble = (PP - 1) * (FB + B - 3 * W)"},
           {"dualpipe_bubble", "dualpipe_ms"}, ["one-direction pipeline's count"]),
    Mutant("zb_costs_with_the_full_b", ASSIGNMENT, {"b3": "zb_paper_costs = (2, 4, 2)"},
           {"zb_paper_costs"}, ["input-gradient backward only"]),
    Mutant("dualpipe_simulated_with_rank_costs", ASSIGNMENT,
           {"b4": "dual = simulate(schedules.dualpipe_v(4, 16), 2, 2, 2, t_fb=5)\n"
                  "dualpipe_simulated = max(dual.idle)"},
           {"dualpipe_simulated"}, ["one rank's share"]),
    Mutant("pick_ignores_memory", ASSIGNMENT, {"c1": PICK_IGNORES_MEMORY},
           {"pick_4", "pick_hidden"}, ["over the budget"]),
    Mutant("pick_counts_chunks_as_stages", ASSIGNMENT, {"c1": PICK_CHUNKS_AS_STAGES},
           {"pick_4", "pick_4_5", "pick_hidden"}, ["count its activations half"]),
    Mutant("interleaving_halves_and_doubles", ASSIGNMENT,
           {"d1": "bubble_factor = 2\nmessages_factor_middle = 2\nmessages_factor_total = 2"},
           {"bubble_factor", "messages_factor_middle", "messages_factor_total"},
           ["'about half' is the case v=2 only", "'doubles' is the case v=2 only"]),
    Mutant("total_messages_times_v", ASSIGNMENT,
           {"d1": "bubble_factor = v\nmessages_factor_middle = v\nmessages_factor_total = v"},
           {"messages_factor_total"}, ["v is right for a middle rank"]),
    # Bubble/T_ideal instead of bubble/T; the wrong claims found from them are wrong too.
    Mutant("gpt3_as_bubble_over_ideal", ASSIGNMENT,
           {"d2": 'gpt3_bubbles = {"gpipe": Fraction(7, 16), "1f1b": Fraction(7, 64), '
                  '"interleaved": Fraction(7, 128)}\n'
                  'claimed = {"gpipe": (30, 0), "1f1b": (9.8, 1), "interleaved": (5.3, 1)}\n'
                  "wrong_claims = {key for key, (percent, digits) in claimed.items()\n"
                  "                if round(100 * float(gpt3_bubbles[key]), digits) != "
                  "percent}"},
           {"gpt3_bubbles", "wrong_claims"}, ["bubble/T_ideal", "30 % is right"]),
]


def samples(root: str) -> list[Work]:
    """This assignment's notebooks of the sample class (besides the all-right one)."""
    good = solved(ASSIGNMENT, root)
    names = ("zb1p_in_the_wrong_notation", "interleaving_halves_and_doubles",
             "gpt3_as_bubble_over_ideal", "pick_counts_chunks_as_stages")
    ben = apply(good, MUTANTS, *names)
    ben_fails = set().union(*(m.fails for m in MUTANTS if m.name in names))
    unmoved = next(m for m in MUTANTS if m.name == "w_right_after_b")
    return [
        Work("ben", "ZB-H1's bubble in the wrong notation, 'interleaving halves the bubble "
                    "and doubles communication', GPT-3's bubbles over the ideal time, chunks "
                    "counted as whole stages", ben, r"^graded$", ben_fails),
        Work("gus", "a 'ZB-H1' whose W's never move", unmoved.notebook(root), r"^graded$",
             unmoved.fails),
    ]
