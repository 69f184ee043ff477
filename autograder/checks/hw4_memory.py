"""Checks of hw4_memory: a layer's activation bytes, recomputation, a pipeline rank's memory,
recomputation's time, and a checkpointed stage.

Every expected value comes from :mod:`paralab.memory` (the formulas the tests check against
the real layer and the real pipeline) or the simulator, and so does every *wrong* value a
known misconception produces: when an answer equals one of those, the feedback names the
misconception.
"""

from __future__ import annotations

from fractions import Fraction

import sympy as sp
import torch

from autograder.checks import (Probe, Verdict, as_real, formula_check, make_checker,
                               originality)
from paralab import memory, schedules
from paralab.memory import L, a, b, h, m, p, s, t, v
from paralab.simulator import simulate

SYMBOLS = [s, b, h, a, t, L, p, m, v]

# The homework's model (a 13B-parameter GPT: Brown et al. 2020, Table 2.1) and layout.
MODEL = dict(s=2048, b=1, h=5120, a=40, L=40)
LAYOUT = dict(t=4, p=4, m=32)
BUDGET_GIB = 8
TIMING = dict(p=4, m=8, t_f=2, t_b=4)
P_VALUES = (2, 4, 8)
GIB = 2 ** 30

# (layers, s, b, h, a, seed) of the runs of the student's checkpointed_forward.
VISIBLE_STAGE = (2, 8, 2, 16, 4, 0)
HIDDEN_STAGES = [(1, 4, 3, 8, 2, 5), (3, 6, 1, 12, 3, 7), (2, 5, 2, 16, 8, 11)]
ORIGINALITY_STAGE = (2, 6, 2, 12, 4, 3)
DROPOUT = 0.1


def _value(expr, **extra):
    """``expr`` at the homework's model and layout (``extra`` overrides)."""
    return memory.evaluate(expr, **{**MODEL, **LAYOUT, **extra})


def _is(value, target, rel=1e-9) -> bool:
    x = as_real(value)
    return x is not None and abs(x - float(target)) <= rel * max(1.0, abs(float(target)))


def _gib(x) -> str:
    return f"{float(x) / GIB:.2f} GiB"


# -- formulas ----------------------------------------------------------------------------------
def homework_formula(expected, misconceptions=(), at=None):
    """:func:`formula_check` at this homework's numbers (the model and layout, or ``at``):
    a wrong formula is shown with what it gives there."""
    values = {k: x for k, x in (at if at is not None else {**MODEL, **LAYOUT}).items()
              if k in memory.SYMBOLS}
    shown = ", ".join(f"{k}={x}" for k, x in values.items()
                      if memory.SYMBOLS[k] in expected.free_symbols)
    return formula_check(expected, misconceptions, memory.SYMBOLS,
                         lambda x: memory.evaluate(x, **values), f"at the homework's {shown}")


def number_check(expected, misconceptions=(), hint="", unit="bytes"):
    """``expected`` (to 1e-9 relative); known wrong values get their message."""
    def check(value) -> Verdict:
        if as_real(value) is None:
            return Verdict(False, f"expected a number ({unit}), got {type(value).__name__}")
        if _is(value, expected):
            return Verdict(True, "correct")
        for wrong, message in misconceptions:
            if _is(value, wrong, rel=1e-6):
                return Verdict(False, message)
        return Verdict(False, f"{value} is not right{'; ' + hint if hint else ''}")
    return check


SBH = s * b * h
A_NONE = memory.transformer_layer_activations("none")
A_TP = memory.transformer_layer_activations("tp")
A_TP_SP = memory.transformer_layer_activations("tp+sp")
FORGOT_ATTENTION = ("that is 34 sbh: it leaves out the attention core, 5as/h in sbh(34 + "
                    "5as/h) - the softmax output, its dropout mask and the dropout's output, "
                    "a s^2 b elements each, quadratic in s (forgetting the 5as/h term)")
MASKS_AT_TWO = ("that counts the dropout masks at 2 bytes per element; a mask takes 1 byte "
                "(the paper's accounting): sbh(34 + 5as/h)")
TP_AS_SP = ("that divides everything by t, which needs sequence parallelism too; tensor "
            "parallelism alone leaves the LayerNorms, the dropouts after the blocks and the "
            "inputs of the QKV and first MLP linears replicated (TP without SP leaves the "
            "10·sbh replicated part): sbh(10 + 24/t + 5as/(ht))")

