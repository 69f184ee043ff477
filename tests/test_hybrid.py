"""Hybrid parallelism: the (dp, pp, tp) layout, its traffic formulas, and real 8-rank training.

The layout tests need no process.  The slow tests share one ``paralab.launch`` world per mesh
shape (module fixtures): each world builds its DeviceMesh once and trains several steps."""

import math

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from paralab import formulas, hybrid, launch, mesh

SHAPES = st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4))


# -- the layout, by hand --------------------------------------------------------------------------
def test_the_three_groups_of_eight_ranks():
    # Written out by hand: tp innermost (neighbours), then pp, then dp (stride pp * tp = 4).
    assert mesh.group_ranks((2, 2, 2), "tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert mesh.group_ranks((2, 2, 2), "pp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert mesh.group_ranks((2, 2, 2), "dp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert mesh.coordinates(6, (2, 2, 2)) == (1, 1, 0)
    assert mesh.groups_of(5, (2, 2, 2)) == {"dp": [1, 5], "pp": [5, 7], "tp": [4, 5]}


def test_which_groups_cross_nodes():
    # two nodes of 4 GPUs: TP and PP stay inside a node, DP goes across
    assert [mesh.crosses_nodes((2, 2, 2), dim, 4) for dim in mesh.DIMS] == [True, False, False]
    # the same 8 ranks with TP outermost would put every TP pair on two nodes
    assert mesh.crosses_nodes((1, 1, 8), "tp", 4)
    assert not mesh.crosses_nodes((1, 2, 4), "tp", 4) and mesh.crosses_nodes((1, 2, 4), "pp", 4)


@settings(max_examples=60, deadline=None)
@given(SHAPES)
def test_every_rank_is_in_exactly_one_group_of_each_dimension(shape):
    n = math.prod(shape)
    for axis, dim in enumerate(mesh.DIMS):
        groups = mesh.group_ranks(shape, dim)
        assert sorted(r for g in groups for r in g) == list(range(n))
        assert all(len(g) == shape[axis] for g in groups)
        for g in groups:  # a group varies only along its own dimension, in order
            coords = [mesh.coordinates(r, shape) for r in g]
            assert [c[axis] for c in coords] == list(range(shape[axis]))
            assert len({c[:axis] + c[axis + 1:] for c in coords}) == 1
    for r in range(n):
        assert mesh.rank_of(mesh.coordinates(r, shape), shape) == r
    # tp innermost: a TP group is tp consecutive ranks
    assert all(g == list(range(g[0], g[0] + shape[2])) for g in mesh.group_ranks(shape, "tp"))


@settings(max_examples=60, deadline=None)
@given(SHAPES, st.sampled_from([1, 2, 4, 8]))
def test_tp_stays_inside_a_node_when_it_divides_the_node(shape, gpus_per_node):
    tp = shape[2]
    if gpus_per_node % tp == 0:
        assert not mesh.crosses_nodes(shape, "tp", gpus_per_node)
    if tp > gpus_per_node:
        assert mesh.crosses_nodes(shape, "tp", gpus_per_node)


def test_mesh_errors_teach():
    with pytest.raises(ValueError, match="three positive whole numbers"):
        mesh.check_shape((2, 0, 2))
    with pytest.raises(ValueError, match="unknown mesh dimension 'ep'"):
        mesh.group_ranks((2, 2, 2), "ep")
    with pytest.raises(ValueError, match="rank 8 is not in a mesh of 2x2x2 = 8 ranks"):
        mesh.coordinates(8, (2, 2, 2))
    with pytest.raises(ValueError, match="do not split into 3 equal pipeline stages"):
        hybrid.HybridModel(layers=4).check((1, 3, 1), 2)
    with pytest.raises(ValueError, match="does not split into dp = 3 replicas"):
        hybrid.HybridModel(batch=16).check((3, 1, 1), 2)


# -- the formulas ---------------------------------------------------------------------------------
def test_ffn_stack_parameters_count_the_real_shards():
    d, tp = 8, 2
    dense = torch.nn.ModuleList([hybrid.HybridModel(width=d).blocks()[0]])
    whole = sum(q.numel() for q in dense.parameters())
    # per rank: W1, b1, W2 split by tp; b2 whole
    per_rank = whole - d
    per_rank = per_rank // tp + d
    assert formulas.evaluate(formulas.ffn_stack_parameters(), L=1, pp=1, tp=tp, d=d) == per_rank
    assert formulas.evaluate(formulas.ffn_stack_parameters(), L=1, pp=1, tp=1, d=d) == whole


def test_traffic_formulas_by_hand():
    sizes = dict(dp=2, pp=2, tp=2, L=4, B=16, d=8, m=2, e=8)
    last = formulas.evaluate(formulas.ffn_stack_traffic("last"), **sizes)
    first = formulas.evaluate(formulas.ffn_stack_traffic("first"), **sizes)
    rows = 16 // (2 * 2)                      # a microbatch: B/(dp m) rows of d
    ring = 2 * (2 - 1) * rows * 8 * 8 // 2    # one all-reduce of it on tp = 2 ranks, ring-priced
    assert last["tp"] == 2 * (4 // 2) * 2 * ring        # 2 per block, 2 blocks, 2 microbatches
    assert first["tp"] == (2 * (4 // 2) - 1) * 2 * ring  # the data needs no gradient
    assert last["pp"] == first["pp"] == 2 * rows * 8 * 8
    params = (4 // 2) * ((8 * 64 + 4 * 8) // 2 + 8)
    assert last["dp"] == first["dp"] == 2 * (2 - 1) * params * 8 // 2
    assert formulas.evaluate(formulas.ffn_stack_traffic("middle")["pp"], **sizes) == 2 * last["pp"]
    assert formulas.ffn_stack_traffic("only")["pp"] == 0
    with pytest.raises(ValueError, match="stage must be one of"):
        formulas.ffn_stack_traffic("second")


# -- 8 real ranks ---------------------------------------------------------------------------------
STEPS, LR = 3, 0.1


@pytest.fixture(scope="module")
def cube():
    """(2, 2, 2): every dimension of degree 2, 1F1B, 3 steps."""
    return hybrid.train((2, 2, 2), hybrid.HybridModel(), steps=STEPS, lr=LR, m=2, timeout=120)


@pytest.fixture(scope="module")
def deep():
    """(1, 4, 2): a pipeline of 4 stages (two in the middle) of TP pairs, GPipe, 2 steps."""
    return hybrid.train((1, 4, 2), hybrid.HybridModel(layers=4), steps=2, lr=LR, m=4,
                        schedule="gpipe", timeout=120)


def _parity(result, steps):
    losses, reference = hybrid.reference_training(result.model, steps, LR)
    got = result.parameters()
    assert got.keys() == reference.keys()
    for name, value in reference.items():
        assert_close(got[name], value, msg=name)
    assert_close(result.losses(), losses)
    assert result.replica_spread() == 0.0


@pytest.mark.slow
def test_eight_ranks_train_exactly_like_one_process(cube):
    _parity(cube, STEPS)


@pytest.mark.slow
def test_a_deeper_pipeline_with_gpipe_trains_like_one_process(deep):
    _parity(deep, 2)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cube", "deep"])
def test_pytorch_device_mesh_builds_our_groups(request, name):
    result = request.getfixturevalue(name)
    for rank, report in enumerate(result.ranks):
        assert report["coords"] == mesh.coordinates(rank, result.shape)
        assert report["groups"] == mesh.groups_of(rank, result.shape)


STAGE = {(0, 1): "only", (0, 2): "first", (1, 2): "last", (0, 4): "first", (1, 4): "middle",
         (2, 4): "middle", (3, 4): "last"}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cube", "deep"])
def test_bytes_per_dimension_equal_the_formulas(request, name):
    result = request.getfixturevalue(name)
    dp, pp, tp = result.shape
    sizes = dict(dp=dp, pp=pp, tp=tp, L=result.model.layers, B=result.model.batch,
                 d=result.model.width, m=result.m, e=8)
    for step in range(len(result.ranks[0]["steps"])):
        for rank, traffic in enumerate(result.traffic(step)):
            stage = STAGE[(mesh.coordinates(rank, result.shape)[1], pp)]
            expected = formulas.evaluate(formulas.ffn_stack_traffic(stage), **sizes)
            assert traffic == expected, (rank, stage)


@pytest.mark.slow
def test_each_dimension_talks_only_inside_its_own_group(cube):
    for rank, report in enumerate(cube.ranks):
        groups = mesh.groups_of(rank, cube.shape)
        record = report["steps"][0]
        assert {x["world_size"] for x in record["tp"]} == {2}
        assert {x["label"] for x in record["dp"]} == {"dp.gradients"}
        assert [x["world_size"] for x in record["dp"]] == [2]
        # every point-to-point send goes to the other member of this rank's pipeline
        assert {dst for dst, _ in record["pp"]} == set(groups["pp"]) - {rank}
        # each rank's parameters: its stage's blocks, its TP shard of them
        count = sum(t.numel() for t in report["parameters"].values())
        assert count == formulas.evaluate(formulas.ffn_stack_parameters(), L=4, pp=2, tp=2, d=8)
        assert record["dp"][0]["elements"] == count


@pytest.mark.slow
def test_an_interleaved_pipeline_of_tp_pairs_trains_like_one_process():
    # 2 chunks per rank: rank 0 of the pipeline holds stages 0 and 2, rank 1 stages 1 and 3
    result = hybrid.train((1, 2, 2), hybrid.HybridModel(layers=4), steps=2, lr=LR, m=2,
                          schedule="interleaved", timeout=120)
    _parity(result, 2)


# -- the misconception: summing instead of averaging ----------------------------------------------
def sum_gradients(parameters, group):
    from paralab import comm
    for q in parameters:
        q.grad.copy_(comm.all_reduce(q.grad, phase="backward", label="dp.sum", group=group))


@pytest.mark.slow
def test_summing_without_averaging_is_a_dp_times_larger_learning_rate():
    model = hybrid.HybridModel(layers=2)
    result = hybrid.train((2, 1, 1), model, steps=2, lr=LR, m=2, average=sum_gradients)
    _, right = hybrid.reference_training(model, 2, LR)
    _, doubled = hybrid.reference_training(model, 2, 2 * LR)
    got = result.parameters()
    assert all(not torch.allclose(got[k], right[k]) for k in right if k.endswith("weight"))
    for name, value in doubled.items():
        assert_close(got[name], value, msg=name)


# -- placement and errors in one process ----------------------------------------------------------
def placement_dry_run(rank, world_size):
    """A 1-rank world on "meta": the mesh, the tensor-parallel stages, the data, the DP
    averaging and the SGD step must create nothing on the CPU."""
    device_mesh = mesh.device_mesh((1, 1, 1))
    model = hybrid.HybridModel()
    ranked = hybrid.RankModel(model, (1, 1, 1), (0, 0, 0), device_mesh.get_group("tp"))
    stage = ranked.build(1)[0].to(launch.device())
    xs, ys = ranked.microbatches(2)
    x, y = xs[0].to(launch.device()), ys[0].to(launch.device())
    hybrid.loss_fn(stage(x), y, 2).backward()
    parameters = list(stage.parameters())
    hybrid.average_gradients(parameters, device_mesh.get_group("dp"))
    hybrid.sgd_step(parameters, LR)
    devices = {q.device.type for q in parameters} | {q.grad.device.type for q in parameters}
    try:
        hybrid.average_gradients([torch.zeros(2, requires_grad=True)], None)
        no_grad = "accepted"
    except ValueError as e:
        no_grad = str(e)
    cpu = torch.zeros(2, requires_grad=True)
    cpu.grad = torch.ones(2)
    try:
        hybrid.average_gradients([cpu], device_mesh.get_group("dp"))
        cpu_grad = "accepted"
    except ValueError as e:
        cpu_grad = str(e)
    try:
        mesh.device_mesh((2, 1, 1))
        wrong = "accepted"
    except ValueError as e:
        wrong = str(e)
    return devices, no_grad, cpu_grad, wrong


@pytest.mark.slow
def test_everything_hybrid_adds_lives_on_the_rank_device(monkeypatch):
    monkeypatch.setenv("PARALAB_DEVICE", "meta")
    [(devices, no_grad, cpu_grad, wrong)] = launch.run(placement_dry_run, 1, echo=False)
    assert devices == {"meta"}
    assert no_grad.startswith("a parameter has no gradient")
    assert cpu_grad.startswith("all_reduce was handed a tensor on cpu")
    assert "needs 2 ranks, but the world has 1" in wrong


def test_count_sends_counts_and_restores():
    originals = dist.isend, dist.send
    with hybrid.count_sends() as log:
        assert dist.isend is not originals[0]
    assert (dist.isend, dist.send) == originals and log.bytes == 0
