# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown] nbgrader={"grade": false, "grade_id": "intro", "locked": true, "schema_version": 3, "solution": false}
# # Homework 4 · Activation memory and recomputation
#
# The model is a GPT with $s = 2048$ tokens per sequence, microbatches of $b = 1$ sequence,
# hidden size $h = 5120$, $a = 40$ attention heads and $L = 40$ layers (about 13 billion
# parameters). Activations are 16-bit (2 bytes per element) and dropout masks take 1 byte per
# element, as in Korthikanti et al. 2022. The layer is Megatron-LM's, as in lecture 04:
# LayerNorm, QKV, scores, softmax, dropout, attention over V, output projection, dropout,
# residual; LayerNorm, `Linear(h, 4h)`, GeLU, `Linear(4h, h)`, dropout, residual.
#
# Lecture 04 covers everything here. How this notebook is graded:
#
# * Put each answer in the variable the question names, with the type it asks for
#   (a number, a SymPy expression, a string, a list...). Then run the test cell below it.
# * Each check in a test cell prints one line: ✓ when the answer is right, ✗ with what is
#   wrong with it otherwise and, when it is a known misconception, which one. A test cell's
#   points are shared among its checks, so every right answer counts.
# * Hidden tests run when the notebook is graded; they check the same things on other
#   inputs.
# * Do not edit or delete the test cells: they are restored before grading anyway.
# * Restart the kernel and run all cells before you submit.

# %% nbgrader={"grade": false, "grade_id": "setup", "locked": true, "schema_version": 3, "solution": false}
import sympy as sp
import torch
from torch.utils.checkpoint import checkpoint

from autograder.checks import hw4_memory as checks
from paralab import memory, schedules
from paralab.simulator import simulate
from paralab.transformer import TransformerLayer

# Symbols for the formulas (use exactly these): sequence, microbatch, hidden, heads,
# tensor-parallel degree, layers, pipeline stages, microbatches, chunks per rank.
s, b, h, a, t, L, p, m, v = sp.symbols("s b h a t L p m v", positive=True)

# The homework's model and layout, for substituting into your formulas.
MODEL = {s: 2048, b: 1, h: 5120, a: 40, L: 40}
LAYOUT = {t: 4, p: 4, m: 32}
GiB = 2 ** 30

# %% [markdown] nbgrader={"grade": false, "grade_id": "part_a", "locked": true, "schema_version": 3, "solution": false}
# ## Part A · One layer's activations
#
# **A1.** Without any parallelism or recomputation, how many bytes does one layer keep for
# its backward, per microbatch? Write it as a SymPy expression in `s, b, h, a` and store it
# in `layer_bytes_formula`. (It is graded by symbolic equivalence: any correct form is
# accepted.)

# %% nbgrader={"grade": false, "grade_id": "a1", "locked": false, "schema_version": 3, "solution": true}
### BEGIN SOLUTION
# Attention: LayerNorm input, QKV input, Q, K, V, projection input: 6 x 2sbh; softmax
# output and dropout output: 2 x 2as^2b; dropout masks: as^2b (scores) + sbh (after the block).
attention = 6 * 2 * s * b * h + 2 * 2 * a * s**2 * b + a * s**2 * b + s * b * h
# MLP: LayerNorm input, fc1 input (2sbh each), GeLU input and fc2 input (4h wide: 8sbh
# each), dropout mask sbh.
mlp = 2 * 2 * s * b * h + 2 * 8 * s * b * h + s * b * h
layer_bytes_formula = sp.factor(attention + mlp)
### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "test_layer_bytes_formula", "locked": true, "points": 3, "schema_version": 3, "solution": false}
checks.check("layer_bytes_formula")

# %% [markdown] nbgrader={"grade": false, "grade_id": "a2_text", "locked": true, "schema_version": 3, "solution": false}
# **A2.** Evaluate it for the homework's model: bytes per layer and microbatch, in
# `layer_bytes`.

# %% nbgrader={"grade": false, "grade_id": "a2", "locked": false, "schema_version": 3, "solution": true}
### BEGIN SOLUTION
layer_bytes = layer_bytes_formula.subs(MODEL)
### END SOLUTION
print(f"{layer_bytes} bytes = {float(layer_bytes) / GiB:.2f} GiB per layer")

# %% nbgrader={"grade": true, "grade_id": "test_layer_bytes", "locked": true, "points": 2, "schema_version": 3, "solution": false}
checks.check("layer_bytes")

