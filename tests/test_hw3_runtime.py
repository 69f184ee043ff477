"""hw3's checks: right runs pass, and each misconception of a runtime is named.

Most tests build the data a test cell records (per rank: losses, gradients, events, peak)
from the one-process reference and the simulator, so they run without processes; a few
slow ones run the solution's runtime, and a blocking-send variant of it, on real ones.  The
graded end-to-end behaviour of every mutant is in tests/test_grading_homework.py.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import jupytext
import pytest
from hypothesis import given, settings, strategies as st

from autograder import probes
from autograder.checks import Raised
from autograder.checks import hw3_pipeline_runtime as hw3
from paralab import lowering, schedules
from paralab.simulator import check_deadlock, simulate

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "solutions" / "hw3_pipeline_runtime" / "hw3_pipeline_runtime.pct.py"


def test_every_test_cell_has_checks_and_every_check_is_used():
    notebook = jupytext.read(SOURCE)
    cells = {c.metadata["nbgrader"]["grade_id"] for c in notebook.cells
             if c.metadata.get("nbgrader", {}).get("grade")}
    assert set(hw3.GRADE_CELLS) == cells
    used = {key for keys in hw3.GRADE_CELLS.values() for key in keys}
    assert used == set(hw3.CHECKS)


# -- the hidden random schedule --------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(p=st.integers(1, 4), chunks=st.integers(1, 3), m=st.integers(1, 5),
       seed=st.integers(0, 10_000))
def test_random_schedules_are_valid_and_never_deadlock(p, chunks, m, seed):
    schedule = schedules.validate(hw3.random_schedule(p, chunks, m, seed))
    check_deadlock(schedule)
    assert schedule.num_stages == p * chunks


def test_the_hidden_random_schedule_tells_tags_and_order_apart():
    schedule = hw3.CASES["random"].schedule
    orders = lowering.message_orders(lowering.lower(schedule))
    assert any(sent != received for sent, received in orders.values())
    forwards_first = schedules.Schedule(
        tuple(tuple([a for a in row if a.op == "F"] + [a for a in row if a.op == "B"])
              for row in schedule.orders), schedule.num_microbatches, schedule.num_stages)
    assert simulate(forwards_first, 1, 2).peak_activations != \
        simulate(schedule, 1, 2).peak_activations
    assert forwards_first.orders != schedule.orders


# -- verdicts on recorded runs, built without processes -------------------------------------------
def recorded(name, *, grads_scale=1.0, losses_scale=1.0, no_grad=(), drop_grads=(),
             order=None, peaks=None, squeeze=1.0):
    """What run_case records for a correct runtime on case ``name``, then spoiled as asked:
    gradients and losses scaled, stages without gradient, events in another ``order`` (a
    schedule), other ``peaks``, idle time shrunk by ``squeeze``."""
    case = hw3.CASES[name]
    schedule = case.schedule
    losses, grads = case.model.reference_step(schedule.num_stages, schedule.num_microbatches)
    costs = case.costs or (0.01, 0.02)
    ran = order or schedule
    timeline = simulate(ran, *(c * schedule.chunks for c in costs))
    expected_peaks = simulate(ran, 1, 2).peak_activations
    ranks = []
    for rank in range(schedule.num_ranks):
        mine = schedule.stages_of(rank)
        events = []
        for e in timeline.events_of(rank):
            events.append((str(e.action), float(e.start) * squeeze, float(e.start) * squeeze
                           + float(e.duration)))
        record = {
            "losses": ({i: v * losses_scale for i, v in enumerate(losses)}
                       if schedule.num_stages - 1 in mine else {}),
            "events": events,
            "grads": {k: (None if int(k.split(".")[0][5:]) in drop_grads else v * grads_scale)
                      for k, v in grads.items() if int(k.split(".")[0][5:]) in mine},
            "peak": (peaks or expected_peaks)[rank],
            "no_grad_inputs": [s for s in no_grad if s in mine],
        }
        ranks.append([record])
    return {"cases": [name], "ranks": ranks}


def verdict(key, value):
    return hw3.CHECKS[key](value)


@pytest.mark.parametrize("key,name", [("naive_p4", "naive"), ("grads_gpipe", "gpipe"),
                                      ("peaks_gpipe", "gpipe"), ("grads_1f1b", "1f1b"),
                                      ("order_1f1b", "1f1b"), ("peaks_1f1b", "1f1b"),
                                      ("bubble_gpipe", "gpipe_timed"),
                                      ("bubble_1f1b", "1f1b_timed"),
                                      ("own_implementation", "probe")])
def test_a_right_run_passes(key, name):
    assert verdict(key, recorded(name)).passed, verdict(key, recorded(name)).message


def test_hidden_checks_cover_both_hidden_schedules():
    runs = [recorded(name) for name in hw3.HIDDEN_CASES]
    together = {"cases": list(hw3.HIDDEN_CASES),
                "ranks": [a + b for a, b in zip(runs[0]["ranks"], runs[1]["ranks"])]}
    for key in ("grads_hidden", "order_hidden", "peaks_hidden"):
        assert verdict(key, together).passed
    spoiled = recorded("random", grads_scale=1.5)
    together["ranks"] = [a + b for a, b in zip(runs[0]["ranks"], spoiled["ranks"])]
    result = verdict("grads_hidden", together)
    assert not result.passed and result.message.startswith("random (p=4, 8 stages, m=4)")
    assert "give every message a tag" in result.message
    # a hidden test's feedback says what is wrong, not what its schedule holds
    wrong_peaks = recorded("interleaved", peaks=[1, 1, 1, 1])
    together["ranks"] = [a + b for a, b in zip(wrong_peaks["ranks"], runs[1]["ranks"])]
    result = verdict("peaks_hidden", together)
    expected = simulate(hw3.CASES["interleaved"].schedule, 1, 2).peak_activations
    assert not result.passed and "[1, 1, 1, 1]" in result.message
    assert str(expected) not in result.message


def test_no_loss_scaling_is_named():
    result = verdict("grads_1f1b", recorded("1f1b", grads_scale=8, losses_scale=8))
    assert not result.passed and "m = 8 times one process's" in result.message
    assert verdict("naive_p4", recorded("naive", grads_scale=1, losses_scale=1)).passed


def test_a_backward_that_sends_nothing_back_is_named():
    result = verdict("grads_gpipe", recorded("gpipe", drop_grads=(0, 1, 2)))
    assert not result.passed and "stages [0, 1, 2] got no gradient" in result.message
    assert "never sends the gradient of the stage's input back" in result.message


def test_a_received_activation_without_requires_grad_is_named():
    result = verdict("naive_p4", recorded("naive", no_grad=(1, 2, 3)))
    assert not result.passed and "detach() without requires_grad_()" in result.message
    crashed = recorded("naive", no_grad=(1,))
    crashed["ranks"][1][0]["error"] = {"type": "AttributeError", "time": 1.0,
                                       "message": "'NoneType' object has no attribute 'x'"}
    assert "detach() without requires_grad_()" in verdict("naive_p4", crashed).message


def test_the_first_real_error_is_reported_not_its_victims():
    run = recorded("gpipe")
    run["ranks"][0][0]["error"] = {"type": "RuntimeError", "time": 2.0,
                                   "message": "Connection closed by peer [127.0.0.1]:1"}
    run["ranks"][2][0]["error"] = {"type": "KeyError", "time": 1.5,
                                   "message": "(1, 2) (in backward, line 4: x = ...)"}
    result = verdict("grads_gpipe", run)
    assert result.message == "rank 2 raised KeyError: (1, 2) (in backward, line 4: x = ...)"


def test_a_deadlock_of_blocking_sends_is_named_with_the_stuck_ranks():
    where = 'File "<cell>", line 9 in send -> send (torch/distributed/distributed_c10d.py)'
    run = {"cases": ["1f1b"], "timeout": 4.0, "stuck": {0: where, 1: where, 2: where}}
    for key in ("grads_1f1b", "order_1f1b", "peaks_1f1b"):
        result = verdict(key, run)
        assert not result.passed and "ranks 0, 1, 2 at " + where in result.message
        assert "a blocking send before the receive on both neighbours deadlocks" in \
            result.message
    waiting = 'File "<cell>", line 20 in receive -> recv (torch/distributed/distributed_c10d.py)'
    result = verdict("grads_1f1b", {"cases": ["1f1b"], "timeout": 4.0, "stuck": {3: waiting}})
    assert "rank 3 at" in result.message and "A receive that no send matches" in result.message


def test_forwards_first_is_named_by_order_and_memory():
    schedule = hw3.CASES["1f1b"].schedule
    gpipe_order = schedules.gpipe(4, 8)
    run = recorded("1f1b", order=gpipe_order)
    assert verdict("grads_1f1b", run).passed  # the gradients are right all the same
    for key in ("order_1f1b", "peaks_1f1b"):
        result = verdict(key, run)
        assert not result.passed and "ran all forwards before any backward" in result.message
    assert simulate(schedule, 1, 2).peak_activations == [4, 3, 2, 1]


def test_graphs_kept_alive_are_named():
    result = verdict("peaks_1f1b", recorded("1f1b", peaks=[8, 8, 8, 8]))
    assert not result.passed and "every microbatch's graph stays alive" in result.message
    result = verdict("peaks_1f1b", recorded("1f1b", peaks=[0, 0, 0, 0]))
    assert "no stage forward was seen" in result.message


def test_the_bubble_is_checked_against_the_simulator():
    assert verdict("bubble_gpipe", recorded("gpipe_timed")).passed
    result = verdict("bubble_gpipe", recorded("gpipe_timed", squeeze=0.5))
    assert not result.passed and "less idle time than the dependencies allow" in result.message
    result = verdict("bubble_1f1b", recorded("1f1b_timed", squeeze=1.6))
    assert not result.passed and "more idle time than the dependencies force" in result.message


def test_training_curves():
    def run(curve):
        return {"cases": list(hw3.TRAINING), "curves": {"gpipe": curve, "1f1b": curve}}
    want = hw3.MODEL.reference_training(4, 8, hw3.STEPS, hw3.LR)
    assert verdict("train_gpipe", run(want)).passed
    assert "m = 8 times" in verdict("train_1f1b", run([8 * v for v in want])).message
    accumulated = hw3.MODEL.reference_training(4, 8, hw3.STEPS, hw3.LR, zero_grad=False)
    assert "never zeroed" in verdict("train_1f1b", run(accumulated)).message
    head_only = hw3._training_of_the_last_stage_only(hw3.TRAINING["gpipe"])
    result = verdict("train_gpipe", run(head_only))
    assert "only the last stage learns" in result.message
    where = 'File "<cell>", line 9 in send -> send (torch/distributed/distributed_c10d.py)'
    stuck = {"cases": list(hw3.TRAINING), "timeout": 4.0, "stuck": {0: where},
             "curves": {"gpipe": want}}
    assert verdict("train_gpipe", stuck).passed
    assert "deadlocks" in verdict("train_1f1b", stuck).message


def test_split_verdicts():
    right = {"stages": [[0, 1], [2, 3], [4, 5], [6, 7]], "error": 0.0}
    assert verdict("split_p4", right).passed
    result = verdict("split_p4", {"stages": [[0, 4], [1, 5], [2, 6], [3, 7]], "error": 1.0})
    assert not result.passed and "round robin" in result.message
    result = verdict("split_p4", {"stages": [[0, 1], [2, None]], "error": None})
    assert "expected 4 stages" in result.message


def test_delegation_is_named():
    run = recorded("probe")
    run["ranks"][0][0]["error"] = {
        "type": "ReferenceUnavailable", "time": 1.0,
        "message": "paralab.lowering:lower is not available in this test: write it yourself"}
    result = verdict("own_implementation", run)
    assert not result.passed and "must run the schedule itself" in result.message
    assert not verdict("own_implementation", Raised("NameError", "x")).passed


def test_the_probe_removes_the_executor_and_keeps_what_the_tests_need(tmp_path):
    stripped = probes.strip_library(str(ROOT / "paralab"), probes.unavailable_names(hw3),
                                    str(tmp_path))
    code = """
