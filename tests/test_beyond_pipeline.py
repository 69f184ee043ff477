"""The new schedules on real processes: gradient parity with one process, measured memory,
the senders'-order lowering, and the command line."""

import json

import pytest
from torch.testing import assert_close

from paralab import cli, lowering, pipeline, schedules
from paralab.simulator import simulate

MODEL = pipeline.PipelineModel(width=16, layers_per_stage=2, batch=48)
SCHEDULES = {
    "interleaved-m6": schedules.interleaved_one_f_one_b(4, 6, 2),
    "zb-h2": schedules.zb_h2(4, 8),
    "zb-v": schedules.zb_v(4, 8),
    "dualpipev": schedules.dualpipe_v(4, 8),
}


@pytest.fixture(scope="module")
def runs():
    # The V schedules run with every receive posted in the sender's order (what NCCL
    # needs); gloo runs either lowering, so this exercises the one NCCL would use.
    return {name: pipeline.run_pipeline(s, MODEL, echo=False,
                                        sender_order=s.placement is not None)
            for name, s in SCHEDULES.items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", SCHEDULES)
def test_losses_and_every_gradient_equal_a_single_process_run(runs, name):
    schedule = SCHEDULES[name]
    losses, grads = pipeline.reference_step(MODEL, schedule.num_stages,
                                            schedule.num_microbatches)
    result = runs[name]
    assert_close(result.losses, losses)
    assert result.grads.keys() == grads.keys()
    for key, reference in grads.items():
        assert_close(result.grads[key], reference, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("name", SCHEDULES)
def test_measured_memory_and_order_are_the_simulators(runs, name):
    schedule, result = SCHEDULES[name], runs[name]
    assert result.peak_activations == simulate(schedule, 1, 2, 1, t_fb=2).peak_activations
    for rank in range(schedule.num_ranks):  # each rank ran its list in order
        assert [e.action for e in result.timeline.events_of(rank)] == \
            list(schedule.orders[rank])


@pytest.mark.slow
def test_dualpipev_runs_with_synthetic_costs_like_the_simulator():
    schedule = schedules.dualpipe_v(2, 4)
    result = pipeline.run_pipeline(schedule, MODEL, synthetic=(0.02, 0.02, 0.02), echo=False)
    # The executor runs an overlapped unit's parts one after the other: without an F&B
    # cost the simulator does the same, so the two must agree.
    assert result.timeline.makespan == pytest.approx(result.simulated.makespan, rel=0.15)


def test_the_nccl_lowering_keeps_every_message_and_moves_only_receives():
    schedule = SCHEDULES["dualpipev"]
    plain, hoisted = lowering.lower(schedule), lowering.post_in_send_order(lowering.lower(schedule))
    assert plain != hoisted
    pipeline.check_message_order(schedule, hoisted)
    assert sorted(lowering.message_orders(plain)) == sorted(lowering.message_orders(hoisted))


# -- the command line ---------------------------------------------------------------------------
def test_simulate_names_the_new_schedules(capsys):
    assert cli.main(["simulate", "--schedule", "dualpipev", "-p", "2", "-m", "4", "--tf", "2",
                     "--tb", "2", "--tw", "2", "--tfb", "5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    expected = simulate(schedules.dualpipe_v(2, 4), 2, 2, 2, t_fb=5)
    assert out["makespan"] == expected.makespan
    assert out["peak_activations"] == expected.peak_activations == [5, 5]
    assert cli.main(["simulate", "--schedule", "zb-h2", "-p", "4", "-m", "8", "--tf", "1",
                     "--tb", "1", "--tw", "1"]) == 0
    assert "peak activations per rank:" in capsys.readouterr().out


def test_simulate_refuses_what_a_schedule_cannot_take(capsys):
    assert cli.main(["simulate", "--schedule", "zb-v", "-p", "2", "-m", "4", "-v", "2",
                     "--tf", "1", "--tb", "1"]) == 2
    assert "two chunks per rank, placed in a V" in capsys.readouterr().err
    assert cli.main(["simulate", "--schedule", "1f1b", "-p", "2", "-m", "4", "--tf", "1",
                     "--tb", "1", "--tfb", "1"]) == 2
    assert "never runs" in capsys.readouterr().err


def test_gantt_frames_each_fused_unit():
    import matplotlib
    matplotlib.use("Agg")
    from paralab import plots

    timeline = simulate(schedules.dualpipe_v(2, 4), 1, 1, 1, t_fb=2)
    ax = plots.gantt(timeline)
    frames = {patch.get_gid(): patch for patch in ax.patches
              if (patch.get_gid() or "").split(" ")[1:2] == ["unit"]}
    units = [(r, "+".join(map(str, row[a:a + n]))) for r, row in enumerate(timeline.schedule.orders)
             for a, n in timeline.schedule.fused[r]]
    assert set(frames) == {f"{r} unit {text}" for r, text in units}
    frame = frames["0 unit 0F3+3B1+3W1"]
    # t_fb=2 per rank is 1 per chunk: the unit lasts 1, not its parts' 3 x 1/2
    assert frame.get_width() == pytest.approx(1.0)
    assert frame.get_x() == pytest.approx(float(timeline.event("0F3").start))
