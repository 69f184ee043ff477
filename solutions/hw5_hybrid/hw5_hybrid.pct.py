# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown] nbgrader={"grade": false, "grade_id": "intro", "locked": true, "schema_version": 3, "solution": false}
# # Homework 5 · Hybrid parallelism
#
# Data, pipeline and tensor parallelism together: `n = dp · pp · tp` ranks arranged in a mesh
# of shape `(dp, pp, tp)`, one process group per dimension. Ranks are numbered with `tp`
# innermost, as in Megatron-LM and PyTorch's `init_device_mesh`:
# `rank = (i_dp · pp + i_pp) · tp + i_tp`. Indices start at 0.
#
# Lecture 05 covers everything here. How this notebook is graded:
#
# * Put each answer in the variable the question names, with the type it asks for
#   (a number, a SymPy expression, a set, a function...). Then run the test cell below it.
# * Each check in a test cell prints one line: ✓ when the answer is right, ✗ with what is
#   wrong with it otherwise and, when it is a known misconception, which one. A test cell's
#   points are shared among its checks, so every right answer counts.
# * Hidden tests run when the notebook is graded; they check the same things on other
#   inputs, and run your functions once more where the library's own versions are not
#   available: write them yourself.
# * Do not edit or delete the test cells: they are restored before grading anyway.
# * Restart the kernel and run all cells before you submit.

# %% nbgrader={"grade": false, "grade_id": "setup", "locked": true, "schema_version": 3, "solution": false}
import sympy as sp
import torch

from autograder.checks import hw5_hybrid as checks
from paralab import comm, planner

# Symbols for the formulas of part B (use exactly these): the three degrees, blocks, global
# batch (rows), width, microbatches per pipeline, bytes per element.
dp, pp, tp, L, B, d, m, e = sp.symbols("dp pp tp L B d m e", positive=True)

# %% [markdown] nbgrader={"grade": false, "grade_id": "part_a", "locked": true, "schema_version": 3, "solution": false}
# ## Part A · The layout
#
# **A1.** Write `group_ranks(shape, dim)`: for a mesh `shape = (dp, pp, tp)` and a dimension
# `dim` (`"dp"`, `"pp"` or `"tp"`), the list of all groups of that dimension. A group is the
# list of ranks that share their other two coordinates, ordered by their coordinate along
# `dim` (so a rank's index in the list is its rank in the group). The order of the groups
# does not matter. Compute it yourself (do not call `paralab.mesh`).

