"""Sample students and mutant submissions of hw3_pipeline_runtime (see autograder/samples.py).

Each wrong runtime is one a student writes -- most of them the mistakes of the source
material's code lab -- and loses exactly the checks its mistake breaks.
"""

from autograder.samples import Mutant, Work, apply, solved

ASSIGNMENT = "hw3_pipeline_runtime"

# -- wrong runtimes, as a student writes them -------------------------------------------------
# The source's "1F1B": whatever the schedule says, every forward runs first.
FORWARDS_FIRST = '''def run_schedule(schedule, rank, stages, inputs, targets, boundary, costs=None):
    state = RankState(schedule, rank, stages, inputs, targets, boundary, costs)
    actions = schedule.orders[rank]
    forwards = [a for a in actions if a.op == "F"]
    backwards = [a for a in actions if a.op == "B"]
    for action in forwards:             # warm-up and steady state: all the forwards...
        forward(state, action.microbatch, action.stage)
    for action in backwards:            # ...then all the backwards
        backward(state, action.microbatch, action.stage)
    for request in state.pending:
        request.wait()
    return {"losses": state.losses, "events": state.events}
'''

# The source's backward: only the loss is backpropagated; the other stages skip theirs.
NO_INPUT_GRADIENT = '''def backward(state, i, s):
    last = state.schedule.num_stages - 1
    x, out = state.saved.pop((i, s))
    start = time.perf_counter()
    if s == last:
        torch.autograd.backward(out)    # the loss: autograd does the rest (does it?)
    finish_action(state, f"{s}B{i}", start)
'''

FORWARD = '''def forward(state, i, s):
    last = state.schedule.num_stages - 1
    if s == 0:
        x = state.inputs[i]
    else:
        x = {received}
    start = time.perf_counter()
    out = state.stages[s](x)
    if s == last:
        out = {loss}
        state.losses[i] = out.item()
    state.saved[(i, s)] = (x, out)
    finish_action(state, f"{{s}}F{{i}}", start)
    if s < last:
        send(state, out, "activation", i, s + 1)
'''
RECEIVED = 'receive(state, "activation", i, s).requires_grad_()'
LOSS = "F.cross_entropy(out, state.targets[i]) / state.schedule.num_microbatches"
NO_LOSS_SCALING = FORWARD.format(received=RECEIVED,
                                 loss="F.cross_entropy(out, state.targets[i])")
DETACHED = FORWARD.format(received='receive(state, "activation", i, s).detach()', loss=LOSS)

MESSAGES = '''def message_tag(state, kind, microbatch, stage):
    schedule = state.schedule
    kind_index = 0 if kind == "activation" else 1
    return (kind_index * schedule.num_stages + stage) * schedule.num_microbatches + microbatch


def send(state, tensor, kind, microbatch, stage):
    destination = state.schedule.rank_of(stage)
    {send}


def receive(state, kind, microbatch, stage):
    sender = stage - 1 if kind == "activation" else stage + 1
    shape, dtype = state.boundary
    buffer = torch.empty(shape, dtype=dtype)
    {recv}
    return buffer
'''
TAGGED_RECV = ("dist.recv(buffer, state.schedule.rank_of(sender),\n"
               "              tag=message_tag(state, kind, microbatch, stage))")
BLOCKING_SEND = MESSAGES.format(
    send="dist.send(tensor.detach().contiguous(), destination,\n"
         "              tag=message_tag(state, kind, microbatch, stage))  # simple: it waits",
    recv=TAGGED_RECV)
UNTAGGED = MESSAGES.format(
    send="state.pending.append(dist.isend(tensor.detach().contiguous(), destination))",
    recv="dist.recv(buffer, state.schedule.rank_of(sender))  # the next message from there")

# Every microbatch's graph kept "just in case": retained, and never let go.
KEEPS_EVERY_GRAPH = '''def backward(state, i, s):
    last = state.schedule.num_stages - 1
    x, out = state.saved[(i, s)]        # keep it, in case it is needed again
    gradient = None if s == last else receive(state, "gradient", i, s)
    start = time.perf_counter()
    torch.autograd.backward(out, gradient, retain_graph=True)
    finish_action(state, f"{s}B{i}", start)
    if s > 0:
        send(state, x.grad, "gradient", i, s - 1)
'''

DELEGATES = '''from paralab import lowering as _lowering


def run_schedule(schedule, rank, stages, inputs, targets, boundary, costs=None):
    state = RankState(schedule, rank, stages, inputs, targets, boundary, costs)
    for step in _lowering.lower(schedule)[rank]:   # the library's program for this rank
        if step.kind == "F":
            forward(state, step.microbatch, step.stage)
        elif step.kind == "B":
            backward(state, step.microbatch, step.stage)
    for request in state.pending:
        request.wait()
    return {"losses": state.losses, "events": state.events}
'''

