"""Tensor-parallel FFN: parity with the dense layer, and communication equal to the formulas."""

from fractions import Fraction

import pytest
import torch
from torch.testing import assert_close

from paralab import comm, formulas, launch, layouts, tp

BATCH, SEQ, D = 2, 4, 8
CASES = [("col-row", True), ("row-row", True), ("col-col", True), ("col-col", False)]
# How each layout splits (Linear1, Linear2): "col" layers own rows of nn.Linear's (out, in)
# weight and slices of the bias, "row" layers columns of the weight and a full bias.
SPLITS = {"col-row": ("col", "row"), "row-row": ("row", "row"), "col-col": ("col", "col")}


def run_all_variants(rank, world_size):
    """One world runs every variant (starting worlds is the expensive part)."""
    return {f"{v}/{g}": tp.ffn_parity_run(rank, world_size, v, BATCH, SEQ, D, gather_output=g)
            for v, g in CASES}


@pytest.fixture(scope="module", params=[1, 2, 4], ids=lambda p: f"P={p}")
def world(request):
    return request.param, launch.run(run_all_variants, request.param, echo=False)


def dense_reference():
    """The dense FFN on the same data as tp.ffn_parity_run, in this process."""
    dense, x, target = tp.ffn_case(BATCH, SEQ, D)
    x.requires_grad_(True)
    out = dense(x)
    ((out - target) ** 2).sum().backward()
    return out.detach(), x.grad, dense


def test_every_layout_is_tested():
    assert set(SPLITS) == set(layouts.FFN_VARIANTS) == {v for v, _ in CASES}
    assert formulas.FFN_VARIANTS == layouts.FFN_VARIANTS


def test_dense_reference_is_the_dense_ffn_on_the_parity_data():
    out, input_grad, dense = dense_reference()
    reference = tp.dense_reference(BATCH, SEQ, D)
    assert_close(reference["output"], out)
    assert_close(reference["input_grad"], input_grad)
    assert reference["grads"].keys() == dict(dense.named_parameters()).keys()
    for name, p in dense.named_parameters():
        assert_close(reference["grads"][name], p.grad)


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
    for name, kind in zip(("linear1", "linear2"), SPLITS[variant]):
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
            ring = {"all_reduce": Fraction(2 * (p - 1), p), "all_gather": Fraction(p - 1, p)}
            assert x.traffic_bytes == ring[x.op] * x.bytes


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


# -- every tensor on launch.device() -------------------------------------------------------------
def placement_dry_run(rank, world_size):
    """A world of one rank whose device is "meta" (PARALAB_DEVICE=meta): the exercise runs
    on shapes alone, and a tensor created on the CPU either meets a meta tensor in an
    operation or is handed to a collective; both raise.  A world of one rank sends nothing,
    so only the placement is checked: exactly what hides CPU tensors in GPU code."""
    devices = {}
    for variant, gathered in CASES:
        result = tp.ffn_parity_step(rank, world_size, variant, BATCH, SEQ, D,
                                    gather_output=gathered)
        tensors = {"output": result["output"], "input_grad": result["input_grad"],
                   **result["grads"]}
        devices[f"{variant}/{gathered}"] = {name: t.device.type for name, t in tensors.items()}
    # The mistake this guards against: the dense model and the input built on the CPU.
    dense = tp.FFN(D).to(torch.float64)
    model = tp.ParallelFFN(dense, "col-row")
    try:
        model(torch.randn(BATCH, SEQ, D, dtype=torch.float64))
        cpu_tensors = "accepted"
    except ValueError as e:
        cpu_tensors = str(e)
    return devices, cpu_tensors


def test_every_tensor_of_the_exercise_is_on_the_rank_device(monkeypatch):
    monkeypatch.setenv("PARALAB_DEVICE", "meta")
    [(devices, cpu_tensors)] = launch.run(placement_dry_run, 1, echo=False)
    assert set(devices) == {f"{v}/{g}" for v, g in CASES}
    for case, names in devices.items():
        assert names and set(names.values()) == {"meta"}, case
    assert cpu_tensors.startswith("all_reduce was handed a tensor on cpu, but this rank "
                                  "computes on meta (paralab.launch.device())")


def test_results_come_back_on_the_cpu(world):
    p, results = world
    for r in results:
        for case in r.values():
            assert case["output"].device.type == case["input_grad"].device.type == "cpu"
            assert {g.device.type for g in case["grads"].values()} == {"cpu"}
