"""Checks of hw3_pipeline_runtime: a pipeline runtime of the student's own, on real processes.

The student writes the per-rank loop (receive, compute, send; keep what backward needs and
free it; non-blocking sends) that :mod:`paralab.interpreter` implements for the library.  A
test cell runs it through :func:`run_case`: a world of ranks (gloo), each of which builds the
model (:class:`paralab.models.Classifier`), keeps its own stages, and calls the student's
``run_schedule`` while :class:`paralab.activations.HeldActivations` watches how long
autograd really holds each forward's saved tensors.  What comes back is plain data --
losses, every gradient, the events the runtime measured, the peak number of forwards held,
which stages received an input that did not require a gradient, and how a failed run ended
(the rank that raised and its line, or the ranks still waiting at the time limit and where)
-- and the checks below compare it, in the clean process, with one process
(:meth:`Classifier.reference_step`, :meth:`Classifier.reference_training`) and with the
simulator.  When an answer is a known misconception, the feedback names it.

Keep the module's imports light: every rank of a test imports it (no SymPy here).
"""

from __future__ import annotations

import math
import random
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch

from autograder.checks import Probe, Raised, Verdict, _student_frame, handles_raised, make_checker
from paralab import rules
from paralab.models import Classifier
from paralab.schedules import Action, Schedule, gpipe, interleaved_one_f_one_b, one_f_one_b

# -- what the tests run -------------------------------------------------------------------------
MODEL = Classifier()                  # the notebook's model: 8 blocks, width 16, batch 64
HIDDEN_MODEL = Classifier(width=12, batch=48, seed=7)
STEPS, LR = 5, 0.1                    # the training of part D
SYNTHETIC = (0.02, 0.04)              # t_f, t_b in seconds of each action, for the timed runs
# The measured bubble fraction may exceed the simulator's by BUBBLE_ABOVE (every message
# and every wake-up of a process adds a little idle time, more on a loaded machine) and fall
# short of it by BUBBLE_BELOW only (the dependencies force that idle time: less means some
# action did not wait for what it needs).
BUBBLE_ABOVE, BUBBLE_BELOW = 0.15, 0.05
# A rank that has not finished a case STALL_LIMIT seconds (plus the case's synthetic step
# time) after every rank was ready is stuck: it reports where and stops, so a deadlock ends
# in seconds.  The clock starts after start-up (imports are slow on a loaded machine), so
# the limit only has to cover the step itself, which takes well under a second.
STALL_LIMIT = 4.0
WORLD_TIMEOUT = 60.0                  # the world as a whole: start-up included
RANDOM_SEED = 4                       # of the hidden random schedule (see random_schedule)


def random_schedule(p: int, chunks: int, m: int, seed: int) -> Schedule:
    """A valid schedule in a random order: list every action in some order that respects
    the dependencies (:func:`paralab.rules.needs`), picking at random among the actions
    whose needs are done; each rank runs its own actions in that order.  It cannot
    deadlock: the whole list is one way to execute it."""
    rng = random.Random(seed)
    stages = p * chunks
    remaining = [Action(op, i, s) for op in "FB" for s in range(stages) for i in range(m)]
    done: set = set()
    orders: list[list[Action]] = [[] for _ in range(p)]
    while remaining:
        ready = [a for a in remaining
                 if all(n.action in done for n in rules.needs(a, stages))]
        action = rng.choice(ready)
        remaining.remove(action)
        done.add(action)
        orders[action.stage % p].append(action)
    return Schedule(tuple(map(tuple, orders)), m, stages, name="random")


@dataclass(frozen=True)
class Case:
    """One schedule run by the student's runtime, on ``model``'s data, for one step."""

    schedule: Schedule
    model: Classifier = MODEL
    costs: tuple | None = None


CASES = {
    "naive": Case(gpipe(4, 1)),
    "gpipe": Case(gpipe(4, 8)),
    "1f1b": Case(one_f_one_b(4, 8)),
    "gpipe_timed": Case(gpipe(4, 4), costs=SYNTHETIC),
    "1f1b_timed": Case(one_f_one_b(4, 4), costs=SYNTHETIC),
    "interleaved": Case(interleaved_one_f_one_b(4, 8, 2), HIDDEN_MODEL),
    "random": Case(random_schedule(4, 2, 4, RANDOM_SEED), HIDDEN_MODEL),
    "probe": Case(gpipe(2, 2), Classifier(blocks=4, batch=16)),
}
HIDDEN_CASES = ("interleaved", "random")
TRAINING = {"gpipe": gpipe(4, 8), "1f1b": one_f_one_b(4, 8)}

