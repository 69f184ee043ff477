"""Sample students and mutant submissions of hw1_tensor_parallel (see autograder/samples.py)."""

from autograder import corpus
from autograder.samples import Mutant, Work, apply, solved

ASSIGNMENT = "hw1_tensor_parallel"

# -- wrong answers, as a student writes them --------------------------------------------------
TRANSPOSED_SHARDS = '''def weight_shard_shapes(d, P):
    # in PyTorch's nn.Linear layout (out x in) instead of the math convention (in x out)
    return (4 * d // P, d), (d, 4 * d // P)


W1_shard_shape, W2_shard_shape = weight_shard_shapes(d, P)
'''

F_AND_G = '''class CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return {f_backward}


class ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, partial):
        return {g_forward}

    @staticmethod
    def backward(ctx, grad):
        return grad


def tp_ffn(x, w1_shard, b1_shard, w2_shard, b2):
    x = CopyToTP.apply(x)
    y_shard = F.gelu(F.linear(x, w1_shard, b1_shard))
    {tail}
'''
ALL_REDUCE_BACKWARD = 'comm.all_reduce(grad, phase="backward")'
ALL_REDUCE_FORWARD = 'comm.all_reduce(partial, phase="forward")'
GOOD_TAIL = "return ReduceFromTP.apply(F.linear(y_shard, w2_shard)) + b2"


def f_and_g(f_backward=ALL_REDUCE_BACKWARD, g_forward=ALL_REDUCE_FORWARD, tail=GOOD_TAIL):
    return F_AND_G.format(f_backward=f_backward, g_forward=g_forward, tail=tail)


TP_FROM_THE_LIBRARY = '''from paralab import tp as _tp


def tp_ffn(x, w1_shard, b1_shard, w2_shard, b2):
    x = _tp.copy_to_tp(x)
    y_shard = F.gelu(F.linear(x, w1_shard, b1_shard))
    return _tp.reduce_from_tp(F.linear(y_shard, w2_shard)) + b2
'''


N = 8 * 128 * 1024  # B*S*d of hw1, as a student would write it in a wrong answer

TP_FFN_CHECKS = {"tp_ffn_p4", "tp_ffn_hidden", "own_implementation"}


MUTANTS = [
    Mutant("transposed_weight_shards", ASSIGNMENT, {"a1": TRANSPOSED_SHARDS},
           {"weight_shard_shapes_hidden"}, ["nn.Linear.weight layout"]),
    Mutant("y_shard_is_full_y", ASSIGNMENT,
           {"a2": "X_shape = (B, S, d)\nY_shard_shape = (B, S, 4 * d)\nY_shape = (B, S, 4 * d)"
                  "\nZ_partial_shape = (B, S, d)\nZ_shape = (B, S, d)"},
           {"Y_shard_shape"}, ["that is the full Y"]),
    Mutant("row_row_needs_an_all_gather", ASSIGNMENT,
           {"c1": f"row_row_forward = [('all_gather', {4 * N}), ('all_reduce', {N})]\n"
                  f"row_row_backward = [('all_gather', {4 * N}), ('all_gather', {N})]"},
           {"row_row_forward"}, ["GeLU is nonlinear"]),
    Mutant("col_col_all_to_all", ASSIGNMENT,
           {"c2": f"col_col_forward = [('all_to_all', {4 * N})]\n"
                  f"col_col_backward = [('all_reduce', {4 * N}), ('all_reduce', {N})]"},
           {"col_col_forward"}, ["an all-to-all or a scatter does not give Linear2"]),
    Mutant("missing_forward_all_reduce", ASSIGNMENT, {"d": f_and_g(g_forward="partial")},
           TP_FFN_CHECKS, ["missing all-reduce in g"]),
    Mutant("missing_backward_all_reduce", ASSIGNMENT, {"d": f_and_g(f_backward="grad")},
           TP_FFN_CHECKS, ["missing all-reduce in f"]),
    # On one rank (the originality run) the bias is added once either way: only the
    # multi-rank runs catch it.
    Mutant("bias_on_every_rank", ASSIGNMENT,
           {"d": f_and_g(tail="return ReduceFromTP.apply(F.linear(y_shard, w2_shard, b2))")},
           {"tp_ffn_p4", "tp_ffn_hidden"}, ["off by (P-1) b2"]),
    Mutant("tp_ffn_from_the_library", ASSIGNMENT, {"d": TP_FROM_THE_LIBRARY}, {"own_implementation"},
           ["write f and g yourself"]),
]


def samples(root: str) -> list[Work]:
    """This assignment's notebooks of the sample class (besides the all-right one)."""
    good = solved(ASSIGNMENT, root)
    crash = corpus.replace_solution(good, "b1", "comm_col_row = {\n    'linear1.forward': None,\n"
                                                "    'linear1.backward': ('all_reduce', "
                                                "B * S * d_model),\n}\n")
    return [
        Work("ben", "the full Y on each rank, an all-gather for row-row, an all-to-all for "
                    "col-col",
             apply(good, MUTANTS, "y_shard_is_full_y", "row_row_needs_an_all_gather",
                   "col_col_all_to_all"),
             r"^graded$", {"Y_shard_shape", "row_row_forward", "col_col_forward"}),
        Work("cleo", "a NameError in one answer cell", crash, r"^graded$", {"comm_col_row"}),
        Work("finn", "a notebook file cut in the middle",
             corpus.corrupt_json(corpus.dumps(good)), r"^malformed notebook", set()),
    ]
