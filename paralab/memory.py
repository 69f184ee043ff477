"""Memory of a training step: measured with saved-tensor hooks, derived term by term.

Pipeline schedules differ less in time than in memory: a rank keeps the activations of every
microbatch whose forward it has run and whose backward it has not, and *what* it keeps per
microbatch is what autograd saves for backward.  This module answers "how many bytes, and
why" at three scales:

1. **One Transformer layer** (Korthikanti et al. 2022, "Reducing Activation Recomputation
   in Large Transformer Models", Eq. 1-6).  :func:`kept_tensors` lists, operation by
   operation, every tensor the layer of :mod:`paralab.transformer` keeps for backward, with
   its number of elements in ``s`` (sequence), ``b`` (microbatch), ``h`` (hidden), ``a``
   (heads), ``t`` (tensor-parallel degree).  Their sum at 2 bytes per activation and 1 byte
   per dropout mask is the paper's ``sbh(34 + 5as/h)``; tensor parallelism, sequence
   parallelism and recomputation change which tensors are kept and how they are split.
   :func:`saved_tensors` measures the real layer, and the tests require the two lists to
   be *the same tensors*.  Where PyTorch keeps something the paper does not count, it is a
   named term (``pytorch=True``): LayerNorm's per-token mean and 1/std, and dropout masks
   kept as full-precision noise by the CPU kernel (CUDA's fused kernel keeps one byte).
2. **One pipeline rank**: weights, gradients and Adam's state for its ``L/p`` layers
   (:func:`model_state_bytes`), plus activations = microbatches in flight x layers per
   stage x bytes per layer (:func:`activation_bytes`): ``m`` for GPipe, ``p - r`` for
   1F1B -- so 1F1B's first stage holds ``L`` layers' worth *whatever p is* -- and
   ``1 + (p-1)/(pv)`` times that on interleaved 1F1B's first stage.  The tests check these
   against the peaks the real executor (:mod:`paralab.pipeline`) measures on gloo.
3. **Time**: recomputation is not free.  The backward re-runs (part of) the forward first,
   so a schedule simulated with :func:`recompute_costs` pays ``t_f`` more per backward for
   full recomputation and the attention core's share ``s/(6h+s)`` of it for selective;
   the bubble grows with it.

:class:`SavedTensorMeter` is what the pipeline executor uses to count bytes per rank over
time.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Iterable

import sympy as sp
import torch

from . import formulas

s, b, h, a, t, L = sp.symbols("s b h a t L", positive=True)
p, m, v, r = (formulas.SYMBOLS[name] for name in ("p", "m", "v", "r"))
SYMBOLS = {sym.name: sym for sym in (s, b, h, a, t, L)}
SYMBOLS.update({name: formulas.SYMBOLS[name] for name in ("p", "m", "v", "r", "t_f", "t_b",
                                                            "t_w")})


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SavedTensor:
    """One tensor autograd saved for backward: its shape, dtype and size in bytes."""

    shape: tuple
    dtype: str
    nbytes: int


class SavedTensorMeter:
    """Counts bytes autograd saves for backward, excluding parameters (they exist anyway
    and are not activations).  ``change`` keeps a running total, its peak and a history.

    Every save counts: a tensor saved by two operations (a Tanh's output that the next
    Linear saves as its input) is counted twice, as autograd holds two references."""

    def __init__(self, parameters: Iterable[torch.Tensor] = ()):
        self.parameter_ptrs = {p.data_ptr() for p in parameters}
        self.current = 0
        self.peak = 0
        self.over_time = [(0.0, 0)]

    def hooks(self, sizes: list):
        """Context manager: append the size in bytes of every saved tensor to ``sizes``."""
        def pack(tensor):
            if tensor.data_ptr() not in self.parameter_ptrs:
                sizes.append(tensor.numel() * tensor.element_size())
            return tensor
        return torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)

    def record(self, records: list):
        """Context manager: append a :class:`SavedTensor` for every saved tensor."""
        def pack(tensor):
            if tensor.data_ptr() not in self.parameter_ptrs:
                records.append(SavedTensor(tuple(tensor.shape),
                                           str(tensor.dtype).replace("torch.", ""),
                                           tensor.numel() * tensor.element_size()))
            return tensor
        return torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)

    def change(self, delta: int, now: float) -> None:
        self.current += delta
        self.peak = max(self.peak, self.current)
        self.over_time.append((now, self.current))


def saved_tensors(fn, *args, parameters: Iterable[torch.Tensor] = ()):
    """``(fn(*args), [SavedTensor, ...])``: what autograd saved while ``fn`` ran, in order,
    leaving out ``parameters``."""
    records: list = []
    with SavedTensorMeter(parameters).record(records):
        out = fn(*args)
    return out, records


# ---------------------------------------------------------------------------------------------
# One layer: which tensors each operation keeps
# ---------------------------------------------------------------------------------------------
RECOMPUTE = ("none", "selective", "full")


@dataclass(frozen=True)
class Strategy:
    """How a layer is run: tensor parallelism, sequence parallelism, recomputation.

    Written as a string: ``"none"``, ``"tp"``, ``"tp+sp"``, ``"selective"``,
    ``"tp+sp+selective"``, ``"full"``... (``"full-recompute"`` is ``"full"``)."""

    tp: bool = False
    sp: bool = False
    recompute: str = "none"

    @classmethod
    def parse(cls, strategy: "str | Strategy") -> "Strategy":
        if isinstance(strategy, Strategy):
            return strategy
        words = [w for w in str(strategy).replace("full-recompute", "full").split("+") if w]
        unknown = [w for w in words if w not in ("none", "tp", "sp") + RECOMPUTE]
        if (unknown or not words or len(set(words)) != len(words)
                or ("none" in words and len(words) > 1)):
            raise ValueError(f"unknown strategy {strategy!r}; write parts joined by '+': "
                             f"'tp', 'sp' (needs tp), and one of 'selective', 'full' "
                             f"(e.g. 'tp+sp+selective'), or 'none'")
        recompute = [w for w in words if w in ("selective", "full")]
        if len(recompute) > 1:
            raise ValueError(f"{strategy!r}: choose one recomputation, selective or full")
        if "sp" in words and "tp" not in words:
            raise ValueError(f"{strategy!r}: sequence parallelism splits what tensor "
                             f"parallelism leaves replicated; it needs 'tp' too")
        return cls("tp" in words, "sp" in words, recompute[0] if recompute else "none")

    def __str__(self) -> str:
        words = [w for w, on in (("tp", self.tp), ("sp", self.sp)) if on]
        words += [self.recompute] if self.recompute != "none" else []
        return "+".join(words) or "none"


@dataclass(frozen=True)
class Kept:
    """One tensor a layer keeps for backward.

    ``elements`` is for one rank (already divided by ``t`` where the strategy splits it);
    ``kind`` is ``activation`` (2 bytes in 16-bit training), ``mask`` (a dropout mask: 1
    byte in the paper) or ``statistic`` (LayerNorm's per-token mean or 1/std, which the
    paper leaves out); ``region`` is ``tensor`` (inside a tensor-parallel block, split
    by TP) or ``replicated`` (LayerNorms, the dropouts after the blocks and the inputs of
    the column-parallel linears: replicated by TP, split along the sequence by SP)."""

    op: str
    tensor: str
    elements: sp.Expr
    kind: str
    region: str


def _layer_table(pytorch: bool):
    """Every tensor the layer keeps without recomputation, whole (no splitting), in the
    order of the forward.  ``(op, tensor, elements, kind, region)``."""
    sbh, as2b = s * b * h, a * s ** 2 * b
    stats = [("ln", "mean", s * b, "statistic", "replicated"),
             ("ln", "1/std", s * b, "statistic", "replicated")] if pytorch else []
    rows = [("ln1", "input", sbh, "activation", "replicated")]
    rows += [("ln1",) + row[1:] for row in stats]
    rows += [
        ("qkv", "input", sbh, "activation", "replicated"),
        ("scores", "Q", sbh, "activation", "tensor"),
        ("scores", "K", sbh, "activation", "tensor"),
        ("softmax", "output", as2b, "activation", "tensor"),
        ("attention dropout", "mask", as2b, "mask", "tensor"),
        ("@ V", "dropout output", as2b, "activation", "tensor"),
        ("@ V", "V", sbh, "activation", "tensor"),
        ("projection", "input", sbh, "activation", "tensor"),
        ("dropout after attention", "mask", sbh, "mask", "replicated"),
        ("ln2", "input", sbh, "activation", "replicated"),
    ]
    rows += [("ln2",) + row[1:] for row in stats]
    rows += [
        ("fc1", "input", sbh, "activation", "replicated"),
        ("gelu", "input", 4 * sbh, "activation", "tensor"),
        ("fc2", "input", 4 * sbh, "activation", "tensor"),
        ("dropout after mlp", "mask", sbh, "mask", "replicated"),
    ]
    return rows


# The attention core: what selective recomputation re-runs (and so does not keep).
ATTENTION_CORE = {("softmax", "output"), ("attention dropout", "mask"),
                  ("@ V", "dropout output")}


def kept_tensors(strategy: "str | Strategy" = "none", *, pytorch: bool = False) -> list[Kept]:
    """The tensors one layer keeps for backward on one rank (Korthikanti et al. 2022, §4).

    * no parallelism: each operation keeps its input (or output, for softmax), dropouts
      keep a mask;
    * ``tp``: everything between a column-parallel and a row-parallel linear is split over
      the ``t`` ranks; the ``replicated`` region is not (the ``10 sbh`` of Eq. 2);
    * ``sp``: the replicated region is split along the sequence, so *everything* is
      divided by ``t`` (the column-parallel linears keep their sequence shard and
      all-gather it again in the backward);
    * ``selective``: the attention core (softmax output, its dropout mask and output) is
      re-run in the backward, so only its inputs Q, K, V stay;
    * ``full``: only the layer's input stays.

    ``pytorch=True`` adds what PyTorch keeps beyond the paper's accounting: LayerNorm's
    per-token mean and 1/std."""
    strategy = Strategy.parse(strategy)

    def split(elements, region):
        divided = (region == "tensor" and strategy.tp) or (region == "replicated" and strategy.sp)
        return elements / t if divided else elements

    if strategy.recompute == "full":
        return [Kept("layer", "input", split(s * b * h, "replicated"), "activation",
                     "replicated")]
    kept = []
    for op, tensor, elements, kind, region in _layer_table(pytorch):
        if strategy.recompute == "selective" and (op, tensor) in ATTENTION_CORE:
            continue
        kept.append(Kept(op, tensor, split(elements, region), kind, region))
    return kept


def bytes_of(kept: Iterable[Kept], activation_bytes=2, mask_bytes=1, statistic_bytes=4):
    """Total bytes of ``kept``: elements times the bytes of their kind."""
    size = {"activation": activation_bytes, "mask": mask_bytes, "statistic": statistic_bytes}
    return sp.expand(sum((sp.sympify(size[k.kind]) * k.elements for k in kept), sp.Integer(0)))


def match_saved(kept: list[Kept], saved: list[SavedTensor], values: dict, *,
                activation_bytes=2, mask_bytes=1, statistic_bytes=4):
    """Pair each kept tensor of the formula with a measured saved tensor of the same size,
    in forward order: ``([(Kept, formula bytes, SavedTensor or None), ...], unmatched
    saved tensors)``.  ``values`` gives the sizes by name (``s b h a t``)."""
    left = list(saved)
    pairs = []
    for k in kept:
        size = int(evaluate(bytes_of([k], activation_bytes, mask_bytes, statistic_bytes),
                            **values))
        found = next((x for x in left if x.nbytes == size), None)
        if found is not None:
            left.remove(found)
        pairs.append((k, size, found))
    return pairs, left


def layer_activation_bytes(strategy: "str | Strategy" = "none", *, activation_bytes=2,
                           mask_bytes=1, statistic_bytes=None):
    """Bytes one layer keeps per microbatch on one rank.  Defaults are the paper's 16-bit
    accounting; ``statistic_bytes`` adds LayerNorm's statistics (PyTorch keeps them)."""
    kept = kept_tensors(strategy, pytorch=statistic_bytes is not None)
    return bytes_of(kept, activation_bytes, mask_bytes, statistic_bytes or 0)