# Part A: (blocks, stages) of the hidden split tests.
HIDDEN_SPLITS = [(8, 2), (8, 8), (6, 3), (4, 1), (12, 4)]


# ---------------------------------------------------------------------------------------------
# Running the student's code (in the notebook's kernel and its ranks)
# ---------------------------------------------------------------------------------------------
def describe_split(split_model: Callable, blocks: int, num_stages: int) -> dict:
    """Which blocks of a ``blocks``-block model each stage of ``split_model(model,
    num_stages)`` holds (identified by their weights, so copies count as the blocks they
    copy), and how far the stages run one after another are from the whole model."""
    model = Classifier(blocks=blocks).build_model()
    stages = split_model(model, num_stages)
    stages = list(stages)
    owners = [(q.detach(), k) for k, block in enumerate(model) for q in block.parameters()]
    held = []
    for stage in stages:
        found = []
        for q in stage.parameters():
            k = next((k for w, k in owners if w.shape == q.shape and torch.equal(w, q.detach())),
                     None)
            if k not in found:
                found.append(k)
        held.append(found)
    x, _ = Classifier(blocks=blocks).data()
    with torch.no_grad():
        out = x
        for stage in stages:
            out = stage(out)
        error = float((out - model(x)).abs().max()) if out.shape == model(x).shape else None
    return {"stages": held, "error": error}


def run_case(names: str | tuple, get_run_schedule: Callable) -> dict:
    """Run the student's ``run_schedule`` (returned by ``get_run_schedule()``) on the cases
    ``names`` (one world; every case has the same number of ranks).  Never raises: a run
    that fails comes back as data saying how."""
    names = (names,) if isinstance(names, str) else tuple(names)
    from paralab import launch
    try:
        fn = get_run_schedule()
    except Exception as e:  # noqa: BLE001 - e.g. run_schedule not defined
        return {"cases": list(names), "failed": f"{type(e).__name__}: {e}"[:300]}
    cases = [CASES[n] for n in names]
    world = cases[0].schedule.num_ranks
    return _launch(launch, names, rank_worker, world, fn, cases)


def run_training(get_train: Callable) -> dict:
    """Run the student's ``train(rank, world_size, schedule, steps)`` (returned by
    ``get_train()``) with each schedule of ``TRAINING`` in turn, in one world.  A loss
    curve is what the rank owning the last stage returns; each is kept as soon as it is
    there, so that a schedule that fails does not take the others' curves with it."""
    from paralab import launch
    try:
        train = get_train()
    except Exception as e:  # noqa: BLE001
        return {"cases": list(TRAINING), "failed": f"{type(e).__name__}: {e}"[:300]}
    world = next(iter(TRAINING.values())).num_ranks
    out = _launch(launch, tuple(TRAINING), train_worker, world, train, STEPS)
    out["curves"] = out.pop("curves", {})
    for rank in out.pop("ranks", None) or []:
        out["curves"].update(rank)
    return out


def _launch(launch, names, fn, world: int, *args) -> dict:
    record: dict = {"cases": list(names)}
    try:
        record["ranks"] = launch.run(fn, world, *args, backend="gloo", timeout=WORLD_TIMEOUT,
                                     echo=False)
    except launch.WorkerError as e:
        import json
        stuck = {}
        for rank, text in sorted(e.outputs.items()):
            for line in text.splitlines():
                if line.startswith(_STUCK):
                    stuck[rank] = line[len(_STUCK):]
                elif line.startswith(_TRAINED):
                    name, curve = json.loads(line[len(_TRAINED):])
                    record.setdefault("curves", {})[name] = curve
        if stuck:
            record["timeout"] = STALL_LIMIT
            record["stuck"] = stuck
        elif isinstance(e, launch.WorkerTimeout):
            from paralab.launch import diagnosis
            record["timeout"] = WORLD_TIMEOUT
            record["stuck"] = {r: diagnosis.where(e.stacks.get(r, "")) for r in e.ranks}
        else:
            first = str(e).split("\n")[0]
            record["failed"] = (first + _culprit_line(e.tracebacks.get(e.rank, "")))[:2000]
    return record


def _culprit_line(text: str) -> str:
    """`` (in f, line N: code)`` for the innermost frame of a traceback that is the
    student's (not the library's, torch's or the tests'), or ''."""
    lines = text.splitlines()
    for k in range(len(lines) - 1, -1, -1):
        line = lines[k].strip()
        if line.startswith('File "') and not any(
                part in line for part in ("site-packages", "/paralab/", "/autograder/",
                                          "/lib/python")):
            name = line.rsplit(" in ", 1)[-1]
            number = line.split(", line ")[-1].split(",")[0]
            code = lines[k + 1].strip() if k + 1 < len(lines) else ""
            return f" (in {name}, line {number}: {code[:80]})"
    return ""


