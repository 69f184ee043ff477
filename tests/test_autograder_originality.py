"""The "own implementation" verdict comes from a run the student's kernel never touched.

Through the real ``grade`` command on hw2: a submission that delegates to the library's
1F1B generator loses the originality check even when it switches off the profiler or
rebinds every check helper in its own kernel; an honest one that calls the simulator inside
its ``one_f_one_b`` keeps it."""

import csv
import re
import subprocess
import sys

import pytest

from autograder import corpus, samples
from autograder.bwrap import bwrap_status
from autograder.mutants import hw2_pipeline_bubbles as hw2_mutants

pytestmark = pytest.mark.slow
BWRAP, WHY = bwrap_status()
HW2 = hw2_mutants.ASSIGNMENT

HONEST = '''def one_f_one_b(p, m):
    orders = []
    for r in range(p):
        warmup = min(p - r - 1, m)
        actions = [Action("F", i, r) for i in range(warmup)]
        for k in range(m - warmup):
            actions += [Action("F", warmup + k, r), Action("B", k, r)]
        actions += [Action("B", i, r) for i in range(m - warmup, m)]
        orders.append(tuple(actions))
    schedule = Schedule(tuple(orders), num_microbatches=m, num_stages=p, name="1f1b")
    simulate(schedule, 1, 1)  # does it run at all?
    return schedule
'''


@pytest.mark.skipif(BWRAP is None, reason=f"{WHY}: the probe runs in the sandbox")
def test_originality_is_decided_outside_the_students_kernel(tmp_path):
    release, source = samples.notebooks(HW2)
    cases = corpus.originality_cases(
        HW2, HW2, release, source, answer_cell="d", delegating=hw2_mutants.DELEGATES,
        honest=HONEST, delegating_score=samples.expected_score(HW2, {"own_implementation"}),
        honest_score=samples.expected_score(HW2, set()))
    for case in cases:
        corpus.write_case(case, str(tmp_path / "class"), HW2)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "autograder", "grade", str(tmp_path / "class"),
                           "--out", str(out), "--no-progress", "--cell-timeout", "60"],
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "grades.csv", newline="") as f:
        rows = {r["student"]: r for r in csv.DictReader(f)}
    for case in cases:
        row = rows[case.student]
        assert re.search(case.status, row["status"]), (case.about, row)
        assert float(row["score"]) == case.score, (case.about, row)
        probe = out / "course" / "grader" / "answers" / case.student / HW2 / f"{HW2}.probe.jsonl"
        assert "own_implementation" in probe.read_text(), case.student
    assert samples.expected_score(HW2, {"own_implementation"}) < \
        samples.expected_score(HW2, set())