LAYER_FORMULA = homework_formula(A_NONE, [
    (34 * SBH, FORGOT_ATTENTION),
    (SBH * (36 + 6 * a * s / h), MASKS_AT_TWO),
    (2 * A_NONE, "that is with 4-byte activations and 2-byte masks; the question asks for "
                 "16-bit activations (2 bytes) and 1-byte masks"),
])
TP_FORMULA = homework_formula(A_TP, [
    (A_TP_SP, TP_AS_SP),
    (SBH * (10 + 24 / t), "that leaves out the attention core 5as/(ht) (forgetting the 5as/h "
                          "term): without recomputation the scores, softmax and its dropout "
                          "are kept, split over the t ranks' heads"),
    (A_NONE / t, TP_AS_SP),
    (34 * SBH / t, "that is TP + SP with selective recomputation; the question asks for "
                   "tensor parallelism alone, nothing recomputed"),
])

LAYER_BYTES = number_check(_value(A_NONE), [
    (_value(34 * SBH), FORGOT_ATTENTION),
    (_value(SBH * (36 + 6 * a * s / h)), MASKS_AT_TWO),
    (_value(A_NONE) / GIB, "that is in GiB; the question asks for bytes"),
    (_value(2 * A_NONE), "that is with 4-byte activations; 16-bit activations take 2 bytes"),
], hint="evaluate sbh(34 + 5as/h) at the homework's s, b, h, a")

STRATEGIES = ("tp", "tp+sp", "tp+sp+selective")


def bytes_by_strategy(value) -> Verdict:
    if not isinstance(value, dict) or set(value) != set(STRATEGIES):
        return Verdict(False, f"expected a dict with exactly the keys {list(STRATEGIES)}")
    expected = {k: _value(memory.transformer_layer_activations(k)) for k in STRATEGIES}
    for key in STRATEGIES:
        got = value[key]
        if as_real(got) is None:
            return Verdict(False, f"{key}: expected a number of bytes, got {type(got).__name__}")
        if _is(got, expected[key]):
            continue
        if key == "tp" and _is(got, expected["tp+sp"]):
            return Verdict(False, f"tp: {got} is the TP + SP value; " + TP_AS_SP)
        if key == "tp+sp" and _is(got, expected["tp"]):
            return Verdict(False, "tp+sp: that is tensor parallelism alone; sequence "
                                  "parallelism also splits the 10 sbh replicated part, so "
                                  "everything is divided by t")
        if _is(got, _value(34 * SBH / t)) and key != "tp+sp+selective":
            return Verdict(False, f"{key}: {got} = 34 sbh / t leaves out the attention core "
                                  f"5as/(ht) (forgetting the 5as/h term)")
        if key == "tp+sp+selective" and _is(got, _value(34 * SBH)):
            return Verdict(False, "tp+sp+selective: 34 sbh is selective recomputation without "
                                  "any splitting; with TP + SP every term is divided by t")
        if key == "tp+sp+selective" and _is(got, expected["tp+sp"]):
            return Verdict(False, "tp+sp+selective: that still counts the attention core, "
                                  "which selective recomputation does not keep")
        return Verdict(False, f"{key}: {got} is not right")
    return Verdict(True, "correct")


# -- recomputation and a budget -------------------------------------------------------------------
def first_stage(strategy, schedule="1f1b", **extra):
    return _value(memory.activation_bytes(schedule, strategy, rank=0), **extra)


def least_recompute(value) -> Verdict:
    needed = {k: first_stage("tp+sp" + ("" if k == "none" else "+" + k))
              for k in memory.RECOMPUTE}
    budget = BUDGET_GIB * GIB
    fits = [k for k in memory.RECOMPUTE if needed[k] <= budget]
    if value not in memory.RECOMPUTE:
        return Verdict(False, f"expected one of {list(memory.RECOMPUTE)}, got {value!r}")
    if value == fits[0]:
        return Verdict(True, f"correct: {_gib(needed[value])} fits in {BUDGET_GIB} GiB")
    if value not in fits:
        return Verdict(False, f"with recompute {value!r} rank 0 needs {_gib(needed[value])} "
                              f"of activations (1F1B's first stage: L layers' worth), more "
                              f"than the {BUDGET_GIB} GiB budget")
    share = memory.recompute_fraction(fits[0]).subs({s: MODEL["s"], h: MODEL["h"]})
    return Verdict(False, f"{value!r} fits, but so does {fits[0]!r} ({_gib(needed[fits[0]])}), "
                          f"which re-runs only {share} of a forward instead of all of it: "
                          f"recomputation is not free, take the least that fits")