_STUCK = "hw3 stuck at: "
_TRAINED = "hw3 trained: "


class _Watchdog:
    """Stop this rank if the main thread is still in the block after ``limit`` seconds:
    print where it is (a line the parent looks for) and exit, so that a deadlock ends in
    seconds with the stuck ranks named, whatever the launcher's timeout."""

    def __init__(self, limit: float):
        import threading
        self.limit, self.done = limit, threading.Event()
        self.main = threading.get_ident()
        self.thread = threading.Thread(target=self._watch, daemon=True, name="hw3-watchdog")

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()

    def _watch(self):
        import os
        import sys
        if self.done.wait(self.limit):
            return
        frame = sys._current_frames().get(self.main)
        print(_STUCK + _where(frame), flush=True)
        os._exit(3)


def _where(frame) -> str:
    """``File "...", line N in f -> send (torch/...)``: the innermost frame of the student's
    code, and the innermost frame of all, as the launcher's hang reports write them."""
    import linecache
    import os
    stack = traceback.extract_stack(frame)[::-1] if frame is not None else []
    if not stack:
        return "(no stack)"
    here = os.path.dirname(os.path.abspath(__file__))

    def own(f) -> bool:
        name = os.path.abspath(f.filename)
        return not (name.startswith(here) or "site-packages" in name or
                    os.sep + "paralab" + os.sep in name or name.startswith(os.path.dirname(
                        os.__file__)) or f.filename.startswith("<frozen"))
    user = next((f for f in stack if own(f)), None)
    inner = stack[0]
    if user is None:
        return f'File "{inner.filename}", line {inner.lineno} in {inner.name}'
    text = f'File "{user.filename}", line {user.lineno} in {user.name}'
    if inner is not user:
        short = inner.filename.split("site-packages" + os.sep)[-1]
        text += f" -> {inner.name} ({short})"
    source = linecache.getline(user.filename, user.lineno).strip()
    return text + (f": {source}" if source else "")


def rank_worker(rank: int, world_size: int, run_schedule: Callable, cases: list) -> list:
    """One rank of a test: each case in turn, until one fails on this rank."""
    from paralab.activations import HeldActivations
    import torch.distributed as dist

    _warm_up()
    results = []
    for case in cases:
        schedule, model = case.schedule, case.model
        m = schedule.num_microbatches
        built = model.build(schedule.num_stages)
        stages = {s: built[s] for s in schedule.stages_of(rank)}
        inputs, targets = model.microbatches(m)
        meter = HeldActivations(stages)
        limit = STALL_LIMIT + (2 * _synthetic_time(case) if case.costs else 0.0)
        dist.barrier()  # start together: the events of all ranks share one clock
        try:
            with _Watchdog(limit), meter:
                result = run_schedule(schedule, rank, stages, inputs, targets,
                                      model.boundary(m), case.costs)
            record = _read_result(result)
        except Exception as e:  # noqa: BLE001 - the student's code failed: that is the answer
            record = {"error": {"type": type(e).__name__, "time": time.time(),
                                "message": str(e)[:300] + _student_frame(e.__traceback__)}}
        record["peak"] = meter.peak
        record["no_grad_inputs"] = sorted({s for s, needs in meter.forwards
                                          if not needs and s > 0})
        record["grads"] = {f"stage{s}.{name}": None if q.grad is None else q.grad.detach().clone()
                           for s, stage in stages.items() for name, q in stage.named_parameters()}
        results.append(record)
        if "error" in record:
            break  # the other ranks now fail too, as they wait for this one
    return results


def _synthetic_time(case: Case) -> float:
    from paralab.simulator import simulate
    t_f, t_b = (c * case.schedule.chunks for c in case.costs)
    return float(simulate(case.schedule, t_f, t_b).makespan)


def train_worker(rank: int, world_size: int, train: Callable, steps: int) -> dict:
    """One rank of the training test: the student's ``train`` with each schedule of
    ``TRAINING``, watched like a case.  The rank that owns the last stage prints each curve
    as soon as it has it, for the parent to find if a later schedule fails."""
    import json
    _warm_up()
    # Building the first optimizer imports torch._dynamo (seconds on a loaded machine):
    # before the watchdog starts, not inside the student's time.
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)
    curves = {}
    for name, schedule in TRAINING.items():
        with _Watchdog(STALL_LIMIT + steps * 0.5):
            curve = train(rank, world_size, schedule, steps)
        if rank == schedule.rank_of(schedule.num_stages - 1):
            curves[name] = curve
            try:
                print(_TRAINED + json.dumps([name, [float(x) for x in curve]]), flush=True)
            except (TypeError, ValueError):
                pass  # not a list of numbers: the check says so
    return curves


