"""Checks of hw5_hybrid: the (dp, pp, tp) layout, traffic per dimension, 8-rank training,
the planner.

Every expected value is computed here from :mod:`paralab` (the mesh layout, the formulas,
the single-process reference, the planner), and so is every *wrong* value a known
misconception produces, so that the feedback can name it: the tensor-parallel groups laid
out across nodes, an all-reduce counted once, gradients summed without averaging,
``nn.DataParallel`` around each stage taken for data parallelism.
"""

from __future__ import annotations

import itertools
import math

from autograder.checks import (Probe, Raised, Verdict, as_integer, formula_check,
                               handles_raised, make_checker)
from paralab import formulas, mesh

DIMS = mesh.DIMS
HOMEWORK_SHAPE = (2, 2, 2)
# Other meshes for the hidden layout test: long and flat ones, degrees of 1, odd sizes.
HIDDEN_SHAPES = [(1, 2, 4), (4, 1, 2), (2, 4, 1), (3, 2, 2), (1, 1, 1), (2, 3, 1), (1, 1, 5),
                 (2, 2, 3)]
ORIGINALITY_SHAPE = (3, 1, 2)
# The hidden 8-rank run: four data-parallel replicas of a one-stage pipeline of TP pairs.
HIDDEN_SHAPE = (4, 1, 2)

# The homework's training run (lecture 05's model): 4 FFN blocks of width 8, 16 rows.
WIDTH, LAYERS, BATCH, STEPS, LR, MICRO = 8, 4, 16, 2, 0.1, 2

# Symbols of part B, as the formulas define them.
dp, pp, tp, L, B, d, m, e = (formulas.SYMBOLS[n] for n in ("dp", "pp", "tp", "L", "B", "d",
                                                              "m", "e"))
SYMBOLS = [dp, pp, tp, L, B, d, m, e]

GIB = 2 ** 30


# -- part A: the layout ---------------------------------------------------------------------------
def layout(shape, order=DIMS) -> dict:
    """The groups of every dimension when ranks are numbered row-major over ``order``
    (outermost first): the course's layout for ``order = ("dp", "pp", "tp")``."""
    sizes = [shape[DIMS.index(dim)] for dim in order]
    groups = {dim: {} for dim in DIMS}
    for rank in range(math.prod(shape)):
        coords, rest = [], rank
        for size in reversed(sizes):
            coords.append(rest % size)
            rest //= size
        coords = dict(zip(order, reversed(coords)))
        for dim in DIMS:
            key = tuple(coords[x] for x in DIMS if x != dim)
            groups[dim].setdefault(key, []).append((coords[dim], rank))
    return {dim: sorted([r for _, r in sorted(g)] for g in groups[dim].values())
            for dim in DIMS}


def _as_groups(value) -> dict | None:
    """The student's ``{dim: [[ranks], ...]}`` with its list of groups sorted (any order of
    groups is accepted; the order inside a group is the group rank and must be right)."""
    if not isinstance(value, dict) or set(value) != set(DIMS):
        return None
    out = {}
    for dim, groups in value.items():
        if not isinstance(groups, (list, tuple)):
            return None
        rows = []
        for group in groups:
            if not isinstance(group, (list, tuple)):
                return None
            ranks = [as_integer(r) for r in group]
            if any(r is None for r in ranks):
                return None
            rows.append(ranks)
        out[dim] = sorted(rows)
    return out


