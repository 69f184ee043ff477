"""Text sources -> student release: deterministic, leak-free, consistent with the checks."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from autograder.course import (Course, CourseError, check_release, generate, read_source,
                               secret_lines, validate_assignment)

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "fixtures", "toy_course")
REPO = os.path.dirname(HERE)


@pytest.fixture
def course(tmp_path):
    root = tmp_path / "course"
    shutil.copytree(FIXTURE, root)
    c = Course(str(root))
    generate(c)
    return c


def read(path):
    with open(path, "rb") as f:
        return f.read()


def test_generation_is_byte_stable(course, tmp_path):
    first = {a: read(os.path.join(course.assignments_dir, a, f"{a}.ipynb"))
             for a in course.assignments()}
    generate(course, into=str(tmp_path / "again"))
    for a, data in first.items():
        assert read(str(tmp_path / "again" / a / f"{a}.ipynb")) == data
    assert check_release(course) == []
    # the conversion itself is deterministic: ids come from grade_id
    nb = read_source(course.sources("toy")["toy"])
    assert [c["id"] for c in nb.cells][:3] == ["intro", "setup", "q1_text"]
    assert "jupytext" not in nb.metadata and nb.metadata["kernelspec"]["name"] == "python3"


def test_release_has_no_solution_and_no_hidden_test(course):
    for a in course.assignments():
        text = read(os.path.join(course.assignments_dir, a, f"{a}.ipynb")).decode()
        source = open(course.sources(a)[a]).read()
        for marker in ("BEGIN SOLUTION", "BEGIN HIDDEN TESTS", "END HIDDEN TESTS"):
            assert marker not in text
        secrets = secret_lines(source)
        assert secrets, "the fixture has solution lines to look for"
        cells = "\n".join(c["source"] if isinstance(c["source"], str) else "".join(c["source"])
                          for c in json.loads(text)["cells"])
        for line in secrets:
            assert line not in cells
        assert os.listdir(os.path.join(course.assignments_dir, a)) == [f"{a}.ipynb"]


def test_check_release_reports_drift_and_every_kind_of_leak(course):
    toy = os.path.join(course.assignments_dir, "toy")
    shutil.copy(course.sources("toy")["toy"], toy)                        # a source file
    with open(os.path.join(toy, "notes.md"), "w") as f:                  # an unlisted file
        f.write("### BEGIN SOLUTION\n")
    nb = json.load(open(os.path.join(toy, "toy.ipynb")))
    nb["cells"][3]["source"] = ["idle_time = (4 - 1) * (1 + 2)\n"]      # a solution line
    json.dump(nb, open(os.path.join(toy, "toy.ipynb"), "w"))
    os.makedirs(os.path.join(course.assignments_dir, "old_homework"))
    problems = "\n".join(check_release(course))
    assert "assignments/toy/toy.pct.py" in problems and "only notebooks" in problems
    assert "contains the marker 'BEGIN SOLUTION'" in problems
    assert "assignments/toy/toy.ipynb differs from what the sources generate" in problems
    assert "contains a line of a solution or hidden test: 'idle_time = (4 - 1) * (1 + 2)'" \
        in problems
    assert "assignments/old_homework/ has no source" in problems


def test_check_release_ignores_what_jupyterlab_and_editors_leave_behind(course):
    folder = os.path.join(course.assignments_dir, "toy")
    checkpoints = os.path.join(folder, ".ipynb_checkpoints")
    os.makedirs(checkpoints)
    shutil.copy(os.path.join(folder, "toy.ipynb"), os.path.join(checkpoints,
                                                                "toy-checkpoint.ipynb"))
    for name in (".DS_Store", "toy.ipynb~", ".toy.ipynb.swp"):
        with open(os.path.join(folder, name), "w") as f:
            f.write("x")
    assert check_release(course) == []
    with open(os.path.join(folder, "notes.txt"), "w") as f:  # a real stray file still counts
        f.write("x")
    assert any("notes.txt" in p for p in check_release(course))


def test_check_release_sees_a_source_edited_without_regenerating(course):
    path = course.sources("mini")["mini"]
    with open(path, "a") as f:
        f.write("\n# %%\nprint('one more cell')\n")
    problems = check_release(course, ["mini"])
    assert problems == ["assignments/mini/mini.ipynb differs from what the sources generate: "
                        "run `python -m autograder generate mini`"]


def test_every_test_cell_needs_a_grade_cells_entry(course):
    path = os.path.join(course.checks_dir, "mini.py")
    text = open(path).read().replace('"test_product": ["product"],', "")
    with open(path, "w") as f:
        f.write(text.replace("GRADE_CELLS = {", 'GRADE_CELLS = {\n    "test_gone": ["product"],'))
    sys.modules.pop("autograder.checks.mini", None)
    try:
        with pytest.raises(CourseError) as info:
            validate_assignment(course, "mini")
    finally:
        sys.modules.pop("autograder.checks.mini", None)
    message = str(info.value)
    assert "test cell 'test_product' (mini.pct.py) has no GRADE_CELLS entry" in message
    assert "GRADE_CELLS lists 'test_gone', which is not an autograded test cell" in message


def test_cli_generate_and_check_release(tmp_path):
    root = tmp_path / "course"
    shutil.copytree(FIXTURE, root)
    run = [sys.executable, "-m", "autograder"]
    gen = subprocess.run(run + ["generate", "mini", "--course-root", str(root)],
                         capture_output=True, text=True)
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.split() == ["assignments/mini/mini.ipynb"]
    ok = subprocess.run(run + ["check-release", "mini", "--course-root", str(root)],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "no leaks" in ok.stdout
    (root / "assignments" / "mini" / "answers.py").write_text("product = 42\n")
    bad = subprocess.run(run + ["check-release", "mini", "--course-root", str(root)],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "assignments/mini/answers.py" in bad.stdout
    sources = subprocess.run(run + ["sources", "mini", "--course-root", str(root)],
                             capture_output=True, text=True)
    assert sources.stdout.split() == ["solutions/mini/mini.ipynb"]
    ok = subprocess.run(run + ["check-release", "mini", "--course-root", str(root)],
                        capture_output=True, text=True)
    assert "solutions/mini/mini.ipynb" not in ok.stdout  # sources never reach the release
    usage = subprocess.run(run + ["generate", "hw9", "--course-root", str(root)],
                           capture_output=True, text=True)
    assert usage.returncode == 2
    assert usage.stderr.strip().splitlines() == [
        "error: unknown assignment(s) hw9; the course has: mini, toy"]


REAL = Course(REPO)


@pytest.mark.parametrize("assignment", REAL.assignments() or
                         [pytest.param(None, marks=pytest.mark.skip(
                             reason="no assignment sources in solutions/ yet"))])
def test_real_assignments_are_released_as_generated_and_leak_free(assignment):
    """The committed release of each real assignment is exactly what its sources generate,
    leaks nothing, and every test cell has its GRADE_CELLS entry."""
    validate_assignment(REAL, assignment)
    assert check_release(REAL, [assignment]) == []