# An honest student who checks the schedule with the library before running it: validate
# and the simulator are always allowed.
SELF_CHECKING = '''from paralab import validate
from paralab.simulator import check_deadlock


def run_schedule(schedule, rank, stages, inputs, targets, boundary, costs=None):
    check_deadlock(validate(schedule))  # a clear error beats a hang
    state = RankState(schedule, rank, stages, inputs, targets, boundary, costs)
    run = {"F": forward, "B": backward}
    for op, microbatch, stage in schedule.orders[rank]:
        run[op](state, microbatch, stage)
    for request in state.pending:
        request.wait()
    return {"losses": state.losses, "events": state.events}
'''

RUNTIME = {"naive_p4", "grads_gpipe", "peaks_gpipe", "grads_1f1b", "order_1f1b", "peaks_1f1b",
           "grads_hidden", "order_hidden", "peaks_hidden", "own_implementation",
           "bubble_gpipe", "bubble_1f1b", "train_gpipe", "train_1f1b"}

MUTANTS = [
    Mutant("forwards_first", ASSIGNMENT, {"run": FORWARDS_FIRST},
           {"order_1f1b", "peaks_1f1b", "order_hidden", "peaks_hidden"},
           ["ran all forwards before any backward"]),
    # No gradient reaches the earlier stages, and their backwards no longer wait for one:
    # the timeline loses its drain too.
    Mutant("no_input_gradient", ASSIGNMENT, {"backward": NO_INPUT_GRADIENT},
           {"naive_p4", "grads_gpipe", "grads_1f1b", "grads_hidden", "own_implementation",
            "bubble_gpipe", "bubble_1f1b", "train_gpipe", "train_1f1b"},
           ["never sends the gradient of the stage", "less idle time than the dependencies"]),
    Mutant("no_loss_scaling", ASSIGNMENT, {"forward": NO_LOSS_SCALING},
           {"grads_gpipe", "grads_1f1b", "grads_hidden", "own_implementation", "train_gpipe",
            "train_1f1b"},
           ["must be divided by m"]),
    # The runtime crashes on every run with more than one stage.
    Mutant("detach_without_requires_grad", ASSIGNMENT, {"forward": DETACHED}, RUNTIME,
           ["detach() without requires_grad_()"]),
    # GPipe survives blocking sends; every 1F1B-like order deadlocks.
    Mutant("blocking_send", ASSIGNMENT, {"messages": BLOCKING_SEND},
           {"grads_1f1b", "order_1f1b", "peaks_1f1b", "grads_hidden", "order_hidden",
            "peaks_hidden", "bubble_1f1b", "train_1f1b"},
           ["a blocking send before the receive on both neighbours deadlocks",
            "the step did not finish: stopped after"]),
    Mutant("keeps_every_graph", ASSIGNMENT, {"backward": KEEPS_EVERY_GRAPH},
           {"peaks_1f1b", "peaks_hidden"}, ["every microbatch's graph stays alive"]),
    # Right on GPipe and 1F1B, whose messages arrive in the order they are received; wrong
    # on the hidden random order, whose messages do not.
    Mutant("untagged_messages", ASSIGNMENT, {"messages": UNTAGGED}, {"grads_hidden"},
           ["give every message a tag"]),
    # Right everywhere in the student's kernel; only the run without the library fails.
    Mutant("delegates_to_the_lowering", ASSIGNMENT, {"run": DELEGATES}, {"own_implementation"},
           ["must run the schedule itself"]),
    Mutant("checks_the_schedule_first", ASSIGNMENT, {"run": SELF_CHECKING}, set()),
]


def samples(root: str) -> list[Work]:
    """This assignment's notebooks of the sample class (besides the all-right one): one
    student per misconception of the source material's code lab."""
    good = solved(ASSIGNMENT, root)
    by_name = {m.name: m for m in MUTANTS}

    def student(name, about, mutant):
        return Work(name, about, apply(good, MUTANTS, mutant), r"^graded$",
                    by_name[mutant].fails)

    return [
        student("gus", "a runtime that runs every forward first (the sources' 1F1B)",
                "forwards_first"),
        student("hal", "blocking sends: 1F1B deadlocks, reported with the stuck ranks",
                "blocking_send"),
        student("ivy", "a received activation detached without requires_grad",
                "detach_without_requires_grad"),
        student("jon", "a backward that never sends the input gradient back",
                "no_input_gradient"),
        student("kim", "no 1/m scaling of the microbatch losses", "no_loss_scaling"),
        student("lea", "every microbatch's graph kept alive", "keeps_every_graph"),
    ]