# %% [markdown] nbgrader={"grade": false, "grade_id": "a3_text", "locked": true, "schema_version": 3, "solution": false}
# **A3.** With tensor parallelism of degree $t$ (Megatron-LM: attention split by heads, the
# MLP by its $4h$ features) and *no* sequence parallelism: the bytes one rank keeps per
# layer and microbatch, as a SymPy expression in `s, b, h, a, t`: `tp_formula`.

# %% nbgrader={"grade": false, "grade_id": "a3", "locked": false, "schema_version": 3, "solution": true}
### BEGIN SOLUTION
# Replicated on every rank: LayerNorm inputs (4sbh), QKV and fc1 inputs (4sbh), the two
# dropout masks after the blocks (2sbh).  Everything between a column- and a row-parallel
# linear is split over the t ranks.
replicated = 10 * s * b * h
split = (24 * s * b * h + 5 * a * s**2 * b) / t
tp_formula = replicated + split
### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "test_tp_formula", "locked": true, "points": 3, "schema_version": 3, "solution": false}
checks.check("tp_formula")

# %% [markdown] nbgrader={"grade": false, "grade_id": "a4_text", "locked": true, "schema_version": 3, "solution": false}
# **A4.** For the homework's model with $t = 4$: the bytes one rank keeps per layer and
# microbatch with tensor parallelism alone (`"tp"`), with tensor and sequence parallelism
# (`"tp+sp"`), and with both plus selective recomputation of the attention core
# (`"tp+sp+selective"`). A dict `bytes_by_strategy` with those three keys.

# %% nbgrader={"grade": false, "grade_id": "a4", "locked": false, "schema_version": 3, "solution": true}
### BEGIN SOLUTION
bytes_by_strategy = {
    "tp": tp_formula.subs(MODEL).subs(LAYOUT),
    "tp+sp": (layer_bytes_formula / t).subs(MODEL).subs(LAYOUT),
    "tp+sp+selective": (34 * s * b * h / t).subs(MODEL).subs(LAYOUT),
}
### END SOLUTION
print({k: f"{float(x) / GiB:.3f} GiB" for k, x in bytes_by_strategy.items()})

# %% nbgrader={"grade": true, "grade_id": "test_bytes_by_strategy", "locked": true, "points": 3, "schema_version": 3, "solution": false}
checks.check("bytes_by_strategy")

# %% [markdown] nbgrader={"grade": false, "grade_id": "part_b", "locked": true, "schema_version": 3, "solution": false}
# ## Part B · Recomputation and a memory budget
#
# The model runs on $t = 4$ tensor-parallel ranks with sequence parallelism, and $p = 4$
# pipeline stages of $L/p$ layers each with the 1F1B schedule and $m = 32$ microbatches.
# Rank 0 (the first stage) can spend at most **8 GiB** ($8 \cdot 2^{30}$ bytes) on
# activations.
#
# **B1.** Which is the *least* recomputation that fits: `"none"`, `"selective"` (re-run
# the attention core) or `"full"` (keep each layer's input only)? Store the string in
# `least_recompute`.

# %% nbgrader={"grade": false, "grade_id": "b1", "locked": false, "schema_version": 3, "solution": true}
### BEGIN SOLUTION
# 1F1B's rank 0 holds p microbatches, each through L/p layers: L layers' worth.
first_stage = {
    "none": L * layer_bytes_formula / t,
    "selective": L * 34 * s * b * h / t,
    "full": L * 2 * s * b * h / t,
}
needed = {k: x.subs(MODEL).subs(LAYOUT) for k, x in first_stage.items()}
least_recompute = next(k for k in ("none", "selective", "full") if needed[k] <= 8 * GiB)
### END SOLUTION
print(least_recompute)

# %% nbgrader={"grade": true, "grade_id": "test_least_recompute", "locked": true, "points": 2, "schema_version": 3, "solution": false}
checks.check("least_recompute")

# %% [markdown] nbgrader={"grade": false, "grade_id": "b2_text", "locked": true, "schema_version": 3, "solution": false}
# **B2.** Selective recomputation re-runs the attention core ($QK^T$, softmax, dropout and
# the product with $V$) in the backward. What share of a layer's forward FLOPs is that, for
# the homework's $s$ and $h$? Count the matmuls (2 FLOPs per multiply-add; softmax and
# dropout are negligible). A number in `selective_share`.

# %% nbgrader={"grade": false, "grade_id": "b2", "locked": false, "schema_version": 3, "solution": true}
### BEGIN SOLUTION
# QKV 6bsh^2, scores 2bs^2h, @V 2bs^2h, projection 2bsh^2, MLP 16bsh^2.
core = 4 * b * s**2 * h
layer = 24 * b * s * h**2 + core
selective_share = (core / layer).subs(MODEL)
### END SOLUTION
print(selective_share)

