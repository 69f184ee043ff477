"""Checks of hw1_tensor_parallel: FFN shard shapes, where communication happens, f and g.

Expected values come from :mod:`paralab.formulas` (shapes, collectives) and from a dense
PyTorch FFN (the code questions); known wrong answers are recognised and named.
"""

from __future__ import annotations

from collections import Counter

import torch

from autograder.checks import (Probe, Verdict, as_integer, make_checker,
                               originality)
from paralab import comm, formulas, tp
from paralab.formulas import evaluate

SIZES = dict(B=8, S=128, d=1024, P=4)
FP32 = 4

# (world size, batch, sequence, hidden size, seed) of the runs of the student's tp_ffn.
VISIBLE_CASE = (4, 2, 3, 8, 0)
HIDDEN_CASES = [(2, 3, 5, 4, 11), (4, 1, 2, 16, 5)]

SHAPE_KEYS = {"X_shape": "X", "W1_shard_shape": "W1_shard", "Y_shard_shape": "Y_shard",
              "Y_shape": "Y", "W2_shard_shape": "W2_shard", "Z_partial_shape": "Z_partial",
              "Z_shape": "Z"}


# (d, P) of the hidden test of A1.  With the homework's P = 4, 4d/P = d, so a column shard
# (d, 4d/P) and its transpose (4d/P, d) are the same tuple: only another P tells the two
# conventions apart.
HIDDEN_SHAPE_CASES = [(1024, 2), (512, 8), (96, 3)]


def _shapes(variant, **sizes):
    return {k: tuple(int(n) for n in v)
            for k, v in evaluate(formulas.ffn_shapes(variant), **(sizes or SIZES)).items()}


def _as_shape(value):
    """A tuple of ints from what a student may write: ints, integral floats (4 * d / P),
    SymPy or numpy integers, a torch.Size; None if it is not a shape."""
    if isinstance(value, torch.Size):
        value = tuple(value)
    if not isinstance(value, (list, tuple)):
        return None
    dims = [as_integer(n) for n in value]
    return None if any(n is None for n in dims) else tuple(dims)


def shape_check(key):
    name = SHAPE_KEYS[key]
    col_row, row_row, col_col = _shapes("col-row"), _shapes("row-row"), _shapes("col-col")
    expected = col_row[name]
    wrong = []
    if name == "Y_shard":
        wrong.append((col_row["Y"], "that is the full Y: each rank computes only its 4d/P "
                                    "columns of it"))
    if name == "W1_shard":
        wrong += [(col_row["W1"], "that is the whole W1; a rank holds 1/P of it"),
                  (row_row["W1_shard"], "that is a ROW shard (d/P rows); Linear1 is "
                                        "column-parallel: it splits W1's 4d columns")]
    if name == "W2_shard":
        wrong += [(col_row["W2"], "that is the whole W2; a rank holds 1/P of it"),
                  (col_col["W2_shard"], "that is a COLUMN shard; Linear2 is row-parallel: it "
                                        "splits W2's 4d rows, matching Y's column shards")]
    if name in ("Y_shard", "Y", "Z_partial", "Z", "X"):
        wrong.append((tuple(reversed(expected)), "the dimensions are in reverse order: an "
                                                 "activation is (B, S, features)"))
    if name == "Z_partial":
        wrong.append((col_col["Z_shard"], "a row-parallel layer does not produce a slice of Z "
                                          "but a full-size partial sum: Z = sum of the Z_i"))
    if name == "X":
        wrong.append((row_row["X_shard"], "a column-parallel layer needs the WHOLE input X on "
                                          "every rank; only row-parallel layers split it"))

    def check(value) -> Verdict:
        shape = _as_shape(value)
        if shape is None:
            return Verdict(False, f"expected a tuple of ints such as (8, 128, 1024), got "
                                  f"{value!r}")
        if shape == expected:
            return Verdict(True, "correct")
        for shape_wrong, message in wrong:
            if shape == shape_wrong:
                return Verdict(False, message)
        return Verdict(False, f"{shape} is not the shape of {name} on one rank (math "
                              f"convention X @ W, W is in x out)")
    return check


def _transposed_message(which: str, d: int, P: int) -> str:
    return (f"for d={d}, P={P} your {which} shard is transposed: that is PyTorch's "
            f"nn.Linear.weight layout (out x in); this question uses the math convention "
            f"X @ W, where a weight is in x out (W1 is d x 4d)")


