# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown] nbgrader={"grade": false, "grade_id": "intro", "locked": true, "schema_version": 3, "solution": false}
# # Homework 6 · Beyond 1F1B
#
# Zero-bubble schedules split each backward into **B** (the gradient of the stage's input,
# which the previous stage waits for) and **W** (the gradient of its weights, which nobody
# waits for). DualPipe overlaps a forward and a backward. Here you write ZB-H1 yourself,
# compute the bubbles of the DeepSeek-V3 report's table, pick a schedule under a memory
# budget, and check an interview answer's claims. Indices start at 0; an action is written
# `<stage><op><microbatch>`, e.g. `2W5`.
#
# Lecture 06 covers everything here. How this notebook is graded:
#
# * Put each answer in the variable the question names, with the type it asks for
#   (a number, a SymPy expression, a string...). Then run the test cell below it.
# * Each check in a test cell prints one line: ✓ when the answer is right, ✗ with what is
#   wrong with it otherwise and, when it is a known misconception, which one. A test cell's
#   points are shared among its checks, so every right answer counts.
# * Hidden tests run when the notebook is graded; they check the same things on other
#   inputs.
# * Do not edit or delete the test cells: they are restored before grading anyway.
# * Restart the kernel and run all cells before you submit.

# %% nbgrader={"grade": false, "grade_id": "setup", "locked": true, "schema_version": 3, "solution": false}
from fractions import Fraction

import sympy as sp

from autograder.checks import hw6_beyond_1f1b as checks
from paralab import schedules
from paralab.schedules import Action, Schedule, validate
from paralab.simulator import simulate

# DeepSeek-V3's notation (Table 2), per chunk of the model: F a forward, B a FULL backward
# (input and weight gradients), W its weight-gradient part, FB a forward and a full
# backward overlapped (F&B), PP the number of pipeline stages. Use exactly these.
PP, F, B, W, FB = sp.symbols("PP F B W FB", positive=True)
# Ranks and chunks per rank, for part D.
p, v = sp.symbols("p v", positive=True)

# %% [markdown] nbgrader={"grade": false, "grade_id": "part_a", "locked": true, "schema_version": 3, "solution": false}
# ## Part A · Write ZB-H1
#
# ZB-H1 (Qi et al. 2024) keeps 1F1B's forwards and backwards exactly: rank $r$ runs a
# warm-up of $\min(p-r-1, m)$ forwards, then one forward and one backward at a time, then
# the remaining backwards (stage $r$ lives on rank $r$). The backward is split: every `B` of
# microbatch $i$ has a `W` of microbatch $i$ somewhere after it. The rule that places them:
# right after each `B`, rank $r$ runs the `W` of the oldest microbatch whose `W` it still
# owes — unless it owes at most $r$ of them. After its last `B` it runs the `W`'s still owed,
# oldest first.
#
# **A1.** Write `zb_h1(p, m)`, returning a `Schedule` in that order. Build it yourself from
# `Action("F", i, r)`, `Action("B", i, r)`, `Action("W", i, r)`; do not call the library's
# schedule generators. `print(schedule)`, `schedule.grid()` and `validate(schedule)` help.

# %% nbgrader={"grade": false, "grade_id": "zb", "locked": false, "schema_version": 3, "solution": true}
def zb_h1(p, m):
    orders = []
    for r in range(p):
        actions = []
        ### BEGIN SOLUTION
        warmup = min(p - r - 1, m)
        owed = []  # microbatches whose W this rank has not run yet, oldest first

        def backward(i):
            actions.append(Action("B", i, r))
            owed.append(i)
            if len(owed) > r:
                actions.append(Action("W", owed.pop(0), r))

        for i in range(warmup):
            actions.append(Action("F", i, r))
        for k in range(m - warmup):
            actions.append(Action("F", warmup + k, r))
            backward(k)
        for i in range(m - warmup, m):
            backward(i)
        actions += [Action("W", i, r) for i in owed]
        ### END SOLUTION
        orders.append(tuple(actions))
    return Schedule(tuple(orders), num_microbatches=m, num_stages=p, name="zb-h1")


print(zb_h1(4, 8))

# %% nbgrader={"grade": true, "grade_id": "test_zb_visible", "locked": true, "points": 4, "schema_version": 3, "solution": false}
checks.check("zb_p4_m8", lambda: zb_h1(4, 8))
checks.check("zb_p3_m5", lambda: zb_h1(3, 5))

# %% nbgrader={"grade": true, "grade_id": "test_zb_hidden", "locked": true, "points": 4, "schema_version": 3, "solution": false}
# Other sizes, including fewer microbatches than ranks; and your zb_h1 once more in a fresh
# process where the library's schedule generators are not available.
### BEGIN HIDDEN TESTS
checks.check("zb_hidden", lambda: [zb_h1(p_, m_) for p_, m_ in checks.HIDDEN_SIZES])
### END HIDDEN TESTS

# %% [markdown] nbgrader={"grade": false, "grade_id": "a2_text", "locked": true, "schema_version": 3, "solution": false}
# **A2.** Simulate your schedule and the library's 1F1B (whose `B` then does both halves)
# for $p = 4$, $m = 8$, $t_f = t_b = t_w = 2$ ms. Store each one's idle time of rank 0 (ms)
# in `zb_idle` and `one_f_one_b_idle`.