import paralab
from paralab import lowering, schedules
from paralab.interpreter import RankExecutor
from paralab.models import Classifier
from autograder.checks import hw3_pipeline_runtime as hw3
schedule = schedules.one_f_one_b(2, 2)
for call in (lambda: lowering.lower(schedule), lambda: RankExecutor(0, schedule, Classifier())):
    try:
        call()
        print("REFERENCE RAN")
    except paralab.ReferenceUnavailable as e:
        print("unavailable:", e)
print("cases", sorted(hw3.CASES))
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(stripped), str(ROOT)]))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "REFERENCE RAN" not in done.stdout
    assert "unavailable: paralab.lowering:lower" in done.stdout
    assert "unavailable: paralab.interpreter:RankExecutor.__init__" in done.stdout
    assert "cases ['1f1b'" in done.stdout


# -- the solution's runtime on real processes --------------------------------------------------------
@pytest.fixture(scope="module")
def solution(tmp_path_factory):
    """The solution's code cells as an importable module (the ranks import it)."""
    notebook = jupytext.read(SOURCE)
    code = "\n\n".join(c.source for c in notebook.cells if c.cell_type == "code"
                       and not c.metadata.get("nbgrader", {}).get("grade"))
    folder = tmp_path_factory.mktemp("hw3")
    (folder / "hw3_solution.py").write_text(code)
    blocking = code.replace("state.pending.append(dist.isend(tensor.detach().contiguous(), "
                            "destination, tag=tag))",
                            "dist.send(tensor.detach().contiguous(), destination, tag=tag)")
    assert blocking != code
    (folder / "hw3_blocking.py").write_text(blocking)
    sys.path.insert(0, str(folder))
    import hw3_blocking
    import hw3_solution
    yield hw3_solution, hw3_blocking
    sys.path.remove(str(folder))