def weight_shapes_hidden_check(value) -> Verdict:
    """weight_shard_shapes(d, P) for other TP degrees, where (d, 4d/P) != (4d/P, d)."""
    if not isinstance(value, list) or len(value) != len(HIDDEN_SHAPE_CASES):
        return Verdict(False, "expected one (W1_shard_shape, W2_shard_shape) pair per hidden "
                              "case")
    for pair, (d_, p_) in zip(value, HIDDEN_SHAPE_CASES):
        shapes = _shapes("col-row", B=1, S=1, d=d_, P=p_)
        want = (shapes["W1_shard"], shapes["W2_shard"])
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            return Verdict(False, "weight_shard_shapes must return a pair (W1 shard shape, "
                                  "W2 shard shape)")
        got = tuple(_as_shape(x) for x in pair)
        if got == want:
            continue
        for which, g, w in (("W1", got[0], want[0]), ("W2", got[1], want[1])):
            if g == tuple(reversed(w)) and g != w:
                return Verdict(False, _transposed_message(which, d_, p_))
        if got == (want[1], want[0]):
            return Verdict(False, f"for d={d_}, P={p_} the two shards are swapped")
        return Verdict(False, f"for d={d_}, P={p_}: {got} is not (W1 shard, W2 shard); write "
                              f"the shapes with d and P, not with the numbers of P = 4")
    return Verdict(True, f"correct for {len(HIDDEN_SHAPE_CASES)} other sizes and TP degrees")


# -- communication ---------------------------------------------------------------------------
SLOTS = ("linear1.forward", "linear1.backward", "linear2.forward", "linear2.backward")


def _col_row_table():
    table = {slot: None for slot in SLOTS}
    for c in formulas.ffn_collectives("col-row"):
        table[f"{c.layer}.{c.phase}"] = (c.op, int(evaluate(c.elements, **SIZES)))
    return table


def comm_table_check(value) -> Verdict:
    expected = _col_row_table()
    if not isinstance(value, dict) or set(value) != set(SLOTS):
        return Verdict(False, f"expected a dict with exactly the keys {list(SLOTS)}")
    big = int(evaluate(formulas.B * formulas.S * 4 * formulas.d, **SIZES))
    for slot in SLOTS:
        got, want = value[slot], expected[slot]
        if isinstance(got, (list, tuple)) and len(got) == 2 and as_integer(got[1]) is not None:
            got = (got[0], as_integer(got[1]))
        if got == want:
            continue
        if want is None:
            why = {"linear1.forward": "X is replicated and each rank computes its own columns "
                                      "of Y: nothing to exchange",
                   "linear2.backward": "dL/dY_i = dL/dZ W2_i^T needs only this rank's rows "
                                       "of W2, and dL/dZ is replicated: nothing to exchange"}
            return Verdict(False, f"{slot}: no communication is needed here - {why[slot]}")
        if got is None:
            return Verdict(False, f"{slot}: communication IS needed here (which partial "
                                  f"results must be summed?)")
        if not (isinstance(got, tuple) and len(got) == 2):
            return Verdict(False, f"{slot}: write None or (collective, elements)")
        if got[0] != want[0]:
            return Verdict(False, f"{slot}: {got[0]} is not the right collective: the ranks "
                                  f"hold partial sums, which an all_reduce adds up")
        if got[1] in (big, want[1] * FP32):
            what = [f"{got[1]} is"]
            if got[1] == big:
                what.append("the size of Y (B*S*4d elements)")
            if got[1] == want[1] * FP32:
                what.append("the size in BYTES of this tensor in fp32" if got[1] != big
                            else "- or this tensor's size in bytes")
            return Verdict(False, f"{slot}: {' '.join(what)}; give the number of elements of "
                                  f"the tensor exchanged here, which has d columns")
        return Verdict(False, f"{slot}: {got[1]} elements is not right")
    return Verdict(True, "correct: one all-reduce of B*S*d forward, one backward")


def bytes_check(value) -> Verdict:
    elements = int(evaluate(formulas.B * formulas.S * formulas.d, **SIZES))
    value = as_integer(value) if as_integer(value) is not None else value
    if value == elements * FP32:
        return Verdict(True, "correct (4 MiB)")
    if value == elements:
        return Verdict(False, "that is the number of elements; an fp32 element is 4 bytes")
    if value == elements * FP32 * 4:
        return Verdict(False, "that is the size of Y (B*S*4d), not of Z or dL/dX")
    return Verdict(False, f"{value} bytes is not right")


