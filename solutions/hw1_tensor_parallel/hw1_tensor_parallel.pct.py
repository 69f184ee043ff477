# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown] nbgrader={"grade": false, "grade_id": "intro", "locked": true, "schema_version": 3, "solution": false}
# # Homework 1 · Tensor parallelism of a Transformer FFN
#
# The feed-forward block of a Transformer layer is
# $Z = \mathrm{GeLU}(X W_1) W_2$ with $X$ of shape $B \times S \times d$, $W_1$ of shape
# $d \times 4d$ and $W_2$ of shape $4d \times d$ (math convention: $X W$, a weight is
# *in × out*). Take $B = 8$, $S = 128$, $d = 1024$ and a tensor-parallel degree $P = 4$:
# Linear1 is **column-parallel**, Linear2 **row-parallel** (Megatron-LM's layout).
#
# Lecture 01 covers everything here. How this notebook is graded:
#
# * Put each answer in the variable the question names, with the type it asks for, and run
#   the test cell below it. Each check prints one line: ✓ when the answer is right, ✗ with
#   what is wrong with it otherwise (naming the misconception when it is a known one).
#   A test cell's points are shared among its checks; hidden tests check more cases when
#   the notebook is graded.
# * Do not edit or delete the test cells: they are restored before grading anyway.
# * Restart the kernel and run all cells before you submit.

# %% nbgrader={"grade": false, "grade_id": "setup", "locked": true, "schema_version": 3, "solution": false}
import torch
import torch.nn.functional as F

from autograder.checks import hw1_tensor_parallel as checks
from paralab import comm, launch

B, S, d, P = 8, 128, 1024, 4

# %% [markdown] nbgrader={"grade": false, "grade_id": "part_a", "locked": true, "schema_version": 3, "solution": false}
# ## Part A · Shapes on one rank
#
# Give each shape as a tuple of ints, e.g. `(8, 128, 1024)`.
#
# **A1.** The weight shards one rank holds: its part of $W_1$ and its part of $W_2$.
# Write them as a function of $d$ and $P$, `weight_shard_shapes(d, P)`, returning the pair
# `(W1_shard_shape, W2_shard_shape)`: the hidden tests try other TP degrees.