@pytest.mark.slow
def test_the_solution_runs_1f1b_and_the_hidden_schedules_like_one_process(solution):
    runtime, _ = solution
    run = hw3.run_case("1f1b", lambda: runtime.run_schedule)
    for key in ("grads_1f1b", "order_1f1b", "peaks_1f1b"):
        assert verdict(key, run).passed, verdict(key, run).message
    run = hw3.run_case(hw3.HIDDEN_CASES, lambda: runtime.run_schedule)
    for key in ("grads_hidden", "order_hidden", "peaks_hidden"):
        assert verdict(key, run).passed, verdict(key, run).message


@pytest.mark.slow
def test_blocking_sends_end_as_a_named_deadlock_within_seconds(solution):
    _, blocking = solution
    assert verdict("grads_gpipe", hw3.run_case("gpipe", lambda: blocking.run_schedule)).passed
    start = time.monotonic()
    run = hw3.run_case("1f1b", lambda: blocking.run_schedule)
    elapsed = time.monotonic() - start
    result = verdict("grads_1f1b", run)
    assert not result.passed and "deadlocks" in result.message
    assert "-> send (torch/distributed" in result.message
    # the stall limit after start-up, the launcher's grace period, and start-up itself
    assert elapsed < hw3.STALL_LIMIT + 15, elapsed