SELECTIVE_SHARE = number_check(_value(memory.recompute_fraction("selective")), [
    (_value(5 * a * s / h / (34 + 5 * a * s / h)),
     "that is the attention core's share of the layer's MEMORY (5as/h out of 34 + 5as/h); "
     "the question asks for its share of the forward's FLOPs, which is small - that is why "
     "selective recomputation is cheap"),
    (1, "1 is full recomputation: selective re-runs only the scores and the product with V"),
    (0, "recomputation is not free: the backward re-runs the attention core's matmuls"),
], hint="count the forward FLOPs of the layer's matmuls (2 per multiply-add) and the share "
        "of QK^T and (softmax) V among them", unit="a fraction")


# -- pipeline memory --------------------------------------------------------------------------------
A_FIRST = _value(A_TP_SP)
LAYERS_PER_STAGE = _value(L / p)


def _peaks():
    gpipe, one = first_stage("tp+sp", "gpipe"), first_stage("tp+sp", "1f1b")
    m_over_p = _value(m / p * L / p * A_TP_SP)
    whole_model = _value(p * L * A_TP_SP)
    gpipe_msgs = [
        (one, "that is 1F1B's first stage; GPipe runs all m forwards before any backward, "
              "so it holds all m microbatches"),
        (_value(m * L * A_TP_SP), "each microbatch crosses only this stage's L/p layers"),
    ]
    one_msgs = [
        (m_over_p, "1F1B's memory is not m/p microbatches (a common claim, and wrong): rank r "
                   "holds p - r of them, whatever m is - the first stage p"),
        (gpipe, "that is GPipe's first stage (all m microbatches); 1F1B starts the backwards "
                "early and holds p"),
        (whole_model, "each of the p microbatches in flight crosses only the stage's L/p "
                      "layers, not all L"),
        (_value(L / p * A_TP_SP), "that is the LAST stage's peak (one microbatch); the first "
                                  "stage holds the most, p"),
    ]
    return number_check(gpipe, gpipe_msgs, hint="in flight x layers per stage x bytes per "
                                                 "layer"), \
        number_check(one, one_msgs, hint="in flight x layers per stage x bytes per layer")


PEAK_GPIPE, PEAK_1F1B = _peaks()


def first_stage_by_p(value) -> Verdict:
    if not isinstance(value, (list, tuple)) or len(value) != len(P_VALUES):
        return Verdict(False, f"expected a list of {len(P_VALUES)} numbers, one per p in "
                              f"{list(P_VALUES)}")
    if any(as_real(x) is None for x in value):
        return Verdict(False, "expected numbers of bytes")
    expected = [first_stage("tp+sp", p=pv) for pv in P_VALUES]
    if all(_is(x, y) for x, y in zip(value, expected)):
        return Verdict(True, "correct: the same for every p")
    grows = [_value(p * L * A_TP_SP, p=pv) for pv in P_VALUES]
    m_over_p = [_value(m / p * L / p * A_TP_SP, p=pv) for pv in P_VALUES]
    if all(_is(x, y) for x, y in zip(value, grows)):
        return Verdict(False, "that grows with p, as if each microbatch in flight crossed all "
                              "L layers (1F1B memory grows with p: a common belief, and "
                              "wrong): p microbatches in flight, each through L/p layers - "
                              "L layers' worth whatever p is")
    if all(_is(x, y) for x, y in zip(value, m_over_p)):
        return Verdict(False, "m/p microbatches in flight is a common claim, and wrong: rank 0 "
                              "holds p of them, whatever m is")
    return Verdict(False, f"{list(value)} is not right; for each p, rank 0 holds p "
                          f"microbatches of L/p layers")


