# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown] nbgrader={"grade": false, "grade_id": "intro", "locked": true, "schema_version": 3, "solution": false}
# # Homework 3 · A pipeline runtime of your own
#
# In homework 2 a schedule was a list; the library executed it. Here you write what
# executes it: the loop that every rank of a pipeline runs. A small classifier is cut into
# stages, one rank runs each stage (or, interleaved, several), and every rank walks through
# its list of actions: for a forward `F`, receive the activation from the previous stage,
# run its stage, send the output on; for a backward `B`, receive the gradient of its output
# from the next stage, backpropagate, and send the gradient of its input back. Your runtime
# must run *any* valid schedule, give exactly the gradients of one process, hold exactly the
# activations its schedule implies, and train.
#
# Lecture 03 covers everything here. Indices start at 0; an action is written
# `<stage><op><microbatch>` (`2F5`); rank `r` owns the stages `r, r+p, r+2p, ...`, so with
# at least 2 ranks two neighbouring stages always live on different ranks. How this
# notebook is graded:
#
# * Write your code in the cells marked `# YOUR CODE HERE`, then run the test cell below.
#   Each check prints one line: ✓ when the answer is right, ✗ with what is wrong with it
#   otherwise (naming the misconception when it is a known one). A test cell's points are
#   shared among its checks; hidden tests run other schedules when the notebook is graded.
# * The tests run your code on 2 or 4 processes (gloo, on the CPU) through
#   `paralab.launch`; a step still running 4 s after it started (a deadlock, usually) is
#   stopped and reported, naming the ranks that were waiting and where.
# * Do not use the library's executor: `paralab.pipeline`, `paralab.interpreter` and
#   `paralab.lowering` are what you write here. When the notebook is graded, your runtime
#   also runs once where they are not available.
# * Do not edit or delete the test cells: they are restored before grading anyway.
# * Restart the kernel and run all cells before you submit.

# %% nbgrader={"grade": false, "grade_id": "setup", "locked": true, "schema_version": 3, "solution": false}
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from autograder.checks import hw3_pipeline_runtime as checks
from paralab import launch, schedules
from paralab.models import Classifier
from paralab.schedules import Action, Schedule

MODEL = Classifier()   # 8 blocks of width 16; a batch of 64 points of 4 classes
LR = 0.1               # the learning rate of part D


@dataclass
class RankState:
    """What one rank knows and keeps during one training step of `schedule`."""

    schedule: Schedule
    rank: int
    stages: dict        # stage index -> module: the stages this rank owns
    inputs: list        # the m microbatches' inputs (stage 0 reads them)
    targets: list       # their class labels (the last stage's loss needs them)
    boundary: tuple     # (shape, dtype) of an activation or a gradient between two stages
    costs: tuple = None                            # synthetic (t_f, t_b) in seconds, or None
    saved: dict = field(default_factory=dict)      # (microbatch, stage) -> kept for backward
    pending: list = field(default_factory=list)    # requests of sends not yet completed
    losses: dict = field(default_factory=dict)     # microbatch -> its loss (last stage)
    events: list = field(default_factory=list)     # (action text, start, end) per action


def finish_action(state, action, start):
    """End the action `action` (its text, e.g. "2F5") whose computation started at `start`
    (`time.perf_counter()`, taken once its input had arrived): with synthetic costs, sleep
    until it has lasted its cost; then record its event.  Call it before sending results."""
    if state.costs is not None:
        cost = state.costs[0] if "F" in action else state.costs[1]
        time.sleep(max(0.0, start + cost - time.perf_counter()))
    state.events.append((action, start, time.perf_counter()))

# %% [markdown] nbgrader={"grade": false, "grade_id": "part_a", "locked": true, "schema_version": 3, "solution": false}
# ## Part A · Cut the model into stages
#
# `MODEL.build_model()` returns the classifier as an `nn.Sequential` of blocks: residual
# blocks $x + \tanh(W x + b)$ of width 16, then the head that maps to the 4 class scores.
#
# **A1.** Write `split_model(model, num_stages)`: a list of `num_stages` modules, stage $s$
# made of the consecutive blocks $s k, \dots, (s+1) k - 1$ with $k$ = blocks / stages (the
# number of stages divides the number of blocks). Use the model's own blocks: every rank
# builds the same model and keeps its stages, so that the pipeline starts from exactly the
# weights of one process.