def _warm_up() -> None:
    """The first backward with an explicit gradient imports SymPy (torch's shape guards):
    do it before the clocks start, not inside the first timed action."""
    x = torch.ones(1, requires_grad=True)
    torch.autograd.backward(x * 2, torch.ones(1))


def _read_result(result: Any) -> dict:
    problem = ("run_schedule must return {'losses': {microbatch: loss}, 'events': [(action "
               "text, start, end), ...]}")
    if not isinstance(result, dict) or not {"losses", "events"} <= set(result):
        return {"error": {"type": "BadResult", "time": time.time(), "message": problem}}
    try:
        losses = {int(i): float(v) for i, v in dict(result["losses"]).items()}
        events = [(str(a), float(start), float(end)) for a, start, end in result["events"]]
    except Exception as e:  # noqa: BLE001
        return {"error": {"type": "BadResult", "time": time.time(),
                          "message": f"{problem} ({type(e).__name__}: {e})"[:400]}}
    return {"losses": losses, "events": events}


# ---------------------------------------------------------------------------------------------
# Checking what came back (in the clean process)
# ---------------------------------------------------------------------------------------------
_VICTIM = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")

DETACH = ("the received activation does not require a gradient (detach() without "
          "requires_grad_()): autograd then stops at the stage's input, x.grad stays None "
          "and there is nothing to send back to the previous stage; mark the received "
          "tensor with requires_grad_() before the stage runs on it")
BLOCKING = ("a blocking send before the receive on both neighbours deadlocks: under 1F1B "
            "rank r sends an activation forward while rank r+1 sends a gradient back, and "
            "dist.send waits until the other side receives, which it never does since it is "
            "sending too; send with dist.isend, keep the requests and wait for them at the "
            "end of the step")
NO_INPUT_GRADIENT = ("the backward never sends the gradient of the stage's input back, so "
                     "the earlier stages receive nothing to backpropagate (autograd does "
                     "not cross processes); after backward, send x.grad to the previous "
                     "stage, which runs its own backward from it")
NO_SCALING = ("every gradient is m = {m} times one process's: the loss of each microbatch "
              "must be divided by m, so that the m accumulated gradients add up to the "
              "gradient of the batch's mean loss")
KEPT_GRAPHS = ("every microbatch's graph stays alive until the end of the step -- GPipe's "
               "memory under a schedule that should free them: after a stage's backward, "
               "drop every reference to that microbatch's input and output (pop what "
               "forward saved) and do not pass retain_graph=True")
FORWARDS_FIRST = ("this runtime ran all forwards before any backward: that is GPipe's order, "
                  "not the schedule's (the source material's so-called 1F1B does exactly "
                  "this); run each rank's actions in the order the schedule lists them")


def _case_results(value: Any, name: str) -> tuple[Verdict | None, list]:
    """The per-rank results of case ``name`` in a recorded run, or the verdict that says
    why there are none."""
    if not isinstance(value, dict) or name not in value.get("cases", []):
        return Verdict(False, "the run could not be recorded"), []
    if "failed" in value:
        return Verdict(False, f"the run failed: {value['failed']}"), []
    if "timeout" in value:
        stuck = value.get("stuck") or {}
        places: dict = {}
        for r, w in sorted(stuck.items()):
            places.setdefault(w, []).append(str(r))
        lines = "; ".join(f"{'ranks' if len(rs) > 1 else 'rank'} {', '.join(rs)} at {w}"
                          for w, rs in places.items())
        head = (f"the step did not finish: stopped after {value['timeout']:g} s while "
                f"waiting: {lines}")
        if any("-> send (" in w for w in stuck.values()):
            return Verdict(False, f"{head}. Deadlock: {BLOCKING}"), []
        return Verdict(False, f"{head}. A receive that no send matches never returns: every "
                              f"message must be sent, to the rank that owns the consuming "
                              f"stage, with the tag the receiver waits for"), []
    index = value["cases"].index(name)
    ranks = value.get("ranks")
    if not isinstance(ranks, list) or not all(isinstance(r, list) for r in ranks):
        return Verdict(False, "the run could not be recorded"), []
    per_rank = [r[index] if index < len(r) else None for r in ranks]
    if any(r is None for r in per_rank) or any("error" in r for r in per_rank):
        return _error_verdict(ranks), []
    return None, per_rank


