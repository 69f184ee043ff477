"""Sample students and mutant submissions of hw5_hybrid (see autograder/samples.py)."""

from autograder import corpus
from autograder.samples import Mutant, Work, apply, solved

ASSIGNMENT = "hw5_hybrid"

# -- wrong answers, as a student writes them --------------------------------------------------
TP_OUTERMOST = '''def group_ranks(shape, dim):
    n_dp, n_pp, n_tp = shape
    axis = ("dp", "pp", "tp").index(dim)
    groups = {}
    for rank in range(n_dp * n_pp * n_tp):
        # numbered with tp outermost and dp innermost
        coords = (rank % n_dp, rank // n_dp % n_pp, rank // (n_dp * n_pp))
        others = coords[:axis] + coords[axis + 1:]
        groups.setdefault(others, []).append(rank)
    return list(groups.values())
'''

DELEGATES_LAYOUT = '''from paralab import mesh as _mesh


def group_ranks(shape, dim):
    return _mesh.group_ranks(shape, dim)
'''

SUMS = '''def average_gradients(parameters, group):
    for q in parameters:
        q.grad.copy_(comm.all_reduce(q.grad, phase="backward", group=group))
'''

WHOLE_WORLD = '''def average_gradients(parameters, group):
    grads = [q.grad for q in parameters]
    flat = torch.cat([g.reshape(-1) for g in grads])
    flat = comm.all_reduce(flat, phase="backward") / comm.world_size()   # every rank
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
'''

DELEGATES_AVERAGE = '''from paralab import hybrid as _hybrid


def average_gradients(parameters, group):
    _hybrid.average_gradients(parameters, group)
'''

UNLOGGED = '''import torch.distributed as dist


def average_gradients(parameters, group):
    for q in parameters:
        dist.all_reduce(q.grad, group=group)
        q.grad /= dist.get_world_size(group)
'''

# An honest variant: one all-reduce per parameter sends the same bytes in all.
PER_PARAMETER = '''def average_gradients(parameters, group):
    n = comm.world_size(group)
    for q in parameters:
        q.grad.copy_(comm.all_reduce(q.grad, phase="backward", label="dp", group=group) / n)
'''

STATES_ONLY = '''gpt3 = planner.Model("GPT-3", layers=96, hidden=12288, heads=96)
for pp_ in (1, 2, 4, 8, 16, 32):
    dp_ = 1024 // (8 * pp_)
    _, parts = planner.rank_memory(gpt3, (dp_, pp_, 8), 1, 1536 // dp_)
    if parts["total"] - parts["activations"] <= 80 * 2 ** 30:   # weights, gradients, Adam
        min_pp = pp_
        break
'''

RUN_CHECKS = {"hybrid_2x2x2", "hybrid_hidden", "own_average"}

MUTANTS = [
    # Right everywhere in the student's kernel; only the runs without the library fail.
    Mutant("delegates_to_the_library", ASSIGNMENT,
           {"a1": DELEGATES_LAYOUT, "c1": DELEGATES_AVERAGE}, {"own_layout", "own_average"},
           ["must compute the layout itself", "write the averaging yourself"]),
    # B2 is computed from B1, so the split bias costs both.
    Mutant("row_bias_split_by_tp", ASSIGNMENT,
           {"b1": "params_per_rank = L / pp * (8 * d**2 + 5 * d) / tp"},
           {"params_per_rank", "dp_bytes"}, ["added after the all-reduce"]),
    Mutant("traffic_counting_mistakes", ASSIGNMENT,
           {"b2": "dp_bytes = params_per_rank * e",
            "b3": "tp_bytes_last = m * (L / pp) * 2 * (tp - 1) / tp * B / (dp * m) * d * e",
            "b4": "pp_bytes_last = 2 * m * B / (dp * m) * d * e"},
           {"dp_bytes", "tp_bytes_last", "pp_bytes_last"},
           ["counted once", "only the forward all-reduces", "no next stage"]),
    Mutant("sums_without_averaging", ASSIGNMENT, {"c1": SUMS}, RUN_CHECKS,
           ["summed over the 2 replicas but not divided by 2"]),
    Mutant("averages_over_the_whole_world", ASSIGNMENT, {"c1": WHOLE_WORLD},
           RUN_CHECKS | {"dp_traffic_2x2x2"}, ["all-reduced over 8 ranks"]),
    Mutant("all_reduce_behind_the_log", ASSIGNMENT, {"c1": UNLOGGED}, {"dp_traffic_2x2x2"},
           ["no bytes were logged"]),
    Mutant("one_all_reduce_per_parameter", ASSIGNMENT, {"c1": PER_PARAMETER}, set()),
    Mutant("planner_mistakes", ASSIGNMENT,
           {"d1": STATES_ONLY, "d2": "best_layout = (32, 2, 8)",
            "d3": 'true_statements = {"tp_inside_a_node", "pp_point_to_point", '
                  '"dp_once_per_step", "dataparallel_per_stage_is_dp"}'},
           {"min_pp", "best_layout", "true_statements"},
           ["also holds its activations", "Megatron-LM published", "nn.DataParallel"]),
]


def samples(root: str) -> list[Work]:
    """This assignment's notebooks of the sample class (besides the all-right one)."""
    good = solved(ASSIGNMENT, root)
    return [
        Work("ben", "counts each all-reduce once, sums the DP gradients without averaging, "
                    "takes nn.DataParallel per stage for DP x PP",
             apply(good, MUTANTS, "traffic_counting_mistakes", "sums_without_averaging",
                   "planner_mistakes"),
             r"^graded$", {"dp_bytes", "tp_bytes_last", "pp_bytes_last", "min_pp",
                           "best_layout", "true_statements"} | RUN_CHECKS),
        # The layout with tp outermost: every TP group spread over non-neighbours, and A2's
        # answer (computed from it) wrong as well.
        Work("hal", "lays the tensor-parallel groups out across nodes",
             corpus.replace_solution(good, "a1", TP_OUTERMOST), r"^graded$",
             {"groups_2x2x2", "groups_hidden", "own_layout", "crossing"}),
    ]
