"""The execution path of the grader: limits end to end, the plan between nbgrader and the
pool, the event protocol, tree removal, student ids."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from autograder import corpus
from autograder.bwrap import bwrap_status
from autograder.course import Course, generate
from autograder.events import Emitter, Reader
from autograder.limits import Limits, describe_fields, option_name
from autograder.plan import ExecutionPlan, PlannedRun
from autograder.sandbox import RunResult
from autograder.submissions import STUDENT_ID, student_id
from autograder.trees import remove_tree, tree_size

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "fixtures", "toy_course")
BWRAP, WHY = bwrap_status()


# ---------------------------------------------------------------------------------------
# Limits


def test_limits_are_one_value_that_round_trips_exactly():
    odd = Limits(cell_timeout=0.5, interrupt_grace=0.25, notebook_timeout=77.5, memory_mb=1500,
                 process_memory_mb=1700, max_procs=90, cpu_seconds=333, file_size_mb=40,
                 work_size_mb=48, tmp_size_mb=24, max_cell_output=5000,
                 max_total_output=60000)
    assert Limits.from_json(odd.to_json()) == odd
    assert Limits.from_json(odd.to_json()).cell_timeout == 0.5
    with pytest.raises(ValueError, match="unknown limit.*cell_timout"):
        Limits.from_dict({"cell_timout": 3})
    with pytest.raises(ValueError, match="memory_mb must be a whole number"):
        Limits(memory_mb=0.5)
    with pytest.raises(ValueError, match="must not be negative"):
        Limits(cell_timeout=-1)
    # the command line has an option for every field
    from autograder.__main__ import _parser
    grade = _parser()._subparsers._group_actions[0].choices["grade"]
    options = {o for a in grade._actions for o in a.option_strings}
    assert {option_name(name) for name, *_ in describe_fields()} <= options


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    root = tmp_path_factory.mktemp("mini") / "course"
    shutil.copytree(FIXTURE, root)
    course = Course(str(root))
    generate(course, ["mini"])
    release, source = corpus.load_pair(
        os.path.join(course.assignments_dir, "mini", "mini.ipynb"),
        course.sources("mini")["mini"])
    return course, release, source


REPORT = '''import json, os, resource
def _mb(res):
    return resource.getrlimit(res)[0] / 2**20
_fs = lambda p: os.statvfs(p).f_blocks * os.statvfs(p).f_frsize / 2**20
print("REPORT" + json.dumps({
    "env": json.loads(os.environ["PARALAB_LIMITS"]),
    "cpu": resource.getrlimit(resource.RLIMIT_CPU)[0], "data_mb": _mb(resource.RLIMIT_DATA),
    "fsize_mb": _mb(resource.RLIMIT_FSIZE), "nproc": resource.getrlimit(resource.RLIMIT_NPROC)[0],
    "tmp_mb": _fs("/tmp"), "work_mb": _fs(os.getcwd())}))
'''


@pytest.mark.slow
@pytest.mark.skipif(BWRAP is None, reason=f"{WHY}: needs bubblewrap")
def test_every_limit_on_the_command_line_reaches_the_running_notebook(mini, tmp_path):
    course, release, source = mini
    given = {"cell_timeout": 0.5, "interrupt_grace": 2.5, "notebook_timeout": 77.5,
             "memory_mb": 1500, "process_memory_mb": 1700, "max_procs": 90,
             "cpu_seconds": 333, "file_size_mb": 40, "work_size_mb": 48, "tmp_size_mb": 24,
             "max_cell_output": 5000, "max_total_output": 60000}
    assert set(given) == {name for name, *_ in describe_fields()}
    nb = corpus.solved_notebook(release, source)
    nb = corpus.inject_cell(nb, "print('x' * 6000)\n", "intro")   # over the cell's output
    nb = corpus.inject_cell(nb, "import time\ntime.sleep(5)\n", "intro")  # over 0.5 s
    nb = corpus.inject_cell(nb, REPORT, "intro")
    corpus.write_case(corpus.Case("ann", {"mini.ipynb": corpus.dumps(nb)}, "", 0, ""),
                      str(tmp_path / "class"), "mini")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "autograder", "grade", str(tmp_path / "class"), "--out",
           str(out), "--course-root", course.root, "--no-progress", "--require-sandbox"]
    for name, value in given.items():
        cmd += [option_name(name), str(value)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    graded = json.load(open(out / "course" / "autograded" / "ann" / "mini" / "mini.ipynb"))
    texts = ["".join(o.get("text", "")) for c in graded["cells"] for o in c.get("outputs", [])]
    report = json.loads(next(t for t in texts if t.startswith("REPORT"))[len("REPORT"):])
    assert report["env"] == given                    # every field, as given
    assert report["cpu"] == 333
    assert report["data_mb"] == 1700
    assert report["fsize_mb"] == 40
    assert report["tmp_mb"] == 24 and report["work_mb"] == 48
    if os.geteuid() == 0:  # the sandbox uid runs nothing else: the limit is exactly ours
        assert report["nproc"] == 90
    flood = next(t for t in texts if t.startswith("xxx"))
    assert len(flood) < 5200 and "output truncated by the grader" in flood
    status = open(out / "grades.csv").read()
    assert "cell 3 interrupted at the cell time limit" in status  # at 0.5 s, not 5 s
    run = json.load(open(out / "course" / "grader" / "runs" / "ann" / "mini" / "mini.json"))
    assert run["status"] == "completed" and run["elapsed"] < 30


def _code_notebook(*sources: str) -> dict:
    return {"nbformat": 4, "nbformat_minor": 5, "metadata": {},
            "cells": [{"cell_type": "code", "id": f"c{i}", "metadata": {}, "source": src,
                       "outputs": [], "execution_count": None}
                      for i, src in enumerate(sources)]}


@pytest.mark.slow
def test_the_notebook_clock_starts_with_its_first_cell_not_with_the_kernel(tmp_path):
    """Starting a kernel takes a second or more (many on a loaded machine), longer than
    this notebook limit: a quick notebook still completes, a slow one is stopped in the
    cell that ran over."""
    from autograder.sandbox import Sandbox
    box = Sandbox.create("auto", Limits(notebook_timeout=0.4, cell_timeout=30),
                         tmp_root=str(tmp_path))
    quick = box.run(_code_notebook("x = 1", "y = x + 1"))
    assert (quick.status, quick.reason) == ("completed", ""), quick.reason
    assert sorted(quick.cells) == [0, 1]
    slow = box.run(_code_notebook("x = 1", "import time\ntime.sleep(3)", "y = 2"))
    assert (slow.status, slow.reason) == ("timed out", "notebook limit 0.4 s reached")
    assert slow.running == 1 and sorted(slow.cells) == [0]


def test_a_stop_names_the_cell_that_was_running_and_no_cell_when_none_was():
    from autograder.grading import Entry, _run_status

    cells = [{"index": 0, "grade_id": None}, {"index": 1, "grade_id": "test_x"}]
    in_cell = Entry("s", "a", runs={"a": {"status": "timed out", "running": 1, "cells": cells,
                                          "reason": "notebook limit 8 s reached"}})
    _run_status(in_cell, single=True)
    assert in_cell.status == "timed out: notebook limit 8 s reached in cell 2 (test_x)"
    no_cell = Entry("s", "a", runs={"a": {"status": "timed out", "running": None,
                                          "cells": cells,
                                          "reason": "the kernel did not start within 60 s"}})
    _run_status(no_cell, single=True)
    assert no_cell.status == "timed out: the kernel did not start within 60 s"


# ---------------------------------------------------------------------------------------
# The plan and the events


def test_the_plan_hands_each_notebook_its_own_result(tmp_path):
    plan = ExecutionPlan(str(tmp_path / "plan"))
    nb = {"cells": [{"cell_type": "code", "source": "1", "metadata": {}}], "metadata": {}}
    first = PlannedRun(("ann", "hw", "hw"), nb, str(tmp_path / "a.jsonl"))
    probe = PlannedRun(("ann", "hw", "hw"), nb, str(tmp_path / "p.jsonl"), kind="probe:x")
    plan.collect(first)
    plan.collect(probe)
    assert [r.kind for r in plan.pending()] == ["notebook", "probe:x"]
    assert plan.result(first.key, nb) is None
    plan.store(first, RunResult(status="killed", reason="memory limit", cells={2: {}}))
    assert [r.kind for r in plan.pending()] == ["probe:x"]
    got = plan.result(first.key, nb)
    assert got.status == "killed" and got.cells == {2: {}}
    changed = dict(nb, metadata={"x": 1})
    assert plan.result(first.key, changed) is None  # never the outputs of another notebook


def test_events_reach_the_grader_intact_and_garbage_is_dropped():
    read_fd, write_fd = os.pipe()
    emit = Emitter(write_fd)
    emit.start(3)
    emit.cell(3, [{"output_type": "stream", "name": "stdout", "text": "hi"}], 1, True)
    emit.start(5)
    emit.stream.write("not json\n[1, 2]\n" + '{"type": "cell", "index": "7"}\n')
    emit.end("work dir full", 5, "work directory limit (48 MiB)")
    emit.stream.close()
    reader = Reader()
    while True:
        chunk = os.read(read_fd, 7)  # events split across reads
        if not chunk:
            break
        reader.feed(chunk)
    os.close(read_fd)
    p = reader.progress
    assert p.cells == {3: {"outputs": [{"output_type": "stream", "name": "stdout",
                                        "text": "hi"}], "execution_count": 1}}
    assert p.interrupted == [3] and p.running == 5
    assert (p.end, p.end_index, p.reason) == ("work dir full", 5,
                                              "work directory limit (48 MiB)")


# ---------------------------------------------------------------------------------------
# Trees, names


def test_remove_tree_takes_any_depth_and_locked_folders(tmp_path):
    root = tmp_path / "work"
    root.mkdir()
    fd = os.open(root, os.O_RDONLY)
    for i in range(3000):  # deeper than shutil.rmtree's recursion, longer than PATH_MAX
        os.mkdir("level", dir_fd=fd)
        child = os.open("level", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = child
        if i % 1000 == 0:
            with open(os.open("data", os.O_CREAT | os.O_WRONLY, dir_fd=fd), "wb") as f:
                f.write(b"x" * 8192)
    os.mkdir("locked", dir_fd=fd)
    os.symlink(str(tmp_path / "outside"), "link", dir_fd=fd)
    os.chmod("locked", 0, dir_fd=fd)
    os.close(fd)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "keep").write_text("not the notebook's")
    assert tree_size(str(root)) >= 3 * 8192
    assert remove_tree(str(root)) == []
    assert not root.exists()
    assert (tmp_path / "outside" / "keep").read_text() == "not the notebook's"
    assert remove_tree(str(root)) == []  # gone already: nothing to say


def test_any_folder_name_gets_a_stable_safe_id():
    names = ["alice", "zoë", "ann marie", "张三", "zoe", "a/b".replace("/", "∕"),
             "x" * 200, "\udcff\udcfe"]
    ids = [student_id(n) for n in names]
    assert ids[0] == "alice" and ids[4] == "zoe"
    assert all(STUDENT_ID.match(i) for i in ids)
    assert len(set(ids)) == len(ids)
    assert ids == [student_id(n) for n in names]
    assert ids[1].startswith("zoe-") and ids[2].startswith("ann-marie-")


# ---------------------------------------------------------------------------------------
# The clean re-check, started ahead


def test_the_recheck_started_ahead_says_exactly_what_verify_says(tmp_path):
    """autograder.recheck gets ready, checks answers as they are written (a pass is kept,
    a failure checked again), then gives what python -m autograder.verify gives."""
    checks_dir = os.path.join(FIXTURE, "autograder", "checks")
    early, late = tmp_path / "early.jsonl", tmp_path / "late.jsonl"
    first = ['{"key": "product", "value": 42}', '{"key": "double_visible", "value": 5}']
    early.write_text("\n".join(first) + "\n")
    args = ["mini", "--batch", "--memory-mb", "2048", "--checks-path", checks_dir]
    helper = subprocess.Popen([sys.executable, "-m", "autograder.recheck", *args],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    described = json.loads(helper.stdout.readline())["module"]
    assert described["GRADE_CELLS"] == {"test_product": ["product"],
                                        "test_double": ["double_visible", "double_hidden"]}
    helper.stdin.write(json.dumps({"watch": [str(early), str(late)]}) + "\n")
    helper.stdin.flush()
    # written after the helper started watching: the last record of a key wins
    with open(early, "a") as f:
        f.write('{"key": "double_visible", "value": 6}\n{"key": "double_hidden", "val')
    late.write_text('{"key": "double_hidden", "value": [0, -8, 2000000, 5.0]}\n'
                    '{"key": "product", "value": "42"}\n')
    with open(early, "a") as f:
        f.write('ue": [0, -8, 2000000, 5.0]}\n')
    helper.stdin.write(json.dumps({"verify": [str(early), str(late)]}) + "\n")
    helper.stdin.close()
    ahead = json.loads(helper.stdout.read())
    assert helper.wait() == 0
    plain = subprocess.run([sys.executable, "-m", "autograder.verify", *args, str(early),
                            str(late)], capture_output=True, text=True)
    assert plain.returncode == 0, plain.stderr
    assert ahead == json.loads(plain.stdout)
    assert ahead[str(early)]["test_double"]["passed"] is True
    assert ahead[str(late)]["test_product"]["passed"] is False  # "42" is not 42
