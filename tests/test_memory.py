"""Activation memory: the formulas against the real layer, the real executor and the simulator.

Expected forms typed here are the paper's printed equations (Korthikanti et al. 2022,
Eq. 1-6, Table 2); every measured number comes from running the layer or the pipeline."""

from fractions import Fraction

import pytest
import sympy as sp
import torch
from hypothesis import given, settings, strategies as st

from paralab import launch, memory, pipeline, schedules
from paralab.memory import a, b, h, s, t
from paralab.simulator import simulate
from paralab.transformer import (TransformerLayer, TransformerPipelineModel, parallel_layer_step,
                                 shard)

SBH = s * b * h


def test_meter_counts_what_autograd_saves_but_not_parameters():
    layer = torch.nn.Linear(16, 32, dtype=torch.float64)
    meter = memory.SavedTensorMeter(layer.parameters())
    x = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    sizes, records = [], []
    with meter.hooks(sizes):
        y = torch.tanh(layer(x))
    with meter.record(records):
        torch.tanh(layer(x))
    # Linear saves its input (4x16); tanh saves its output (4x32); the weight is excluded.
    assert sorted(sizes) == [4 * 16 * 8, 4 * 32 * 8]
    assert sorted((r.shape, r.dtype, r.nbytes) for r in records) == [
        ((4, 16), "float64", 4 * 16 * 8), ((4, 32), "float64", 4 * 32 * 8)]
    meter.change(sum(sizes), 1.0)
    meter.change(-sum(sizes), 2.0)
    assert meter.peak == 4 * 48 * 8 and meter.current == 0
    assert meter.over_time == [(0.0, 0), (1.0, 4 * 48 * 8), (2.0, 0)]
    y.sum().backward()  # the hooks returned the tensors unchanged


# -- the paper's equations, from the kept tensors ------------------------------------------------
@pytest.mark.parametrize("strategy,paper", [
    ("none", SBH * (34 + 5 * a * s / h)),                          # Eq. 1
    ("tp", SBH * (10 + 24 / t + 5 * a * s / (h * t))),             # Eq. 2
    ("tp+sp", SBH / t * (34 + 5 * a * s / h)),                     # Eq. 4
    ("selective", 34 * SBH),
    ("tp+selective", SBH * (10 + 24 / t)),                         # Table 2
    ("tp+sp+selective", 34 * SBH / t),                             # Eq. 6
    ("full", 2 * SBH),                                             # Table 2
    ("full-recompute", 2 * SBH),
    ("tp+sp+full", 2 * SBH / t),
])
def test_kept_tensors_add_up_to_the_papers_equations(strategy, paper):
    assert sp.simplify(memory.transformer_layer_activations(strategy) - paper) == 0


def test_tensor_parallel_formulas_reduce_to_the_unsharded_one_at_t_equal_1():
    none = memory.transformer_layer_activations("none")
    for strategy in ("tp", "tp+sp"):
        assert sp.simplify(memory.transformer_layer_activations(strategy).subs(t, 1) - none) == 0


def test_sequence_parallelism_splits_exactly_the_10_sbh_tensor_parallelism_replicates():
    tp = memory.transformer_layer_activations("tp")
    tp_sp = memory.transformer_layer_activations("tp+sp")
    assert sp.simplify(tp - tp_sp - 10 * SBH * (1 - 1 / t)) == 0
    replicated = [k for k in memory.kept_tensors("tp") if k.region == "replicated"]
    assert sp.simplify(memory.bytes_of(replicated) - 10 * SBH) == 0
    assert {k.op for k in replicated} == {"ln1", "qkv", "dropout after attention", "ln2", "fc1",
                                          "dropout after mlp"}


def test_the_quadratic_term_is_the_attention_core_that_selective_recomputation_drops():
    core = [k for k in memory.kept_tensors("none") if (k.op, k.tensor) in memory.ATTENTION_CORE]
    assert sp.simplify(memory.bytes_of(core) - 5 * a * s ** 2 * b) == 0
    assert sp.simplify(memory.transformer_layer_activations("none")
                       - memory.transformer_layer_activations("selective") - 5 * a * s ** 2 * b) == 0


def test_gpt3_sized_layer_numbers():
    # s=2048, b=1, h=12288, a=96, t=8: selective recomputation keeps 34 sbh / t bytes.
    values = dict(s=2048, b=1, h=12288, a=96, t=8)
    selective = memory.evaluate(memory.transformer_layer_activations("tp+sp+selective"), **values)
    assert selective == 34 * 2048 * 12288 // 8
    full = memory.evaluate(memory.transformer_layer_activations("none"), **values)
    assert full / selective > 8  # the attention scores dominate at this sequence length


