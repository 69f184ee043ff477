"""Negative controls on the real homework, through the real `grade` command.

One grading run (grading is the expensive part) covers: the bundled sample class, the
untouched release (must score zero) and every mutant of every assignment (``autograder/mutants/``)
(each must lose exactly the points of the checks it breaks, with feedback that names the
misconception).  Mutants whose answers and failing checks do not overlap are graded together
as one submission (``samples.packs``), which must then lose exactly the sum of their points.
"""

import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from autograder import corpus, samples

ROOT = Path(__file__).resolve().parents[1]
HOMEWORK = samples.homework()
MUTANTS = samples.all_mutants()
PACKS, AS_STUDENT = samples.mutant_submissions()
PACK_OF = {(m.assignment, m.name): pack for pack in PACKS for m in pack.mutants}
pytestmark = pytest.mark.slow


def test_committed_sample_class_is_what_the_builders_make():
    assert samples.drift() == []


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    root = tmp_path_factory.mktemp("grading")
    submissions, out = root / "submissions", root / "out"
    shutil.copytree(samples.CLASS_DIR, submissions)
    for assignment in HOMEWORK:
        release = ROOT / "assignments" / assignment / f"{assignment}.ipynb"
        target = submissions / "release" / assignment
        target.mkdir(parents=True)
        shutil.copy(release, target)
    for i, pack in enumerate(PACKS):
        target = submissions / f"mutants-{i}" / pack.assignment
        target.mkdir(parents=True)
        (target / f"{pack.assignment}.ipynb").write_bytes(corpus.dumps(pack.notebook()))
    command = [sys.executable, "-m", "autograder", "grade", str(submissions), "--out", str(out),
               "--cell-timeout", "30", "--jobs", "2", "--no-progress",
               "--sandbox-uid", str(63000 + os.getpid() % 1000)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(out / "grades.csv", newline="") as f:
        rows = {(r["student"], r["assignment"]): r for r in csv.DictReader(f)}
    return rows, out


def feedback(out, student, assignment):
    page = out / "feedback" / student / assignment / f"{assignment}.html"
    return page.read_text(encoding="utf-8") if page.exists() else ""


@pytest.mark.parametrize("sample", samples.sample_class(), ids=lambda s: s.student)
def test_sample_class(graded, sample):
    rows, _ = graded
    for assignment in HOMEWORK:
        row = rows[(sample.student, assignment)]
        assert re.search(sample.status_of(assignment), row["status"]), row["status"]
        assert float(row["score"]) == sample.expected_score(assignment), (assignment, row)


def test_release_scores_zero_and_solutions_full_marks(graded):
    rows, _ = graded
    for assignment in HOMEWORK:
        assert float(rows[("release", assignment)]["score"]) == 0
        full = rows[("ada", assignment)]
        assert float(full["score"]) == float(full["max_score"]) > 0


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: f"{m.assignment}-{m.name}")
def test_mutant_loses_exactly_its_points(graded, mutant):
    rows, out = graded
    key = (mutant.assignment, mutant.name)
    if key in AS_STUDENT:  # the very notebook of a sample student, graded as theirs
        student, _ = AS_STUDENT[key]
        graded_as, expected = student, mutant.expected_score()
    else:
        pack = PACK_OF[key]
        student = f"mutants-{PACKS.index(pack)}"
        graded_as, expected = pack.name, pack.expected_score()
    row = rows[(student, mutant.assignment)]
    assert row["status"] == "graded", (graded_as, row["status"])
    assert float(row["score"]) == expected, graded_as
    # a mutant with nothing to fail is an honest variant that must keep every point
    assert (float(row["score"]) < float(row["max_score"])) == bool(mutant.fails), graded_as
    page = feedback(out, student, mutant.assignment)
    for phrase in mutant.feedback:
        assert phrase.replace("'", "&#39;") in page or phrase in page, phrase


def test_feedback_names_misconceptions_and_hides_hidden_tests(graded):
    _, out = graded
    page = feedback(out, "ben", "hw2_pipeline_bubbles")
    assert "is T_ideal" in page and "m/p = 2 per rank is a common claim" in page
    for assignment in HOMEWORK:
        text = feedback(out, "ada", assignment)
        assert "HIDDEN_SIZES" not in text and "HIDDEN_CASES" not in text
        assert "BEGIN HIDDEN TESTS" not in text


def test_make_grade_sample_report_format(graded):
    _, out = graded
    text = samples.report(str(out))
    assert text.splitlines()[0].split()[:3] == ["student", "assignment", "score"]
    assert "feedback:" in text