def _error_verdict(ranks: list) -> Verdict:
    records = [r for rank in ranks for r in rank]
    if any(r.get("no_grad_inputs") for r in records):
        return Verdict(False, f"the runtime failed: {DETACH}")
    errors = sorted(((r["error"].get("time", 0), rank, r["error"]) for rank, results
                     in enumerate(ranks) for r in results if "error" in r),
                    key=lambda e: e[:2])
    own = [e for e in errors if not any(v in e[2].get("message", "") for v in _VICTIM)]
    if not own and not errors:
        return Verdict(False, "a rank stopped before running this case")
    _, rank, error = (own or errors)[0]
    if error.get("type") == "ReferenceUnavailable":
        return Verdict(False, f"rank {rank}: run_schedule must run the schedule itself, not "
                              f"through the library's executor or lowering "
                              f"({error.get('message', '')})")
    return Verdict(False, f"rank {rank} raised {error.get('type')}: {error.get('message')}")


def _reference(case: Case):
    losses, grads = case.model.reference_step(case.schedule.num_stages,
                                              case.schedule.num_microbatches)
    return dict(enumerate(losses)), grads


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a.double(), b.double(), rtol=1e-7, atol=1e-10)


def grads_check(*names: str) -> Callable[[Any], Verdict]:
    """Every gradient and loss of the cases ``names`` equals one process's."""
    def check(value: Any) -> Verdict:
        for name in names:
            verdict = _grads_verdict(value, name)
            if not verdict.passed:
                return verdict if len(names) == 1 else \
                    Verdict(False, f"{_what(name)}: {verdict.message}")
        return Verdict(True, "the losses and every stage's gradients equal one process's"
                       + ("" if len(names) == 1 else f" on all {len(names)} schedules"))
    return check


def _what(name: str) -> str:
    s = CASES[name].schedule
    return f"{s.name} (p={s.num_ranks}, {s.num_stages} stages, m={s.num_microbatches})"


def _grads_verdict(value: Any, name: str) -> Verdict:
    failed, per_rank = _case_results(value, name)
    if failed:
        return failed
    case = CASES[name]
    m = case.schedule.num_microbatches
    if any(r.get("no_grad_inputs") for r in per_rank):
        stages = sorted({s for r in per_rank for s in r["no_grad_inputs"]})
        return Verdict(False, f"stages {stages}: {DETACH}")
    losses, grads = {}, {}
    for r in per_rank:
        losses.update(r.get("losses") or {})
        grads.update(r.get("grads") or {})
    want_losses, want_grads = _reference(case)
    missing = sorted({int(k.split(".")[0][5:]) for k, g in want_grads.items()
                      if grads.get(k) is None or not bool(grads[k].abs().max() > 0)})
    if missing:
        return Verdict(False, f"stages {missing} got no gradient: {NO_INPUT_GRADIENT}")
    if set(grads) != set(want_grads):
        return Verdict(False, "the stages' parameters are not the model's")
    if all(_close(grads[k], m * want_grads[k]) for k in want_grads) and m > 1:
        return Verdict(False, NO_SCALING.format(m=m))
    wrong = [k for k in want_grads if not _close(grads[k], want_grads[k])]
    if wrong:
        k = wrong[0]
        diff = float((grads[k].double() - want_grads[k].double()).abs().max())
        message = (f"the gradients of {len(wrong)} parameters differ from one process's (e.g. "
                   f"{k} by {diff:.3g})")
        if _messages_reordered(case.schedule):
            message += (": in this schedule some rank receives its messages in another order "
                        "than its neighbour sends them, and gloo pairs a receive with the "
                        "first message of the same source and tag -- give every message a tag "
                        "that names its kind, microbatch and stage, so that each receive gets "
                        "its own message")
        return Verdict(False, message)
    if sorted(losses) != sorted(want_losses):
        return Verdict(False, f"losses must be reported for microbatches 0..{m - 1} by the "
                              f"rank that owns the last stage, got {sorted(losses)}")
    if all(math.isclose(losses[i], m * want_losses[i], rel_tol=1e-7) for i in want_losses) \
            and m > 1:
        return Verdict(False, NO_SCALING.format(m=m))
    if not all(math.isclose(losses[i], want_losses[i], rel_tol=1e-7, abs_tol=1e-12)
               for i in want_losses):
        return Verdict(False, "the reported losses differ from one process's (report each "
                              "microbatch's loss as it is backpropagated, divided by m)")
    return Verdict(True, "correct")


def _messages_reordered(schedule: Schedule) -> bool:
    from paralab import lowering
    return any(sent != received for sent, received
               in lowering.message_orders(lowering.lower(schedule)).values())