# %% nbgrader={"grade": false, "grade_id": "a", "locked": false, "schema_version": 3, "solution": true}
def split_model(model, num_stages):
    ### BEGIN SOLUTION
    blocks = list(model)
    k = len(blocks) // num_stages
    return [nn.Sequential(*blocks[s * k:(s + 1) * k]) for s in range(num_stages)]
    ### END SOLUTION


print(split_model(MODEL.build_model(), 4)[0])

# %% nbgrader={"grade": true, "grade_id": "test_split", "locked": true, "points": 2, "schema_version": 3, "solution": false}
checks.check("split_p4", lambda: checks.describe_split(split_model, MODEL.blocks, 4))

# %% nbgrader={"grade": true, "grade_id": "test_split_hidden", "locked": true, "points": 1, "schema_version": 3, "solution": false}
# Other numbers of blocks and stages.
### BEGIN HIDDEN TESTS
checks.check("split_hidden", lambda: [checks.describe_split(split_model, blocks, stages)
                                      for blocks, stages in checks.HIDDEN_SPLITS])
### END HIDDEN TESTS

# %% [markdown] nbgrader={"grade": false, "grade_id": "part_b", "locked": true, "schema_version": 3, "solution": false}
# ## Part B · One action on one rank
#
# A rank keeps what it knows in a `RankState` (defined at the top). Write its three ways of
# talking to its neighbours, then its forward and its backward.
#
# **B1. Messages.** A message carries the `"activation"` or the `"gradient"` of one
# microbatch *for* one stage, the stage that consumes it: the activation of microbatch 3
# that stage 1 computes is the activation *for* stage 2; the gradient that stage 2 computes
# for its input is the gradient *for* stage 1.
#
# * `message_tag(state, kind, microbatch, stage)`: the tag that names it,
#   $(k S + \text{stage})\, m + \text{microbatch}$ with $k = 0$ for an activation, 1 for a
#   gradient, $S$ stages and $m$ microbatches. gloo pairs a receive with a message of the
#   same source *and tag*, so distinct tags let a rank receive its messages in any order.
# * `send(state, tensor, kind, microbatch, stage)`: send it to the rank that owns `stage`,
#   **without blocking** (`dist.isend`); keep the request in `state.pending`.
# * `receive(state, kind, microbatch, stage)`: wait for it (`dist.recv` into a new tensor
#   of the boundary's shape and dtype) and return it.

# %% nbgrader={"grade": false, "grade_id": "messages", "locked": false, "schema_version": 3, "solution": true}
def message_tag(state, kind, microbatch, stage):
    ### BEGIN SOLUTION
    schedule = state.schedule
    kind_index = 0 if kind == "activation" else 1
    return (kind_index * schedule.num_stages + stage) * schedule.num_microbatches + microbatch
    ### END SOLUTION


def send(state, tensor, kind, microbatch, stage):
    ### BEGIN SOLUTION
    destination = state.schedule.rank_of(stage)
    tag = message_tag(state, kind, microbatch, stage)
    state.pending.append(dist.isend(tensor.detach().contiguous(), destination, tag=tag))
    ### END SOLUTION


def receive(state, kind, microbatch, stage):
    ### BEGIN SOLUTION
    sender = stage - 1 if kind == "activation" else stage + 1
    shape, dtype = state.boundary
    buffer = torch.empty(shape, dtype=dtype)
    dist.recv(buffer, state.schedule.rank_of(sender),
              tag=message_tag(state, kind, microbatch, stage))
    return buffer
    ### END SOLUTION