def traffic_check(value) -> Verdict:
    elements = formulas.B * formulas.S * formulas.d
    expected = int(evaluate(formulas.collective_traffic("all_reduce", elements) * FP32, **SIZES))
    nbytes = int(evaluate(elements * FP32, **SIZES))
    value = as_integer(value) if as_integer(value) is not None else value
    if value == expected:
        return Verdict(True, "correct: 2(P-1)/P of the tensor, per rank")
    if value == 2 * nbytes:
        return Verdict(False, "2N is the naive figure; a ring all-reduce sends 2(P-1)/P N per "
                              "rank (a reduce-scatter then an all-gather of N/P chunks)")
    if value == int(evaluate(formulas.collective_traffic("all_gather", elements) * FP32,
                             **SIZES)):
        return Verdict(False, "that is half: an all-reduce is a reduce-scatter AND an "
                              "all-gather, (P-1)/P N each")
    return Verdict(False, f"{value} bytes is not right")


# Why each collective of the other layouts is there, by (variant, tensor, phase): the
# message a student gets when it is missing or has the wrong operation.
WHY = {
    ("row-row", "Y", "forward"):
        "row-parallel Linear1 leaves PARTIAL SUMS of Y, and GeLU is nonlinear "
        "(GeLU(a+b) != GeLU(a)+GeLU(b)), so they must be all-reduced before GeLU",
    ("row-row", "Z", "forward"):
        "row-parallel Linear2 leaves partial sums of Z: an all-reduce adds them up",
    ("row-row", "dL/dY", "backward"):
        "Linear2 split its input Y (each rank kept its slice of the replicated Y); the "
        "backward of that split is an all-gather of dL/dY",
    ("row-row", "dL/dX", "backward"):
        "Linear1 split its input X; the backward of that split is an all-gather of dL/dX",
    ("col-col", "Y", "forward"):
        "column-parallel Linear2 needs the WHOLE Y on every rank (each rank multiplies all of "
        "Y by its columns of W2), but Linear1 left each rank with a column slice of it: only "
        "an all-gather of Y gives every rank all of it",
    ("col-col", "Z", "forward"):
        "Linear2 is column-parallel too, so each rank ends with a column slice of Z: "
        "assembling the full Z on every rank takes a second all-gather",
    ("col-col", "dL/dY", "backward"):
        "every rank fed the whole Y into its own columns of W2, so each rank holds only a "
        "partial dL/dY: an all-reduce sums them",
    ("col-col", "dL/dX", "backward"):
        "as in col-row, each rank's columns of W1 give a partial dL/dX: an all-reduce sums "
        "them",
}

# Error 4 of the source material: for two column-parallel layers it moves Y between the
# ranks with an all-to-all or a scatter.
_NOT_A_GATHER = {"all_to_all", "alltoall", "all-to-all", "scatter", "reduce_scatter"}


def _expected_collectives(variant, phase):
    return [(c.op, int(evaluate(c.elements, **SIZES)), c.tensor)
            for c in formulas.ffn_collectives(variant) if c.phase == phase]


def _size_name(n: int) -> str:
    x = int(evaluate(formulas.B * formulas.S * formulas.d, **SIZES))
    return {x: "B*S*d", 4 * x: "B*S*4d"}.get(n, str(n))


def collectives_check(variant, phase):
    expected = _expected_collectives(variant, phase)
    want = Counter((op, n) for op, n, _ in expected)

    def check(value) -> Verdict:
        if not isinstance(value, (list, tuple)) or not all(
                isinstance(x, (list, tuple)) and len(x) == 2 for x in value):
            return Verdict(False, "expected a list of (collective, elements) pairs")
        pairs = [(str(op), as_integer(n)) for op, n in value]
        if any(n is None for _, n in pairs):
            return Verdict(False, "each pair is (collective name, number of elements)")
        got = Counter(pairs)
        if got == want:
            return Verdict(True, "correct")
        if variant == "col-col" and phase == "forward" and any(
                op.lower() in _NOT_A_GATHER for op, _ in pairs):
            return Verdict(False, "an all-to-all or a scatter does not give Linear2 what it "
                                  "needs: " + WHY[("col-col", "Y", "forward")] + " (B*S*4d "
                                  "elements); its output is then a column slice of Z")
        for op, n, tensor in expected:
            if got[(op, n)] >= 1:
                continue
            why = WHY[(variant, tensor, phase)]
            other = [o for o, m in pairs if m == n and o != op]
            if other:
                return Verdict(False, f"{other[0]} of {_size_name(n)} elements ({tensor}) is "
                                      f"not the right collective: {why}")
            return Verdict(False, f"missing the {op} of {tensor} ({_size_name(n)} elements): "
                                  f"{why}")
        extra = sorted((got - want).elements())
        return Verdict(False, f"not needed in the {phase} pass: {extra} (each collective of "
                              f"one pass has a conjugate in the other: identity <-> "
                              f"all-reduce, slice <-> all-gather)")
    return check