@pytest.mark.parametrize("text,error", [
    ("magic", "unknown strategy 'magic'"), ("sp", "needs 'tp' too"),
    ("tp+selective+full", "choose one recomputation"), ("tp+tp", "unknown strategy"),
])
def test_strategies_that_do_not_exist_are_explained(text, error):
    with pytest.raises(ValueError, match=error):
        memory.transformer_layer_activations(text)


def test_strategy_round_trips_as_text():
    for text in ("none", "tp", "tp+sp", "selective", "tp+sp+full"):
        assert str(memory.Strategy.parse(text)) == text


# -- the real layer ----------------------------------------------------------------------------------
def measure(seq, batch, hidden, heads, recompute="none", dtype=torch.float32, dropout=0.1):
    torch.manual_seed(0)
    layer = TransformerLayer(hidden, heads, dropout=dropout, recompute=recompute, dtype=dtype)
    x = torch.randn(seq, batch, hidden, dtype=dtype, requires_grad=True)
    out, saved = memory.saved_tensors(layer, x, parameters=layer.parameters())
    out.sum().backward()
    return saved


def expected_sizes(strategy, e, values, mask_bytes=None):
    """Bytes of every kept tensor, PyTorch's accounting on the CPU: LayerNorm statistics in
    the input's dtype, dropout masks kept as scaled noise of the input's dtype."""
    kept = memory.kept_tensors(strategy, pytorch=True)
    return sorted(int(memory.evaluate(memory.bytes_of([k], e, mask_bytes or e, e), **values))
                  for k in kept)


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_the_layer_keeps_exactly_the_tensors_of_the_formula(recompute, dtype):
    values = dict(s=8, b=2, h=16, a=4)
    saved = measure(8, 2, 16, 4, recompute, dtype)
    e = torch.empty((), dtype=dtype).element_size()
    assert sorted(x.nbytes for x in saved) == expected_sizes(recompute, e, values)
    assert {x.dtype for x in saved} == {str(dtype).replace("torch.", "")}


@settings(max_examples=15, deadline=None)
@given(seq=st.integers(1, 6), batch=st.integers(1, 3), heads=st.integers(1, 3),
       head_dim=st.integers(1, 4), recompute=st.sampled_from(["none", "selective", "full"]))
def test_measured_bytes_equal_the_formula_for_any_size(seq, batch, heads, head_dim, recompute):
    hidden = heads * head_dim
    saved = measure(seq, batch, hidden, heads, recompute)
    formula = memory.layer_activation_bytes(recompute, activation_bytes=4, mask_bytes=4,
                                            statistic_bytes=4)
    assert sum(x.nbytes for x in saved) == memory.evaluate(formula, s=seq, b=batch, h=hidden,
                                                           a=heads)


def test_what_pytorch_keeps_beyond_the_paper_is_named_and_exact():
    """In 16-bit, the CPU layer keeps the paper's bytes plus two named differences:
    LayerNorm's mean and 1/std (2 per token per LayerNorm) and dropout masks as 2-byte noise
    instead of 1-byte masks (one extra byte per masked element: 2 sbh + a s^2 b)."""
    values = dict(s=8, b=2, h=16, a=4)
    measured = sum(x.nbytes for x in measure(8, 2, 16, 4, dtype=torch.bfloat16))
    paper = memory.evaluate(memory.transformer_layer_activations("none"), **values)
    statistics = 2 * 2 * 8 * 2 * 2          # 2 LayerNorms x (mean, 1/std) x s b x 2 bytes
    masks = 2 * 8 * 2 * 16 + 4 * 8 ** 2 * 2  # one more byte for each of 2 sbh + a s^2 b
    assert measured - paper == statistics + masks


def test_recomputation_keeps_the_gradients_of_the_plain_layer():
    """With dropout: the re-run must draw the forward's masks (checkpoint restores the RNG)."""
    grads = {}
    for recompute in ("none", "selective", "full"):
        torch.manual_seed(0)
        layer = TransformerLayer(16, 4, dropout=0.3, recompute=recompute, dtype=torch.float64)
        x = torch.randn(8, 2, 16, dtype=torch.float64, requires_grad=True)
        torch.manual_seed(1)
        layer(x).pow(2).sum().backward()
        grads[recompute] = [x.grad] + [q.grad for q in layer.parameters()]
    for recompute in ("selective", "full"):
        for got, want in zip(grads[recompute], grads["none"]):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_layer_parameters_equal_the_modules():
    layer = TransformerLayer(24, 4)
    assert sum(q.numel() for q in layer.parameters()) == memory.evaluate(
        memory.layer_parameters(), h=24)
    part = shard(layer, 1, 2)
    assert sum(q.numel() for q in part.parameters()) == memory.evaluate(
        memory.layer_parameters(tp=True), h=24, t=2)


