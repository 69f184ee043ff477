"""The Transformer layer of lecture 04: parallel shards compute the whole layer's step."""

import pytest
import torch
from torch.testing import assert_close

from paralab import launch, pipeline, schedules
from paralab.transformer import (TransformerLayer, TransformerPipelineModel, parallel_layer_step,
                                 shard)

SEQ, BATCH, HIDDEN, HEADS = 8, 2, 16, 4


def whole_step():
    """One process, the whole layer, as parallel_layer_step builds it (dropout off, so that
    the shards can be compared value by value)."""
    torch.manual_seed(0)
    layer = TransformerLayer(HIDDEN, HEADS, dropout=0.0, dtype=torch.float64)
    x = torch.randn(SEQ, BATCH, HIDDEN, dtype=torch.float64)
    grad_out = torch.randn_like(x)
    x.requires_grad_()
    out = layer(x)
    out.backward(grad_out)
    return out.detach(), x.grad, {n: q.grad for n, q in layer.named_parameters()}


@pytest.mark.slow
@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "tp+sp"])
def test_two_ranks_compute_the_whole_layers_step(sequence_parallel, recompute):
    results = launch.run(parallel_layer_step, 2, SEQ, BATCH, HIDDEN, HEADS,
                         sequence_parallel=sequence_parallel, recompute=recompute, echo=False)
    out, input_grad, grads = whole_step()
    if sequence_parallel:  # each rank holds its half of the sequence
        assert_close(torch.cat([r["output"] for r in results]), out)
        assert_close(torch.cat([r["input_grad"] for r in results]), input_grad)
    else:
        for r in results:
            assert_close(r["output"], out)
            assert_close(r["input_grad"], input_grad)
    for name in ("qkv.weight", "qkv.bias", "fc1.weight", "fc1.bias"):   # column-parallel
        assert_close(torch.cat([r["grads"][name] for r in results]), grads[name], msg=name)
    for name in ("proj.weight", "fc2.weight"):                           # row-parallel
        assert_close(torch.cat([r["grads"][name] for r in results], dim=1), grads[name],
                     msg=name)
    for name in ("ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias", "proj.bias", "fc2.bias"):
        parts = [r["grads"][name] for r in results]
        # replicated parameters: with SP each rank saw half of the tokens (Megatron
        # all-reduces these gradients over the tensor-parallel group)
        assert_close(sum(parts) if sequence_parallel else parts[0], grads[name], msg=name)


@pytest.mark.parametrize("kwargs,error", [
    (dict(hidden=10, heads=4), "not divisible by the 4 heads"),
    (dict(hidden=16, heads=4, tp=3), "cannot be split over tensor-parallel degree 3"),
    (dict(hidden=16, heads=4, sequence_parallel=True), "needs tp > 1"),
    (dict(hidden=16, heads=4, recompute="some"), "unknown recompute 'some'"),
])
def test_impossible_layers_are_explained(kwargs, error):
    with pytest.raises(ValueError, match=error):
        TransformerLayer(**kwargs)


def test_a_shard_holds_its_heads_and_a_slice_of_the_mlp():
    layer = TransformerLayer(HIDDEN, HEADS)
    part = shard(layer, 1, 2)
    assert part.local_heads == HEADS // 2
    assert_close(part.qkv.weight, layer.qkv.weight[3 * HIDDEN // 2:])
    assert_close(part.fc2.weight, layer.fc2.weight[:, 4 * HIDDEN // 2:])
    assert_close(part.fc2.bias, layer.fc2.bias)
    with pytest.raises(ValueError, match="shard a whole layer"):
        shard(part, 0, 2)


@pytest.mark.slow
def test_the_pipeline_model_runs_in_the_executor_and_matches_one_process():
    model = TransformerPipelineModel(dropout=0.0, dtype="float64")
    result = pipeline.run_pipeline(schedules.one_f_one_b(2, 4), model, echo=False)
    stages = model.build(2)
    xs, ys = model.microbatches(4)
    for x, y in zip(xs, ys):
        out = x
        for stage in stages:
            out = stage(out)
        model.loss(out, y, 4).backward()
    for s, stage in enumerate(stages):
        for name, q in stage.named_parameters():
            assert_close(result.grads[f"stage{s}.{name}"], q.grad, msg=name)