# %% [markdown] nbgrader={"grade": false, "grade_id": "b2_text", "locked": true, "schema_version": 3, "solution": false}
# **B2. Forward.** `forward(state, i, s)` runs `F(i, s)`: its input is `state.inputs[i]` on
# stage 0, else the activation received from stage $s-1$ -- which must require a gradient,
# since its gradient is what this stage's backward sends back. Run the stage on it. On the
# last stage, the output is the class scores: the microbatch's loss is
# `F.cross_entropy(scores, state.targets[i])` divided by $m$ (the $m$ losses then add up to
# the batch's mean loss, and their gradients to its gradient); store its value in
# `state.losses[i]`. Keep in `state.saved` exactly what the backward will need, call
# `finish_action(state, f"{s}F{i}", start)` with `start = time.perf_counter()` taken once
# the input is there, and only then send the output to stage $s+1$ (unless $s$ is last).
#
# **B3. Backward.** `backward(state, i, s)` runs `B(i, s)`: take (and remove) what forward
# saved; backpropagate from the loss on the last stage, else from the gradient received
# from stage $s+1$ (`torch.autograd.backward(output, gradient)`); the parameters'
# gradients accumulate in their `.grad`. Finish the action, then send the gradient of the
# stage's input to stage $s-1$ (unless $s = 0$). Nothing of microbatch $i$ on stage $s$
# may stay alive afterwards: the tests measure how long autograd keeps what it saved.

# %% nbgrader={"grade": false, "grade_id": "forward", "locked": false, "schema_version": 3, "solution": true}
def forward(state, i, s):
    ### BEGIN SOLUTION
    last = state.schedule.num_stages - 1
    if s == 0:
        x = state.inputs[i]
    else:
        x = receive(state, "activation", i, s).requires_grad_()
    start = time.perf_counter()
    out = state.stages[s](x)
    if s == last:
        out = F.cross_entropy(out, state.targets[i]) / state.schedule.num_microbatches
        state.losses[i] = out.item()
    state.saved[(i, s)] = (x, out)
    finish_action(state, f"{s}F{i}", start)
    if s < last:
        send(state, out, "activation", i, s + 1)
    ### END SOLUTION

# %% nbgrader={"grade": false, "grade_id": "backward", "locked": false, "schema_version": 3, "solution": true}
def backward(state, i, s):
    ### BEGIN SOLUTION
    last = state.schedule.num_stages - 1
    x, out = state.saved.pop((i, s))
    gradient = None if s == last else receive(state, "gradient", i, s)
    start = time.perf_counter()
    torch.autograd.backward(out, gradient)
    finish_action(state, f"{s}B{i}", start)
    if s > 0:
        send(state, x.grad, "gradient", i, s - 1)
    ### END SOLUTION

# %% [markdown] nbgrader={"grade": false, "grade_id": "part_c", "locked": true, "schema_version": 3, "solution": false}
# ## Part C · Run any schedule
#
# **C1.** `run_schedule(schedule, rank, stages, inputs, targets, boundary, costs=None)` runs
# one training step of `schedule` on rank `rank` (the tests call it on every rank of a
# world, each with its own `stages`): every action of the rank's list, in its order, then
# wait until every send has completed. It returns
# `{"losses": state.losses, "events": state.events}`.

# %% nbgrader={"grade": false, "grade_id": "run", "locked": false, "schema_version": 3, "solution": true}
def run_schedule(schedule, rank, stages, inputs, targets, boundary, costs=None):
    state = RankState(schedule, rank, stages, inputs, targets, boundary, costs)
    ### BEGIN SOLUTION
    for action in schedule.orders[rank]:
        if action.op == "F":
            forward(state, action.microbatch, action.stage)
        elif action.op == "B":
            backward(state, action.microbatch, action.stage)
        else:
            raise ValueError(f"{action}: this runtime runs F and B actions only")
    for request in state.pending:
        request.wait()
    ### END SOLUTION
    return {"losses": state.losses, "events": state.events}

# %% [markdown] nbgrader={"grade": false, "grade_id": "c_tests_text", "locked": true, "schema_version": 3, "solution": false}
# The tests run your runtime on 4 processes (a few seconds each). First the naive pipeline,
# one microbatch crossing all 4 stages forward and back: every stage's gradients must equal
# one process's. Then GPipe and 1F1B with 8 microbatches: the gradients again, the order
# in which each rank ran its actions (from your events), and how many microbatches'
# activations each rank held at once -- measured by how long autograd kept the tensors it
# saved, so GPipe holds $m$ on every rank and 1F1B $\min(m, p - r)$ on rank $r$. Hidden
# tests run schedules you have not seen.

# %% nbgrader={"grade": true, "grade_id": "test_naive", "locked": true, "points": 3, "schema_version": 3, "solution": false}
checks.check("naive_p4", checks.run_case("naive", lambda: run_schedule))