def transformer_layer_activations(strategy: "str | Strategy" = "none"):
    """Korthikanti et al. 2022's bytes per layer (16-bit activations, 1-byte masks):

    * ``none``: ``s b h (34 + 5 a s / h)`` -- the ``5as/h`` term is the attention scores,
      softmax and its dropout mask, quadratic in ``s``;
    * ``tp``: ``s b h (10 + 24/t + 5 a s / (h t))``: LayerNorms, post-block dropouts and
      the inputs of the QKV and first MLP linears (``10 sbh``) stay replicated;
    * ``tp+sp``: ``s b h (34 + 5 a s / h) / t``;
    * ``selective`` (``34 sbh``), ``tp+selective`` (``sbh(10 + 24/t)``),
      ``tp+sp+selective`` (``34 sbh / t``): the attention core is recomputed;
    * ``full`` (``full-recompute``): ``2 s b h`` -- the layer input (``2sbh/t`` with SP).

    Each is the sum of :func:`kept_tensors`."""
    return sp.factor(layer_activation_bytes(strategy))


def per_sbh(expr):
    """``expr / (s b h)``, simplified: the paper's way of writing a layer's bytes."""
    return sp.simplify(sp.expand(expr / (s * b * h)))


# ---------------------------------------------------------------------------------------------
# One layer: parameters and model states
# ---------------------------------------------------------------------------------------------
def _parameter_table():
    """(name, elements, split by TP?) of one layer's parameters."""
    return [("ln1 weight+bias", 2 * h, False), ("qkv weight", 3 * h * h, True),
            ("qkv bias", 3 * h, True), ("projection weight", h * h, True),
            ("projection bias", h, False), ("ln2 weight+bias", 2 * h, False),
            ("fc1 weight", 4 * h * h, True), ("fc1 bias", 4 * h, True),
            ("fc2 weight", 4 * h * h, True), ("fc2 bias", h, False)]