# %% nbgrader={"grade": true, "grade_id": "test_selective_share", "locked": true, "points": 2, "schema_version": 3, "solution": false}
checks.check("selective_share")

# %% [markdown] nbgrader={"grade": false, "grade_id": "part_c", "locked": true, "schema_version": 3, "solution": false}
# ## Part C · A pipeline rank's memory
#
# Same layout: $t = 4$ with sequence parallelism, $p = 4$, $m = 32$, no recomputation unless
# a question says otherwise. Each stage holds $L/p$ layers.
#
# **C1.** The activation bytes rank 0 holds at its peak with GPipe (`peak_gpipe_rank0`)
# and with 1F1B (`peak_1f1b_rank0`).

# %% nbgrader={"grade": false, "grade_id": "c1", "locked": false, "schema_version": 3, "solution": true}
### BEGIN SOLUTION
per_layer = (layer_bytes_formula / t).subs(MODEL).subs(LAYOUT)
layers_per_stage = (L / p).subs(MODEL).subs(LAYOUT)
# GPipe: all m forwards before the first backward; 1F1B: p - r in flight on rank r.
peak_gpipe_rank0 = LAYOUT[m] * layers_per_stage * per_layer
peak_1f1b_rank0 = LAYOUT[p] * layers_per_stage * per_layer
### END SOLUTION
print(f"GPipe {float(peak_gpipe_rank0) / GiB:.2f} GiB, 1F1B {float(peak_1f1b_rank0) / GiB:.2f} GiB")

# %% nbgrader={"grade": true, "grade_id": "test_first_stage_peaks", "locked": true, "points": 3, "schema_version": 3, "solution": false}
checks.check("peak_gpipe_rank0")
checks.check("peak_1f1b_rank0")

# %% [markdown] nbgrader={"grade": false, "grade_id": "c2_text", "locked": true, "schema_version": 3, "solution": false}
# **C2.** Keep $L = 40$, $m = 32$, $t = 4$ with sequence parallelism and 1F1B, and vary the
# number of stages: rank 0's activation bytes for $p = 2, 4, 8$, as a list
# `first_stage_by_p`.

# %% nbgrader={"grade": false, "grade_id": "c2", "locked": false, "schema_version": 3, "solution": true}
### BEGIN SOLUTION
first_stage_by_p = [min(LAYOUT[m], p_) * sp.Rational(MODEL[L], p_) * per_layer for p_ in (2, 4, 8)]
### END SOLUTION
print([f"{float(x) / GiB:.2f} GiB" for x in first_stage_by_p])

# %% nbgrader={"grade": true, "grade_id": "test_first_stage_by_p", "locked": true, "points": 2, "schema_version": 3, "solution": false}
checks.check("first_stage_by_p")

# %% [markdown] nbgrader={"grade": false, "grade_id": "c3_text", "locked": true, "schema_version": 3, "solution": false}
# **C3.** Interleaved 1F1B gives each rank $v$ chunks of $L/(pv)$ layers; rank 0's warm-up
# runs $2(p-1) + (v-1)p$ chunk forwards before its first backward. For $m$ large enough,
# rank 0 then holds how many times the activations of 1F1B's rank 0? A SymPy expression in
# `p, v`: `interleaved_factor`.

# %% nbgrader={"grade": false, "grade_id": "c3", "locked": false, "schema_version": 3, "solution": true}
### BEGIN SOLUTION
in_flight = 2 * (p - 1) + (v - 1) * p + 1          # warm-up, plus the first steady forward
interleaved_factor = sp.simplify(in_flight * (L / (p * v)) / (p * (L / p)))
### END SOLUTION
print(interleaved_factor)

# %% nbgrader={"grade": true, "grade_id": "test_interleaved_factor", "locked": true, "points": 2, "schema_version": 3, "solution": false}
checks.check("interleaved_factor")

# %% [markdown] nbgrader={"grade": false, "grade_id": "c4_text", "locked": true, "schema_version": 3, "solution": false}
# **C4.** Everything on rank 0 with 1F1B, $t = 4$ with sequence parallelism and selective
# recomputation: its 16-bit weights and gradients and Adam's state in mixed precision (an
# fp32 master copy, momentum and variance) for its $L/p$ layers, plus its activations.
# A layer has $12h^2 + 13h$ parameters: tensor parallelism splits the weight matrices and
# the QKV and first MLP biases ($12h^2 + 7h$), and replicates the LayerNorms and the other
# two biases ($6h$). Total bytes in `rank0_total`.