# %% nbgrader={"grade": false, "grade_id": "a2", "locked": false, "schema_version": 3, "solution": true}
### BEGIN SOLUTION
zb_idle = simulate(zb_h1(4, 8), 2, 2, 2).idle[0]
one_f_one_b_idle = simulate(schedules.one_f_one_b(4, 8), 2, 2, 2).idle[0]
### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "test_zb_idle", "locked": true, "points": 2, "schema_version": 3, "solution": false}
checks.check("zb_idle")
checks.check("one_f_one_b_idle")

# %% [markdown] nbgrader={"grade": false, "grade_id": "a3_text", "locked": true, "schema_version": 3, "solution": false}
# Finally, your ZB-H1 runs for real: 4 processes each build one stage of a small model, run
# B and W as separate passes in your order, and the gradients must equal those of one
# process running the whole model (a few seconds).

# %% nbgrader={"grade": true, "grade_id": "test_zb_executor", "locked": true, "points": 3, "schema_version": 3, "solution": false}
checks.check("zb_executor", lambda: zb_h1(4, 8))

# %% [markdown] nbgrader={"grade": false, "grade_id": "part_b", "locked": true, "schema_version": 3, "solution": false}
# ## Part B · DeepSeek-V3's bubble table
#
# The DeepSeek-V3 report compares bubbles in per-chunk costs where **B is the full
# backward**. The Zero Bubble paper writes ZB-H1's bubble as $(p-1)(t_f + t_b - t_w)$ with
# $t_b$ the *input-gradient* backward only.
#
# **B1.** In the symbols `PP, F, B, W, FB` of the setup cell, write the bubble of ZB1P
# (= ZB-H1) in `zb1p_bubble` and the bubble of DualPipe in `dualpipe_bubble`, as the report
# gives them.

# %% nbgrader={"grade": false, "grade_id": "b1", "locked": false, "schema_version": 3, "solution": true}
### BEGIN SOLUTION
zb1p_bubble = (PP - 1) * (F + B - 2 * W)
dualpipe_bubble = (PP / 2 - 1) * (FB + B - 3 * W)
### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "test_b_formulas", "locked": true, "points": 3, "schema_version": 3, "solution": false}
checks.check("zb1p_bubble")
checks.check("dualpipe_bubble")

# %% [markdown] nbgrader={"grade": false, "grade_id": "b2_text", "locked": true, "schema_version": 3, "solution": false}
# **B2.** With $PP = 8$ stages and, per chunk, $F = 2$, $B = 4$ (full), $W = 2$, $F\&B = 5$
# ms: the bubbles of 1F1B, ZB1P and DualPipe in ms, in `one_f_one_b_ms`, `zb1p_ms`,
# `dualpipe_ms`.

# %% nbgrader={"grade": false, "grade_id": "b2", "locked": false, "schema_version": 3, "solution": true}
### BEGIN SOLUTION
at = {PP: 8, F: 2, B: 4, W: 2, FB: 5}
one_f_one_b_ms = ((PP - 1) * (F + B)).subs(at)
zb1p_ms = zb1p_bubble.subs(at)
dualpipe_ms = dualpipe_bubble.subs(at)
### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "test_b_numbers", "locked": true, "points": 3, "schema_version": 3, "solution": false}
checks.check("one_f_one_b_ms")
checks.check("zb1p_ms")
checks.check("dualpipe_ms")

# %% [markdown] nbgrader={"grade": false, "grade_id": "b3_text", "locked": true, "schema_version": 3, "solution": false}
# **B3.** The same costs in the Zero Bubble paper's notation: the tuple
# `zb_paper_costs = (t_f, t_b, t_w)` in ms.

# %% nbgrader={"grade": false, "grade_id": "b3", "locked": false, "schema_version": 3, "solution": true}
### BEGIN SOLUTION
zb_paper_costs = (2, 4 - 2, 2)
### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "test_b_costs", "locked": true, "points": 1, "schema_version": 3, "solution": false}
checks.check("zb_paper_costs")

# %% [markdown] nbgrader={"grade": false, "grade_id": "b4_text", "locked": true, "schema_version": 3, "solution": false}
# **B4.** Confirm with the simulator. DualPipeV runs the $PP = 8$ chunks on $p = 4$ ranks
# (`schedules.dualpipe_v(4, 16)`, two chunks per rank). Simulate it with the chunk costs of
# B2 (`simulate(schedule, t_f, t_b, t_w, t_fb=...)`; a list gives each stage's cost, a
# number is one *rank's* share, split over its chunks) and store the largest idle time of a
# rank, in ms, in `dualpipe_simulated`.

# %% nbgrader={"grade": false, "grade_id": "b4", "locked": false, "schema_version": 3, "solution": true}
### BEGIN SOLUTION
dual = simulate(schedules.dualpipe_v(4, 16), [2] * 8, [4 - 2] * 8, [2] * 8, t_fb=[5] * 8)
dualpipe_simulated = max(dual.idle)
### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "test_b_simulated", "locked": true, "points": 2, "schema_version": 3, "solution": false}
checks.check("dualpipe_simulated")