def layer_parameters(tp: bool = False):
    """Parameters of one layer on one rank: ``12h^2 + 13h``; with tensor parallelism
    ``(12h^2 + 7h)/t + 6h`` (LayerNorms and the row-parallel biases are replicated)."""
    return sp.expand(sum(n / t if split and tp else n for _, n, split in _parameter_table()))


# Bytes per parameter in mixed-precision training with Adam (Rajbhandari et al. 2020, ZeRO
# §3.1): 16-bit weights and gradients, and an fp32 master copy, momentum and variance.
ADAM_MIXED_PRECISION = {"weights": 2, "gradients": 2, "optimizer": 12}


def model_state_bytes(parameters, per_parameter: dict = ADAM_MIXED_PRECISION) -> dict:
    """``{"weights", "gradients", "optimizer"}`` bytes for ``parameters`` parameters."""
    return {name: per_parameter[name] * parameters for name in ("weights", "gradients",
                                                                  "optimizer")}


# ---------------------------------------------------------------------------------------------
# One pipeline rank
# ---------------------------------------------------------------------------------------------
def in_flight(schedule: str, rank=r):
    """Microbatches (chunk-microbatches for interleaved) whose activations rank ``rank``
    holds at its peak: :func:`paralab.formulas.peak_activations` (``m``, ``min(m, p-r)``,
    ``min(mv, 2(p-r-1) + (v-1)p + 1)``)."""
    return formulas.peak_activations(schedule, rank)


