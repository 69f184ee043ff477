# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown] nbgrader={"grade": false, "grade_id": "intro", "locked": true, "schema_version": 3, "solution": false}
# # Homework 2 · Pipeline bubbles
#
# A model is split into $p = 4$ pipeline stages, one per rank. A training step processes
# $m = 8$ microbatches. One microbatch's forward through one stage takes $t_f = 2$ ms, its
# backward $t_b = 4$ ms. Communication is free. Indices start at 0 (microbatch `0..m-1`,
# stage and rank `0..p-1`), and an action is written `<stage><op><microbatch>`, e.g. `2F5`.
#
# Lecture 02 covers everything here. How this notebook is graded:
#
# * Put each answer in the variable the question names, with the type it asks for
#   (a number, a SymPy expression, a list...). Then run the test cell below it.
# * Each check in a test cell prints one line: ✓ when the answer is right, ✗ with what is
#   wrong with it otherwise and, when it is a known misconception, which one. A test cell's
#   points are shared among its checks, so every right answer counts.
# * Hidden tests run when the notebook is graded; they check the same things on other
#   inputs.
# * Do not edit or delete the test cells: they are restored before grading anyway.
# * Restart the kernel and run all cells before you submit.

# %% nbgrader={"grade": false, "grade_id": "setup", "locked": true, "schema_version": 3, "solution": false}
import sympy as sp

from autograder.checks import hw2_pipeline_bubbles as checks
from paralab import schedules
from paralab.schedules import Action, Schedule, validate
from paralab.simulator import simulate

# Symbols for the formulas of part B (use exactly these).
p, m, t_f, t_b = sp.symbols("p m t_f t_b", positive=True)

# %% [markdown] nbgrader={"grade": false, "grade_id": "part_a", "locked": true, "schema_version": 3, "solution": false}
# ## Part A · GPipe, in numbers
#
# GPipe runs every microbatch's forward through all stages, then every backward.
#
# **A1.** How long does one training step take, in ms? Store it in `T_total`.

# %% nbgrader={"grade": false, "grade_id": "a1", "locked": false, "schema_version": 3, "solution": true}
### BEGIN SOLUTION
# The last stage starts after microbatch 0 crossed p-1 stages, then runs m forwards and
# m backwards back to back; the last gradient then crosses p-1 stages back.
T_total = (4 - 1) * 2 + 8 * 2 + 8 * 4 + (4 - 1) * 4
### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "test_T_total", "locked": true, "points": 2, "schema_version": 3, "solution": false}
checks.check("T_total")

# %% [markdown] nbgrader={"grade": false, "grade_id": "a2_text", "locked": true, "schema_version": 3, "solution": false}
# **A2.** With no bubble at all, how long would the step take (ms)? Store it in `T_ideal`.

# %% nbgrader={"grade": false, "grade_id": "a2", "locked": false, "schema_version": 3, "solution": true}
### BEGIN SOLUTION
T_ideal = 8 * (2 + 4)
### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "test_T_ideal", "locked": true, "points": 1, "schema_version": 3, "solution": false}
checks.check("T_ideal")

# %% [markdown] nbgrader={"grade": false, "grade_id": "a3_text", "locked": true, "schema_version": 3, "solution": false}
# **A3.** The homework defines the "bubble ratio" as $T_\text{total} / T_\text{ideal}$.
# Compute it; store it in `time_ratio`.

# %% nbgrader={"grade": false, "grade_id": "a3", "locked": false, "schema_version": 3, "solution": true}
### BEGIN SOLUTION
time_ratio = T_total / T_ideal
### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "test_time_ratio", "locked": true, "points": 1, "schema_version": 3, "solution": false}
checks.check("time_ratio")

# %% [markdown] nbgrader={"grade": false, "grade_id": "a4_text", "locked": true, "schema_version": 3, "solution": false}
# **A4.** Same questions with $m = 16$ microbatches: store the step time, the ideal time and
# their ratio in `T_total_16`, `T_ideal_16` and `time_ratio_16`.