# %% nbgrader={"grade": false, "grade_id": "a1", "locked": false, "schema_version": 3, "solution": true}
def weight_shard_shapes(d, P):
    ### BEGIN SOLUTION
    W1_shard_shape = (d, 4 * d // P)   # column-parallel: a block of W1's columns
    W2_shard_shape = (4 * d // P, d)   # row-parallel: the matching block of W2's rows
    ### END SOLUTION
    return W1_shard_shape, W2_shard_shape


W1_shard_shape, W2_shard_shape = weight_shard_shapes(d, P)

# %% nbgrader={"grade": true, "grade_id": "test_weight_shapes", "locked": true, "points": 3, "schema_version": 3, "solution": false}
checks.check("W1_shard_shape")
checks.check("W2_shard_shape")
### BEGIN HIDDEN TESTS
checks.check("weight_shard_shapes_hidden",
             lambda: [weight_shard_shapes(d_, P_) for d_, P_ in checks.HIDDEN_SHAPE_CASES])
### END HIDDEN TESTS

# %% [markdown] nbgrader={"grade": false, "grade_id": "a2_text", "locked": true, "schema_version": 3, "solution": false}
# **A2.** The activations: the input one rank uses (`X_shape`), the output of its Linear1
# after GeLU (`Y_shard_shape`), the full $Y$ if it were assembled (`Y_shape`), what its
# Linear2 produces before any communication (`Z_partial_shape`), and the final $Z$
# (`Z_shape`).

# %% nbgrader={"grade": false, "grade_id": "a2", "locked": false, "schema_version": 3, "solution": true}
### BEGIN SOLUTION
X_shape = (B, S, d)
Y_shard_shape = (B, S, 4 * d // P)
Y_shape = (B, S, 4 * d)
Z_partial_shape = (B, S, d)       # a full-size partial sum
Z_shape = (B, S, d)
### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "test_activation_shapes", "locked": true, "points": 5, "schema_version": 3, "solution": false}
checks.check("X_shape")
checks.check("Y_shard_shape")
checks.check("Y_shape")
checks.check("Z_partial_shape")
checks.check("Z_shape")

# %% [markdown] nbgrader={"grade": false, "grade_id": "part_b", "locked": true, "schema_version": 3, "solution": false}
# ## Part B · Where does communication happen?
#
# **B1.** For each layer and pass, say which collective is needed and on how many elements
# (of the full logical tensor), or `None` if the ranks need not communicate. Use the names
# `"all_reduce"` and `"all_gather"`. Store a dict `comm_col_row` with the keys
# `"linear1.forward"`, `"linear1.backward"`, `"linear2.forward"`, `"linear2.backward"` and
# values `None` or `(collective, elements)`.

# %% nbgrader={"grade": false, "grade_id": "b1", "locked": false, "schema_version": 3, "solution": true}
### BEGIN SOLUTION
comm_col_row = {
    "linear1.forward": None,                       # X is replicated
    "linear1.backward": ("all_reduce", B * S * d),  # dL/dX: a sum over the ranks' slices
    "linear2.forward": ("all_reduce", B * S * d),   # Z: a sum of partial sums
    "linear2.backward": None,                       # dL/dY_i is local
}
### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "test_comm_col_row", "locked": true, "points": 4, "schema_version": 3, "solution": false}
checks.check("comm_col_row")

# %% [markdown] nbgrader={"grade": false, "grade_id": "b2_text", "locked": true, "schema_version": 3, "solution": false}
# **B2.** In fp32, how many bytes is the tensor of one of those all-reduces
# (`allreduce_bytes_fp32`)? A ring all-reduce over $P$ ranks sends how many bytes from each
# rank (`ring_traffic_bytes`)?

# %% nbgrader={"grade": false, "grade_id": "b2", "locked": false, "schema_version": 3, "solution": true}
### BEGIN SOLUTION
allreduce_bytes_fp32 = B * S * d * 4
ring_traffic_bytes = 2 * (P - 1) * allreduce_bytes_fp32 // P
### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "test_bytes", "locked": true, "points": 2, "schema_version": 3, "solution": false}
checks.check("allreduce_bytes_fp32")
checks.check("ring_traffic_bytes")

# %% [markdown] nbgrader={"grade": false, "grade_id": "part_c", "locked": true, "schema_version": 3, "solution": false}
# ## Part C · Other layouts
#
# Answer each as a list of `(collective, elements)` pairs, one per collective, for one pass.
# A split (keeping one's own slice of a replicated tensor) is free; its backward is an
# all-gather. An all-gather's backward is a free split; an identity's backward that feeds
# several ranks' partial results is an all-reduce.
#
# **C1.** Both layers **row-parallel** (each splits its input's last dimension itself):
# the collectives of the forward pass (`row_row_forward`) and of the backward pass
# (`row_row_backward`).

# %% nbgrader={"grade": false, "grade_id": "c1", "locked": false, "schema_version": 3, "solution": true}
### BEGIN SOLUTION
row_row_forward = [("all_reduce", B * S * 4 * d),   # Linear1's partial sums, before GeLU
                   ("all_reduce", B * S * d)]       # Linear2's partial sums
row_row_backward = [("all_gather", B * S * 4 * d),  # the split of Y in front of Linear2
                    ("all_gather", B * S * d)]      # the split of X in front of Linear1
### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "test_row_row", "locked": true, "points": 3, "schema_version": 3, "solution": false}
checks.check("row_row_forward")
checks.check("row_row_backward")

# %% [markdown] nbgrader={"grade": false, "grade_id": "c2_text", "locked": true, "schema_version": 3, "solution": false}
# **C2.** Both layers **column-parallel**, with the final $Z$ assembled on every rank:
# `col_col_forward` and `col_col_backward`.

# %% nbgrader={"grade": false, "grade_id": "c2", "locked": false, "schema_version": 3, "solution": true}
### BEGIN SOLUTION
col_col_forward = [("all_gather", B * S * 4 * d),   # Linear2 needs the full Y
                   ("all_gather", B * S * d)]       # and its output is column-sharded
col_col_backward = [("all_reduce", B * S * 4 * d),  # dL/dY: every rank used the full Y
                    ("all_reduce", B * S * d)]      # dL/dX, as in col-row
### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "test_col_col", "locked": true, "points": 3, "schema_version": 3, "solution": false}
checks.check("col_col_forward")
checks.check("col_col_backward")

# %% [markdown] nbgrader={"grade": false, "grade_id": "part_d", "locked": true, "schema_version": 3, "solution": false}
# ## Part D · Implement f and g, run on 4 processes
#
# Implement Megatron's two operators as autograd functions:
#
# * `CopyToTP` (f): identity in the forward; in the backward, all-reduce the gradient;
# * `ReduceFromTP` (g): all-reduce in the forward; identity in the backward;
#
# and `tp_ffn(x, w1_shard, b1_shard, w2_shard, b2)`, one rank's column → GeLU → row FFN.
# The weights come in `nn.Linear`'s layout (*out × in*): `w1_shard` is
# $(4d/P) \times d$, `b1_shard` has $4d/P$ elements, `w2_shard` is $d \times (4d/P)$ and
# `b2` (replicated) has $d$. `F.linear(x, w, b)` computes $x w^T + b$.
#
# Communicate only through `comm.all_reduce(tensor, phase="forward" or "backward")`
# (it returns the summed tensor and logs what it sent, which the tests read).

# %% nbgrader={"grade": false, "grade_id": "d", "locked": false, "schema_version": 3, "solution": true}
class CopyToTP(torch.autograd.Function):
    """f: identity forward, all-reduce backward."""

    @staticmethod
    def forward(ctx, x):
        ### BEGIN SOLUTION
        return x.view_as(x)
        ### END SOLUTION

    @staticmethod
    def backward(ctx, grad):
        ### BEGIN SOLUTION
        return comm.all_reduce(grad, phase="backward", label="dL/dX")
        ### END SOLUTION


class ReduceFromTP(torch.autograd.Function):
    """g: all-reduce forward, identity backward."""

    @staticmethod
    def forward(ctx, partial):
        ### BEGIN SOLUTION
        return comm.all_reduce(partial, phase="forward", label="Z")
        ### END SOLUTION

    @staticmethod
    def backward(ctx, grad):
        ### BEGIN SOLUTION
        return grad
        ### END SOLUTION


def tp_ffn(x, w1_shard, b1_shard, w2_shard, b2):
    ### BEGIN SOLUTION
    x = CopyToTP.apply(x)
    y_shard = F.gelu(F.linear(x, w1_shard, b1_shard))   # column-parallel, GeLU on the slice
    z = ReduceFromTP.apply(F.linear(y_shard, w2_shard))  # row-parallel partial sums, summed
    return z + b2                                        # the bias once, after the sum
    ### END SOLUTION

# %% [markdown] nbgrader={"grade": false, "grade_id": "d_run_text", "locked": true, "schema_version": 3, "solution": false}
# The test runs your `tp_ffn` on 4 processes with `paralab.launch.run`: every rank shards a
# small dense FFN, runs one forward and backward through your code, and returns its output,
# gradients and communication log, which must match the dense FFN and the formulas.

# %% nbgrader={"grade": true, "grade_id": "test_tp_ffn", "locked": true, "points": 5, "schema_version": 3, "solution": false}
checks.check("tp_ffn_p4", lambda: launch.run(checks.tp_ffn_worker, checks.VISIBLE_CASE[0],
                                              tp_ffn, checks.VISIBLE_CASE, timeout=60,
                                              echo=False))

# %% nbgrader={"grade": true, "grade_id": "test_tp_ffn_hidden", "locked": true, "points": 4, "schema_version": 3, "solution": false}
# Other sizes and world sizes; and your tp_ffn once more in a fresh process where
# paralab.tp is not available.
### BEGIN HIDDEN TESTS
checks.check("tp_ffn_hidden", lambda: [
    launch.run(checks.tp_ffn_worker, case[0], tp_ffn, case, timeout=60, echo=False)
    for case in checks.HIDDEN_CASES])
### END HIDDEN TESTS
