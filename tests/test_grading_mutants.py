"""Every mutant of every assignment (``autograder/mutants/``), graded through the real
`grade` command: each must lose exactly the points of the checks it breaks, with feedback
that names the misconception.  Mutants whose answers and failing checks do not overlap are
graded together as one submission (``samples.packs``), which must then lose exactly the sum
of their points.  (Mutants that are sample students are checked with the sample class, in
``tests/test_grading_homework.py``.)
"""

import sys
from pathlib import Path

import pytest

from autograder import corpus, samples

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grading_support import grade, loses_exactly  # noqa: E402 - next to this file

PACKS, _ = samples.mutant_submissions()
pytestmark = [pytest.mark.slow, pytest.mark.heavy(5)]


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    root = tmp_path_factory.mktemp("mutants")
    submissions, out = root / "submissions", root / "out"
    for i, pack in enumerate(PACKS):
        target = submissions / f"mutants-{i}" / pack.assignment
        target.mkdir(parents=True)
        (target / f"{pack.assignment}.ipynb").write_bytes(corpus.dumps(pack.notebook()))
    return grade(submissions, out), out


@pytest.mark.parametrize("index", range(len(PACKS)),
                         ids=[f"{p.assignment}-{p.name}" for p in PACKS])
def test_pack_loses_exactly_its_mutants_points(graded, index):
    rows, out = graded
    pack = PACKS[index]
    loses_exactly(rows, out, f"mutants-{index}", pack.mutants, pack.expected_score())