# %% nbgrader={"grade": false, "grade_id": "a4", "locked": false, "schema_version": 3, "solution": true}
### BEGIN SOLUTION
T_total_16 = (16 + 4 - 1) * (2 + 4)
T_ideal_16 = 16 * (2 + 4)
time_ratio_16 = T_total_16 / T_ideal_16
### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "test_m16", "locked": true, "points": 2, "schema_version": 3, "solution": false}
checks.check("T_total_16")
checks.check("T_ideal_16")
checks.check("time_ratio_16")

# %% [markdown] nbgrader={"grade": false, "grade_id": "part_b", "locked": true, "schema_version": 3, "solution": false}
# ## Part B · The general formulas
#
# Write each answer as a SymPy expression in the symbols `p, m, t_f, t_b` defined at the
# top. It is graded by symbolic equivalence: any correct form is accepted.
#
# **B1.** GPipe's step time and its ideal time: `T_total_formula`, `T_ideal_formula`.

# %% nbgrader={"grade": false, "grade_id": "b1", "locked": false, "schema_version": 3, "solution": true}
### BEGIN SOLUTION
T_total_formula = (p - 1) * t_f + m * (t_f + t_b) + (p - 1) * t_b
T_ideal_formula = m * (t_f + t_b)
### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "test_T_formulas", "locked": true, "points": 3, "schema_version": 3, "solution": false}
checks.check("T_total_formula")
checks.check("T_ideal_formula")

# %% [markdown] nbgrader={"grade": false, "grade_id": "b2_text", "locked": true, "schema_version": 3, "solution": false}
# **B2.** Three different quantities are all called "bubble ratio" in papers and notes.
# With the bubble $= T_\text{total} - T_\text{ideal}$ (a rank's idle time), write
#
# * `time_ratio_formula` $= T_\text{total} / T_\text{ideal}$,
# * `bubble_overhead_formula` $=$ bubble $/ T_\text{ideal}$ (Megatron-LM's "bubble time fraction"),
# * `bubble_fraction_formula` $=$ bubble $/ T_\text{total}$ (the idle share; GPipe paper),
#
# each simplified so that $t_f$ and $t_b$ cancel out.

# %% nbgrader={"grade": false, "grade_id": "b2", "locked": false, "schema_version": 3, "solution": true}
### BEGIN SOLUTION
bubble = T_total_formula - T_ideal_formula
time_ratio_formula = sp.simplify(T_total_formula / T_ideal_formula)
bubble_overhead_formula = sp.simplify(bubble / T_ideal_formula)
bubble_fraction_formula = sp.simplify(bubble / T_total_formula)
### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "test_quantity_formulas", "locked": true, "points": 3, "schema_version": 3, "solution": false}
checks.check("time_ratio_formula")
checks.check("bubble_overhead_formula")
checks.check("bubble_fraction_formula")

# %% [markdown] nbgrader={"grade": false, "grade_id": "b3_text", "locked": true, "schema_version": 3, "solution": false}
# **B3.** Evaluate the three for $p = 4$, $m = 8$. Store them in a dict
# `quantities_p4_m8` with the keys `"time_ratio"`, `"bubble_overhead"`, `"bubble_fraction"`.

# %% nbgrader={"grade": false, "grade_id": "b3", "locked": false, "schema_version": 3, "solution": true}
### BEGIN SOLUTION
quantities_p4_m8 = {
    "time_ratio": time_ratio_formula.subs({p: 4, m: 8}),
    "bubble_overhead": bubble_overhead_formula.subs({p: 4, m: 8}),
    "bubble_fraction": bubble_fraction_formula.subs({p: 4, m: 8}),
}
### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "test_quantities_p4_m8", "locked": true, "points": 2, "schema_version": 3, "solution": false}
checks.check("quantities_p4_m8")