def _executed(per_rank: list) -> list[list[str]]:
    return [[a for a, start, _ in sorted(r["events"], key=lambda e: e[1])] for r in per_rank]


def order_check(*names: str) -> Callable[[Any], Verdict]:
    """Each rank ran its actions in the schedule's order (its events, by start time)."""
    def check(value: Any) -> Verdict:
        for name in names:
            failed, per_rank = _case_results(value, name)
            if failed:
                return failed
            schedule = CASES[name].schedule
            executed = _executed(per_rank)
            want = schedule.to_strings()
            if executed == want:
                continue
            forwards_first = [[a for a in row if "F" in a] + [a for a in row if "B" in a]
                              for row in want]
            prefix = "" if len(names) == 1 else f"{_what(name)}: "
            reveal = name not in HIDDEN_CASES  # a hidden test does not show its schedule
            if executed == forwards_first:
                return Verdict(False, prefix + FORWARDS_FIRST)
            for r, (got, expected) in enumerate(zip(executed, want)):
                if got != expected:
                    if sorted(got) != sorted(expected):
                        return Verdict(False, f"{prefix}rank {r} recorded the events "
                                              f"{sorted(set(got) ^ set(expected))[:6]} that "
                                              f"are not (or not only) its actions: record "
                                              f"one event per action, named like '2F5'")
                    k = next(k for k, (a, b) in enumerate(zip(got, expected)) if a != b)
                    listed = f"where the schedule lists {expected[k]}" if reveal else \
                        "which is not the schedule's"
                    return Verdict(False, f"{prefix}rank {r} ran {got[k]} as its action {k}, "
                                          f"{listed}: run the actions in the schedule's order")
        return Verdict(True, "every rank ran its actions in the schedule's order")
    return check


def peaks_check(*names: str) -> Callable[[Any], Verdict]:
    """The forwards held at once on each rank, measured by their saved tensors' lifetimes,
    are what the schedule implies (the simulator's peak activations)."""
    from paralab.simulator import simulate

    def check(value: Any) -> Verdict:
        for name in names:
            failed, per_rank = _case_results(value, name)
            if failed:
                return failed
            schedule = CASES[name].schedule
            expected = simulate(schedule, 1, 2).peak_activations
            measured = [r.get("peak") for r in per_rank]
            if measured == expected:
                continue
            prefix = "" if len(names) == 1 else f"{_what(name)}: "
            held_all = [schedule.num_microbatches * schedule.chunks] * schedule.num_ranks
            said = f"measured peak activations per rank {measured}, " + (
                f"where {schedule.name} holds {expected}" if name not in HIDDEN_CASES
                else "not what this schedule holds")
            if not any(measured):
                return Verdict(False, f"{prefix}no stage forward was seen: call the stage "
                                      f"modules (stages[s](x)), not their .forward")
            if measured == held_all:
                forwards_first = _executed(per_rank) == [
                    [a for a in row if "F" in a] + [a for a in row if "B" in a]
                    for row in schedule.to_strings()]
                why = FORWARDS_FIRST if forwards_first else KEPT_GRAPHS
                return Verdict(False, f"{prefix}{said}: {why}")
            return Verdict(False, f"{prefix}{said}")
        return Verdict(True, "each rank holds exactly the activations its schedule implies "
                             "(measured by how long autograd kept them)")
    return check


def bubble_check(name: str) -> Callable[[Any], Verdict]:
    """The measured bubble fraction (idle share) is at most BUBBLE_BELOW under and
    BUBBLE_ABOVE over the simulator's for the same synthetic costs."""
    from paralab.simulator import simulate
    from paralab.timeline import Event, Timeline

    def check(value: Any) -> Verdict:
        failed, per_rank = _case_results(value, name)
        if failed:
            return failed
        case = CASES[name]
        schedule = case.schedule
        executed = _executed(per_rank)
        if sorted(map(sorted, executed)) != sorted(map(sorted, schedule.to_strings())):
            return Verdict(False, "the events do not name each action of the schedule once: "
                                  "record (action text, start, end) per action")
        events = tuple(Event(rank, Action.parse(a), start, end)
                       for rank, r in enumerate(per_rank) for a, start, end in r["events"])
        measured = Timeline(schedule, events, source="measured", unit="s")
        t_f, t_b = (c * schedule.chunks for c in case.costs)
        simulated = simulate(schedule, t_f, t_b)
        got, want = float(measured.bubble_fraction), float(simulated.bubble_fraction)
        said = (f"measured bubble fraction {got:.3f} (step {measured.makespan:.3f} s), "
                f"simulated {want:.3f} (step {float(simulated.makespan):.3f} s)")
        if want - BUBBLE_BELOW <= got <= want + BUBBLE_ABOVE:
            return Verdict(True, f"{said}: within -{BUBBLE_BELOW}/+{BUBBLE_ABOVE}")
        if got < want:
            return Verdict(False, f"{said}: less idle time than the dependencies allow -- "
                                  f"does every action wait for the data it needs (a "
                                  f"backward for its gradient), and start its clock only "
                                  f"once that data has arrived?")
        return Verdict(False, f"{said}: more idle time than the dependencies force -- does a "
                              f"rank wait where it need not (a blocking send, a receive "
                              f"posted too early, an action that finishes after it sends)?")
    return check