INTERLEAVED_FACTOR = homework_formula(memory.first_stage_factor("interleaved"), [
    (1 / v, "interleaving does not divide the memory by v: each chunk holds 1/v of the "
            "stage's layers, but more chunk-microbatches are in flight (a longer warm-up)"),
    (sp.Integer(1), "interleaved 1F1B's first stage holds MORE than 1F1B's: its warm-up "
                    "runs 2(p-1) + (v-1)p chunk forwards before the first backward"),
    ((p - 1) / (p * v), "that is only the extra part; the factor is 1 + (p-1)/(pv)"),
    (1 + (p - 1) / p, "the extra warm-up is counted in chunks of L/(pv) layers, not in stages: "
                      "1 + (p-1)/(pv)"),
], at={"p": LAYOUT["p"], "v": 2})


def _rank0_total():
    parts = memory.evaluate(memory.rank_memory("1f1b", "tp+sp+selective", rank=0),
                            **MODEL, **LAYOUT)
    params = parts["weights"] / 2
    act = parts["activations"]
    return number_check(parts["total"], [
        (act + 4 * params, "that counts weights and gradients but forgets Adam's state, the "
                           "largest part: 12 bytes per parameter (fp32 master copy, momentum, "
                           "variance)"),
        (act + 12 * params, "that counts Adam as 8 bytes per parameter; with 16-bit training "
                            "it also keeps an fp32 master copy of the weights: 12 bytes of "
                            "optimizer state per parameter, 16 in all"),
        (act, "that is only the activations; weights, gradients and Adam's state come on top"),
        (16 * params, "that is only the model states; the activations come on top"),
        (act + 16 * _value(L / p * memory.layer_parameters(tp=False)),
         "that counts every parameter of the stage's layers; with tensor parallelism a rank "
         "holds 1/t of the matrices"),
    ], hint="weights + gradients + optimizer (16 bytes per parameter of the rank's L/p "
            "layers, each (12h^2 + 7h)/t + 6h parameters) + activations")


RANK0_TOTAL = _rank0_total()


# -- time -----------------------------------------------------------------------------------------------
def _timing():
    one_f_one_b = schedules.one_f_one_b(TIMING["p"], TIMING["m"])
    runs = {}
    for recompute in memory.RECOMPUTE:
        costs = memory.recompute_costs(Fraction(TIMING["t_f"]), Fraction(TIMING["t_b"]),
                                       recompute, seq=MODEL["s"], hidden=MODEL["h"])
        runs[recompute] = (costs[1] - TIMING["t_b"], simulate(one_f_one_b, *costs))
    plain = runs["none"][1]
    free = ("recomputation is not free: the backward first re-runs the recomputed part of "
            "the forward, so it lasts longer")

    def work_only(recompute):
        extra = runs[recompute][0]
        return (plain.makespan + TIMING["m"] * extra,
                "that adds the re-run to each of the m backwards but not to the bubble: the "
                "fill and drain are made of the same, longer backwards, so the bubble grows "
                "too: (m+p-1)(t_f + t_b')")

    full_check = number_check(runs["full"][1].makespan, [
        (plain.makespan, free), work_only("full"),
        (plain.makespan + 2 * (runs["full"][1].makespan - plain.makespan),
         "full recomputation re-runs ONE forward per backward, not two"),
    ], hint="simulate 1F1B with the backward made longer (paralab.memory.recompute_costs)",
        unit="ms")
    selective_check = number_check(runs["selective"][1].makespan, [
        (plain.makespan, free),
        (runs["full"][1].makespan, "that is FULL recomputation; selective re-runs only the "
                                   "attention core"),
        work_only("selective"),
    ], hint="the backward re-runs s/(6h+s) of a forward: simulate with t_b + that share of t_f",
        unit="ms")
    full = runs["full"][1]
    bubble_check = number_check(full.makespan - full.ideal, [
        (plain.makespan - plain.ideal, "that is the bubble without recomputation; the fill and "
                                       "drain are made of the longer backwards too: "
                                       "(p-1)(t_f + t_b + t_f)"),
    ], hint="idle time per rank: step time minus the rank's own work", unit="ms")
    return full_check, selective_check, bubble_check


STEP_FULL, STEP_SELECTIVE, BUBBLE_FULL = _timing()