def diagnose_layout(value, shape, reveal: bool = True) -> Verdict:
    groups = _as_groups(value)
    if groups is None:
        return Verdict(False, "expected a dict {'dp': groups, 'pp': groups, 'tp': groups}, "
                              "each a list of groups, each a list of ranks")
    expected = layout(shape)
    if groups == expected:
        return Verdict(True, "correct")
    where = f" for the mesh {shape}" if reveal else ""
    for order in itertools.permutations(DIMS):
        if order != DIMS and groups == layout(shape, order):
            return Verdict(False, f"your ranks are numbered with {order[-1]!r} innermost (the "
                                  f"order {order}, outermost first){where}.  The course's "
                                  f"layout, Megatron-LM's and init_device_mesh's, puts tp "
                                  f"innermost so that a tensor-parallel group is consecutive "
                                  f"ranks on one node; in yours the TP group "
                                  f"{groups['tp'][0]} is not, so TP would cross nodes and its "
                                  f"all-reduces, on the critical path of every layer, would "
                                  f"run over the network")
    for dim in DIMS:
        if sorted(map(sorted, groups[dim])) == expected[dim] and groups[dim] != expected[dim]:
            return Verdict(False, f"the {dim} groups have the right members but not in the "
                                  f"right order: a rank's index in its group is its rank in "
                                  f"the group, its coordinate along {dim!r}")
    for dim in DIMS:
        if groups[dim] != expected[dim]:
            members = sorted(r for g in groups[dim] for r in g)
            if members != list(range(math.prod(shape))):
                return Verdict(False, f"the {dim} groups{where} do not hold every rank exactly "
                                      f"once: every rank belongs to one group of each "
                                      f"dimension")
            return Verdict(False, f"the {dim} groups{where} are not right: they are the ranks "
                                  f"that differ only in their {dim!r} coordinate, with "
                                  f"rank = (i_dp * pp + i_pp) * tp + i_tp")
    return Verdict(False, "not right")


def groups_check(value) -> Verdict:
    return diagnose_layout(value, HOMEWORK_SHAPE)


def groups_hidden_check(value) -> Verdict:
    if not isinstance(value, (list, tuple)) or len(value) != len(HIDDEN_SHAPES):
        return Verdict(False, "expected one answer per hidden mesh")
    for answer, shape in zip(value, HIDDEN_SHAPES):
        verdict = diagnose_layout(answer, shape, reveal=False)
        if not verdict.passed:
            return Verdict(False, f"on a hidden mesh: {verdict.message}")
    return Verdict(True, f"correct on {len(HIDDEN_SHAPES)} other meshes")


REFERENCE_LAYOUT = tuple(f"paralab.mesh:{name}" for name in (
    "group_ranks", "groups_of", "coordinates", "rank_of", "crosses_nodes"))
REFERENCE_AVERAGE = ("paralab.hybrid:average_gradients",)

PROBES = {
    # group_ranks once more where paralab.mesh's layout functions raise
    # ReferenceUnavailable: the layout must be the student's own.
    "own_layout": Probe(cells=("setup", "a1"),
                        call="{dim: group_ranks(checks.ORIGINALITY_SHAPE, dim) "
                             "for dim in ('dp', 'pp', 'tp')}",
                        unavailable=REFERENCE_LAYOUT),
    # average_gradients on 4 real ranks where paralab.hybrid's own raises.
    "own_average": Probe(cells=("setup", "c1"), call="checks.probe_average(average_gradients)",
                         unavailable=REFERENCE_AVERAGE),
}


def _unavailable(value: Raised) -> bool:
    return value.type == "ReferenceUnavailable" or "is not available in this test" in value.message


@handles_raised
def own_layout_check(value) -> Verdict:
    if isinstance(value, Raised):
        if _unavailable(value):
            return Verdict(False, f"group_ranks must compute the layout itself, not call "
                                  f"paralab.mesh ({value.message[:200]})")
        return Verdict(False, value.describe())
    verdict = diagnose_layout(value, ORIGINALITY_SHAPE, reveal=False)
    return Verdict(verdict.passed, "your own implementation" if verdict.passed
                   else verdict.message)


