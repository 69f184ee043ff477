"""Sample students and mutant submissions of hw4_memory (see autograder/samples.py)."""

from autograder.samples import Mutant, Work, apply, solved

ASSIGNMENT = "hw4_memory"

# -- wrong answers, as a student writes them --------------------------------------------------
NO_RNG_RESTORE = '''def checkpointed_forward(layers, x):
    for layer in layers:  # "the random state does not matter for memory"
        x = checkpoint(layer, x, use_reentrant=False, preserve_rng_state=False)
    return x
'''

WHOLE_STAGE = '''def checkpointed_forward(layers, x):
    def stage(x):
        for layer in layers:
            x = layer(x)
        return x
    return checkpoint(stage, x, use_reentrant=False)   # one checkpoint for the whole stage
'''

PLAIN = '''def checkpointed_forward(layers, x):
    for layer in layers:
        x = layer(x)
    return x
'''

LIBRARY_RECOMPUTE = '''def checkpointed_forward(layers, x):
    for layer in layers:
        layer.recompute = "full"   # the layer's own option
        x = layer(x)
    return x
'''

# An honest student who writes the recomputation by hand, random state included.
BY_HAND = '''class Recomputed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer, ctx.rng = layer, torch.get_rng_state()
        ctx.save_for_backward(x)
        with torch.no_grad():
            return layer(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        x = x.detach().requires_grad_()
        now = torch.get_rng_state()
        torch.set_rng_state(ctx.rng)          # the forward's dropout masks again
        with torch.enable_grad():
            out = ctx.layer(x)
        torch.set_rng_state(now)
        torch.autograd.backward(out, grad)    # weight gradients accumulate here
        return x.grad, None


def checkpointed_forward(layers, x):
    for layer in layers:
        x = Recomputed.apply(x, layer)
    return x
'''

REENTRANT = '''def checkpointed_forward(layers, x):
    for layer in layers:
        x = checkpoint(layer, x, use_reentrant=True)
    return x
'''

CODING = {"checkpoint_visible", "checkpoint_hidden", "own_implementation"}

MUTANTS = [
    # B1, C1 and C2 reuse A1's formula, and A2, A4 evaluate it: the error carries through.
    Mutant("forgot_the_attention_term", ASSIGNMENT,
           {"a1": "layer_bytes_formula = 34 * s * b * h"},
           {"layer_bytes_formula", "layer_bytes", "bytes_by_strategy", "least_recompute",
            "peak_gpipe_rank0", "peak_1f1b_rank0", "first_stage_by_p"},
           ["forgetting the 5as/h term"]),
    Mutant("forgot_the_attention_term_in_the_number", ASSIGNMENT,
           {"a2": "layer_bytes = (34 * s * b * h).subs(MODEL)"}, {"layer_bytes"},
           ["forgetting the 5as/h term"]),
    Mutant("tp_divides_everything", ASSIGNMENT,
           {"a3": "tp_formula = layer_bytes_formula / t"}, {"tp_formula", "bytes_by_strategy"},
           ["TP without SP leaves the 10·sbh replicated part"]),
    Mutant("full_when_selective_fits", ASSIGNMENT, {"b1": 'least_recompute = "full"'},
           {"least_recompute"}, ["take the least that fits"]),
    # D's selective step reuses B2's share.
    Mutant("memory_share_for_flop_share", ASSIGNMENT,
           {"b2": "selective_share = sp.Rational(80, 114)"},
           {"selective_share", "step_time_selective"}, ["share of the layer's MEMORY"]),
    Mutant("one_f_one_b_holds_m_over_p", ASSIGNMENT,
           {"c1": "per_layer = (layer_bytes_formula / t).subs(MODEL).subs(LAYOUT)\n"
                  "layers_per_stage = (L / p).subs(MODEL).subs(LAYOUT)\n"
                  "peak_gpipe_rank0 = LAYOUT[m] * layers_per_stage * per_layer\n"
                  "peak_1f1b_rank0 = LAYOUT[m] / LAYOUT[p] * layers_per_stage * per_layer"},
           {"peak_1f1b_rank0"}, ["not m/p microbatches"]),
    Mutant("one_f_one_b_grows_with_p", ASSIGNMENT,
           {"c2": "first_stage_by_p = [p_ * MODEL[L] * per_layer for p_ in (2, 4, 8)]"},
           {"first_stage_by_p"}, ["1F1B memory grows with p"]),
    Mutant("interleaving_divides_by_v", ASSIGNMENT, {"c3": "interleaved_factor = 1 / v"},
           {"interleaved_factor"}, ["does not divide the memory by v"]),
    Mutant("adam_without_master_copy", ASSIGNMENT,
           {"c4": "params = (L / p * ((12 * h**2 + 7 * h) / t + 6 * h)).subs(MODEL).subs(LAYOUT)\n"
                  "rank0_total = (2 + 2 + 8) * params + (L * 34 * s * b * h / t).subs(MODEL)"
                  ".subs(LAYOUT)"},
           {"rank0_total"}, ["fp32 master copy"]),
    Mutant("recomputation_is_free", ASSIGNMENT,
           {"d": "timeline = simulate(schedules.one_f_one_b(4, 8), 2, 4)\n"
                 "step_time_full = step_time_selective = timeline.makespan\n"
                 "bubble_full = timeline.makespan - timeline.ideal"},
           {"step_time_full", "bubble_full", "step_time_selective"},
           ["recomputation is not free"]),
    Mutant("recompute_without_the_random_state", ASSIGNMENT, {"e": NO_RNG_RESTORE}, CODING,
           ["drew different dropout masks"]),
    Mutant("one_checkpoint_for_the_whole_stage", ASSIGNMENT, {"e": WHOLE_STAGE}, CODING,
           ["one input for the whole stage"]),
    Mutant("no_checkpoint_at_all", ASSIGNMENT, {"e": PLAIN}, CODING,
           ["still keeps every activation"]),
    # Right everywhere in the student's kernel; only the run without the library fails.
    Mutant("switches_on_the_layers_recomputation", ASSIGNMENT, {"e": LIBRARY_RECOMPUTE},
           {"own_implementation"}, ["instead of switching on the layer's own recomputation"]),
    Mutant("recomputes_by_hand", ASSIGNMENT, {"e": BY_HAND}, set()),
    Mutant("reentrant_checkpoint", ASSIGNMENT, {"e": REENTRANT}, set()),
]


def samples(root: str) -> list[Work]:
    """This assignment's notebooks of the sample class (besides the all-right one)."""
    good = solved(ASSIGNMENT, root)
    return [
        Work("ben", "forgets the 5as/h attention term, lets TP alone divide everything by t, "
                    "holds m/p microbatches in 1F1B and has 1F1B's memory grow with p, "
                    "prices recomputation at zero",
             apply(good, MUTANTS, "forgot_the_attention_term_in_the_number",
                   "tp_divides_everything", "one_f_one_b_holds_m_over_p",
                   "one_f_one_b_grows_with_p", "recomputation_is_free"),
             r"^graded$", {"layer_bytes", "tp_formula", "bytes_by_strategy", "peak_1f1b_rank0",
                           "first_stage_by_p", "step_time_full", "bubble_full",
                           "step_time_selective"}),
        Work("ivy", "a checkpointed stage whose re-run draws new dropout masks",
             apply(good, MUTANTS, "recompute_without_the_random_state"), r"^graded$", CODING),
    ]