def training_check(name: str) -> Callable[[Any], Verdict]:
    """The loss curve of the student's train() equals one process's SGD."""
    def check(value: Any) -> Verdict:
        schedule = TRAINING[name]
        m = schedule.num_microbatches
        if not isinstance(value, dict) or name not in value.get("cases", []):
            return Verdict(False, "the training run could not be recorded")
        curve = (value.get("curves") or {}).get(name)
        if curve is None:
            if "failed" in value and "'NoneType' object has no attribute" in value["failed"]:
                return Verdict(False, f"train failed: {value['failed']} -- if that None is the "
                                      f"gradient of a received activation: {DETACH}")
            if "timeout" in value or "failed" in value:
                return _case_results(value, name)[0]
            return Verdict(False, f"train returned nothing for {name} on the rank that owns "
                                  f"the last stage")
        if not isinstance(curve, (list, tuple)) or len(curve) != STEPS:
            return Verdict(False, f"train must return the loss of each of its {STEPS} steps "
                                  f"(a list) on the rank that owns the last stage")
        try:
            curve = [float(x) for x in curve]
        except (TypeError, ValueError):
            return Verdict(False, "train must return a list of numbers")
        want = MODEL.reference_training(schedule.num_stages, m, STEPS, LR)
        if all(math.isclose(a, b, rel_tol=1e-7) for a, b in zip(curve, want)):
            return Verdict(True, f"the loss falls from {want[0]:.3f} to {want[-1]:.3f}, "
                                 f"exactly as in one process")
        if math.isclose(curve[0], m * want[0], rel_tol=1e-7):
            return Verdict(False, NO_SCALING.format(m=m))
        if math.isclose(curve[0], want[0], rel_tol=1e-7):
            accumulated = MODEL.reference_training(schedule.num_stages, m, STEPS, LR,
                                                   zero_grad=False)
            if all(math.isclose(a, b, rel_tol=1e-7) for a, b in zip(curve, accumulated)):
                return Verdict(False, "the first step is right, the later ones are not: the "
                                      "gradients of earlier steps were never zeroed, so each "
                                      "step descends along their sum (zero them before each "
                                      "step)")
            if all(math.isclose(a, b, rel_tol=1e-7)
                   for a, b in zip(curve, _training_of_the_last_stage_only(schedule))):
                return Verdict(False, f"only the last stage learns: {NO_INPUT_GRADIENT}")
            return Verdict(False, "the first step's loss is right but the curve then leaves "
                                  "one process's: after each step, update every stage's "
                                  "parameters with SGD (lr=LR) and zero their gradients")
        return Verdict(False, f"the first step's loss {curve[0]:.6g} is not one process's "
                              f"{want[0]:.6g}: start from the model's own weights and data "
                              f"(MODEL) and report the step's loss, the sum of the "
                              f"microbatches' losses")
    return check


def _training_of_the_last_stage_only(schedule: Schedule) -> list[float]:
    """One process's curve when no gradient reaches the stages before the last one."""
    m = schedule.num_microbatches
    stages = MODEL.build(schedule.num_stages)
    inputs, targets = MODEL.microbatches(m)
    curve = []
    for _ in range(STEPS):
        for q in stages[-1].parameters():
            q.grad = None
        total = 0.0
        for x, y in zip(inputs, targets):
            with torch.no_grad():
                for stage in stages[:-1]:
                    x = stage(x)
            loss = MODEL.loss(stages[-1](x), y, m)
            loss.backward()
            total += loss.item()
        curve.append(total)
        with torch.no_grad():
            for q in stages[-1].parameters():
                q.add_(q.grad, alpha=-LR)
    return curve


