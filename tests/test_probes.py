"""Originality probes: the library's reference implementations, made unavailable in a copy.

The end-to-end behaviour (a delegating submission loses exactly the originality check, an
honest one that uses the simulator keeps it, through the real ``grade`` command) is in
tests/test_grading_homework.py; these tests pin the parts.
"""

import os
import subprocess
import sys
from pathlib import Path

import jupytext
import pytest

from autograder import probes
from autograder.checks import hw1_tensor_parallel as hw1
from autograder.checks import hw2_pipeline_bubbles as hw2

ROOT = Path(__file__).resolve().parents[1]
PARALAB = str(ROOT / "paralab")


@pytest.fixture(scope="module")
def stripped(tmp_path_factory):
    dest = tmp_path_factory.mktemp("stripped")
    names = probes.unavailable_names(hw2) + probes.unavailable_names(hw1)
    return probes.strip_library(PARALAB, names, str(dest))


def run_python(stripped_paralab, code):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(stripped_paralab), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, cwd=os.path.dirname(stripped_paralab), timeout=120)


def test_every_probe_of_the_course_names_real_functions(tmp_path):
    for module in (hw1, hw2):
        for key, probe in module.PROBES.items():
            assert probe.unavailable and probe.cells and probe.call
            probes.strip_library(PARALAB, probe.unavailable, str(tmp_path / key / module.__name__))


def test_unknown_names_are_a_course_error(tmp_path):
    with pytest.raises(probes.ProbeError, match="not defined"):
        probes.strip_library(PARALAB, ["paralab.schedules:no_such_generator"], str(tmp_path / "a"))
    with pytest.raises(probes.ProbeError, match="no module"):
        probes.strip_library(PARALAB, ["paralab.nothing:f"], str(tmp_path / "b"))
    with pytest.raises(probes.ProbeError, match="paralab.module:qualname"):
        probes.strip_library(PARALAB, ["one_f_one_b"], str(tmp_path / "c"))


def test_the_copy_refuses_the_references_and_keeps_everything_else(stripped):
    code = """
import paralab
from paralab import schedules, simulate, validate
from paralab.schedules import Action, Schedule
alias = schedules.one_f_one_b                      # an alias made before the call
for call in (lambda: alias(2, 2), lambda: schedules.gpipe(2, 2),
             lambda: schedules.one_f_one_b.__wrapped__(2, 2),   # under the decorator
             lambda: schedules.build("1f1b", 2, 2)):
    try:
        call()
        print("REFERENCE RAN")
    except paralab.ReferenceUnavailable as e:
        print("unavailable:", e)
rows = [[Action("F", 0, 0), Action("B", 0, 0)], [Action("F", 0, 1), Action("B", 0, 1)]]
own = validate(Schedule(tuple(map(tuple, rows)), 1, 2))
print("makespan", simulate(own, 1, 2).makespan)
from paralab import tp
try:
    tp.copy_to_tp
    tp.ColumnParallelLinear.forward(None, None)
except paralab.ReferenceUnavailable as e:
    print("unavailable:", e)
print("FFN still there", tp.FFN(4).linear1.weight.shape)
"""
    done = run_python(stripped, code)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "REFERENCE RAN" not in out
    assert out.count("unavailable:") == 5
    assert "paralab.schedules:one_f_one_b is not available in this test" in out
    assert "makespan 6" in out and "FFN still there" in out


def test_probe_notebook_runs_the_needed_cells_then_records(tmp_path):
    source = jupytext.read(ROOT / "solutions" / "hw2_pipeline_bubbles"
                           / "hw2_pipeline_bubbles.pct.py")
    nb = probes.probe_notebook(source, "hw2_pipeline_bubbles", hw2.PROBES)
    sources = [c["source"] for c in nb["cells"]]
    assert len(sources) == 3
    assert "from autograder.checks import hw2_pipeline_bubbles as checks" in sources[0]
    assert "def one_f_one_b(p, m):" in sources[1]
    assert sources[2].splitlines()[-1] == (
        "checks.check('own_implementation', lambda: one_f_one_b(*checks.ORIGINALITY_SIZE))")
    without_d = {"cells": [c for c in source.cells
                           if c.metadata.get("nbgrader", {}).get("grade_id") != "d"]}
    assert len(probes.probe_notebook(without_d, "hw2_pipeline_bubbles", hw2.PROBES)["cells"]) == 2