# -- the student's f, g and tp_ffn -----------------------------------------------------------
def _case_data(case, device=None):
    world, batch, seq, d, seed = case
    return tp.ffn_case(batch, seq, d, seed, device=device)


def tp_ffn_worker(rank, world_size, tp_ffn, case):
    """Run the student's ``tp_ffn`` on this rank's shards (every tensor on the rank's
    device, so the same test runs under NCCL); return plain CPU data to check."""
    from paralab import launch

    dense, x, target = _case_data(case, launch.device())
    shard = lambda t, dim: comm.shard(t, dim, rank, world_size)  # noqa: E731
    w1 = shard(dense.linear1.weight.detach(), 0).requires_grad_(True)
    b1 = shard(dense.linear1.bias.detach(), 0).requires_grad_(True)
    w2 = shard(dense.linear2.weight.detach(), 1).requires_grad_(True)
    b2 = dense.linear2.bias.detach().clone().requires_grad_(True)
    x = x.clone().requires_grad_(True)
    with comm.record() as log:
        out = tp_ffn(x, w1, b1, w2, b2)
        ((out - target) ** 2).sum().backward()

    def cpu(t):
        return None if t is None else t.detach().cpu()
    return {
        "output": cpu(out),
        "input_grad": cpu(x.grad),
        "grads": [cpu(t.grad) for t in (w1, b1, w2, b2)],
        "collectives": [(r.phase, r.op, r.elements) for r in log],
    }


def _reference(case):
    dense, x, target = _case_data(case)
    x = x.clone().requires_grad_(True)
    out = dense(x)
    ((out - target) ** 2).sum().backward()
    return out.detach(), x.grad, dense


def tp_ffn_check(case):
    world, batch, seq, d, _ = case
    n = batch * seq * d
    expected_comm = [("forward", "all_reduce", n), ("backward", "all_reduce", n)]

    def check(value) -> Verdict:
        if not isinstance(value, list) or len(value) != world or not all(
                isinstance(r, dict) for r in value):
            return Verdict(False, f"expected the results of {world} ranks")
        out, input_grad, dense = _reference(case)
        comms = [[tuple(c) for c in r.get("collectives", [])] for r in value]
        forward_ar = any(c[:2] == ("forward", "all_reduce") for c in comms[0])
        backward_ar = any(c[:2] == ("backward", "all_reduce") for c in comms[0])
        for rank, r in enumerate(value):
            got = r.get("output")
            if not isinstance(got, torch.Tensor) or got.shape != out.shape:
                return Verdict(False, f"rank {rank}: tp_ffn must return Z of shape "
                                      f"{tuple(out.shape)}")
            if not torch.allclose(got.double(), out, rtol=1e-6, atol=1e-8):
                bias_times = (got.double() - out)
                if torch.allclose(bias_times, (world - 1) * dense.linear2.bias.detach()
                                  .expand_as(out), atol=1e-8):
                    return Verdict(False, "Z is off by (P-1) b2: the row-parallel bias must be "
                                          "added once, after the all-reduce, not by every rank")
                if not forward_ar:
                    return Verdict(False, "missing all-reduce in g's forward: each rank's "
                                          "Linear2 result is only a partial sum of Z")
                return Verdict(False, f"rank {rank}: Z differs from the dense FFN's")
        for rank, r in enumerate(value):
            grad = r.get("input_grad")
            if not isinstance(grad, torch.Tensor) or \
                    not torch.allclose(grad.double(), input_grad, rtol=1e-6, atol=1e-8):
                if not backward_ar:
                    return Verdict(False, "missing all-reduce in f's backward: every rank used "
                                          "the same X for a different slice of Y, so dL/dX is "
                                          "the SUM of every rank's contribution")
                return Verdict(False, f"rank {rank}: dL/dX differs from the dense FFN's")
        names = ("linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias")
        dims = (0, 0, 1, None)
        for index, (name, dim) in enumerate(zip(names, dims)):
            reference = dense.get_parameter(name).grad
            parts = [r["grads"][index] if isinstance(r.get("grads"), list) else None
                     for r in value]
            if any(not isinstance(t, torch.Tensor) for t in parts):
                return Verdict(False, f"no gradient reached {name}")
            full = parts[0] if dim is None else torch.cat(parts, dim=dim)
            if full.shape != reference.shape or not torch.allclose(full.double(), reference,
                                                                   rtol=1e-6, atol=1e-8):
                if name == "linear2.weight" or name == "linear2.bias":
                    return Verdict(False, f"the gradient of {name} is wrong (is g's backward "
                                          f"the identity? the gradient of a sum reaches every "
                                          f"summand unchanged)")
                return Verdict(False, f"the gradient of {name} differs from the dense FFN's")
        for rank, c in enumerate(comms):
            if c != expected_comm:
                return Verdict(False, f"rank {rank} issued {c}; column -> row needs exactly one "
                                      f"all-reduce of B*S*d={n} elements forward and one "
                                      f"backward (use paralab.comm.all_reduce, so it is logged)")
        return Verdict(True, f"on {world} processes: Z, dL/dX and every weight gradient equal "
                             f"the dense FFN's; communication {expected_comm[0][1:]} forward "
                             f"and backward")
    return check