# %% [markdown] nbgrader={"grade": false, "grade_id": "part_c", "locked": true, "schema_version": 3, "solution": false}
# ## Part C · A schedule under a memory budget
#
# $p = 4$ ranks, $m = 8$ microbatches, $t_f = t_b = t_w = 1$ per rank, and an overlapped
# forward and full backward costs `t_fb` per rank (DualPipeV's `F&B`; 2.5 unless given).
# A schedule's memory is the peak activation memory of its fullest rank, in units of one
# microbatch's activations through one *whole* stage: in a schedule with two chunks per
# rank (`schedule.chunks`), a chunk's activations count half.
#
# **C1.** Write `pick_schedule(budget, t_fb=2.5)`: among `checks.CANDIDATES` (names for
# `schedules.build`; `interleaved` with $v = 2$ chunks), the one with the shortest simulated
# step time (makespan) whose memory is at most `budget`, or `None` if none fits.

# %% nbgrader={"grade": false, "grade_id": "c1", "locked": false, "schema_version": 3, "solution": true}
def pick_schedule(budget, t_fb=2.5):
    ### BEGIN SOLUTION
    best = None
    for name in checks.CANDIDATES:
        schedule = schedules.build(name, 4, 8, 2 if name == "interleaved" else 1)
        timeline = simulate(schedule, 1, 1, 1, t_fb=t_fb if schedule.fused else None)
        memory = Fraction(max(timeline.peak_activations), schedule.chunks)
        if memory <= budget and (best is None or timeline.makespan < best[0]):
            best = (timeline.makespan, name)
    return None if best is None else best[1]
    ### END SOLUTION


print(pick_schedule(4), pick_schedule(4.5))

# %% nbgrader={"grade": true, "grade_id": "test_pick_visible", "locked": true, "points": 2, "schema_version": 3, "solution": false}
checks.check("pick_4", lambda: pick_schedule(4))
checks.check("pick_4_5", lambda: pick_schedule(4.5))

# %% nbgrader={"grade": true, "grade_id": "test_pick_hidden", "locked": true, "points": 2, "schema_version": 3, "solution": false}
### BEGIN HIDDEN TESTS
checks.check("pick_hidden", lambda: [pick_schedule(b_, f_) for b_, f_ in checks.HIDDEN_BUDGETS])
### END HIDDEN TESTS

# %% [markdown] nbgrader={"grade": false, "grade_id": "part_d", "locked": true, "schema_version": 3, "solution": false}
# ## Part D · An interview answer, checked
#
# An interview answer about pipeline bubbles claims that interleaving (`v` chunks per
# rank) "reduces the bubble by about half, but doubles the communication", and that GPT-3's
# pipeline ($p = 8$) has a bubble of 30 % with GPipe ($m = 16$), 9.8 % with 1F1B ($m = 64$)
# and 5.3 % interleaved ($v = 2$, $m = 64$).
#
# **D1.** As SymPy expressions in `p` and `v`: by what factor interleaving divides the
# bubble, `bubble_factor`; by what factor it multiplies the point-to-point messages a
# middle rank (neither the first nor the last) sends per step, `messages_factor_middle`;
# and the messages all ranks send together, `messages_factor_total`.

# %% nbgrader={"grade": false, "grade_id": "d1", "locked": false, "schema_version": 3, "solution": true}
### BEGIN SOLUTION
bubble_factor = v
messages_factor_middle = v
messages_factor_total = (v * p - 1) / (p - 1)
### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "test_d_factors", "locked": true, "points": 3, "schema_version": 3, "solution": false}
checks.check("bubble_factor")
checks.check("messages_factor_middle")
checks.check("messages_factor_total")

# %% [markdown] nbgrader={"grade": false, "grade_id": "d2_text", "locked": true, "schema_version": 3, "solution": false}
# **D2.** The three GPT-3 bubbles, as exact fractions of the step time, in a dict
# `gpt3_bubbles` with the keys `"gpipe"`, `"1f1b"`, `"interleaved"`. Then the set
# `wrong_claims` of the keys whose percentage in the answer is wrong at the precision it
# is written in (30 % to the percent, the others to a tenth of a percent).

# %% nbgrader={"grade": false, "grade_id": "d2", "locked": false, "schema_version": 3, "solution": true}
### BEGIN SOLUTION
gpt3_bubbles = {"gpipe": Fraction(7, 16 + 7), "1f1b": Fraction(7, 64 + 7),
                "interleaved": Fraction(7, 2 * 64 + 7)}
claimed = {"gpipe": (30, 0), "1f1b": (9.8, 1), "interleaved": (5.3, 1)}
wrong_claims = {key for key, (percent, digits) in claimed.items()
                if round(100 * float(gpt3_bubbles[key]), digits) != percent}
### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "test_d_gpt3", "locked": true, "points": 3, "schema_version": 3, "solution": false}
checks.check("gpt3_bubbles")
checks.check("wrong_claims")