# %% nbgrader={"grade": true, "grade_id": "test_gpipe", "locked": true, "points": 3, "schema_version": 3, "solution": false}
gpipe_run = checks.run_case("gpipe", lambda: run_schedule)
checks.check("grads_gpipe", gpipe_run)
checks.check("peaks_gpipe", gpipe_run)

# %% nbgrader={"grade": true, "grade_id": "test_1f1b", "locked": true, "points": 4, "schema_version": 3, "solution": false}
one_f_one_b_run = checks.run_case("1f1b", lambda: run_schedule)
checks.check("grads_1f1b", one_f_one_b_run)
checks.check("order_1f1b", one_f_one_b_run)
checks.check("peaks_1f1b", one_f_one_b_run)

# %% nbgrader={"grade": true, "grade_id": "test_hidden", "locked": true, "points": 5, "schema_version": 3, "solution": false}
# Schedules you have not seen, on another model; and your runtime once more in a fresh
# process where the library's executor, interpreter and lowering are not available.
### BEGIN HIDDEN TESTS
hidden_run = checks.run_case(checks.HIDDEN_CASES, lambda: run_schedule)
checks.check("grads_hidden", hidden_run)
checks.check("order_hidden", hidden_run)
checks.check("peaks_hidden", hidden_run)
### END HIDDEN TESTS

# %% [markdown] nbgrader={"grade": false, "grade_id": "part_d_text", "locked": true, "schema_version": 3, "solution": false}
# ## Part D · Time and train
#
# **D1.** With synthetic costs every forward lasts 20 ms and every backward 40 ms (your
# `finish_action` calls make them), so the bubble shows as it would on real devices. The
# test runs GPipe and 1F1B with $p = 4$, $m = 4$ and builds a timeline from your events:
# its bubble fraction (the idle share of the step) is compared with the simulator's for the
# same costs. It may not be smaller by more than 0.05 (the dependencies force that idle
# time) nor larger by more than 0.15 (each message and each process waking up adds a
# little). Nothing to write if your runtime waits exactly where the dependencies say, and
# nowhere else.

# %% nbgrader={"grade": true, "grade_id": "test_bubble", "locked": true, "points": 3, "schema_version": 3, "solution": false}
checks.check("bubble_gpipe", checks.run_case("gpipe_timed", lambda: run_schedule))
checks.check("bubble_1f1b", checks.run_case("1f1b_timed", lambda: run_schedule))

# %% [markdown] nbgrader={"grade": false, "grade_id": "d2_text", "locked": true, "schema_version": 3, "solution": false}
# **D2.** Train. Write `train(rank, world_size, schedule, steps)`, the function every rank of
# a world runs: build `MODEL`'s model, cut it with your `split_model` into
# `schedule.num_stages` stages, keep this rank's, and run `steps` steps of SGD with learning
# rate `LR` on `MODEL.microbatches(m)` (the same batch every step): zero the gradients,
# run the schedule, update. Return the list of the steps' losses (each the sum of the
# microbatches' losses: what the rank that owns the last stage has; the others may return
# anything). The test trains 5 steps with GPipe and with 1F1B; the curve must equal one
# process's, and it falls well below chance ($\log 4 \approx 1.39$).

# %% nbgrader={"grade": false, "grade_id": "train", "locked": false, "schema_version": 3, "solution": true}
def train(rank, world_size, schedule, steps):
    ### BEGIN SOLUTION
    m = schedule.num_microbatches
    stages = split_model(MODEL.build_model(), schedule.num_stages)
    mine = {s: stages[s] for s in schedule.stages_of(rank)}
    optimizer = torch.optim.SGD([q for stage in mine.values() for q in stage.parameters()],
                                lr=LR)
    inputs, targets = MODEL.microbatches(m)
    curve = []
    for _ in range(steps):
        optimizer.zero_grad()
        result = run_schedule(schedule, rank, mine, inputs, targets, MODEL.boundary(m))
        optimizer.step()
        curve.append(sum(result["losses"].values()))
    return curve
    ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "test_train", "locked": true, "points": 4, "schema_version": 3, "solution": false}
training = checks.run_training(lambda: train)
checks.check("train_gpipe", training)
checks.check("train_1f1b", training)