def test_adam_keeps_two_fp32_moments_per_parameter():
    """Of mixed precision's 12 optimizer bytes per parameter, torch.optim.Adam holds the
    momentum and variance (4 + 4); the other 4 are the fp32 master copy of the 16-bit
    weights, which the model states count separately from the 2-byte weights."""
    layer = TransformerLayer(16, 4)
    optimizer = torch.optim.Adam(layer.parameters())
    layer(torch.randn(3, 2, 16)).sum().backward()
    optimizer.step()
    moments = sum(x.numel() * x.element_size() for state in optimizer.state.values()
                  for name, x in state.items() if name != "step")
    n = sum(q.numel() for q in layer.parameters())
    assert moments == 8 * n
    states = memory.model_state_bytes(n)
    assert states == {"weights": 2 * n, "gradients": 2 * n, "optimizer": 12 * n}


# -- pipeline ranks -----------------------------------------------------------------------------------
def test_first_stage_factors():
    p, v = memory.p, memory.v
    assert memory.first_stage_factor("gpipe") == memory.m / p
    assert memory.first_stage_factor("1f1b") == 1
    assert sp.simplify(memory.first_stage_factor("interleaved") - (1 + (p - 1) / (p * v))) == 0


def test_one_f_one_b_first_stage_holds_L_layers_whatever_p():
    per_layer = memory.transformer_layer_activations("none")
    for p_value in (2, 4, 8, 16):
        first = memory.evaluate(memory.activation_bytes("1f1b", rank=0), p=p_value, m=64, L=32)
        assert sp.simplify(first - 32 * per_layer) == 0
    gpipe = memory.evaluate(memory.activation_bytes("gpipe", rank=0), m=64, L=32, p=4)
    assert sp.simplify(gpipe - 16 * 32 * per_layer) == 0


def test_rank_memory_adds_model_states_and_activations():
    parts = memory.evaluate(memory.rank_memory("1f1b", "tp+sp+selective", rank=0),
                            s=2048, b=1, h=12288, a=96, L=96, t=8, p=8, m=64)
    params = 96 // 8 * (12 * 12288 ** 2 + 7 * 12288) // 8 + 96 // 8 * 6 * 12288
    assert parts["weights"] == 2 * params and parts["optimizer"] == 12 * params
    assert parts["activations"] == 96 * 34 * 2048 * 12288 // 8  # L layers on the first stage
    assert parts["total"] == sum(parts[k] for k in ("weights", "gradients", "optimizer",
                                                    "activations"))


# -- recomputation's price, in the simulator ----------------------------------------------------------
@pytest.mark.parametrize("schedule,build,extra", [
    ("gpipe", lambda: schedules.gpipe(4, 8), {}),
    ("1f1b", lambda: schedules.one_f_one_b(4, 8), {}),
    ("interleaved", lambda: schedules.interleaved_one_f_one_b(4, 8, 2), {"v": 2}),
])
@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_simulated_step_with_recomputation_equals_the_formula(schedule, build, extra, recompute):
    seq, hidden = 512, 1024
    t_f, t_b = memory.recompute_costs(Fraction(2), Fraction(4), recompute,
                                      seq=seq, hidden=hidden)
    timeline = simulate(build(), t_f, t_b)
    formula = memory.step_time_with_recompute(schedule, recompute)
    phi = memory.recompute_fraction(recompute).subs({s: seq, h: hidden})
    assert t_b == 4 + Fraction(int(phi.p), int(phi.q)) * 2
    assert timeline.makespan == memory.evaluate(formula, p=4, m=8, t_f=2, t_b=4, s=seq, h=hidden,
                                                **extra)
    # the bubble grows with the backward: (p-1)(t_f + t_b') for GPipe and 1F1B
    if schedule != "interleaved":
        assert timeline.makespan - timeline.ideal == 3 * (t_f + t_b)


def test_recomputation_is_not_free():
    plain = simulate(schedules.one_f_one_b(4, 8), 2, 4).makespan
    full = simulate(schedules.one_f_one_b(4, 8), *memory.recompute_costs(2, 4, "full")).makespan
    assert (plain, full) == (66, 88)
    assert memory.recompute_fraction("selective") == s / (6 * h + s)
    with pytest.raises(ValueError, match="pass seq= and hidden="):
        memory.recompute_costs(2, 4, "selective")


