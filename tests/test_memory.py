"""Activation-memory accounting: the saved-tensor meter and the per-layer formulas."""

import pytest
import sympy as sp
import torch

from paralab import memory


def test_meter_counts_what_autograd_saves_but_not_parameters():
    layer = torch.nn.Linear(16, 32, dtype=torch.float64)
    meter = memory.SavedTensorMeter(layer.parameters())
    x = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    sizes = []
    with meter.hooks(sizes):
        y = torch.tanh(layer(x))
    # Linear saves its input (4x16); tanh saves its output (4x32); the weight is excluded.
    assert sorted(sizes) == [4 * 16 * 8, 4 * 32 * 8]
    meter.change(sum(sizes), 1.0)
    meter.change(-sum(sizes), 2.0)
    assert meter.peak == 4 * 48 * 8 and meter.current == 0
    assert meter.over_time == [(0.0, 0), (1.0, 4 * 48 * 8), (2.0, 0)]
    y.sum().backward()  # the hooks returned the tensors unchanged


def test_tensor_parallel_formulas_reduce_to_the_unsharded_one_at_t_equal_1():
    none = memory.transformer_layer_activations("none")
    for strategy in ("tp", "tp+sp"):
        assert sp.simplify(memory.transformer_layer_activations(strategy).subs(memory.t, 1)
                           - none) == 0


def test_sequence_parallel_shards_everything_tensor_parallel_leaves_replicated():
    tp = memory.transformer_layer_activations("tp")
    tp_sp = memory.transformer_layer_activations("tp+sp")
    # What TP alone leaves unsharded: 10 sbh (layer norms, dropouts, inputs) minus its t-th.
    assert sp.simplify(tp - tp_sp - 10 * memory.s * memory.b * memory.h * (1 - 1 / memory.t)) == 0


def test_gpt3_sized_layer_numbers():
    # s=2048, b=1, h=12288, a=96, t=8: selective recomputation keeps 34 sbh / t bytes.
    values = {memory.s: 2048, memory.b: 1, memory.h: 12288, memory.a: 96, memory.t: 8}
    selective = memory.transformer_layer_activations("tp+sp+selective").subs(values)
    assert selective == 34 * 2048 * 12288 // 8
    full = memory.transformer_layer_activations("none").subs(values)
    assert full / selective > 8  # the attention scores dominate at this sequence length


def test_unknown_strategy_is_named():
    with pytest.raises(ValueError, match="unknown strategy 'magic'"):
        memory.transformer_layer_activations("magic")
