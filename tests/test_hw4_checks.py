"""hw4_memory's checks: right answers pass, each known misconception is named.

The right answers are worked out here by hand from the homework's numbers (s=2048, b=1,
h=5120, a=40, L=40, t=4, p=4, m=32), not read from the library the checks use."""

from fractions import Fraction
from pathlib import Path

import jupytext
import numpy as np
import pytest
import sympy as sp
import torch
from torch.utils.checkpoint import checkpoint

from autograder.checks import Raised, encode, run_check
from autograder.checks import hw4_memory as hw4

ROOT = Path(__file__).resolve().parents[1]
s, b, h, a, t, p, v = sp.symbols("s b h a t p v")  # plain symbols, as a student may build them

SBH = 2048 * 1 * 5120
LAYER = SBH * (34 + 5 * 40 * 2048 // 5120)           # 114 sbh
TP_SP = LAYER // 4
FIRST_1F1B = 4 * 10 * TP_SP                          # p in flight x L/p layers
PARAMS = 10 * ((12 * 5120 ** 2 + 7 * 5120) // 4 + 6 * 5120)
TOTAL = 16 * PARAMS + 40 * 34 * SBH // 4


def verdict(key, value):
    return hw4.CHECKS[key](value)


def test_every_test_cell_has_checks_and_every_check_is_used():
    notebook = jupytext.read(ROOT / "solutions" / "hw4_memory" / "hw4_memory.pct.py")
    cells = {c.metadata["nbgrader"]["grade_id"] for c in notebook.cells
             if c.metadata.get("nbgrader", {}).get("grade")}
    assert set(hw4.GRADE_CELLS) == cells
    assert {key for keys in hw4.GRADE_CELLS.values() for key in keys} == set(hw4.CHECKS)


@pytest.mark.parametrize("key,value", [
    ("layer_bytes_formula", s * b * h * (34 + 5 * a * s / h)),
    ("layer_bytes_formula", 34 * s * b * h + 5 * a * s ** 2 * b),
    ("layer_bytes", LAYER), ("layer_bytes", float(LAYER)), ("layer_bytes", np.int64(LAYER)),
    ("tp_formula", s * b * h * (10 + 24 / t + 5 * a * s / (h * t))),
    ("tp_formula", 10 * s * b * h + (24 * s * b * h + 5 * a * s ** 2 * b) / t),
    ("bytes_by_strategy", {"tp": SBH * (10 + 24 // 4 + 80 // 4), "tp+sp": TP_SP,
                           "tp+sp+selective": 34 * SBH // 4}),
    ("least_recompute", "selective"),
    ("selective_share", Fraction(1, 16)), ("selective_share", 0.0625),
    ("peak_gpipe_rank0", 32 * 10 * TP_SP), ("peak_1f1b_rank0", FIRST_1F1B),
    ("first_stage_by_p", [FIRST_1F1B] * 3),
    ("interleaved_factor", 1 + (p - 1) / (p * v)), ("interleaved_factor", (p * v + p - 1) / (p * v)),
    ("rank0_total", TOTAL), ("rank0_total", sp.Integer(TOTAL)),
    ("step_time_full", 11 * (2 + 4 + 2)), ("bubble_full", 3 * (2 + 4 + 2)),
    ("step_time_selective", 11 * (2 + 4 + Fraction(2, 16))), ("step_time_selective", 67.375),
])
def test_right_answers_pass(key, value):
    result = verdict(key, value)
    assert result.passed, result.message


@pytest.mark.parametrize("key,value,phrase", [
    ("layer_bytes_formula", 34 * s * b * h, "forgetting the 5as/h term"),
    ("layer_bytes_formula", s * b * h * (36 + 6 * a * s / h), "1 byte"),
    ("layer_bytes_formula", 2 * s * b * h * (34 + 5 * a * s / h), "4-byte activations"),
    ("layer_bytes_formula", s * b * (34 + 5 * a * s), "at the homework's s=2048"),
    ("layer_bytes_formula", s * b * h * (34 + 5 * a * s / h) / t, "depends on t"),
    ("layer_bytes_formula", 5, "got a number"),
    ("layer_bytes", 34 * SBH, "forgetting the 5as/h term"),
    ("layer_bytes", LAYER / 2 ** 30, "in GiB"),
    ("tp_formula", s * b * h * (34 + 5 * a * s / h) / t,
     "TP without SP leaves the 10·sbh replicated part"),
    ("tp_formula", s * b * h * (10 + 24 / t), "forgetting the 5as/h term"),
    ("tp_formula", 34 * s * b * h / t, "selective recomputation"),
    ("bytes_by_strategy", {"tp": TP_SP, "tp+sp": TP_SP, "tp+sp+selective": 34 * SBH // 4},
     "TP without SP leaves the 10·sbh replicated part"),
    ("bytes_by_strategy", {"tp": SBH * 36, "tp+sp": TP_SP, "tp+sp+selective": 34 * SBH},
     "every term is divided by t"),
    ("bytes_by_strategy", {"tp": 1}, "exactly the keys"),
    ("least_recompute", "full", "take the least that fits"),
    ("least_recompute", "none", "more than the 8 GiB budget"),
    ("least_recompute", "some", "expected one of"),
    ("selective_share", 80 / 114, "share of the layer's MEMORY"),
    ("selective_share", 0, "not free"),
    ("peak_1f1b_rank0", 8 * 10 * TP_SP, "not m/p microbatches"),
    ("peak_1f1b_rank0", 32 * 10 * TP_SP, "GPipe's first stage"),
    ("peak_1f1b_rank0", 4 * 40 * TP_SP, "only the stage's L/p layers"),
    ("peak_1f1b_rank0", 10 * TP_SP, "LAST stage"),
    ("peak_gpipe_rank0", FIRST_1F1B, "holds all m microbatches"),
    ("first_stage_by_p", [2 * 40 * TP_SP, 4 * 40 * TP_SP, 8 * 40 * TP_SP],
     "1F1B memory grows with p"),
    ("first_stage_by_p", [16 * 20 * TP_SP, 8 * 10 * TP_SP, 4 * 5 * TP_SP], "m/p microbatches"),
    ("interleaved_factor", 1 / v, "does not divide the memory by v"),
    ("interleaved_factor", 1, "MORE than 1F1B's"),
    ("interleaved_factor", (p - 1) / (p * v), "only the extra part"),
    ("rank0_total", 4 * PARAMS + 40 * 34 * SBH // 4, "forgets Adam's state"),
    ("rank0_total", 12 * PARAMS + 40 * 34 * SBH // 4, "fp32 master copy"),
    ("rank0_total", 40 * 34 * SBH // 4, "only the activations"),
    ("step_time_full", 66, "recomputation is not free"),
    ("step_time_full", 66 + 8 * 2, "the bubble grows too"),
    ("bubble_full", 18, "the bubble without recomputation"),
    ("step_time_selective", 66, "recomputation is not free"),
    ("step_time_selective", 88, "FULL recomputation"),
])
def test_misconceptions_are_named(key, value, phrase):
    result = verdict(key, value)
    assert not result.passed and phrase in result.message, result.message


# -- the checkpointed stage, on real layers -----------------------------------------------------------
def with_checkpoint(layers, x, **options):
    for layer in layers:
        x = checkpoint(layer, x, **{"use_reentrant": False, **options})
    return x


def plain(layers, x):
    for layer in layers:
        x = layer(x)
    return x


def whole_stage(layers, x):
    return checkpoint(lambda y: plain(layers, y), x, use_reentrant=False)


def no_grad(layers, x):
    with torch.no_grad():
        return plain(layers, x)


@pytest.mark.parametrize("forward,phrase", [
    (with_checkpoint, None),
    (lambda layers, x: with_checkpoint(layers, x, use_reentrant=True), None),
    (lambda layers, x: with_checkpoint(layers, x, preserve_rng_state=False),
     "drew different dropout masks"),
    (plain, "still keeps every activation"),
    (whole_stage, "one input for the whole stage"),
    (no_grad, "does not require grad"),
    (lambda layers, x: plain(layers[::-1], x), "the output differs"),
])
def test_the_stage_check_on_real_runs(forward, phrase):
    result = verdict("checkpoint_visible", hw4.run_stage(forward))
    if phrase is None:
        assert result.passed, result.message
    else:
        assert not result.passed and phrase in result.message, result.message


def test_the_recorded_stage_survives_the_trip_to_the_clean_process():
    encoded = encode(hw4.run_stage(with_checkpoint))
    assert run_check(hw4.CHECKS, "checkpoint_visible", encoded).passed
    hidden = encode([hw4.run_stage(with_checkpoint, case) for case in hw4.HIDDEN_STAGES])
    assert run_check(hw4.CHECKS, "checkpoint_hidden", hidden).passed
    wrong = encode([hw4.run_stage(plain, case) for case in hw4.HIDDEN_STAGES])
    result = run_check(hw4.CHECKS, "checkpoint_hidden", wrong)
    assert not result.passed and "still keeps every activation" in result.message


def test_own_implementation_verdicts():
    own = hw4.run_stage(with_checkpoint, hw4.ORIGINALITY_STAGE)
    assert verdict("own_implementation", own).passed
    unavailable = Raised("ReferenceUnavailable", "paralab.transformer:TransformerLayer."
                                                 "_layer_recomputed is not available")
    result = verdict("own_implementation", unavailable)
    assert not result.passed and "layer's own recomputation" in result.message
    assert not run_check(hw4.CHECKS, "own_implementation", encode(Raised("KeyError", "x"))).passed


def test_without_the_layers_recomputation_torch_checkpoint_still_works(tmp_path):
    """The probe's copy of the library: the layer's own recomputation raises, everything
    the exercise needs (the plain layer, the meter, torch.utils.checkpoint) works."""
    import os
    import subprocess
    import sys

    from autograder import probes
    stripped = probes.strip_library(str(ROOT / "paralab"), probes.unavailable_names(hw4),
                                    str(tmp_path / "copy"))
    code = """
import paralab, torch
from torch.utils.checkpoint import checkpoint
from autograder.checks import hw4_memory as checks

def own(layers, x):
    for layer in layers:
        x = checkpoint(layer, x, use_reentrant=False)
    return x

def library(layers, x):
    for layer in layers:
        layer.recompute = "full"
        x = layer(x)
    return x

print("own", checks.CHECKS["own_implementation"](checks.run_stage(own, checks.ORIGINALITY_STAGE)).passed)
try:
    checks.run_stage(library, checks.ORIGINALITY_STAGE)
except paralab.ReferenceUnavailable as e:
    print("unavailable:", e)
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(stripped), str(ROOT)]),
               OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(stripped), timeout=120)
    assert done.returncode == 0, done.stderr
    assert "own True" in done.stdout
    assert "unavailable: paralab.transformer:TransformerLayer._layer_recomputed" in done.stdout
