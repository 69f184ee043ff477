"""Negative controls on the real homework, through the real `grade` command: the bundled
sample class and the untouched release (must score zero), in one grading run.  A mutant
whose notebook is a sample student's is checked here, on that student's row; the other
mutants are graded in ``tests/test_grading_mutants.py`` (on the other test worker).
"""

import re
import shutil
import sys
from pathlib import Path

import pytest

from autograder import samples

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grading_support import feedback, grade, loses_exactly  # noqa: E402 - next to this file

ROOT = Path(__file__).resolve().parents[1]
HOMEWORK = samples.homework()
_, AS_STUDENT = samples.mutant_submissions()
MUTANT = {(m.assignment, m.name): m for m in samples.all_mutants()}
pytestmark = [pytest.mark.slow, pytest.mark.heavy(7)]


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
    return grade(submissions, out), out


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


@pytest.mark.parametrize("key", sorted(AS_STUDENT), ids=lambda k: "-".join(k))
def test_mutant_that_is_a_sample_student_loses_exactly_its_points(graded, key):
    rows, out = graded
    mutant = MUTANT[key]
    student, assignment = AS_STUDENT[key]
    loses_exactly(rows, out, student, [mutant], mutant.expected_score())


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