def layers_per_chunk(schedule: str):
    """Layers in one stage (one chunk for interleaved): ``L/p`` (``L/(pv)``)."""
    return L / (p * v) if schedule == "interleaved" else L / p


def activation_bytes(schedule: str, strategy: "str | Strategy" = "none", rank=r,
                     per_layer=None):
    """Peak activation bytes on rank ``rank``: in-flight x layers per chunk x bytes per
    layer (``per_layer`` defaults to :func:`transformer_layer_activations`)."""
    per_layer = transformer_layer_activations(strategy) if per_layer is None else per_layer
    return in_flight(schedule, rank) * layers_per_chunk(schedule) * per_layer


def first_stage_factor(schedule: str):
    """Rank 0's activations relative to ``L`` layers' worth of one microbatch, for ``m``
    large enough: ``m/p`` for GPipe, ``1`` for 1F1B (whatever ``p``), ``1 + (p-1)/(pv)``
    for interleaved 1F1B (Korthikanti et al. 2022, §4.2.3)."""
    peak = in_flight(schedule, 0)
    if schedule != "gpipe":
        peak = peak.subs(m, sp.oo)
    return sp.expand(sp.simplify(peak * layers_per_chunk(schedule) / L))


def rank_memory(schedule: str = "1f1b", strategy: "str | Strategy" = "none", rank=r,
                per_parameter: dict = ADAM_MIXED_PRECISION) -> dict:
    """Bytes on pipeline rank ``rank`` for a stack of ``L`` layers (embeddings and output
    layer left out): ``weights``, ``gradients``, ``optimizer`` for its ``L/p`` layers
    (tensor-parallel shards when the strategy uses TP), ``activations`` at its peak, and
    ``total``."""
    strategy = Strategy.parse(strategy)
    parts = model_state_bytes(L / p * layer_parameters(strategy.tp), per_parameter)
    parts["activations"] = activation_bytes(schedule, strategy, rank)
    parts["total"] = sum(parts.values())
    return parts