def split_check(blocks: int, num_stages: int, reveal: bool = True):
    expected = [list(range(s * blocks // num_stages, (s + 1) * blocks // num_stages))
                for s in range(num_stages)]

    def check(value: Any) -> Verdict:
        if not isinstance(value, dict) or "stages" not in value:
            return Verdict(False, "split_model must return a list of stage modules")
        got = value["stages"]
        where = f"{blocks} blocks into {num_stages} stages: " if not reveal else ""
        if len(got) != num_stages:
            return Verdict(False, f"{where}expected {num_stages} stages, got {len(got)}")
        if any(None in stage for stage in got):
            return Verdict(False, f"{where}some stage holds weights that are not the model's: "
                                  f"a stage is made of the model's own blocks")
        if got == expected and value.get("error") is not None and value["error"] < 1e-12:
            return Verdict(True, "correct: consecutive blocks, the stages in order "
                                 "compute the model")
        if got == expected:
            return Verdict(False, f"{where}the right blocks, but running the stages one after "
                                  f"another does not compute the model: keep each block "
                                  f"whole and in order")
        round_robin = [list(range(s, blocks, num_stages)) for s in range(num_stages)]
        if got == round_robin and num_stages > 1:
            return Verdict(False, f"{where}blocks dealt out round robin: a stage is a group of "
                                  f"CONSECUTIVE blocks, so that only its last block's output "
                                  f"crosses to the next stage")
        shown = f"; expected {expected}" if reveal else ""
        return Verdict(False, f"{where}stage blocks {got}{shown}: stage s holds the blocks "
                              f"s*k .. (s+1)*k-1, k = blocks / stages")
    return check


def hidden_split_check(value: Any) -> Verdict:
    if not isinstance(value, list) or len(value) != len(HIDDEN_SPLITS):
        return Verdict(False, "expected one split per hidden size")
    for answer, (blocks, stages) in zip(value, HIDDEN_SPLITS):
        verdict = split_check(blocks, stages, reveal=False)(answer)
        if not verdict.passed:
            return verdict
    return Verdict(True, f"correct on all {len(HIDDEN_SPLITS)} hidden sizes")


# -- originality ---------------------------------------------------------------------------------
# The library's executor, interpreter and lowering: the reference answer of this homework.
REFERENCE_RUNTIME = (
    "paralab.pipeline:run_pipeline", "paralab.pipeline:_pipeline_worker",
    "paralab.interpreter:RankExecutor.__init__", "paralab.interpreter:RankExecutor.step",
    "paralab.interpreter:RankExecutor._forward", "paralab.interpreter:RankExecutor._backward",
    "paralab.lowering:lower",
)

PROBES = {
    # run_schedule once more, in a fresh process where the library's executor, interpreter
    # and lowering raise ReferenceUnavailable (on every rank: the ranks import the same
    # stripped copy).  Everything else of the library works as usual there.
    "own_implementation": Probe(cells=("setup", "messages", "forward", "backward", "run"),
                                call="checks.run_case('probe', lambda: run_schedule)",
                                unavailable=REFERENCE_RUNTIME),
}


@handles_raised
def own_implementation_check(value: Any) -> Verdict:
    if isinstance(value, Raised):
        return Verdict(False, value.describe())
    verdict = _grads_verdict(value, "probe")
    return Verdict(verdict.passed, "your own runtime, without the library's executor"
                   if verdict.passed else verdict.message)


CHECKS = {
    "split_p4": split_check(MODEL.blocks, 4),
    "split_hidden": hidden_split_check,
    "naive_p4": grads_check("naive"),
    "grads_gpipe": grads_check("gpipe"),
    "peaks_gpipe": peaks_check("gpipe"),
    "grads_1f1b": grads_check("1f1b"),
    "order_1f1b": order_check("1f1b"),
    "peaks_1f1b": peaks_check("1f1b"),
    "grads_hidden": grads_check(*HIDDEN_CASES),
    "order_hidden": order_check(*HIDDEN_CASES),
    "peaks_hidden": peaks_check(*HIDDEN_CASES),
    "own_implementation": own_implementation_check,
    "bubble_gpipe": bubble_check("gpipe_timed"),
    "bubble_1f1b": bubble_check("1f1b_timed"),
    "train_gpipe": training_check("gpipe"),
    "train_1f1b": training_check("1f1b"),
}

GRADE_CELLS = {
    "test_split": ["split_p4"],
    "test_split_hidden": ["split_hidden"],
    "test_naive": ["naive_p4"],
    "test_gpipe": {"grads_gpipe": 2, "peaks_gpipe": 1},
    "test_1f1b": {"grads_1f1b": 2, "order_1f1b": 1, "peaks_1f1b": 1},
    "test_hidden": {"grads_hidden": 2, "order_hidden": 1, "peaks_hidden": 1,
                    "own_implementation": 1},
    "test_bubble": ["bubble_gpipe", "bubble_1f1b"],
    "test_train": ["train_gpipe", "train_1f1b"],
}

check = make_checker(CHECKS)
