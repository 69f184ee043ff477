"""Checks of hw1_tensor_parallel: FFN shard shapes, where communication happens, f and g.

Expected values come from :mod:`paralab.formulas` (shapes, collectives) and from a dense
PyTorch FFN (the code questions); known wrong answers are recognised and named.
"""

from __future__ import annotations

from collections import Counter

import torch

from autograder.checks import Verdict, make_checker, originality
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


def _shapes(variant):
    return {k: tuple(int(n) for n in v)
            for k, v in evaluate(formulas.ffn_shapes(variant), **SIZES).items()}


def _as_shape(value):
    if isinstance(value, torch.Size):
        value = tuple(value)
    if not isinstance(value, (list, tuple)) or not all(
            isinstance(n, int) and not isinstance(n, bool) for n in value):
        return None
    return tuple(value)


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
        got = tuple(got) if isinstance(got, list) else got
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


def _variant_phase(variant, phase):
    return Counter((c.op, int(evaluate(c.elements, **SIZES)))
                   for c in formulas.ffn_collectives(variant) if c.phase == phase)


def collectives_check(variant, phase):
    expected = _variant_phase(variant, phase)
    big = int(evaluate(formulas.B * formulas.S * 4 * formulas.d, **SIZES))

    def check(value) -> Verdict:
        if not isinstance(value, (list, tuple)) or not all(
                isinstance(x, (list, tuple)) and len(x) == 2 for x in value):
            return Verdict(False, "expected a list of (collective, elements) pairs")
        got = Counter((str(op), n) for op, n in value)
        if got == expected:
            return Verdict(True, "correct")
        if variant == "row-row" and phase == "forward" and ("all_reduce", big) not in got:
            if any(op == "all_gather" for op, _ in got):
                return Verdict(False, "an all-gather does not fix row-parallel Linear1: its "
                                      "outputs are PARTIAL SUMS, and GeLU is nonlinear "
                                      "(GeLU(a+b) != GeLU(a)+GeLU(b)), so they must be "
                                      "all-reduced (B*S*4d elements) before GeLU")
            return Verdict(False, "row-parallel Linear1 leaves partial sums, and GeLU is "
                                  "nonlinear: what must happen before GeLU?")
        if variant == "col-col" and phase == "forward" and ("all_gather", big) not in got:
            return Verdict(False, "column-parallel Linear2 needs the FULL Y on every rank, but "
                                  "Linear1 left each rank with a column slice of it")
        missing = expected - got
        extra = got - expected
        parts = []
        if missing:
            parts.append(f"missing {sorted(missing.elements())}")
        if extra:
            parts.append(f"not needed {sorted(extra.elements())}")
        return Verdict(False, "; ".join(parts) + " (each forward collective has a conjugate "
                                                 "backward: identity <-> all-reduce, "
                                                 "slice <-> all-gather)")
    return check


# -- the student's f, g and tp_ffn -----------------------------------------------------------
def _case_data(case):
    world, batch, seq, d, seed = case
    torch.manual_seed(seed)
    dense = tp.FFN(d).to(torch.float64)
    x = torch.randn(batch, seq, d, dtype=torch.float64)
    target = torch.randn(batch, seq, d, dtype=torch.float64)
    return dense, x, target


def tp_ffn_worker(rank, world_size, tp_ffn, case):
    """Run the student's ``tp_ffn`` on this rank's shards; return plain data to check."""
    dense, x, target = _case_data(case)
    shard = lambda t, dim: comm.shard(t, dim, rank, world_size)  # noqa: E731
    w1 = shard(dense.linear1.weight.detach(), 0).requires_grad_(True)
    b1 = shard(dense.linear1.bias.detach(), 0).requires_grad_(True)
    w2 = shard(dense.linear2.weight.detach(), 1).requires_grad_(True)
    b2 = dense.linear2.bias.detach().clone().requires_grad_(True)
    x = x.clone().requires_grad_(True)
    with comm.record() as log:
        out = tp_ffn(x, w1, b1, w2, b2)
        ((out - target) ** 2).sum().backward()
    return {
        "output": out.detach(),
        "input_grad": None if x.grad is None else x.grad.detach(),
        "grads": [None if t.grad is None else t.grad.detach() for t in (w1, b1, w2, b2)],
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


def without_library(tp_ffn):
    """Run ``tp_ffn`` once in this process with paralab.tp switched off (hidden test)."""
    functions = [tp.copy_to_tp, tp.reduce_from_tp, tp.gather_from_tp, tp.scatter_to_tp,
                 tp.ColumnParallelLinear.forward, tp.RowParallelLinear.forward,
                 tp.ParallelFFN.forward]
    for op in (tp._CopyToTP, tp._ReduceFromTP, tp._GatherFromTP, tp._ScatterToTP):
        functions += [op.forward, op.backward]
    return originality.without(functions,
                               lambda: [tp_ffn_worker(0, 1, tp_ffn, ORIGINALITY_CASE)])


def own_implementation_check(value) -> Verdict:
    if value == originality.REFERENCE_USED:
        return Verdict(False, "write f and g yourself instead of using paralab.tp")
    verdict = tp_ffn_check(ORIGINALITY_CASE)(value)
    return Verdict(verdict.passed, "your own implementation" if verdict.passed
                   else verdict.message)


CHECKS = {key: shape_check(key) for key in SHAPE_KEYS}
CHECKS.update({
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
    "test_weight_shapes": ["W1_shard_shape", "W2_shard_shape"],
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