# %% nbgrader={"grade": false, "grade_id": "c4", "locked": false, "schema_version": 3, "solution": true}
### BEGIN SOLUTION
params = (L / p * ((12 * h**2 + 7 * h) / t + 6 * h)).subs(MODEL).subs(LAYOUT)
model_states = (2 + 2 + 12) * params
activations = (L * 34 * s * b * h / t).subs(MODEL).subs(LAYOUT)
rank0_total = model_states + activations
### END SOLUTION
print(f"{float(rank0_total) / GiB:.2f} GiB")

# %% nbgrader={"grade": true, "grade_id": "test_rank0_total", "locked": true, "points": 2, "schema_version": 3, "solution": false}
checks.check("rank0_total")

# %% [markdown] nbgrader={"grade": false, "grade_id": "part_d", "locked": true, "schema_version": 3, "solution": false}
# ## Part D · The price in time
#
# Back to lecture 02's pipeline: 1F1B with $p = 4$, $m = 8$, $t_f = 2$ ms and $t_b = 4$ ms per
# microbatch and stage. With recomputation each backward first re-runs the recomputed part of
# the forward. Use `simulate` (it takes any `t_f`, `t_b`, exactly with `Fraction`s) and
# `schedules.one_f_one_b`.
#
# **D1.** With full recomputation: the step time `step_time_full` (ms) and the bubble, a
# rank's idle time, `bubble_full` (ms). Then with selective recomputation, for the homework's
# $s$ and $h$ (your B2): the step time `step_time_selective` (ms).

# %% nbgrader={"grade": false, "grade_id": "d", "locked": false, "schema_version": 3, "solution": true}
### BEGIN SOLUTION
from fractions import Fraction

full = simulate(schedules.one_f_one_b(4, 8), 2, 4 + 2)
step_time_full = full.makespan
bubble_full = full.makespan - full.ideal
share = Fraction(int(sp.numer(selective_share)), int(sp.denom(selective_share)))
step_time_selective = simulate(schedules.one_f_one_b(4, 8), 2, 4 + share * 2).makespan
### END SOLUTION
print(step_time_full, bubble_full, step_time_selective)

# %% nbgrader={"grade": true, "grade_id": "test_recompute_time", "locked": true, "points": 3, "schema_version": 3, "solution": false}
checks.check("step_time_full")
checks.check("bubble_full")
checks.check("step_time_selective")

# %% [markdown] nbgrader={"grade": false, "grade_id": "part_e", "locked": true, "schema_version": 3, "solution": false}
# ## Part E · Checkpoint a stage
#
# Write `checkpointed_forward(layers, x)`: it runs `x` (shape $(s, b, h)$) through the
# `layers` (a list of `TransformerLayer`, in order) and returns the output, so that autograd
# keeps **only each layer's input** for the backward (full recomputation, layer by layer:
# $2sbh$ per layer in 16-bit) — and the gradients stay exactly those of the plain stage. The
# layers use dropout.
#
# Use `torch.utils.checkpoint` or write the recomputation yourself with a
# `torch.autograd.Function`; do not switch on the layer's own `recompute` option.
#
# The test builds a stage, measures what autograd saves during your forward
# (`paralab.memory.SavedTensorMeter`), backpropagates, and compares everything with the plain
# stage `for layer in layers: x = layer(x)`.

# %% nbgrader={"grade": false, "grade_id": "e", "locked": false, "schema_version": 3, "solution": true}
def checkpointed_forward(layers, x):
    ### BEGIN SOLUTION
    # checkpoint keeps the layer's input, re-runs the layer in the backward, and restores
    # the random state so that dropout draws the same masks again.
    for layer in layers:
        x = checkpoint(layer, x, use_reentrant=False)
    return x
    ### END SOLUTION


result = checks.run_stage(checkpointed_forward)
print(f"saved {sum(result['saved'])} bytes during the forward")

# %% nbgrader={"grade": true, "grade_id": "test_checkpoint_visible", "locked": true, "points": 4, "schema_version": 3, "solution": false}
checks.check("checkpoint_visible", lambda: checks.run_stage(checkpointed_forward, checks.VISIBLE_STAGE))

# %% nbgrader={"grade": true, "grade_id": "test_checkpoint_hidden", "locked": true, "points": 4, "schema_version": 3, "solution": false}
# Other stages (1 to 3 layers, other sizes); and your checkpointed_forward once more in a fresh
# process where the layer's own recomputation is not available.
### BEGIN HIDDEN TESTS
checks.check("checkpoint_hidden", lambda: [checks.run_stage(checkpointed_forward, case) for case in checks.HIDDEN_STAGES])
### END HIDDEN TESTS