# %% [markdown] nbgrader={"grade": false, "grade_id": "b4_text", "locked": true, "schema_version": 3, "solution": false}
# **B4.** With $p = 4$, what is the smallest number of microbatches $m$ for which the ranks
# are idle at most 5% of the step (bubble $/ T_\text{total} \le 0.05$)? Store the integer in
# `min_m_5_percent`.

# %% nbgrader={"grade": false, "grade_id": "b4", "locked": false, "schema_version": 3, "solution": true}
### BEGIN SOLUTION
min_m_5_percent = next(k for k in range(1, 10_000)
                       if bubble_fraction_formula.subs({p: 4, m: k}) <= sp.Rational(1, 20))
### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "test_min_m", "locked": true, "points": 2, "schema_version": 3, "solution": false}
checks.check("min_m_5_percent")

# %% [markdown] nbgrader={"grade": false, "grade_id": "part_c", "locked": true, "schema_version": 3, "solution": false}
# ## Part C · 1F1B against GPipe
#
# 1F1B runs, on rank $r$, a warm-up of $p-r-1$ forwards, then alternates one forward and
# one backward, then runs the remaining backwards. Use `simulate` and
# `paralab.schedules` to explore if you like (the library's own `one_f_one_b` is allowed in
# this part).
#
# **C1.** The 1F1B step time for $p=4$, $m=8$, $t_f=2$, $t_b=4$ (ms): `one_f_one_b_T_total`.
# And the bubble fraction (bubble / $T_\text{total}$) of GPipe and of 1F1B as a pair
# `same_bubble = (gpipe_fraction, one_f_one_b_fraction)`.

# %% nbgrader={"grade": false, "grade_id": "c1", "locked": false, "schema_version": 3, "solution": true}
### BEGIN SOLUTION
one_f_one_b_timeline = simulate(schedules.one_f_one_b(4, 8), t_f=2, t_b=4)
one_f_one_b_T_total = one_f_one_b_timeline.makespan
same_bubble = (simulate(schedules.gpipe(4, 8), t_f=2, t_b=4).bubble_fraction,
               one_f_one_b_timeline.bubble_fraction)
### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "test_one_f_one_b_time", "locked": true, "points": 2, "schema_version": 3, "solution": false}
checks.check("one_f_one_b_T_total")
checks.check("same_bubble")

# %% [markdown] nbgrader={"grade": false, "grade_id": "c2_text", "locked": true, "schema_version": 3, "solution": false}
# **C2.** Peak activation memory: for each rank $0..3$, the largest number of microbatches
# whose activations the rank holds at once (from the start of a forward to the end of its
# backward). Lists `peak_gpipe` and `peak_1f1b` for $p = 4$, $m = 8$.

# %% nbgrader={"grade": false, "grade_id": "c2", "locked": false, "schema_version": 3, "solution": true}
### BEGIN SOLUTION
peak_gpipe = simulate(schedules.gpipe(4, 8), 2, 4).peak_activations
peak_1f1b = simulate(schedules.one_f_one_b(4, 8), 2, 4).peak_activations
### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "test_peaks", "locked": true, "points": 2, "schema_version": 3, "solution": false}
checks.check("peak_gpipe")
checks.check("peak_1f1b")

# %% [markdown] nbgrader={"grade": false, "grade_id": "c3_text", "locked": true, "schema_version": 3, "solution": false}
# **C3.** Interleaved 1F1B with $v = 2$ chunks per rank (each chunk costs half of a rank's
# $t_f$ and $t_b$): the step time in ms for $p=4$, $m=8$. Store it in `interleaved_T_total`.

# %% nbgrader={"grade": false, "grade_id": "c3", "locked": false, "schema_version": 3, "solution": true}
### BEGIN SOLUTION
interleaved_T_total = simulate(schedules.interleaved_one_f_one_b(4, 8, 2), 2, 4).makespan
### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "test_interleaved", "locked": true, "points": 1, "schema_version": 3, "solution": false}
checks.check("interleaved_T_total")

