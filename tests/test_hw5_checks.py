"""hw5_hybrid's checks: right answers pass, each known misconception is named.

The right answers are worked out here by hand (the groups of a 2x2x2 mesh, the traffic of the
FFN stack, GPT-3's memory), not read from the library the checks use; the 8-rank runs are
replaced by reports built from single-process training, so the diagnoses are tested without
starting processes (the grading test runs the real thing)."""

import os
import subprocess
import sys
from pathlib import Path

import jupytext
import pytest
import sympy as sp
import torch

from autograder import probes
from autograder.checks import Raised, encode, run_check
from autograder.checks import hw5_hybrid as hw5
from paralab import hybrid, planner

ROOT = Path(__file__).resolve().parents[1]
dp, pp, tp, L, B, d, m, e = sp.symbols("dp pp tp L B d m e", positive=True)  # as a student

GROUPS = {"dp": [[0, 4], [1, 5], [2, 6], [3, 7]], "pp": [[0, 2], [1, 3], [4, 6], [5, 7]],
          "tp": [[0, 1], [2, 3], [4, 5], [6, 7]]}
PARAMS = L / pp * ((8 * d ** 2 + 4 * d) / tp + d)


def verdict(key, value):
    return run_check(hw5.CHECKS, key, encode(value), hw5.SYMBOLS)


def test_every_test_cell_has_checks_and_every_check_is_used():
    notebook = jupytext.read(ROOT / "solutions" / "hw5_hybrid" / "hw5_hybrid.pct.py")
    cells = {c.metadata["nbgrader"]["grade_id"] for c in notebook.cells
             if c.metadata.get("nbgrader", {}).get("grade")}
    assert set(hw5.GRADE_CELLS) == cells
    assert {key for keys in hw5.GRADE_CELLS.values() for key in keys} == set(hw5.CHECKS)
    assert set(hw5.PROBES) <= set(hw5.CHECKS)