def crossing_dims(shape, gpus_per_node) -> set:
    """The dimensions with a group on more than one node (ranks fill the nodes in order).
    Computed from :func:`layout`, not from paralab.mesh: this module is imported where the
    probes make paralab.mesh's layout functions unavailable."""
    return {dim for dim, groups in layout(shape).items()
            if any(len({r // gpus_per_node for r in g}) > 1 for g in groups)}


CROSSING_NODES = {g: crossing_dims(HOMEWORK_SHAPE, g) for g in (4, 2)}


def crossing_check(value) -> Verdict:
    if not isinstance(value, dict) or set(value) != set(CROSSING_NODES) or not all(
            isinstance(x, (set, frozenset, list, tuple)) and set(x) <= set(DIMS)
            for x in value.values()):
        return Verdict(False, f"expected a dict {{4: set of dimensions, 2: set of dimensions}} "
                              f"with dimensions among {DIMS}")
    for gpus, expected in CROSSING_NODES.items():
        got = set(value[gpus])
        if got == expected:
            continue
        if "tp" in got:
            return Verdict(False, f"with {gpus} GPUs per node: the tp groups are consecutive "
                                  f"ranks ({layout(HOMEWORK_SHAPE)['tp'][1]}...), so "
                                  f"they stay inside a node: that is why tp is innermost")
        missing = sorted(expected - got)
        extra = sorted(got - expected)
        if missing:
            dim = missing[0]
            return Verdict(False, f"with {gpus} GPUs per node, a {dim} group such as "
                                  f"{layout(HOMEWORK_SHAPE)[dim][0]} spans two nodes")
        dim = extra[0]
        return Verdict(False, f"with {gpus} GPUs per node, every {dim} group stays on one node: "
                              f"{layout(HOMEWORK_SHAPE)[dim]}")
    return Verdict(True, "correct: the innermost dimension stays inside a node longest")


# -- part B: traffic per step -------------------------------------------------------------------
# A formula that is neither right nor a known mistake is shown with what it gives here.
RUN_C = dict(dp=2, pp=2, tp=2, L=4, B=16, d=8, m=2, e=8)
AT_RUN_C = dict(symbols=formulas.SYMBOLS, evaluate=lambda x: formulas.evaluate(x, **RUN_C),
                where="for the run of part C (dp=pp=tp=2, L=4, B=16, d=8, m=2, e=8)")


PARAMS = formulas.ffn_stack_parameters()
WRONG_PARAMS = {
    "bias_split": L / pp * (8 * d ** 2 + 5 * d) / tp,
    "whole_model": L * ((8 * d ** 2 + 4 * d) / tp + d),
    "no_tp": L / pp * (8 * d ** 2 + 5 * d),
    "dp_splits": L / pp * ((8 * d ** 2 + 4 * d) / tp + d) / dp,
}
PARAMS_CHECK = formula_check(PARAMS, [
    (WRONG_PARAMS["bias_split"], "the second bias b2 is added after the all-reduce, once: "
                                 "every TP rank holds it whole (d parameters), it is not split "
                                 "by tp"),
    (WRONG_PARAMS["whole_model"], "a rank holds only its own stage: L/pp of the L blocks"),
    (WRONG_PARAMS["no_tp"], "tensor parallelism splits W1, b1 and W2 over the tp ranks"),
    (WRONG_PARAMS["dp_splits"], "data parallelism replicates the parameters: every replica "
                                "holds all of them (splitting them over dp is what ZeRO adds)"),
], **AT_RUN_C)

DP_BYTES = formulas.dp_traffic(PARAMS)
DP_CHECK = formula_check(DP_BYTES, [
    (PARAMS * e, "that is the size of the gradients, counted once: a ring all-reduce sends "
                 "2(dp-1)/dp times the tensor per rank (a reduce-scatter, then an all-gather)"),
    (formulas.collective_traffic("all_gather", PARAMS * e, dp),
     "(dp-1)/dp is one pass around the ring, an all-gather or a reduce-scatter: an "
     "all-reduce is both, 2(dp-1)/dp"),
    (2 * PARAMS * e, "a ring all-reduce sends 2(dp-1)/dp of the tensor per rank, not twice "
                     "the tensor"),
] + [(formulas.dp_traffic(wrong), "the ring factor 2(dp-1)/dp is right, but the parameters "
                                  "one rank holds are not (see B1)")
     for wrong in WRONG_PARAMS.values()], **AT_RUN_C)

_LAST = formulas.ffn_stack_traffic("last")
_FIRST = formulas.ffn_stack_traffic("first")
_ROWS = B / (dp * m)
TP_CHECK = formula_check(_LAST["tp"], [
    (_FIRST["tp"], "that is the first stage's: only there the first block's input is the "
                   "data, whose gradient nobody needs; on the last stage every block "
                   "all-reduces forward and backward"),
    (2 * L / pp * m * _ROWS * d * e, "that counts each all-reduce as its tensor once: a ring "
                                     "all-reduce sends 2(tp-1)/tp times it per rank"),
    (_LAST["tp"] / 2, "that counts only the forward all-reduces (g); every block also "
                      "all-reduces the gradient of its input in the backward (f)"),
    (_LAST["tp"] * dp, "each pipeline (data-parallel replica) sees B/dp rows, not the whole "
                       "batch B"),
    (_LAST["tp"] / m, "per step, not per microbatch: the m microbatches each all-reduce"),
], **AT_RUN_C)
PP_CHECK = formula_check(_LAST["pp"], [
    (formulas.ffn_stack_traffic("middle")["pp"],
     "the last stage has no next stage: it sends only gradients back, no activations"),
    (formulas.collective_traffic("all_reduce", _LAST["pp"], pp),
     "point-to-point messages cross one link once: there is no ring factor"),
    (_LAST["pp"] / tp, "every tensor-parallel rank of the stage sends its own copy to its "
                       "counterpart (only Megatron-LM's scatter/gather optimisation sends "
                       "1/tp of it)"),
    (_LAST["pp"] * dp, "each pipeline carries B/dp rows, not the whole batch"),
    (_LAST["pp"] / m, "per step: one gradient for each of the m microbatches"),
], **AT_RUN_C)


# -- part C: 8 processes ---------------------------------------------------------------------------
def _model():
    from paralab import hybrid
    return hybrid.HybridModel(width=WIDTH, layers=LAYERS, batch=BATCH)


_RUNS: dict = {}


def run_hybrid(average, shape=HOMEWORK_SHAPE) -> dict:
    """Train the homework's model on ``shape`` with the student's ``average`` (one
    ``paralab.launch`` world) and return what the checks need, as data.  The same function
    on the same mesh runs once: the checks of one test cell share the run (and its error)."""
    key = (average, tuple(shape))
    if key not in _RUNS:
        try:
            _RUNS[key] = (_run_hybrid(average, shape), None)
        except Exception as e:  # noqa: BLE001 - re-raised for every check that asks
            _RUNS[key] = (None, e)
    result, error = _RUNS[key]
    if error is not None:
        raise error
    return result


def _run_hybrid(average, shape) -> dict:
    from paralab import hybrid
    result = hybrid.train(shape, _model(), steps=STEPS, lr=LR, m=MICRO, average=average,
                          timeout=120)
    return {"shape": list(shape),
            "replicas": [result.parameters(i) for i in range(shape[0])],
            "losses": result.losses(),
            "traffic": [{k: float(x) for k, x in t.items()} for t in result.traffic(0)],
            "dp": [[[x["world_size"], x["elements"]] for x in r["steps"][0]["dp"]]
                   for r in result.ranks]}


def _close(a, b_, tol=1e-9) -> bool:
    import torch
    return (isinstance(a, torch.Tensor) and a.shape == b_.shape
            and torch.allclose(a.double(), b_.double(), rtol=tol, atol=tol))


def _same(params, reference) -> bool:
    return (isinstance(params, dict) and set(params) == set(reference)
            and all(_close(params[k], v) for k, v in reference.items()))


def _spread(replicas) -> float:
    first = replicas[0]
    return max((float((r[k] - v).abs().max()) for r in replicas[1:] for k, v in first.items()),
               default=0.0)


def diagnose_run(value, shape, reveal: bool = True) -> Verdict:
    from paralab import hybrid

    dp_ = shape[0]
    if not isinstance(value, dict) or not isinstance(value.get("replicas"), list) \
            or len(value["replicas"]) != dp_:
        return Verdict(False, f"expected the report of a {shape} run")
    model = _model()
    _, right = hybrid.reference_training(model, STEPS, LR)
    replicas = value["replicas"]
    if all(_same(r, right) for r in replicas):
        where = f", mesh {tuple(shape)}" if reveal else ""
        return Verdict(True, f"on {math.prod(shape)} processes{where}: every parameter of "
                             f"every replica equals a single process's after {STEPS} steps")
    sizes = {tuple(x) for rank in value.get("dp", []) for x in rank}
    world_sizes = {s[0] for s in sizes}
    if dp_ > 1 and _same(replicas[0], hybrid.reference_training(model, STEPS, LR * dp_)[1]):
        return Verdict(False, f"the gradients were summed over the {dp_} replicas but not "
                              f"divided by {dp_}: that is a single process with a learning "
                              f"rate {dp_} times larger.  The gradient of the whole batch's "
                              f"mean loss is the MEAN of the replicas' gradients")
    if world_sizes and world_sizes != {dp_}:
        wrong = max(world_sizes)
        mesh_text = f" of a {tuple(shape)} mesh" if reveal else ""
        return Verdict(False, f"the gradients were all-reduced over {wrong} ranks; the "
                              f"data-parallel group{mesh_text} has {dp_}: average only with "
                              f"the ranks that hold the same shard of the same stage (the "
                              f"group passed to average_gradients)")
    if dp_ > 1 and _spread(replicas) > 1e-9:
        return Verdict(False, "the data-parallel replicas drifted apart: each took a step on "
                              "its own rows only.  Their gradients must be all-reduced over "
                              "the data-parallel group and averaged")
    if dp_ > 1 and not world_sizes:
        return Verdict(False, "no all-reduce was logged: average with paralab.comm.all_reduce "
                              "over the group you are given")
    return Verdict(False, "the trained parameters differ from a single process's: is every "
                          "gradient replaced by its mean over the group?")


def hybrid_check(value) -> Verdict:
    return diagnose_run(value, HOMEWORK_SHAPE)


def hybrid_hidden_check(value) -> Verdict:
    verdict = diagnose_run(value, HIDDEN_SHAPE, reveal=False)
    return verdict if verdict.passed else Verdict(False, f"on a hidden mesh: {verdict.message}")


def traffic_check(shape):
    def check(value) -> Verdict:
        if not isinstance(value, dict) or not isinstance(value.get("traffic"), list):
            return Verdict(False, f"expected the report of a {shape} run")
        dp_, pp_, tp_ = shape
        expected = int(formulas.evaluate(DP_BYTES, dp=dp_, pp=pp_, tp=tp_, L=LAYERS, d=WIDTH,
                                         e=8))
        params = int(formulas.evaluate(PARAMS, pp=pp_, tp=tp_, L=LAYERS, d=WIDTH))
        got = [t.get("dp") for t in value["traffic"]]
        if all(x == expected for x in got):
            return Verdict(True, f"every rank sent {expected} bytes to average its gradients: "
                                 f"2(dp-1)/dp times its {params} float64 gradients")
        if all(x == 0 for x in got):
            return Verdict(False, "no bytes were logged: all-reduce with paralab.comm.all_reduce "
                                  "(it logs what it sends), over the group you are given")
        return Verdict(False, f"the ranks sent {sorted(set(got))} bytes to average their "
                              f"gradients; one all-reduce of every gradient sends {expected}: "
                              f"2(dp-1)/dp times the rank's gradients")
    return check


def probe_worker(rank, world_size, average):
    """Worker of :func:`probe_average`: a (2, 1, 2) mesh, two gradients per rank whose values
    say which rank they come from; the data-parallel groups are {0, 2} and {1, 3}."""
    import torch

    from paralab import comm, launch
    device_mesh = mesh.device_mesh((2, 1, 2))
    params = [torch.nn.Parameter(torch.zeros(3, 2, dtype=torch.float64, device=launch.device())),
              torch.nn.Parameter(torch.zeros(5, dtype=torch.float64, device=launch.device()))]
    for i, q in enumerate(params):
        q.grad = torch.full_like(q, float((rank + 1) * (i + 1)))
    with comm.record() as log:
        average(params, device_mesh.get_group("dp"))
    return {"grads": [q.grad.detach().cpu() for q in params],
            "world_sizes": [r.world_size for r in log]}


def probe_average(average) -> list:
    """The student's average_gradients on 4 real ranks (:func:`probe_worker`)."""
    from paralab import launch
    return launch.run(probe_worker, 4, average, echo=False, timeout=60)


@handles_raised
def own_average_check(value) -> Verdict:
    import torch

    if isinstance(value, Raised):
        if _unavailable(value):
            return Verdict(False, "write the averaging yourself instead of calling "
                                  "paralab.hybrid.average_gradients")
        return Verdict(False, value.describe())
    if not isinstance(value, list) or len(value) != 4:
        return Verdict(False, "expected the results of 4 ranks")
    for rank, r in enumerate(value):
        partner = layout((2, 1, 2))["dp"][rank % 2]
        mean = sum(x + 1 for x in partner) / 2
        grads = r.get("grads") if isinstance(r, dict) else None
        if not isinstance(grads, list) or len(grads) != 2:
            return Verdict(False, "the gradients did not come back")
        for i, g in enumerate(grads):
            if not isinstance(g, torch.Tensor) or not torch.allclose(
                    g, torch.full_like(g, mean * (i + 1))):
                return Verdict(False, "run once more on a (2, 1, 2) mesh, your averaging did "
                                      "not give each rank the mean over its data-parallel "
                                      "group")
    return Verdict(True, "your own implementation")


# -- part D: the planner --------------------------------------------------------------------------
GPT3 = dict(name="GPT-3", layers=96, hidden=12288, heads=96)
GPT3_GPUS, GPT3_BATCH, GPT3_TP = 1024, 1536, 8


def _fullest(pp_value, per_parameter=None, activations=True):
    from paralab import memory, planner
    model = planner.Model(**GPT3)
    dp_ = GPT3_GPUS // (GPT3_TP * pp_value)
    m_ = GPT3_BATCH // dp_
    _, parts = planner.rank_memory(model, (dp_, pp_value, GPT3_TP), 1, m_)
    total = parts["total"] - (0 if activations else parts["activations"])
    if per_parameter is not None:
        params = parts["weights"] / memory.ADAM_MIXED_PRECISION["weights"]
        total += params * (per_parameter - sum(memory.ADAM_MIXED_PRECISION.values()))
    return total


def _pp_candidates():
    return [p_ for p_ in range(1, GPT3["layers"] + 1)
            if GPT3["layers"] % p_ == 0 and GPT3_GPUS % (GPT3_TP * p_) == 0
            and GPT3_BATCH % (GPT3_GPUS // (GPT3_TP * p_)) == 0]


def _smallest(**kwargs):
    return next((p_ for p_ in _pp_candidates() if _fullest(p_, **kwargs) <= 80 * GIB), None)


def min_pp_check(value) -> Verdict:
    value = as_integer(value)
    if value is None:
        return Verdict(False, "expected a whole number of pipeline stages")
    expected = _smallest()
    if value == expected:
        return Verdict(True, f"correct: with pp = {expected} rank 0 needs "
                             f"{_fullest(expected) / GIB:.1f} GiB")
    if value not in _pp_candidates():
        return Verdict(False, f"pp = {value} does not divide the 96 layers and the GPUs evenly")
    need = _fullest(value)
    if need > 80 * GIB:
        if value == _smallest(activations=False):
            return Verdict(False, f"with pp = {value} the weights, gradients and Adam's state "
                                  f"fit, but rank 0 also holds its activations: under 1F1B, "
                                  f"p microbatches through L/p layers each -- L layers' worth "
                                  f"whatever p is; it needs {need / GIB:.1f} GiB in all")
        if value == _smallest(per_parameter=4):
            return Verdict(False, f"with pp = {value} rank 0 needs {need / GIB:.1f} GiB: mixed "
                                  f"precision with Adam keeps 16 bytes per parameter (16-bit "
                                  f"weights and gradients, an fp32 master copy, momentum and "
                                  f"variance), not 4")
        return Verdict(False, f"with pp = {value} rank 0 needs {need / GIB:.1f} GiB, more than "
                              f"80 GiB")
    return Verdict(False, f"pp = {value} fits, but a smaller pipeline does too")


BEST_LAYOUT_RUN = 4      # Megatron-LM's 39.1B model on 512 GPUs


def _best_layout():
    from paralab import planner
    run = planner.MEGATRON_2021[BEST_LAYOUT_RUN]
    return planner.best(run.model, planner.Cluster(gpus=run.gpus), run.batch).layout


def best_layout_check(value) -> Verdict:
    from paralab import planner
    if not isinstance(value, (list, tuple)) or len(value) != 3 or any(
            as_integer(x) is None for x in value):
        return Verdict(False, "expected (dp, pp, tp): three whole numbers")
    value = tuple(as_integer(x) for x in value)
    expected = _best_layout()
    if value == expected:
        return Verdict(True, "correct")
    run = planner.MEGATRON_2021[BEST_LAYOUT_RUN]
    if value == (run.dp, run.pp, run.tp):
        return Verdict(False, "that is the layout Megatron-LM published for this model; the "
                              "question asks what the planner ranks first (lecture 05 shows "
                              "why the two differ)")
    if sorted(value) == sorted(expected):
        return Verdict(False, "the degrees are right but not in the order (dp, pp, tp)")
    return Verdict(False, f"{value} is not the planner's first choice: call planner.best with "
                          f"the model, a Cluster of {run.gpus} GPUs and the batch")


STATEMENTS = {
    "tp_inside_a_node": True,
    "tp_sends_fewest_messages": False,
    "pp_point_to_point": True,
    "dp_sums_gradients": False,
    "dataparallel_per_stage_is_dp": False,
    "allreduce_sends_the_tensor_once": False,
    "dp_once_per_step": True,
}
STATEMENT_MESSAGES = {
    "tp_sends_fewest_messages": "tensor parallelism sends the MOST messages: every layer "
                                "all-reduces in the forward and in the backward, and the "
                                "compute waits for each",
    "dp_sums_gradients": "the data-parallel all-reduce must be followed by a division by dp: "
                         "a plain sum is a learning rate dp times too large",
    "dataparallel_per_stage_is_dp": "wrapping each stage in nn.DataParallel is one process "
                                    "copying the stage to a few devices on every forward and "
                                    "gathering the outputs on one of them; data parallelism "
                                    "is a group of processes (one per device) on a mesh that "
                                    "all-reduce and average their gradients",
    "allreduce_sends_the_tensor_once": "a ring all-reduce sends 2(P-1)/P times the tensor per "
                                       "rank: a reduce-scatter, then an all-gather",
}


def statements_check(value) -> Verdict:
    if not isinstance(value, (set, frozenset, list, tuple)) or not set(value) <= set(STATEMENTS):
        return Verdict(False, f"expected a set of names from {sorted(STATEMENTS)}")
    value = set(value)
    for name in sorted(value):
        if not STATEMENTS[name]:
            return Verdict(False, f"{name!r} is false: {STATEMENT_MESSAGES[name]}")
    missing = {k for k, v in STATEMENTS.items() if v} - value
    if missing:
        return Verdict(False, f"incomplete: {len(missing)} more statement(s) are true")
    return Verdict(True, "correct")


CHECKS = {
    "groups_2x2x2": groups_check,
    "groups_hidden": groups_hidden_check,
    "own_layout": own_layout_check,
    "crossing": crossing_check,
    "params_per_rank": PARAMS_CHECK,
    "dp_bytes": DP_CHECK,
    "tp_bytes_last": TP_CHECK,
    "pp_bytes_last": PP_CHECK,
    "hybrid_2x2x2": hybrid_check,
    "dp_traffic_2x2x2": traffic_check(HOMEWORK_SHAPE),
    "hybrid_hidden": hybrid_hidden_check,
    "own_average": own_average_check,
    "min_pp": min_pp_check,
    "best_layout": best_layout_check,
    "true_statements": statements_check,
}

GRADE_CELLS = {
    "test_groups": ["groups_2x2x2"],
    "test_groups_hidden": ["groups_hidden", "own_layout"],
    "test_crossing": ["crossing"],
    "test_params": ["params_per_rank"],
    "test_dp_bytes": ["dp_bytes"],
    "test_tp_bytes": ["tp_bytes_last"],
    "test_pp_bytes": ["pp_bytes_last"],
    "test_hybrid": {"hybrid_2x2x2": 3, "dp_traffic_2x2x2": 1},
    "test_hybrid_hidden": ["hybrid_hidden", "own_average"],
    "test_min_pp": ["min_pp"],
    "test_best_layout": ["best_layout"],
    "test_statements": ["true_statements"],
}

check = make_checker(CHECKS, symbols=SYMBOLS)