# ---------------------------------------------------------------------------------------------
# The price in time
# ---------------------------------------------------------------------------------------------
def layer_flops():
    """Forward FLOPs of one layer, matmul by matmul (2 FLOPs per multiply-add):
    QKV ``6bsh^2``, scores ``2bs^2h``, ``@ V`` ``2bs^2h``, projection ``2bsh^2``, MLP
    ``16bsh^2``: ``24bsh^2 + 4bs^2h`` (Narayanan et al. 2021, Korthikanti et al. 2022 §5)."""
    return {"qkv": 6 * b * s * h ** 2, "scores": 2 * b * s ** 2 * h, "@ V": 2 * b * s ** 2 * h,
            "projection": 2 * b * s * h ** 2, "mlp": 16 * b * s * h ** 2}


def recompute_fraction(recompute: str):
    """The share of a forward that the backward re-runs: 0, the attention core's
    ``s/(6h+s)`` (selective), or 1 (full)."""
    if recompute not in RECOMPUTE:
        raise ValueError(f"unknown recompute {recompute!r}; choose from {', '.join(RECOMPUTE)}")
    if recompute == "none":
        return sp.Integer(0)
    if recompute == "full":
        return sp.Integer(1)
    flops = layer_flops()
    return sp.factor((flops["scores"] + flops["@ V"]) / sum(flops.values()))


def recompute_costs(t_f, t_b, recompute: str = "full", *, seq=None, hidden=None):
    """``(t_f, t_b')`` to pass to :func:`paralab.simulator.simulate`: the backward first
    re-runs the recomputed share of the forward, ``t_b' = t_b + fraction x t_f``.
    Selective needs ``seq`` and ``hidden`` (its share is ``s/(6h+s)``).  Exact with ints
    and Fractions."""
    fraction = recompute_fraction(recompute)
    if fraction.free_symbols:
        if seq is None or hidden is None:
            raise ValueError("selective recomputation's cost depends on s and h: pass seq= "
                             "and hidden=")
        fraction = fraction.subs({s: seq, h: hidden})
    fraction = Fraction(int(fraction.p), int(fraction.q))
    extra = fraction * t_f
    if isinstance(t_f, float) or isinstance(t_b, float):
        extra = float(extra)
    elif extra.denominator == 1:
        extra = int(extra)
    return t_f, t_b + extra


def step_time_with_recompute(schedule: str = "1f1b", recompute: str = "full"):
    """The schedule's step time with the backward made longer by the recomputation."""
    phi = sp.Symbol("phi", positive=True)
    base = formulas.step_time(schedule).subs(formulas.t_b, formulas.t_b + phi * formulas.t_f)
    return sp.factor(base.subs(phi, recompute_fraction(recompute)))


# ---------------------------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------------------------
def _exact(value):
    """A number as an exact SymPy number (floats as the decimal they print as)."""
    if isinstance(value, bool):
        raise TypeError(f"expected a number, got {value!r}")
    if isinstance(value, float):
        return sp.Rational(repr(value))
    if isinstance(value, Fraction):
        return sp.Rational(value.numerator, value.denominator)
    return sp.sympify(value)


def evaluate(expr, **values):
    """Substitute numbers for the symbols of this module and of :mod:`paralab.formulas` by
    name (``s b h a t L p m v r t_f t_b t_w``), exactly; dicts element by element."""
    unknown = sorted(set(values) - set(SYMBOLS))
    if unknown:
        raise ValueError(f"unknown symbol name(s) {', '.join(unknown)}; the symbols are "
                         f"{', '.join(SYMBOLS)}")
    if isinstance(expr, dict):
        return {k: evaluate(x, **values) for k, x in expr.items()}
    subs = {SYMBOLS[name]: _exact(value) for name, value in values.items()}
    result = sp.sympify(expr).subs(subs)
    return result if result.is_Rational else sp.simplify(result)