def test_the_probes_name_real_functions_and_the_checks_import_without_them(tmp_path):
    # The probe notebook imports this check module against the stripped library: nothing
    # at import may call what the probes make unavailable.
    stripped = probes.strip_library(str(ROOT / "paralab"), probes.unavailable_names(hw5),
                                    str(tmp_path))
    code = ("import paralab\nfrom autograder.checks import hw5_hybrid as c\n"
            "from paralab import mesh\n"
            "try:\n    mesh.group_ranks((2, 2, 2), 'tp')\nexcept paralab.ReferenceUnavailable:\n"
            "    print('stripped', c.CROSSING_NODES[4])\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(stripped), str(ROOT)]))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(stripped), timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "stripped {'dp'}"


@pytest.mark.parametrize("key,value", [
    ("groups_2x2x2", GROUPS),
    ("groups_2x2x2", {k: v[::-1] for k, v in GROUPS.items()}),     # any order of the groups
    ("crossing", {4: {"dp"}, 2: {"dp", "pp"}}),
    ("crossing", {4: ["dp"], 2: ("pp", "dp")}),
    ("params_per_rank", PARAMS),
    ("params_per_rank", (8 * L * d ** 2 + 4 * L * d + L * d * tp) / (pp * tp)),
    ("dp_bytes", 2 * (dp - 1) / dp * PARAMS * e),
    ("tp_bytes_last", 4 * L * B * d * e * (tp - 1) / (pp * dp * tp)),
    ("pp_bytes_last", B * d * e / dp),
    ("min_pp", 16), ("min_pp", 16.0),
    ("true_statements", {"tp_inside_a_node", "pp_point_to_point", "dp_once_per_step"}),
])
def test_right_answers_pass(key, value):
    result = verdict(key, value)
    assert result.passed, result.message


@pytest.mark.parametrize("key,value,phrase", [
    ("groups_2x2x2", {"dp": GROUPS["tp"], "pp": GROUPS["pp"], "tp": GROUPS["dp"]},
     "'dp' innermost"),
    ("groups_2x2x2", {**GROUPS, "tp": [[1, 0], [2, 3], [4, 5], [6, 7]]},
     "right members but not in the right order"),
    ("groups_2x2x2", {**GROUPS, "pp": [[0, 2], [1, 3], [4, 6]]}, "every rank exactly once"),
    ("crossing", {4: {"tp", "dp"}, 2: {"dp", "pp"}}, "consecutive ranks"),
    ("crossing", {4: {"dp"}, 2: {"dp"}}, "a pp group such as [0, 2] spans two nodes"),
    ("params_per_rank", L / pp * (8 * d ** 2 + 5 * d) / tp, "added after the all-reduce"),
    ("params_per_rank", L * ((8 * d ** 2 + 4 * d) / tp + d), "only its own stage"),
    ("params_per_rank", PARAMS / dp, "ZeRO"),
    ("dp_bytes", PARAMS * e, "counted once"),
    ("dp_bytes", (dp - 1) / dp * PARAMS * e, "one pass around the ring"),
    ("dp_bytes", 2 * (dp - 1) / dp * e * L / pp * (8 * d ** 2 + 5 * d) / tp, "see B1"),
    ("tp_bytes_last", 2 * L * B * d * e * (tp - 1) / (pp * dp * tp), "only the forward"),
    ("tp_bytes_last", 2 * L * B * d * e / (pp * dp), "tensor once"),
    ("tp_bytes_last", 2 * B * d * e * (2 * L - pp) * (tp - 1) / (dp * pp * tp),
     "the first stage's"),
    ("tp_bytes_last", 4 * L * B * d * e * (tp - 1) / (pp * tp), "B/dp rows"),
    ("pp_bytes_last", 2 * B * d * e / dp, "no next stage"),
    ("pp_bytes_last", B * d * e / (dp * tp), "its own copy"),
    ("pp_bytes_last", 2 * (pp - 1) / pp * B * d * e / dp, "no ring factor"),
    ("pp_bytes_last", 3, "got a number"),
    ("min_pp", 8, "also holds its activations"),
    ("min_pp", 32, "a smaller pipeline does too"),
    ("min_pp", 3, "does not divide"),
    ("best_layout", (32, 2, 8), "Megatron-LM published"),
    ("true_statements", {"tp_inside_a_node", "pp_point_to_point", "dp_once_per_step",
                         "dataparallel_per_stage_is_dp"}, "nn.DataParallel"),
    ("true_statements", {"tp_inside_a_node", "dp_sums_gradients"}, "division by dp"),
    ("true_statements", {"allreduce_sends_the_tensor_once"}, "2(P-1)/P"),
    ("true_statements", {"tp_sends_fewest_messages"}, "the MOST messages"),
    ("true_statements", {"tp_inside_a_node"}, "incomplete"),
])
def test_misconceptions_are_named(key, value, phrase):
    result = verdict(key, value)
    assert not result.passed and phrase in result.message, result.message


def test_the_first_choice_is_the_planners():
    run = planner.MEGATRON_2021[hw5.BEST_LAYOUT_RUN]
    best = planner.best(run.model, planner.Cluster(run.gpus), run.batch).layout
    assert verdict("best_layout", best).passed
    assert verdict("best_layout", list(best)).passed
    if best[::-1] != best:
        assert "order (dp, pp, tp)" in verdict("best_layout", best[::-1]).message


def test_hidden_layouts_do_not_reveal_the_meshes():
    def wrong(shape):
        return {dim: hw5.layout(shape, ("tp", "pp", "dp"))[dim] for dim in hw5.DIMS}
    answers = [hw5.layout(s) for s in hw5.HIDDEN_SHAPES]
    assert verdict("groups_hidden", answers).passed
    answers[1] = wrong(hw5.HIDDEN_SHAPES[1])
    result = verdict("groups_hidden", answers)
    assert not result.passed and "innermost" in result.message
    assert str(hw5.HIDDEN_SHAPES[1]) not in result.message


# -- the run's diagnoses, on reports built in one process ------------------------------------------
MODEL = hybrid.HybridModel(width=hw5.WIDTH, layers=hw5.LAYERS, batch=hw5.BATCH)


def report(dp_value, lr=hw5.LR, spread=False, world=None, traffic=None):
    _, params = hybrid.reference_training(MODEL, hw5.STEPS, lr)
    replicas = [dict(params) for _ in range(dp_value)]
    if spread:
        replicas[-1] = {k: v + 1e-3 for k, v in params.items()}
    size = world or dp_value
    return {"shape": [dp_value, 2, 2], "replicas": replicas, "losses": [0.0],
            "traffic": [{"tp": 0.0, "pp": 0.0, "dp": traffic if traffic is not None else 0.0}] * 8,
            "dp": [[[size, 560]]] * 8}


def test_a_right_run_passes():
    assert verdict("hybrid_2x2x2", report(2)).passed
    hidden = verdict("hybrid_hidden", report(4))
    assert hidden.passed and "(4, 1, 2)" not in hidden.message


@pytest.mark.parametrize("key,value,phrase", [
    ("hybrid_2x2x2", report(2, lr=2 * hw5.LR), "summed over the 2 replicas but not divided"),
    ("hybrid_hidden", report(4, lr=4 * hw5.LR), "summed over the 4 replicas"),
    ("hybrid_2x2x2", report(2, lr=0.3, world=8), "all-reduced over 8 ranks"),
    ("hybrid_2x2x2", report(2, lr=0.3, spread=True), "drifted apart"),
    ("hybrid_2x2x2", {"replicas": []}, "expected the report"),
])
def test_run_misconceptions_are_named(key, value, phrase):
    result = verdict(key, value)
    assert not result.passed and phrase in result.message, result.message
    if key == "hybrid_hidden":
        assert "(4, 1, 2)" not in result.message


def test_the_dp_traffic_is_the_ring_formula():
    # 2 blocks of d = 8 per stage, TP pairs: 2 * ((8*64 + 4*8)/2 + 8) = 560 float64 gradients,
    # a ring all-reduce on 2 ranks sends 2 * 1/2 of them: 560 * 8 bytes
    assert verdict("dp_traffic_2x2x2", report(2, traffic=4480.0)).passed
    assert "no bytes were logged" in verdict("dp_traffic_2x2x2", report(2, traffic=0.0)).message
    assert "2(dp-1)/dp" in verdict("dp_traffic_2x2x2", report(2, traffic=8960.0)).message


def test_originality_verdicts():
    delegated = Raised("WorkerError", "rank 0 raised ReferenceUnavailable: "
                                      "paralab.hybrid:average_gradients is not available in "
                                      "this test: write it yourself")
    assert "write the averaging yourself" in verdict("own_average", delegated).message
    # means over {0, 2}: (1 + 3)/2 = 2; over {1, 3}: (2 + 4)/2 = 3; times (i + 1)
    right = [{"grads": [torch.full((3, 2), float(v)), torch.full((5,), 2.0 * v)]}
             for v in (2, 3, 2, 3)]
    assert verdict("own_average", right).passed
    summed = [{"grads": [torch.full((3, 2), float(v)), torch.full((5,), 2.0 * v)]}
              for v in (4, 6, 4, 6)]
    assert not verdict("own_average", summed).passed
    layout = Raised("ReferenceUnavailable", "paralab.mesh:group_ranks is not available")
    assert "compute the layout itself" in verdict("own_layout", layout).message
    assert verdict("own_layout", hw5.layout(hw5.ORIGINALITY_SHAPE)).passed


@pytest.mark.slow
def test_the_probe_runs_an_averaging_on_four_ranks():
    assert verdict("own_average", hw5.probe_average(hybrid.average_gradients)).passed