# %% nbgrader={"grade": false, "grade_id": "a1", "locked": false, "schema_version": 3, "solution": true}
def group_ranks(shape, dim):
    ### BEGIN SOLUTION
    n_dp, n_pp, n_tp = shape
    axis = ("dp", "pp", "tp").index(dim)
    groups = {}
    for rank in range(n_dp * n_pp * n_tp):
        coords = (rank // (n_pp * n_tp), rank // n_tp % n_pp, rank % n_tp)
        others = coords[:axis] + coords[axis + 1:]
        groups.setdefault(others, []).append(rank)  # ascending rank = ascending coordinate
    return list(groups.values())
    ### END SOLUTION


for dim_ in ("dp", "pp", "tp"):
    print(dim_, group_ranks((2, 2, 2), dim_))

# %% nbgrader={"grade": true, "grade_id": "test_groups", "locked": true, "points": 4, "schema_version": 3, "solution": false}
checks.check("groups_2x2x2", lambda: {dim_: group_ranks((2, 2, 2), dim_)
                                      for dim_ in ("dp", "pp", "tp")})

# %% nbgrader={"grade": true, "grade_id": "test_groups_hidden", "locked": true, "points": 4, "schema_version": 3, "solution": false}
# Other meshes; and your group_ranks once more in a fresh process where paralab.mesh's
# layout functions are not available.
### BEGIN HIDDEN TESTS
checks.check("groups_hidden", lambda: [{dim_: group_ranks(shape_, dim_)
                                        for dim_ in ("dp", "pp", "tp")}
                                       for shape_ in checks.HIDDEN_SHAPES])
### END HIDDEN TESTS

# %% [markdown] nbgrader={"grade": false, "grade_id": "a2_text", "locked": true, "schema_version": 3, "solution": false}
# **A2.** The 8 ranks of the mesh `(2, 2, 2)` run on nodes that hold the ranks in order
# (node 0 the first GPUs, and so on). Which dimensions have a group that spans more than one
# node, with 4 GPUs per node? With 2 GPUs per node? Store a dict `crossing` mapping the GPUs
# per node (`4`, `2`) to a set of dimension names.

# %% nbgrader={"grade": false, "grade_id": "a2", "locked": false, "schema_version": 3, "solution": true}
### BEGIN SOLUTION
crossing = {}
for gpus in (4, 2):
    crossing[gpus] = {dim_ for dim_ in ("dp", "pp", "tp")
                      if any(len({r // gpus for r in group}) > 1
                             for group in group_ranks((2, 2, 2), dim_))}
### END SOLUTION
print(crossing)

# %% nbgrader={"grade": true, "grade_id": "test_crossing", "locked": true, "points": 2, "schema_version": 3, "solution": false}
checks.check("crossing")

# %% [markdown] nbgrader={"grade": false, "grade_id": "part_b", "locked": true, "schema_version": 3, "solution": false}
# ## Part B · What each dimension sends per step
#
# The model of lecture 05's live run: $L$ blocks of lecture 01's FFN,
# `Linear(d, 4d) → GeLU → Linear(4d, d)`, each split column → row over the `tp` ranks of
# its stage, $L/pp$ blocks per stage. A training step takes a global batch of $B$ rows of
# width $d$; each pipeline (data-parallel replica) gets $B/dp$ of them, in $m$
# microbatches, and runs 1F1B. Elements take $e$ bytes. Write each answer as a SymPy
# expression in the symbols defined at the top; any equivalent form is accepted.
#
# **B1.** How many parameters does one rank hold? `params_per_rank`.

# %% nbgrader={"grade": false, "grade_id": "b1", "locked": false, "schema_version": 3, "solution": true}
### BEGIN SOLUTION
# W1 (4d x d), b1 (4d), W2 (d x 4d) are split over tp; b2 (d) is added once, after the
# all-reduce, and every TP rank holds it whole.
params_per_rank = L / pp * ((4 * d * d + 4 * d + 4 * d * d) / tp + d)
### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "test_params", "locked": true, "points": 2, "schema_version": 3, "solution": false}
checks.check("params_per_rank")

# %% [markdown] nbgrader={"grade": false, "grade_id": "b2_text", "locked": true, "schema_version": 3, "solution": false}
# **B2.** After the backward, each rank averages its gradients over its data-parallel group
# with one ring all-reduce. How many bytes does one rank send in it, per step? `dp_bytes`.

# %% nbgrader={"grade": false, "grade_id": "b2", "locked": false, "schema_version": 3, "solution": true}
### BEGIN SOLUTION
# reduce-scatter then all-gather: (dp-1)/dp of the tensor each
dp_bytes = 2 * (dp - 1) / dp * params_per_rank * e
### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "test_dp_bytes", "locked": true, "points": 3, "schema_version": 3, "solution": false}
checks.check("dp_bytes")

# %% [markdown] nbgrader={"grade": false, "grade_id": "b3_text", "locked": true, "schema_version": 3, "solution": false}
# **B3.** A rank of the **last** pipeline stage: how many bytes does it send per step in its
# tensor-parallel all-reduces (ring-priced, forward and backward)? `tp_bytes_last`.

# %% nbgrader={"grade": false, "grade_id": "b3", "locked": false, "schema_version": 3, "solution": true}
### BEGIN SOLUTION
# every block: one all-reduce of its output forward (g), one of its input's gradient
# backward (f); each of a microbatch, B/(dp m) rows of d
microbatch = B / (dp * m) * d * e
tp_bytes_last = m * (2 * L / pp) * 2 * (tp - 1) / tp * microbatch
### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "test_tp_bytes", "locked": true, "points": 3, "schema_version": 3, "solution": false}
checks.check("tp_bytes_last")

# %% [markdown] nbgrader={"grade": false, "grade_id": "b4_text", "locked": true, "schema_version": 3, "solution": false}
# **B4.** The same rank of the last stage: how many bytes does it send point to point to
# other pipeline stages, per step? `pp_bytes_last`.

# %% nbgrader={"grade": false, "grade_id": "b4", "locked": false, "schema_version": 3, "solution": true}
### BEGIN SOLUTION
# no next stage: only the gradient of each microbatch's input, back to the previous stage
pp_bytes_last = m * B / (dp * m) * d * e
### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "test_pp_bytes", "locked": true, "points": 2, "schema_version": 3, "solution": false}
checks.check("pp_bytes_last")

# %% [markdown] nbgrader={"grade": false, "grade_id": "part_c", "locked": true, "schema_version": 3, "solution": false}
# ## Part C · Eight processes
#
# **C1.** Write `average_gradients(parameters, group)`: replace the gradient (`.grad`) of
# every parameter by its mean over the ranks of the process group `group` (the rank's
# data-parallel group). Use `comm.all_reduce(tensor, phase="backward", group=group)` (it
# returns the sum over the group and logs what it sends) and `comm.world_size(group)`.
# One all-reduce of all the gradients flattened together is enough. Do not call
# `paralab.hybrid`'s own.
#
# The test cell then trains lecture 05's model for a few SGD steps on 8 processes, on a
# `(2, 2, 2)` DeviceMesh, with your function averaging the gradients: every parameter must
# end up equal to a single process's (about ten seconds).

# %% nbgrader={"grade": false, "grade_id": "c1", "locked": false, "schema_version": 3, "solution": true}
def average_gradients(parameters, group):
    ### BEGIN SOLUTION
    grads = [q.grad for q in parameters]
    flat = torch.cat([g.reshape(-1) for g in grads])
    mean = comm.all_reduce(flat, phase="backward", label="dp", group=group) / comm.world_size(group)
    offset = 0
    for g in grads:
        g.copy_(mean[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
    ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "test_hybrid", "locked": true, "points": 4, "schema_version": 3, "solution": false}
checks.check("hybrid_2x2x2", lambda: checks.run_hybrid(average_gradients))
checks.check("dp_traffic_2x2x2", lambda: checks.run_hybrid(average_gradients))

# %% nbgrader={"grade": true, "grade_id": "test_hybrid_hidden", "locked": true, "points": 4, "schema_version": 3, "solution": false}
# Another mesh; and your average_gradients once more on 4 ranks in a fresh process where
# paralab.hybrid's own is not available.
### BEGIN HIDDEN TESTS
checks.check("hybrid_hidden", lambda: checks.run_hybrid(average_gradients, checks.HIDDEN_SHAPE))
### END HIDDEN TESTS

# %% [markdown] nbgrader={"grade": false, "grade_id": "part_d", "locked": true, "schema_version": 3, "solution": false}
# ## Part D · Choosing the degrees
#
# `paralab.planner` (lecture 05, section 5) models a GPU cluster (`planner.Cluster`: by
# default nodes of 8 A100s with 80 GiB), a GPT (`planner.Model`) and what each layout costs.
#
# **D1.** GPT-3 (`planner.Model("GPT-3", layers=96, hidden=12288, heads=96)`) on 1024 GPUs
# with a batch of 1536 sequences, `tp = 8`, microbatches of one sequence (`b = 1`), 1F1B
# (`v = 1`), no recomputation, no sequence parallelism, and `dp = 1024 / (8 pp)`. What is the
# smallest number of pipeline stages `pp` for which the fullest rank fits in 80 GiB
# (`80 * 2**30` bytes)? `planner.rank_memory(model, (dp, pp, tp), b, m)` gives a layout's
# fullest rank. Store the integer in `min_pp`.

# %% nbgrader={"grade": false, "grade_id": "d1", "locked": false, "schema_version": 3, "solution": true}
### BEGIN SOLUTION
gpt3 = planner.Model("GPT-3", layers=96, hidden=12288, heads=96)
for pp_ in (1, 2, 4, 8, 16, 32):
    dp_ = 1024 // (8 * pp_)
    _, parts = planner.rank_memory(gpt3, (dp_, pp_, 8), 1, 1536 // dp_)
    if parts["total"] <= 80 * 2 ** 30:
        min_pp = pp_
        break
### END SOLUTION
print(min_pp)

# %% nbgrader={"grade": true, "grade_id": "test_min_pp", "locked": true, "points": 2, "schema_version": 3, "solution": false}
checks.check("min_pp")

# %% [markdown] nbgrader={"grade": false, "grade_id": "d2_text", "locked": true, "schema_version": 3, "solution": false}
# **D2.** Megatron-LM trained a 39.1-billion-parameter GPT on 512 GPUs with a batch of 1536
# (`planner.MEGATRON_2021[4]`). Which `(dp, pp, tp)` does the planner rank first for it, with
# its default options? Store the tuple in `best_layout`.

# %% nbgrader={"grade": false, "grade_id": "d2", "locked": false, "schema_version": 3, "solution": true}
### BEGIN SOLUTION
run_ = planner.MEGATRON_2021[4]
best_layout = planner.best(run_.model, planner.Cluster(gpus=run_.gpus), run_.batch).layout
### END SOLUTION
print(best_layout)

# %% nbgrader={"grade": true, "grade_id": "test_best_layout", "locked": true, "points": 1, "schema_version": 3, "solution": false}
checks.check("best_layout")

# %% [markdown] nbgrader={"grade": false, "grade_id": "d3_text", "locked": true, "schema_version": 3, "solution": false}
# **D3.** Which statements are true? Store the set of their names in `true_statements`.
#
# * `"tp_inside_a_node"`: each tensor-parallel group should stay inside one node;
# * `"tp_sends_fewest_messages"`: of the three dimensions, tensor parallelism sends the
#   fewest messages per step;
# * `"pp_point_to_point"`: pipeline stages exchange activations and gradients point to
#   point, once per microbatch at each stage boundary;
# * `"dp_sums_gradients"`: the data-parallel all-reduce sums the gradients, and that sum is
#   the gradient to step with;
# * `"dataparallel_per_stage_is_dp"`: wrapping each pipeline stage in `torch.nn.DataParallel`
#   gives data × pipeline parallelism;
# * `"allreduce_sends_the_tensor_once"`: in a ring all-reduce each rank sends as many bytes
#   as the tensor has;
# * `"dp_once_per_step"`: the data-parallel all-reduce happens once per step and can overlap
#   the backward.

# %% nbgrader={"grade": false, "grade_id": "d3", "locked": false, "schema_version": 3, "solution": true}
### BEGIN SOLUTION
true_statements = {"tp_inside_a_node", "pp_point_to_point", "dp_once_per_step"}
### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "test_statements", "locked": true, "points": 3, "schema_version": 3, "solution": false}
checks.check("true_statements")