# %% [markdown] nbgrader={"grade": false, "grade_id": "c4_text", "locked": true, "schema_version": 3, "solution": false}
# **C4.** What does 1F1B improve over GPipe? Store a set with every true statement among
# `"bubble_at_equal_m"` (a smaller bubble for the same $m$), `"peak_activation_memory"`,
# `"allows_larger_m"` (more microbatches fit in memory), `"communication_volume"`.

# %% nbgrader={"grade": false, "grade_id": "c4", "locked": false, "schema_version": 3, "solution": true}
### BEGIN SOLUTION
one_f_one_b_gains = {"peak_activation_memory", "allows_larger_m"}
### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "test_gains", "locked": true, "points": 2, "schema_version": 3, "solution": false}
checks.check("one_f_one_b_gains")

# %% [markdown] nbgrader={"grade": false, "grade_id": "part_d", "locked": true, "schema_version": 3, "solution": false}
# ## Part D · Write the 1F1B schedule
#
# Write `one_f_one_b(p, m)`: it returns a `Schedule` whose `orders[r]` is rank $r$'s list of
# actions, in Megatron-LM's order: a warm-up of $\min(p-r-1, m)$ forwards, then the steady
# state (one forward, then one backward, in microbatch order), then the cool-down (the
# remaining backwards). Build it yourself from `Action("F", microbatch, stage)` and
# `Action("B", microbatch, stage)`; here stage $r$ lives on rank $r$. Do not call the
# library's schedule generators.
#
# `print(schedule)` and `schedule.grid()` show what you built; `validate(schedule)` explains
# what is wrong with an invalid one.

# %% nbgrader={"grade": false, "grade_id": "d", "locked": false, "schema_version": 3, "solution": true}
def one_f_one_b(p, m):
    orders = []
    for r in range(p):
        actions = []
        ### BEGIN SOLUTION
        warmup = min(p - r - 1, m)
        for i in range(warmup):
            actions.append(Action("F", i, r))
        for k in range(m - warmup):
            actions.append(Action("F", warmup + k, r))
            actions.append(Action("B", k, r))
        for i in range(m - warmup, m):
            actions.append(Action("B", i, r))
        ### END SOLUTION
        orders.append(tuple(actions))
    return Schedule(tuple(orders), num_microbatches=m, num_stages=p, name="1f1b")


print(one_f_one_b(4, 8).grid())

# %% nbgrader={"grade": true, "grade_id": "test_schedule_visible", "locked": true, "points": 4, "schema_version": 3, "solution": false}
checks.check("schedule_p4_m8", lambda: one_f_one_b(4, 8))
checks.check("schedule_p2_m3", lambda: one_f_one_b(2, 3))

# %% nbgrader={"grade": true, "grade_id": "test_schedule_hidden", "locked": true, "points": 4, "schema_version": 3, "solution": false}
# Other sizes, including fewer microbatches than ranks; and your one_f_one_b once more in a
# fresh process where the library's schedule generators are not available.
### BEGIN HIDDEN TESTS
checks.check("schedules_hidden", lambda: [one_f_one_b(p_, m_) for p_, m_ in checks.HIDDEN_SIZES])
### END HIDDEN TESTS

# %% [markdown] nbgrader={"grade": false, "grade_id": "d2_text", "locked": true, "schema_version": 3, "solution": false}
# Finally, your schedule runs for real: 4 processes each build one stage of a small model,
# send activations and gradients to each other in your order, and the gradients must equal
# those of one process running the whole model (a few seconds).

# %% nbgrader={"grade": true, "grade_id": "test_schedule_executor", "locked": true, "points": 3, "schema_version": 3, "solution": false}
checks.check("executor_p4_m8", lambda: one_f_one_b(4, 8))
