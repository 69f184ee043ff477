"""The planner: its memory and time come from the course's formulas and simulator, and its
choices are compared with the configurations Megatron-LM published."""

import pytest

from paralab import memory_calculator as calc
from paralab import planner, schedules
from paralab.simulator import simulate

GPT3 = planner.Model("GPT-3", layers=96, hidden=12288, heads=96)
TOOLS_2021 = dict(recompute=("none", "full"), sequence_parallel=(False,))


def test_the_parameter_formula_gives_the_published_sizes():
    # Table 1 states each model's size in billions; our count of L layers and the
    # embeddings must round to it (this also checks the transcribed h, L of each row).
    for run in planner.MEGATRON_2021:
        assert round(run.model.parameters() / 1e9, 1) == pytest.approx(run.billions, abs=0.051)
    assert round(GPT3.parameters() / 1e9) == 175


@pytest.mark.parametrize("tp,pp,m,v,recompute,sp", [
    (8, 8, 64, 1, "none", True), (8, 8, 64, 2, "selective", False), (4, 16, 32, 1, "full", False),
    (1, 4, 8, 1, "none", False)])
def test_memory_is_the_calculators_plus_the_embeddings(tp, pp, m, v, recompute, sp):
    rank, parts = planner.rank_memory(GPT3, (1, pp, tp), 1, m, v, recompute, sp)
    config = calc.Config(s=2048, b=1, h=12288, a=96, L=96, t=tp, sp=sp, p=pp, v=v, m=m,
                         schedule="interleaved" if v > 1 else "1f1b", recompute=recompute)
    per_rank = calc.per_rank(config)
    embedding = GPT3.vocab * GPT3.hidden / tp + GPT3.seq * GPT3.hidden
    extra = {0: embedding, pp - 1: GPT3.vocab * GPT3.hidden / tp}
    totals = [row["total"] + 16 * (embedding if r == 0 else 0)
              + 16 * (extra[pp - 1] if r == pp - 1 and pp > 1 else 0)
              for r, row in enumerate(per_rank)]
    assert parts["total"] == pytest.approx(max(totals[0], totals[-1]))
    assert parts["total"] == pytest.approx(totals[rank])
    assert parts["activations"] == per_rank[rank]["activations"]


@pytest.mark.parametrize("pp,m,v", [(4, 8, 1), (4, 8, 2), (8, 16, 4), (1, 4, 1)])
def test_the_pipeline_time_is_the_simulators(pp, m, v):
    cluster = planner.Cluster(gpus=8 * pp)
    time = planner.step_time(GPT3, cluster, (1, pp, 8), 1, m, v)
    schedule = (schedules.interleaved_one_f_one_b(pp, m, v) if v > 1
                else schedules.one_f_one_b(pp, m))
    makespan = simulate(schedule, time["forward"], time["backward"]).makespan
    assert time["total"] - time["dp"] == pytest.approx(makespan)
    assert time["bubble"] == pytest.approx(makespan - m * (time["forward"] + time["backward"]))


def test_every_plan_is_a_valid_layout_and_they_come_fastest_first():
    model = planner.MEGATRON_2021[4].model
    cluster = planner.Cluster(gpus=512)
    ranked = planner.plans(model, cluster, 1536)
    for plan in ranked:
        assert plan.dp * plan.pp * plan.tp == 512 and plan.dp * plan.b * plan.m == 1536
        assert model.heads % plan.tp == 0 and model.layers % (plan.pp * plan.v) == 0
        assert plan.fits == (plan.memory["total"] <= cluster.memory)
        assert plan.time["total"] == pytest.approx(sum(plan.time[k] for k in (
            "compute", "bubble", "tp", "pp", "dp")))
    keys = [(not plan.fits, plan.time["total"]) for plan in ranked]
    assert keys == sorted(keys) and ranked[0].fits


def test_nothing_fits_says_how_close_it_came():
    with pytest.raises(ValueError, match="no layout of GPT-3 fits in 80 GiB per GPU on 8 GPUs"):
        planner.best(GPT3, planner.Cluster(gpus=8), 64)


@pytest.mark.slow
def test_the_planners_choices_next_to_megatrons():
    """What lecture 05 claims: with 2021's tools the planner keeps TP inside a node, uses
    t = 8 from 76B parameters on, grows p with the model, and ranks every published layout
    within a few percent of its best."""
    chosen = []
    for run in planner.MEGATRON_2021:
        cluster = planner.Cluster(gpus=run.gpus)
        ranked = [p for p in planner.plans(run.model, cluster, run.batch, **TOOLS_2021) if p.fits]
        top = ranked[0]
        published = min(p.time["total"] for p in ranked if (p.tp, p.pp) == (run.tp, run.pp))
        assert published / top.time["total"] < 1.06, run.model.name
        assert cluster.gpus_per_node % top.tp == 0
        chosen.append(top)
    assert [p.tp for p in chosen[5:]] == [8] * 5
    assert [p.pp for p in chosen] == sorted(p.pp for p in chosen)
    assert chosen[-1].pp > chosen[5].pp


def test_tensor_parallelism_across_nodes_is_slow():
    run = planner.MEGATRON_2021[6]
    ranked = [p for p in planner.plans(run.model, planner.Cluster(run.gpus), run.batch,
                                       max_tp=16, **TOOLS_2021) if p.fits]
    across = min(p.time["total"] for p in ranked if p.tp == 16)
    assert across > 1.5 * ranked[0].time["total"]
    assert ranked[0].time["tp"] * 3 < min(p.time["tp"] for p in ranked if p.tp == 16)