# -- real processes -------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "tp+sp"])
def test_each_tensor_parallel_rank_keeps_the_formulas_tensors(sequence_parallel):
    results = launch.run(parallel_layer_step, 2, 8, 2, 16, 4, sequence_parallel=sequence_parallel,
                         dropout=0.1, dtype="float32", echo=False)
    strategy = "tp+sp" if sequence_parallel else "tp"
    for result in results:
        assert sorted(x.nbytes for x in result["saved"]) == expected_sizes(
            strategy, 4, dict(s=8, b=2, h=16, a=4, t=2))


PIPELINE = TransformerPipelineModel(seq=8, hidden=16, heads=4, layers_per_stage=2, batch=16)
PIPELINE_SCHEDULES = {"gpipe": schedules.gpipe(4, 8), "1f1b": schedules.one_f_one_b(4, 8),
                      "interleaved": schedules.interleaved_one_f_one_b(4, 8, 2)}


@pytest.mark.slow
@pytest.mark.parametrize("name", PIPELINE_SCHEDULES)
@pytest.mark.parametrize("how", ["plain", "layers recomputed", "stages recomputed"])
def test_pipeline_peaks_are_in_flight_times_layers_times_the_layer(name, how):
    """The executor measures each rank's peak; the formula multiplies the microbatches in
    flight by the layers of a chunk and the bytes of one layer (one stage input when the
    executor recomputes whole stages)."""
    model = PIPELINE if how != "layers recomputed" else \
        TransformerPipelineModel(**{**PIPELINE.__dict__, "recompute": "full"})
    schedule = PIPELINE_SCHEDULES[name]
    result = pipeline.run_pipeline(schedule, model, recompute=how == "stages recomputed",
                                   echo=False)
    micro = dict(s=PIPELINE.seq, b=PIPELINE.batch // 8, h=PIPELINE.hidden, a=PIPELINE.heads)
    layer = memory.layer_activation_bytes("full" if how == "layers recomputed" else "none",
                                          activation_bytes=4, mask_bytes=4, statistic_bytes=4)
    per_chunk = (memory.evaluate(layer, **micro) * PIPELINE.layers_per_stage
                 if how != "stages recomputed" else micro["s"] * micro["b"] * micro["h"] * 4)
    v = 2 if name == "interleaved" else 1
    loss_input = micro["s"] * micro["b"] * micro["h"] * 4  # (out - y) ** 2 keeps out - y
    for rank, peak in enumerate(result.peak_saved_bytes):
        held = memory.evaluate(memory.in_flight(name, rank), p=4, m=8, v=v)
        if rank < 3 or how == "stages recomputed":
            assert peak == held * per_chunk, (rank, peak, held)
        elif name != "interleaved":  # the last stage also keeps its loss's input
            assert peak == held * (per_chunk + loss_input)
    first = memory.evaluate(memory.activation_bytes(name, rank=0, per_layer=memory.evaluate(
        layer, **micro)), p=4, m=8, v=v, L=4 * v * PIPELINE.layers_per_stage)
    if how != "stages recomputed":
        assert result.peak_saved_bytes[0] == first


def test_match_saved_pairs_every_kept_tensor_with_a_measured_one():
    values = dict(s=4, b=2, h=8, a=2)
    saved = measure(4, 2, 8, 2, dtype=torch.float32)
    kept = memory.kept_tensors("none", pytorch=True)
    pairs, extra = memory.match_saved(kept, saved, values, activation_bytes=4, mask_bytes=4,
                                      statistic_bytes=4)
    assert not extra and [k for k, _, _ in pairs] == kept
    assert all(found.nbytes == size for _, size, found in pairs)
    # the paper's accounting (no statistics, 1-byte masks) leaves measured tensors over
    pairs, extra = memory.match_saved(memory.kept_tensors("none"), saved, values,
                                      activation_bytes=4, mask_bytes=1)
    assert sum(found is None for _, _, found in pairs) == 3        # the three masks
    assert len(extra) == 4 + 3                                     # statistics + masks


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_masks_take_one_byte_as_in_the_paper():
    """CUDA's fused dropout keeps a 1-byte mask, and LayerNorm keeps float32 statistics for
    16-bit inputs: the measured layer is the paper's Eq. 1 plus the statistics only."""
    values = dict(s=8, b=2, h=16, a=4)
    torch.manual_seed(0)
    layer = TransformerLayer(16, 4, dtype=torch.bfloat16).cuda()
    x = torch.randn(8, 2, 16, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    _, saved = memory.saved_tensors(layer, x, parameters=layer.parameters())
    formula = memory.layer_activation_bytes("none", statistic_bytes=4)
    assert sum(x.nbytes for x in saved) == memory.evaluate(formula, **values)
