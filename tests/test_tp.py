"""Tensor-parallel FFN: parity with the dense layer, and communication equal to the formulas."""

from fractions import Fraction

import pytest
import torch
from torch.testing import assert_close

from paralab import comm, formulas, launch, tp

BATCH, SEQ, D = 2, 4, 8
CASES = [("col-row", True), ("row-row", True), ("col-col", True), ("col-col", False)]


def run_all_variants(rank, world_size):
    """One world runs every variant (starting worlds is the expensive part)."""
    return {f"{v}/{g}": tp.ffn_parity_run(rank, world_size, v, BATCH, SEQ, D, gather_output=g)
            for v, g in CASES}


@pytest.fixture(scope="module", params=[1, 2, 4], ids=lambda p: f"P={p}")
def world(request):
    return request.param, launch.run(run_all_variants, request.param, echo=False)


def dense_reference():
    torch.manual_seed(0)  # the same draws, in the same order, as tp.ffn_parity_run
    dense = tp.FFN(D).to(torch.float64)
    x = torch.randn(BATCH, SEQ, D, dtype=torch.float64, requires_grad=True)
    target = torch.randn(BATCH, SEQ, D, dtype=torch.float64)
    out = dense(x)
    ((out - target) ** 2).sum().backward()
    return out.detach(), x.grad, dense


def assemble(per_rank, name, dim):
    """Concatenate the per-rank shards of parameter gradient ``name`` along ``dim``."""
    return torch.cat([r["grads"][name] for r in per_rank], dim=dim)


@pytest.mark.parametrize("variant,gathered", CASES)
def test_outputs_and_every_gradient_match_the_dense_ffn(world, variant, gathered):
    p, results = world
    per_rank = [r[f"{variant}/{gathered}"] for r in results]
    out, input_grad, dense = dense_reference()
    for r in per_rank:
        assert_close(r["output"], out)
        assert_close(r["input_grad"], input_grad)
    # Column-parallel layers own rows of nn.Linear's (out, in) weight and slices of the bias;
    # row-parallel layers own columns of the weight and a full copy of the bias.
    layers = {"col-row": ("col", "row"), "row-row": ("row", "row"),
              "col-col": ("col", "col")}[variant]
    for name, kind in zip(("linear1", "linear2"), layers):
        reference = getattr(dense, name)
        if kind == "col":
            assert_close(assemble(per_rank, f"{name}.weight", 0), reference.weight.grad)
            assert_close(assemble(per_rank, f"{name}.bias", 0), reference.bias.grad)
        else:
            assert_close(assemble(per_rank, f"{name}.weight", 1), reference.weight.grad)
            for r in per_rank:
                assert_close(r["grads"][f"{name}.bias"], reference.bias.grad)


@pytest.mark.parametrize("variant,gathered", CASES)
def test_recorded_communication_equals_the_formulas(world, variant, gathered):
    p, results = world
    expected = formulas.ffn_collectives(variant, output_gathered=gathered)
    values = dict(B=BATCH, S=SEQ, d=D, P=p)
    for r in results:
        records = r[f"{variant}/{gathered}"]["records"]
        got = [(x.phase, x.op, x.elements) for x in records]
        want = [(c.phase, c.op, int(formulas.evaluate(c.elements, **values))) for c in expected]
        assert got == want
        for x in records:
            assert x.bytes == x.elements * 8  # float64
            assert x.world_size == p
            # ring traffic per rank: 2(P-1)/P N for all-reduce, (P-1)/P N for all-gather
            traffic = formulas.collective_traffic(x.op, x.elements, p) * 8
            assert x.traffic_bytes == Fraction(int(traffic.p), int(traffic.q))


def test_homework_sizes_col_row_moves_4_mib_each_way():
    """B=8, S=128, d=1024 in fp32 on P=4: one 4 MiB all-reduce forward, one backward."""
    results = launch.run(tp.ffn_parity_run, 4, "col-row", 8, 128, 1024, 0, torch.float32,
                         echo=False)
    log = results[0]["records"]
    assert [(x.phase, x.op, x.shape) for x in log] == [
        ("forward", "all_reduce", (8, 128, 1024)), ("backward", "all_reduce", (8, 128, 1024))]
    assert all(x.bytes == 4 * 2 ** 20 for x in log)
    assert log[0].traffic_bytes == 2 * 3 * 4 * 2 ** 20 / 4


def test_layers_reject_uneven_shards():
    with pytest.raises(launch.WorkerError, match="out_features=6 is not divisible by the "
                                                 "tensor-parallel degree 4"):
        launch.run(lambda rank, ws: tp.ColumnParallelLinear(8, 6), 4, echo=False)


def dtensor_comm_counts(rank, world_size):
    """The same FFN through PyTorch's own DTensor tensor parallelism, counted by CommDebugMode."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)
    mesh = init_device_mesh("cpu", (world_size,))
    torch.manual_seed(0)
    dense = tp.FFN(D)
    model = parallelize_module(dense, mesh, {"linear1": ColwiseParallel(),
                                             "linear2": RowwiseParallel()})
    x = torch.randn(BATCH, SEQ, D, requires_grad=True)
    counts = {}
    with CommDebugMode() as forward_mode:
        out = model(x)
    with CommDebugMode() as backward_mode:
        out.sum().backward()
    with comm.record() as ours:
        ours_model = tp.ParallelFFN(tp.FFN(D), "col-row")
        y = ours_model(x.detach().requires_grad_(True))
        y.sum().backward()
    for name, mode in (("forward", forward_mode), ("backward", backward_mode)):
        counts[name] = {str(k).split(".")[-1]: v for k, v in mode.get_comm_counts().items()}
    return counts, [(r.phase, r.op) for r in ours]


@pytest.mark.slow
def test_counts_agree_with_pytorch_dtensor_comm_debug_mode():
    counts, ours = launch.run(dtensor_comm_counts, 2, echo=False)[0]
    assert counts == {"forward": {"all_reduce": 1}, "backward": {"all_reduce": 1}}
    assert ours == [("forward", "all_reduce"), ("backward", "all_reduce")]


def test_comm_log_is_scoped_to_its_block():
    x = torch.ones(3)
    with comm.record() as outer:
        comm.all_reduce(x, phase="forward", label="a")
        with comm.record() as inner:
            comm.all_gather(x, phase="backward", label="b")
    comm.all_reduce(x, phase="forward", label="outside")
    assert [r.label for r in outer] == ["a", "b"]
    assert [r.label for r in inner] == ["b"]
    with pytest.raises(ValueError, match="phase must be"):
        with comm.record():
            comm.all_reduce(x, phase="sideways")
