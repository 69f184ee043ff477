"""Choosing the degrees: which (dp, pp, tp, microbatch, m, v, recomputation) to train with.

Given a Transformer (layers, hidden size, heads, sequence length, vocabulary), a cluster
(GPUs, GPUs per node, memory per GPU, bandwidth inside and between nodes, FLOP/s) and a
global batch, :func:`plans` enumerates every layout that divides the model and the batch
evenly, keeps those that fit in memory, and ranks them by a modelled step time.  Every
term comes from the course's formulas:

* **memory** of the fullest rank (the first pipeline stage, or the last, which holds the
  output layer): :func:`paralab.memory.rank_memory` -- weights, gradients and Adam's
  state for its layers (mixed precision, 16 bytes per parameter), and its peak
  activations under 1F1B or interleaved 1F1B with the chosen tensor/sequence parallelism
  and recomputation -- plus the embedding (split over ``tp``, as Megatron-LM's vocabulary-
  parallel embedding; the output layer shares its weights and keeps a copy on the last
  stage).  What the model leaves out: the embedding's and the logits' activations, memory
  fragmentation and the framework's own buffers;
* **compute**: the matmul FLOPs of a layer (:func:`paralab.memory.layer_flops`, 2 per
  multiply-add), ``L/pp`` layers per stage split over its ``tp`` GPUs, plus the output
  layer on the last stage, which then sets the pipeline's pace; at the share of the peak
  FLOP/s a step sustains; a backward costs two forwards, plus what the recomputation
  re-runs (:func:`paralab.memory.recompute_fraction`);
* **tensor-parallel communication** on the critical path of every layer: two all-reduces
  of the ``s b h`` activations in the forward, two in the backward (two more when full
  recomputation re-runs the forward), ring-priced (:func:`paralab.formulas.tp_traffic`) at
  NVLink bandwidth when every TP group stays inside a node (:func:`paralab.mesh.
  crosses_nodes`; likewise for the PP and DP groups) and at network bandwidth otherwise --
  sequence parallelism replaces each all-reduce by an all-gather and a reduce-scatter,
  the same traffic;
* **pipeline communication**: each microbatch's activation and gradient cross every stage
  boundary, ``v`` times with interleaving (:func:`paralab.formulas.pp_traffic`), sent as
  ``1/tp`` per GPU with Megatron-LM's scatter/gather;
* **the bubble**: :func:`paralab.formulas.interleaved_time` -- ``(m + (pp-1)/v)`` times
  the time of one microbatch's forward and backward on a stage, communication included
  (for ``v = 1`` it is 1F1B's ``(m + pp - 1)``);
* **the data-parallel all-reduce** of the gradients (2 bytes each) once per step
  (:func:`paralab.formulas.dp_traffic`), after the backward: the model does not overlap
  it with the backward (PyTorch's DDP and today's Megatron-LM do).

It is a model, meant to show why the choices come out as they do, not to predict a step
time to the percent: matmul efficiency (which drops when ``tp`` makes the matrices small),
latency and overlap are left out.  Lecture 05 compares its choices with the published
configurations of Narayanan et al. 2021 (:data:`MEGATRON_2021`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from functools import lru_cache

import sympy as sp

from . import formulas, memory, mesh

#: Bytes of a 16-bit activation or gradient.
HALF = 2


@dataclass(frozen=True)
class Model:
    """A GPT: ``layers`` Transformer layers of hidden size ``hidden`` with ``heads`` heads,
    ``seq`` tokens per sequence, a vocabulary of ``vocab`` (Megatron-LM pads GPT-2's 50257
    to 51200)."""

    name: str
    layers: int
    hidden: int
    heads: int
    seq: int = 2048
    vocab: int = 51200

    def parameters(self) -> int:
        """``L (12h^2 + 13h) + (V + s) h``: the layers (:func:`paralab.memory.layer_parameters`)
        and the word and position embeddings (the output layer shares the word embedding).
        Narayanan et al. 2021 write it ``12 L h^2 (1 + 13/(12h) + (V + s)/(12 L h))``."""
        per_layer = memory.evaluate(memory.layer_parameters(), h=self.hidden)
        return int(self.layers * per_layer + (self.vocab + self.seq) * self.hidden)


@dataclass(frozen=True)
class Cluster:
    """``gpus`` GPUs, ``gpus_per_node`` per node.  Defaults: NVIDIA's Selene as Narayanan et
    al. 2021 describe it -- DGX A100 nodes of 8 A100 80 GB GPUs (312 TFLOP/s in 16-bit),
    NVLink/NVSwitch inside a node (300 GB/s per GPU and direction), one 200 Gb/s HDR
    InfiniBand adapter per GPU between nodes (25 GB/s).  Bandwidths are per GPU and
    direction, in bytes per second; ``memory`` in bytes.  ``flops`` is the peak of 16-bit
    matmuls and ``efficiency`` the share of it a training step sustains: a half is typical
    of large Transformers (Narayanan et al. 2021 measure 44-52% end to end)."""

    gpus: int
    gpus_per_node: int = 8
    memory: float = 80 * 2 ** 30
    intra_bandwidth: float = 300e9
    inter_bandwidth: float = 25e9
    flops: float = 312e12
    efficiency: float = 0.5


RECOMPUTE = memory.RECOMPUTE


@dataclass(frozen=True)
class Plan:
    """One layout and what the model says of it.  ``memory``: bytes on the fullest rank
    (``weights``, ``gradients``, ``optimizer``, ``activations``, ``total``) and ``rank``,
    which pipeline rank that is; ``time``: seconds per step (``compute``, ``bubble``,
    ``tp``, ``pp``, ``dp``, ``total``; ``compute`` and the communication terms are the
    critical path's shares, the bubble its idle share)."""

    dp: int
    pp: int
    tp: int
    b: int
    m: int
    v: int
    recompute: str
    sequence_parallel: bool
    memory: dict = field(compare=False)
    time: dict = field(compare=False)
    fits: bool = field(compare=False)

    @property
    def layout(self) -> tuple[int, int, int]:
        return self.dp, self.pp, self.tp

    def describe(self) -> str:
        sp_ = "+sp" if self.sequence_parallel else ""
        return (f"dp={self.dp} pp={self.pp} tp={self.tp}{sp_} b={self.b} m={self.m} "
                f"v={self.v} recompute={self.recompute}")


# ---------------------------------------------------------------------------------------------
# The formulas, compiled once into plain functions (a planner evaluates thousands of layouts)
# ---------------------------------------------------------------------------------------------
_SIZES = [memory.SYMBOLS[n] for n in ("s", "b", "h", "a", "L", "t", "p", "m", "v", "r")]


@lru_cache(maxsize=None)
def _memory_function(schedule: str, strategy: str):
    parts = memory.rank_memory(schedule, strategy, memory.r)
    return sp.lambdify(_SIZES, [parts[k] for k in ("weights", "gradients", "optimizer",
                                                   "activations")], "math")


@lru_cache(maxsize=None)
def _pipeline_function():
    return sp.lambdify([formulas.p, formulas.m, formulas.v, formulas.t_f, formulas.t_b],
                       formulas.interleaved_time(), "math")


_N = sp.Symbol("N", positive=True)


@lru_cache(maxsize=None)
def _traffic_functions():
    """Bytes one GPU sends: a TP all-reduce of N elements, a DP all-reduce of N gradients,
    the pipeline messages of a stage in the middle of the pipeline (N elements each)."""
    e, tp, dp, m = formulas.e, formulas.tp, formulas.dp, formulas.m
    return (sp.lambdify([_N, tp, e], formulas.tp_traffic(_N, 1), "math"),
            sp.lambdify([_N, dp, e], formulas.dp_traffic(_N), "math"),
            sp.lambdify([_N, m, e], formulas.pp_traffic(_N, "middle"), "math"))


@lru_cache(maxsize=None)
def _flops_per_microbatch(model: "Model", b: int) -> tuple[float, float]:
    """Forward FLOPs of one microbatch through all layers, and through the output layer."""
    layer = sum(memory.layer_flops().values())
    layers = model.layers * float(memory.evaluate(layer, s=model.seq, b=b, h=model.hidden))
    return layers, 2.0 * b * model.seq * model.hidden * model.vocab


@lru_cache(maxsize=None)
def _recomputed_share(recompute: str, seq: int, hidden: int) -> float:
    return float(memory.evaluate(memory.recompute_fraction(recompute), s=seq, h=hidden))


@lru_cache(maxsize=None)
def _crosses_nodes(layout: tuple, dim: str, gpus_per_node: int) -> bool:
    return mesh.crosses_nodes(layout, dim, gpus_per_node)


def _strategy(tp: int, sequence_parallel: bool, recompute: str) -> str:
    words = (["tp"] if tp > 1 else []) + (["sp"] if sequence_parallel else [])
    words += [recompute] if recompute != "none" else []
    return "+".join(words) or "none"


def rank_memory(model: Model, layout: tuple[int, int, int], b: int, m: int, v: int = 1,
                recompute: str = "none", sequence_parallel: bool = False) -> tuple[int, dict]:
    """``(rank, parts)``: the pipeline rank that needs the most memory and its bytes (see the
    module docstring), for ``layout = (dp, pp, tp)``."""
    _, pp, tp = layout
    schedule = "interleaved" if v > 1 else "1f1b"
    function = _memory_function(schedule, _strategy(tp, sequence_parallel, recompute))
    embedding = model.vocab * model.hidden / tp + model.seq * model.hidden
    output = model.vocab * model.hidden / tp
    best = None
    for rank in sorted({0, pp - 1}):
        values = function(model.seq, b, model.hidden, model.heads, model.layers, tp, pp, m, v,
                          rank)
        extra = (embedding if rank == 0 else 0) + (output if rank == pp - 1 and pp > 1 else 0)
        state = memory.model_state_bytes(extra)
        parts = {"weights": values[0] + state["weights"],
                 "gradients": values[1] + state["gradients"],
                 "optimizer": values[2] + state["optimizer"], "activations": values[3]}
        parts["total"] = sum(parts.values())
        if best is None or parts["total"] > best[1]["total"]:
            best = (rank, parts)
    return best


def step_time(model: Model, cluster: Cluster, layout: tuple[int, int, int], b: int, m: int,
              v: int = 1, recompute: str = "none", sequence_parallel: bool = False) -> dict:
    """The modelled seconds of one training step (see the module docstring):
    ``{"compute", "bubble", "tp", "pp", "dp", "total"}``, and the ``forward`` and
    ``backward`` of one microbatch on the slowest stage, communication included (what the
    pipeline formula, or the simulator, is given)."""
    dp, pp, tp = layout
    layers, logits = _flops_per_microbatch(model, b)
    # The last stage also runs the output layer, and the pipeline goes at its pace.
    rate = tp * cluster.flops * cluster.efficiency
    t_f = (layers / pp + logits) / rate
    phi = _recomputed_share(recompute, model.seq, model.hidden)
    t_b = 2 * t_f + phi * layers / pp / rate
    tp_bytes, dp_bytes, pp_bytes = _traffic_functions()

    tp_bandwidth, pp_bandwidth, dp_bandwidth = (
        cluster.inter_bandwidth if _crosses_nodes(layout, dim, cluster.gpus_per_node)
        else cluster.intra_bandwidth for dim in ("tp", "pp", "dp"))
    activation = model.seq * b * model.hidden
    per_all_reduce = tp_bytes(activation, tp, HALF) / tp_bandwidth
    layers_per_stage = model.layers / pp
    tp_forward = 2 * layers_per_stage * per_all_reduce
    tp_backward = (4 if recompute == "full" else 2) * layers_per_stage * per_all_reduce
    # per microbatch, v activations out and v gradients back, 1/tp of each per GPU
    pp_message = 0.0 if pp == 1 else pp_bytes(v * activation / tp, 1, HALF) / 2 / pp_bandwidth
    forward = t_f + tp_forward + pp_message
    backward = t_b + tp_backward + pp_message
    pipeline = _pipeline_function()(pp, m, v, forward, backward)

    _, parts = rank_memory(model, layout, b, m, v, recompute, sequence_parallel)
    parameters = parts["weights"] / memory.ADAM_MIXED_PRECISION["weights"]
    dp_time = 0.0 if dp == 1 else dp_bytes(parameters, dp, HALF) / dp_bandwidth
    work = m * (t_f + t_b)
    return {"forward": forward, "backward": backward, "compute": work,
            "bubble": pipeline - m * (forward + backward),
            "tp": m * (tp_forward + tp_backward), "pp": m * 2 * pp_message, "dp": dp_time,
            "total": pipeline + dp_time}


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def plans(model: Model, cluster: Cluster, batch: int, *, microbatch_sizes=(1, 2, 4, 8),
          chunks=(1, 2, 4), recompute=RECOMPUTE, sequence_parallel=(False, True),
          max_tp: int | None = None) -> list[Plan]:
    """Every layout of ``model`` on ``cluster`` for a global batch of ``batch`` sequences,
    fastest first; the ones that do not fit in memory last (``Plan.fits``).

    A layout is ``dp * pp * tp = cluster.gpus`` with ``tp`` dividing the heads, ``pp * v``
    dividing the layers, ``dp * b * m = batch``; interleaving (``v > 1``) needs ``m`` a
    multiple of ``pp``; sequence parallelism needs ``tp > 1`` and ``tp`` dividing ``seq``.
    ``microbatch_sizes``, ``chunks``, ``recompute`` and ``sequence_parallel`` say which
    values to try (e.g. ``recompute=("none", "full"), sequence_parallel=(False,)`` for the
    tools of 2021); ``max_tp`` caps the tensor-parallel degree."""
    found = []
    for tp in _divisors(cluster.gpus):
        if model.heads % tp or (max_tp is not None and tp > max_tp):
            continue
        for pp in _divisors(cluster.gpus // tp):
            if model.layers % pp:
                continue
            dp = cluster.gpus // (tp * pp)
            if batch % dp:
                continue
            for b, v, rec, seq_par in itertools.product(microbatch_sizes, chunks, recompute,
                                                         sequence_parallel):
                if (batch // dp) % b or model.layers % (pp * v):
                    continue
                m = batch // (dp * b)
                if v > 1 and (pp == 1 or m % pp):
                    continue
                if seq_par and (tp == 1 or model.seq % tp):
                    continue
                layout = (dp, pp, tp)
                _, parts = rank_memory(model, layout, b, m, v, rec, seq_par)
                time = step_time(model, cluster, layout, b, m, v, rec, seq_par)
                found.append(Plan(dp, pp, tp, b, m, v, rec, seq_par, parts, time,
                                  parts["total"] <= cluster.memory))
    if not found:
        raise ValueError(f"no layout of {model.name} ({model.layers} layers, {model.heads} "
                         f"heads) divides {cluster.gpus} GPUs and a batch of {batch} evenly")
    return sorted(found, key=lambda plan: (not plan.fits, plan.time["total"]))


def best(model: Model, cluster: Cluster, batch: int, **options) -> Plan:
    """The fastest layout that fits (:func:`plans`); a ValueError when none fits."""
    ranked = plans(model, cluster, batch, **options)
    if not ranked[0].fits:
        least = min(ranked, key=lambda plan: plan.memory["total"])
        raise ValueError(f"no layout of {model.name} fits in {cluster.memory / 2**30:.0f} GiB "
                         f"per GPU on {cluster.gpus} GPUs; the least memory is "
                         f"{least.memory['total'] / 2**30:.1f} GiB ({least.describe()})")
    return ranked[0]


def useful_flops_per_gpu(model: Model, cluster: Cluster, batch: int, plan: Plan) -> float:
    """FLOP/s per GPU that the step time of ``plan`` implies, counting only the model's
    own FLOPs (forward and backward, no recomputation): what papers report as achieved
    throughput."""
    layers, logits = _flops_per_microbatch(model, 1)
    return 3 * (layers + logits) * batch / plan.time["total"] / cluster.gpus


# ---------------------------------------------------------------------------------------------
# Published configurations
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Published:
    """A run as a paper reports it: the model, the GPUs and batch, the degrees chosen, the
    parameter count it states (in billions) and the throughput achieved per GPU."""

    model: Model
    gpus: int
    batch: int
    tp: int
    pp: int
    billions: float
    teraflops: float

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.pp)


def _gpt(billions: float, heads: int, hidden: int, layers: int) -> Model:
    return Model(f"GPT {billions:g}B", layers, hidden, heads)


#: Narayanan et al. 2021 ("Efficient Large-Scale Language Model Training on GPU Clusters
#: Using Megatron-LM"), Table 1: weak scaling from 1.7 to 1008 billion parameters on
#: Selene (sequence 2048, vocabulary 51200), the tensor- and pipeline-parallel sizes
#: the authors chose, and the teraFLOP/s per GPU they achieved.
MEGATRON_2021 = (
    Published(_gpt(1.7, 24, 2304, 24), 32, 512, 1, 1, 1.7, 137),
    Published(_gpt(3.6, 32, 3072, 30), 64, 512, 2, 1, 3.6, 138),
    Published(_gpt(7.5, 32, 4096, 36), 128, 512, 4, 1, 7.5, 142),
    Published(_gpt(18.4, 48, 6144, 40), 256, 1024, 8, 1, 18.4, 135),
    Published(_gpt(39.1, 64, 8192, 48), 512, 1536, 8, 2, 39.1, 138),
    Published(_gpt(76.1, 80, 10240, 60), 1024, 1792, 8, 4, 76.1, 140),
    Published(_gpt(145.6, 96, 12288, 80), 1536, 2304, 8, 8, 145.6, 148),
    Published(_gpt(310.1, 128, 16384, 96), 1920, 2160, 8, 16, 310.1, 155),
    Published(_gpt(529.6, 128, 20480, 105), 2520, 2520, 8, 35, 529.6, 163),
    Published(_gpt(1008.0, 160, 25600, 128), 3072, 3072, 8, 64, 1008.0, 163),
)
