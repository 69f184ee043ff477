"""The real pipeline executor: gradient parity, memory, timing and failure behaviour."""

import time
from dataclasses import dataclass

import pytest
from torch import nn
from torch.testing import assert_close

from paralab import launch, pipeline, schedules
from paralab.schedules import Schedule, ScheduleError
from paralab.simulator import DeadlockError, simulate

MODEL = pipeline.PipelineModel(width=16, layers_per_stage=2, batch=32)
SCHEDULES = {
    "gpipe": schedules.gpipe(4, 8),
    "1f1b": schedules.one_f_one_b(4, 8),
    "interleaved": schedules.interleaved_one_f_one_b(4, 8, 2),
    "zb-h1": schedules.zb_h1(4, 8),
}


@pytest.fixture(scope="module")
def runs():
    return {name: pipeline.run_pipeline(s, MODEL, echo=False) for name, s in SCHEDULES.items()}


@pytest.mark.parametrize("name", SCHEDULES)
def test_losses_and_every_gradient_equal_a_single_process_run(runs, name):
    result, schedule = runs[name], SCHEDULES[name]
    losses, grads = pipeline.reference_step(MODEL, schedule.num_stages, 8)
    assert_close(result.losses, losses)
    assert result.grads.keys() == grads.keys()
    for key, reference in grads.items():
        assert_close(result.grads[key], reference, msg=key)


def held_bytes_peaks(schedule, bytes_of):
    """Per rank, the most bytes held at once when microbatch i's stage s holds
    ``bytes_of(s)`` from its F until the pass that frees its graph (its B, or its W when the
    backward is split), walking each rank's list in order as a rank runs it."""
    frees = "W" if schedule.splits_backward else "B"
    peaks = []
    for row in schedule.orders:
        held = peak = 0
        for op, _, stage in row:
            held += bytes_of(stage) if op == "F" else -bytes_of(stage) if op == frees else 0
            peak = max(peak, held)
        peaks.append(peak)
    return peaks