def tp_ffn_hidden_check(value) -> Verdict:
    if not isinstance(value, list) or len(value) != len(HIDDEN_CASES):
        return Verdict(False, "expected one result per hidden case")
    for results, case in zip(value, HIDDEN_CASES):
        verdict = tp_ffn_check(case)(results)
        if not verdict.passed:
            world, batch, seq, d, _ = case
            return Verdict(False, f"P={world}, B={batch}, S={seq}, d={d}: {verdict.message}")
    return Verdict(True, f"correct on {len(HIDDEN_CASES)} other sizes and world sizes")


ORIGINALITY_CASE = (1, 2, 3, 8, 3)

# The library's own f, g and tensor-parallel layers: the reference answer of part D.
REFERENCE_TP = tuple(f"paralab.tp:{name}" for name in (
    "copy_to_tp", "reduce_from_tp", "gather_from_tp", "scatter_to_tp",
    "ColumnParallelLinear.forward", "RowParallelLinear.forward", "ParallelFFN.forward",
    "_CopyToTP.forward", "_CopyToTP.backward", "_ReduceFromTP.forward",
    "_ReduceFromTP.backward", "_GatherFromTP.forward", "_GatherFromTP.backward",
    "_ScatterToTP.forward", "_ScatterToTP.backward"))

PROBES = {
    # tp_ffn run once more, in a fresh process where paralab.tp's operators and layers
    # raise ReferenceUnavailable: f and g must be the student's own.
    "own_implementation": Probe(
        cells=("setup", "d"),
        call="[checks.tp_ffn_worker(0, 1, tp_ffn, checks.ORIGINALITY_CASE)]",
        unavailable=REFERENCE_TP),
}


own_implementation_check = originality(
    lambda value: tp_ffn_check(ORIGINALITY_CASE)(value),
    "write f and g yourself instead of using paralab.tp")


CHECKS = {key: shape_check(key) for key in SHAPE_KEYS}
CHECKS.update({
    "weight_shard_shapes_hidden": weight_shapes_hidden_check,
    "comm_col_row": comm_table_check,
    "allreduce_bytes_fp32": bytes_check,
    "ring_traffic_bytes": traffic_check,
    "row_row_forward": collectives_check("row-row", "forward"),
    "row_row_backward": collectives_check("row-row", "backward"),
    "col_col_forward": collectives_check("col-col", "forward"),
    "col_col_backward": collectives_check("col-col", "backward"),
    "tp_ffn_p4": tp_ffn_check(VISIBLE_CASE),
    "tp_ffn_hidden": tp_ffn_hidden_check,
    "own_implementation": own_implementation_check,
})

GRADE_CELLS = {
    "test_weight_shapes": ["W1_shard_shape", "W2_shard_shape", "weight_shard_shapes_hidden"],
    "test_activation_shapes": ["X_shape", "Y_shard_shape", "Y_shape", "Z_partial_shape",
                               "Z_shape"],
    "test_comm_col_row": ["comm_col_row"],
    "test_bytes": ["allreduce_bytes_fp32", "ring_traffic_bytes"],
    "test_row_row": ["row_row_forward", "row_row_backward"],
    "test_col_col": ["col_col_forward", "col_col_backward"],
    "test_tp_ffn": ["tp_ffn_p4"],
    "test_tp_ffn_hidden": ["tp_ffn_hidden", "own_implementation"],
}

check = make_checker(CHECKS)