# -- the checkpointed stage ------------------------------------------------------------------------------
def _stage(case):
    from paralab import transformer
    layers_n, seq, batch, hidden, heads, seed = case
    layers = transformer.build_layers(layers_n, hidden, heads, seed=seed, dropout=DROPOUT,
                                      dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(seq, batch, hidden, dtype=torch.float64, generator=generator)
    grad_out = torch.randn(seq, batch, hidden, dtype=torch.float64, generator=generator)
    return layers, x.requires_grad_(), grad_out


def run_stage(forward, case=VISIBLE_STAGE) -> dict:
    """Run ``forward(layers, x)`` on a stage built from ``case`` and backpropagate a fixed
    output gradient; return plain data: the bytes of every tensor autograd saved during the
    forward, the output, and the gradients of the input and of every parameter."""
    layers, x, grad_out = _stage(case)
    params = [q for layer in layers for q in layer.parameters()]
    torch.manual_seed(case[-1] + 2)  # the dropout masks
    sizes: list = []
    with memory.SavedTensorMeter(params).hooks(sizes):
        out = forward(layers, x)
    result = {"saved": sizes, "output": out.detach() if isinstance(out, torch.Tensor) else None,
              "input_grad": None, "grads": [None] * len(params), "graph": False}
    if isinstance(out, torch.Tensor) and out.requires_grad:
        result["graph"] = True
        out.backward(grad_out)
        result["input_grad"] = x.grad
        result["grads"] = [q.grad for q in params]
    return result


def _reference(case):
    def plain(layers, x):
        for layer in layers:
            x = layer(x)
        return x
    return run_stage(plain, case)


def stage_check(case):
    layers_n, seq, batch, hidden, heads, _ = case
    sizes = dict(s=seq, b=batch, h=hidden, a=heads)
    per_layer_input = int(memory.evaluate(memory.layer_activation_bytes("full",
                                                                        activation_bytes=8),
                                          **sizes))
    expected_saved = layers_n * per_layer_input
    plain_saved = layers_n * int(memory.evaluate(memory.layer_activation_bytes(
        "none", activation_bytes=8, mask_bytes=8, statistic_bytes=8), **sizes))

    def check(value) -> Verdict:
        if not isinstance(value, dict) or not {"saved", "output", "grads"} <= set(value):
            return Verdict(False, "expected the result of checks.run_stage")
        reference = _reference(case)
        out = value.get("output")
        if not isinstance(out, torch.Tensor) or out.shape != reference["output"].shape:
            return Verdict(False, f"checkpointed_forward must return the stage's output, a "
                                  f"tensor of shape {tuple(reference['output'].shape)}")
        if not torch.allclose(out, reference["output"], rtol=1e-9, atol=1e-12):
            return Verdict(False, "the output differs from the plain stage's: run every layer, "
                                  "in order, on the previous layer's output")
        if not value.get("graph"):
            return Verdict(False, "the output does not require grad: the forward ran without "
                                  "autograd and nothing re-runs it in the backward, so no "
                                  "gradient reaches the weights")
        grads = value.get("grads") or []
        if value.get("input_grad") is None or any(g is None for g in grads):
            return Verdict(False, "no gradient reached the input or some weights: the "
                                  "backward must re-run each layer's forward with autograd on "
                                  "and backpropagate through it")
        saved = sum(int(x) for x in value["saved"])
        if saved == plain_saved:
            return Verdict(False, f"the stage still keeps every activation ({saved} bytes, the "
                                  f"plain stage's): checkpoint each layer so that only its "
                                  f"input is kept")
        if saved == per_layer_input and layers_n > 1:
            return Verdict(False, f"{saved} bytes: one input for the whole stage.  The "
                                  f"question asks for full recomputation layer by layer (each "
                                  f"layer's input, 2sbh in 16-bit): a whole-stage checkpoint "
                                  f"brings all the stage's activations back at once in the "
                                  f"backward")
        if saved == 0:
            return Verdict(False, "autograd saved nothing during your forward: keep each "
                                  "layer's input as a saved tensor (ctx.save_for_backward, or "
                                  "torch.utils.checkpoint), so the memory it holds is "
                                  "accounted for")
        if saved != expected_saved:
            return Verdict(False, f"autograd saved {saved} bytes during the forward; full "
                                  f"recomputation keeps each layer's input: {layers_n} x "
                                  f"{per_layer_input} = {expected_saved} bytes")
        pairs = [(value["input_grad"], reference["input_grad"])] + list(
            zip(grads, reference["grads"]))
        for got, want in pairs:
            if not isinstance(got, torch.Tensor) or got.shape != want.shape or \
                    not torch.allclose(got, want, rtol=1e-9, atol=1e-12):
                return Verdict(False, "the output is right but the gradients differ from the "
                                      "plain stage's: the re-run of the forward drew different "
                                      "dropout masks.  Recompute with the forward's random "
                                      "state (torch.utils.checkpoint restores it; by hand, "
                                      "save torch.get_rng_state() and restore it for the "
                                      "re-run)")
        return Verdict(True, f"{saved} bytes kept ({layers_n} layer inputs, as the formula "
                             f"says, instead of {plain_saved}); output and every gradient "
                             f"equal the plain stage's")
    return check


def hidden_stages_check(value) -> Verdict:
    if not isinstance(value, list) or len(value) != len(HIDDEN_STAGES):
        return Verdict(False, "expected one result per hidden stage")
    for result, case in zip(value, HIDDEN_STAGES):
        verdict = stage_check(case)(result)
        if not verdict.passed:
            return Verdict(False, f"a stage of {case[0]} layer(s), s={case[1]}, b={case[2]}, "
                                  f"h={case[3]}, a={case[4]}: {verdict.message}")
    return Verdict(True, f"correct on {len(HIDDEN_STAGES)} other stages")


# The library's own recomputation: the reference answer of part E.
REFERENCE_RECOMPUTATION = ("paralab.transformer:TransformerLayer._layer_recomputed",
                           "paralab.transformer:TransformerLayer._attention_core_recomputed")

PROBES = {
    # checkpointed_forward run once more, in a fresh process where the layer's own
    # recomputation raises ReferenceUnavailable: torch.utils.checkpoint and everything else
    # work as usual.
    "own_implementation": Probe(cells=("setup", "e"),
                                call="checks.run_stage(checkpointed_forward, "
                                     "checks.ORIGINALITY_STAGE)",
                                unavailable=REFERENCE_RECOMPUTATION),
}


own_implementation_check = originality(
    lambda value: stage_check(ORIGINALITY_STAGE)(value),
    "checkpoint the layers yourself (torch.utils.checkpoint is fine) instead of switching on "
    "the layer's own recomputation")


CHECKS = {
    "layer_bytes_formula": LAYER_FORMULA,
    "layer_bytes": LAYER_BYTES,
    "tp_formula": TP_FORMULA,
    "bytes_by_strategy": bytes_by_strategy,
    "least_recompute": least_recompute,
    "selective_share": SELECTIVE_SHARE,
    "peak_gpipe_rank0": PEAK_GPIPE,
    "peak_1f1b_rank0": PEAK_1F1B,
    "first_stage_by_p": first_stage_by_p,
    "interleaved_factor": INTERLEAVED_FACTOR,
    "rank0_total": RANK0_TOTAL,
    "step_time_full": STEP_FULL,
    "bubble_full": BUBBLE_FULL,
    "step_time_selective": STEP_SELECTIVE,
    "checkpoint_visible": stage_check(VISIBLE_STAGE),
    "checkpoint_hidden": hidden_stages_check,
    "own_implementation": own_implementation_check,
}

GRADE_CELLS = {
    "test_layer_bytes_formula": ["layer_bytes_formula"],
    "test_layer_bytes": ["layer_bytes"],
    "test_tp_formula": ["tp_formula"],
    "test_bytes_by_strategy": ["bytes_by_strategy"],
    "test_least_recompute": ["least_recompute"],
    "test_selective_share": ["selective_share"],
    "test_first_stage_peaks": {"peak_gpipe_rank0": 1, "peak_1f1b_rank0": 2},
    "test_first_stage_by_p": ["first_stage_by_p"],
    "test_interleaved_factor": ["interleaved_factor"],
    "test_rank0_total": ["rank0_total"],
    "test_recompute_time": ["step_time_full", "bubble_full", "step_time_selective"],
    "test_checkpoint_visible": ["checkpoint_visible"],
    "test_checkpoint_hidden": ["checkpoint_hidden", "own_implementation"],
}

check = make_checker(CHECKS, symbols=SYMBOLS)