@pytest.mark.parametrize("name", SCHEDULES)
def test_measured_saved_bytes_equal_what_the_model_saves(runs, name):
    # What autograd keeps for one microbatch through one stage, from the model's layers:
    # each Linear saves its input and each Tanh its output (the weights are parameters, not
    # activations), and the last stage's loss ((out - y) ** 2).mean() / m saves out - y.
    schedule = SCHEDULES[name]
    tensor = (MODEL.batch // schedule.num_microbatches) * MODEL.width * 8  # float64
    last = schedule.num_stages - 1

    def bytes_of(stage):
        return (2 * MODEL.layers_per_stage + (stage == last)) * tensor

    assert runs[name].peak_saved_bytes == held_bytes_peaks(schedule, bytes_of)


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "interleaved"])
def test_saved_bytes_are_in_flight_microbatches_times_their_activations(runs, name):
    # Each Linear saves its input and each Tanh its output: 2 tensors of (batch/m, width)
    # per layer, float64.  (The last stage also keeps its loss inputs, so skip it.)
    per_microbatch_stage = MODEL.layers_per_stage * 2 * (MODEL.batch // 8) * MODEL.width * 8
    result = runs[name]
    last = SCHEDULES[name].rank_of(SCHEDULES[name].num_stages - 1)
    for rank, peak in enumerate(result.peak_saved_bytes):
        if rank != last:
            assert peak == result.peak_activations[rank] * per_microbatch_stage


def test_measured_timeline_has_the_simulators_shape(runs):
    measured = runs["1f1b"].timeline
    simulated = simulate(SCHEDULES["1f1b"], 1, 2)
    assert measured.source == "measured" and measured.unit == "s"
    assert sorted((e.rank, e.action) for e in measured.events) == \
        sorted((e.rank, e.action) for e in simulated.events)
    for rank in range(4):  # each rank ran its list in order
        order = [e.action for e in measured.events_of(rank)]
        assert order == list(SCHEDULES["1f1b"].orders[rank])


def test_recomputation_keeps_gradients_and_saves_only_stage_inputs():
    schedule = SCHEDULES["1f1b"]
    result = pipeline.run_pipeline(schedule, MODEL, recompute=True, echo=False)
    _, grads = pipeline.reference_step(MODEL, 4, 8)
    for key, reference in grads.items():
        assert_close(result.grads[key], reference, msg=key)
    input_bytes = (MODEL.batch // 8) * MODEL.width * 8
    assert result.peak_saved_bytes == [n * input_bytes for n in result.peak_activations]
    assert result.peak_saved_bytes == held_bytes_peaks(schedule, lambda stage: input_bytes)


@dataclass(frozen=True)
class DropoutModel(pipeline.PipelineModel):
    """MODEL with dropout after every stage: each forward draws a random mask."""

    def build(self, num_stages):
        return [nn.Sequential(*stage, nn.Dropout(0.5)) for stage in super().build(num_stages)]


def test_recomputation_draws_the_forwards_dropout_masks_again():
    """Recomputing a stage in the backward replays the forward's random state, and the
    forwards after it draw what they would have drawn without recomputation: a step
    with dropout gives the same losses and gradients either way."""
    schedule, model = SCHEDULES["1f1b"], DropoutModel(width=16, layers_per_stage=2, batch=32)
    kept = pipeline.run_pipeline(schedule, model, echo=False)
    recomputed = pipeline.run_pipeline(schedule, model, recompute=True, echo=False)
    assert_close(recomputed.losses, kept.losses)
    for key, reference in kept.grads.items():
        assert_close(recomputed.grads[key], reference, msg=key)
    # the masks matter: without dropout the step is another one
    assert kept.losses != pipeline.run_pipeline(schedule, MODEL, echo=False).losses


def test_a_students_own_schedule_runs():
    # A valid 2-rank order nobody ships: all forwards of rank 0 first, rank 1 drains eagerly.
    own = Schedule.from_strings(["0F0 0F1 0F2 0F3 0B0 0B1 0B2 0B3",
                                 "1F0 1B0 1F1 1B1 1F2 1B2 1F3 1B3"])
    result = pipeline.run_pipeline(own, MODEL, echo=False)
    _, grads = pipeline.reference_step(MODEL, 2, 4)
    assert result.max_grad_error(grads) < 1e-12
    assert result.peak_activations == [4, 1]


@pytest.mark.slow
@pytest.mark.parametrize("name", SCHEDULES)
def test_synthetic_makespan_within_ten_percent_of_the_simulator(name):
    result = pipeline.run_pipeline(SCHEDULES[name], MODEL, synthetic=(0.02, 0.04, 0.02),
                                   echo=False)
    assert result.simulated.makespan == pytest.approx(
        simulate(SCHEDULES[name], 0.02, 0.04, 0.02).makespan)
    assert result.timeline.makespan == pytest.approx(result.simulated.makespan, rel=0.10)


def test_invalid_schedule_is_rejected_before_any_process_starts(monkeypatch):
    def no_processes(*args, **kwargs):
        raise AssertionError("a process was started for an invalid schedule")
    monkeypatch.setattr(launch, "run", no_processes)
    broken = Schedule.from_strings(["0F0 0B0 0F1", "1F0 1B0 1F1 1B1"])
    with pytest.raises(ScheduleError, match="0B1 is missing"):
        pipeline.run_pipeline(broken, MODEL)
    crossed = Schedule.from_strings(["0F0 0B0 0F1 0B1", "1F1 1B1 1F0 1B0"])
    with pytest.raises(DeadlockError, match="rank 1 at step 0 \\(1F1\\) waits for 0F1"):
        pipeline.run_pipeline(crossed, MODEL)


def test_a_deadlocking_schedule_run_anyway_fails_within_the_timeout():
    crossed = Schedule.from_strings(["0F0 0B0 0F1 0B1", "1F1 1B1 1F0 1B0"])
    start = time.monotonic()
    with pytest.raises(launch.WorkerTimeout) as err:
        pipeline.run_pipeline(crossed, MODEL, check_deadlock=False, timeout=5, echo=False)
    assert time.monotonic() - start < 5 + 10
    message = str(err.value)
    assert "rank 0" in message and "rank 1" in message
    assert "recv" in message  # both are stuck waiting for a message that never comes


def test_bad_synthetic_costs_are_rejected():
    with pytest.raises(ValueError, match="non-negative seconds"):
        pipeline.run_pipeline(SCHEDULES["1f1b"], MODEL, synthetic=(0.01, -1))


@pytest.mark.parametrize("p_value,m_value,v", [(2, 4, 1), (4, 8, 1), (4, 4, 1), (3, 9, 1),
                                                (2, 4, 2), (4, 8, 2), (4, 8, 4), (3, 6, 3)])
def test_generated_schedules_post_messages_in_matching_order(p_value, m_value, v):
    # NCCL matches point-to-point messages in posting order: every shipped schedule must
    # post each pair's messages in the same order on both sides.
    kinds = ["interleaved"] if v > 1 else ["gpipe", "1f1b", "zb-h1"]
    for kind in kinds:
        schedule = schedules.build(kind, p_value, m_value, v)
        pipeline.check_message_order(schedule)
        orders = pipeline.message_orders(schedule)
        sent = sum(len(s) for s, _ in orders.values())
        # one activation and one gradient per microbatch and stage boundary between ranks
        boundaries = schedule.num_stages - 1 if p_value > 1 else 0
        assert sent == 2 * m_value * boundaries


def test_message_order_mismatch_is_explained():
    # Rank 1 takes microbatch 1's activation before microbatch 0's: fine on gloo (tags),
    # but NCCL would pair rank 0's first message with rank 1's first receive.
    swapped = Schedule.from_strings(["0F0 0F1 0B0 0B1", "1F1 1F0 1B0 1B1"])
    with pytest.raises(ScheduleError, match="rank 0 sends its messages to rank 1 in a "
                                            "different order"):
        pipeline.check_message_order(swapped)
    result = pipeline.run_pipeline(swapped, MODEL, echo=False)  # gloo copes
    _, grads = pipeline.reference_step(MODEL, 2, 2)
    assert result.max_grad_error(grads) < 1e-12
