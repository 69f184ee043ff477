"""The classifier of lecture 03 and hw3, and the meter of activations held for backward."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.testing import assert_close

from autograder.checks.hw3_pipeline_runtime import random_schedule
from paralab import pipeline, schedules
from paralab.activations import HeldActivations
from paralab.models import Classifier
from paralab.simulator import simulate


def whole_batch_gradients(model: Classifier):
    """The plain single-process computation: the whole batch at once, mean cross-entropy."""
    net = model.build_model()
    x, y = model.data()
    loss = torch.nn.functional.cross_entropy(net(x), y)
    loss.backward()
    return loss.item(), net


@pytest.mark.parametrize("num_stages,m", [(1, 1), (2, 4), (4, 8), (8, 16)])
def test_microbatches_scaled_by_one_over_m_give_the_whole_batch_gradient(num_stages, m):
    model = Classifier()
    losses, grads = model.reference_step(num_stages, m)
    loss, net = whole_batch_gradients(model)
    assert math.isclose(sum(losses), loss, rel_tol=1e-12)
    per_stage = model.blocks // num_stages
    for k, block in enumerate(net):
        s = k // per_stage
        for name, q in block.named_parameters():
            assert_close(grads[f"stage{s}.{k}.{name}"], q.grad)


def test_stages_are_the_models_blocks_in_order():
    model = Classifier()
    stages = model.build(4)
    whole = model.build_model()
    x, _ = model.data()
    out = x
    for stage in stages:
        assert len(stage) == 2
        out = stage(out)
    assert_close(out, whole(x))
    assert model.boundary(8) == ((8, 16), torch.float64)
    with pytest.raises(ValueError, match="must divide the number of blocks"):
        model.build(3)
    with pytest.raises(ValueError, match="does not split into 5 equal microbatches"):
        model.microbatches(5)


def test_building_twice_gives_the_same_weights_and_leaves_the_random_state_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = Classifier().build_model()
    after = torch.rand(1)
    assert torch.equal(before, after)
    for p, q in zip(a.parameters(), Classifier().build_model().parameters()):
        assert torch.equal(p, q)


def test_training_learns_well_below_chance_and_forgetting_zero_grad_differs():
    model = Classifier()
    curve = model.reference_training(4, 8, 10, 0.1)
    assert curve[0] > math.log(model.classes) and curve[-1] < 0.6 * math.log(model.classes)
    assert all(b < a for a, b in zip(curve, curve[1:]))
    accumulated = model.reference_training(4, 8, 10, 0.1, zero_grad=False)
    assert accumulated[0] == curve[0] and accumulated[2] != curve[2]


@pytest.mark.slow
def test_the_library_executor_runs_the_classifier_like_one_process():
    model = Classifier()
    schedule = schedules.interleaved_one_f_one_b(2, 4, 2)
    result = pipeline.run_pipeline(schedule, model, echo=False)
    losses, grads = model.reference_step(schedule.num_stages, 4)
    assert result.max_grad_error(grads) < 1e-12
    assert result.losses == pytest.approx(losses, rel=1e-12)


# -- HeldActivations ------------------------------------------------------------------------------
def run_one_rank(schedule, model, keep_graphs=False):
    """Every action of a one-rank schedule (all stages on rank 0), handing activations and
    gradients from stage to stage locally; returns the meter."""
    m, last = schedule.num_microbatches, schedule.num_stages - 1
    stages = dict(enumerate(model.build(schedule.num_stages)))
    xs, ys = model.microbatches(m)
    saved, kept, handed = {}, [], {}
    with HeldActivations(stages) as meter:
        for op, i, s in schedule.orders[0]:
            if op == "F":
                x = xs[i] if s == 0 else handed.pop(("a", i, s)).requires_grad_()
                out = stages[s](x)
                if s == last:
                    out = model.loss(out, ys[i], m)
                else:
                    handed[("a", i, s + 1)] = out.detach()
                saved[(i, s)] = (x, out)
            else:
                x, out = saved.pop((i, s))
                grad = None if s == last else handed.pop(("g", i, s))
                torch.autograd.backward(out, grad, retain_graph=keep_graphs)
                if keep_graphs:
                    kept.append(out)
                if s > 0:
                    handed[("g", i, s - 1)] = x.grad
    return meter


@settings(max_examples=25, deadline=None)
@given(chunks=st.integers(1, 4), m=st.integers(1, 5), seed=st.integers(0, 10_000))
def test_held_activations_follow_the_schedule_whatever_the_order(chunks, m, seed):
    """Measured by lifetimes, the peak is the simulator's count of (microbatch, stage) pairs
    between a forward and its backward; and nothing is held at the end."""
    schedule = random_schedule(1, chunks, m, seed)
    model = Classifier(blocks=2 * chunks, batch=4 * m)
    meter = run_one_rank(schedule, model)
    assert meter.peak == simulate(schedule, 1, 2).peak_activations[0]
    assert meter.current == 0 and meter.current_bytes == 0
    assert meter.peak_bytes > 0


def test_graphs_kept_alive_are_counted_and_released_with_them():
    schedule = schedules.one_f_one_b(1, 4)
    model = Classifier(blocks=2, batch=8)
    assert run_one_rank(schedule, model).peak == 1
    meter = run_one_rank(schedule, model, keep_graphs=True)
    assert meter.peak == 4  # every microbatch's graph, as GPipe would hold
    assert meter.current == 0  # freed once the references are gone


def test_the_meter_sees_inputs_that_do_not_require_grad_and_ignores_parameters():
    model = Classifier(blocks=2, batch=4)
    first, second = model.build(2)
    x, _ = model.data()
    with HeldActivations({0: first, 1: second}) as meter:
        hidden = first(x)
        out = second(hidden.detach())        # no requires_grad: the gradient stops here
        assert meter.forwards == [(0, False), (1, False)]
        # the residual block keeps its linear's input and its tanh's output, the head its
        # input; the weights are not activations
        assert meter.current == 2
        assert meter.current_bytes == 3 * x.numel() * x.element_size()
    del hidden, out
    assert meter.current == 0
