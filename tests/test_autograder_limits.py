"""Limits with and without bubblewrap, on the fast mini assignment, and the input rules
(zip safety, folder layout, unknown assignments)."""

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

from autograder import corpus
from autograder.course import Course, generate
from autograder.bwrap import bwrap_status
from autograder.processes import MARKER_ENV, PidsCgroup, list_processes
from autograder.submissions import InputError, class_root, extract_zip

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "fixtures", "toy_course")
BWRAP, WHY = bwrap_status()
WORK_MB = 32
LIMITS = ["--cell-timeout", "5", "--notebook-timeout", "8", "--memory-mb", "1024",
          "--max-procs", "96", "--work-size-mb", str(WORK_MB)]
SLEEPER = "import time\ntime.sleep(3.5)\n"


def _fork_bomb_is_contained() -> bool:
    """Without bubblewrap a fork bomb is stopped by RLIMIT_NPROC (not root) or a pids
    cgroup (root); with neither, only by polling: not something to run in a test."""
    if os.geteuid() != 0:
        return True
    group = PidsCgroup.create(f"paralab-probe-{os.getpid()}", 10)
    if group is None:
        return False
    group.remove()
    return True


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    root = tmp_path_factory.mktemp("mini") / "course"
    shutil.copytree(FIXTURE, root)
    course = Course(str(root))
    generate(course, ["mini"])
    release, source = corpus.load_pair(os.path.join(course.assignments_dir, "mini", "mini.ipynb"),
                                       course.sources("mini")["mini"])
    return course, release, source


def mini_class(mini, folder, names, sandboxed=True):
    course, release, source = mini
    cases = {c.student: c for c in corpus.adversarial_corpus("mini", "mini", release, source,
                                                             sandboxed=sandboxed,
                                                             work_size_mb=WORK_MB)}
    good = corpus.solved_notebook(release, source)
    slow = good
    for _ in range(3):  # three cells of 3.5 s: each under the cell limit, together over
        slow = corpus.inject_cell(slow, SLEEPER, "intro")
    died = corpus.inject_cell(good, "import os\nos._exit(1)\n", "test_product")
    cases["kernel_death"] = corpus.Case("kernel_death", {"mini.ipynb": corpus.dumps(died)},
                                        r"^kernel died in cell 4 \(exit code 1\)$", 1.0,
                                        "the kernel exits after the first test")
    cases["sleeper"] = corpus.Case("sleeper", {"mini.ipynb": corpus.dumps(slow)},
                                   r"^timed out: notebook limit 8 s reached in cell \d+$",
                                   0.0, "slow cells, together over the notebook limit")
    for name in names:
        corpus.write_case(cases[name], str(folder), "mini")
    return {n: cases[n] for n in names}


def grade(course, submissions, out, *extra, env=None):
    # one notebook at a time: the wall-clock limits of these tests are tight
    cmd = [sys.executable, "-m", "autograder", "grade", str(submissions), "--out", str(out),
           "--course-root", course.root, "--no-progress", "--jobs", "1", *LIMITS, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def table(out):
    with open(os.path.join(out, "grades.csv"), newline="") as f:
        return {r["student"]: r for r in csv.DictReader(f)}


def no_marked_process_left(out):
    """No process carries the marker of a run of ``out`` (other graders may be running on
    this machine: their processes carry their own markers)."""
    runs = os.path.join(out, "course", "grader", "runs")
    markers = {f"{MARKER_ENV}={json.load(open(os.path.join(d, f)))['marker']}".encode()
               for d, _, files in os.walk(runs) for f in files if f.endswith(".json")}
    assert markers
    for proc in list_processes().values():
        try:
            with open(f"/proc/{proc.pid}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        if any(m in env for m in markers):
            return False
    return True


@pytest.mark.slow
def test_without_bubblewrap_limits_still_apply_and_one_warning_says_so(mini, tmp_path):
    names = ["correct", "release", "infinite_loop", "memory_bomb", "sleeper", "malformed",
             "deep_tree", "kill_runner", "disk_filler"]
    if _fork_bomb_is_contained():
        names.append("fork_bomb")
    cases = mini_class(mini, tmp_path / "class", names, sandboxed=False)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = dict(os.environ, PATH=os.path.dirname(sys.executable),  # no bwrap on the PATH
               TMPDIR=str(scratch))
    proc = grade(mini[0], tmp_path / "class", tmp_path / "out", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if "WITHOUT a sandbox" in line]
    assert len(warnings) == 1
    assert warnings[0].startswith("warning: bubblewrap not found: submissions run WITHOUT a "
                                  "sandbox")
    assert "apt-get install bubblewrap" in warnings[0] and "--no-sandbox" in warnings[0]
    got = table(tmp_path / "out")
    for name, case in cases.items():
        assert re.search(case.status, got[name]["status"]), (name, got[name]["status"])
        assert float(got[name]["score"]) == case.score, (name, got[name])
    assert no_marked_process_left(tmp_path / "out")
    # the work directories were on this disk (the deep tree included): all gone
    assert os.listdir(scratch) == []
    print(open(tmp_path / "out" / "course" / "grader" / "runs.log").read())

    mini_class(mini, tmp_path / "one", ["correct"])
    quiet = grade(mini[0], tmp_path / "one", tmp_path / "out2", "--no-sandbox", env=env)
    assert quiet.returncode == 0 and "WITHOUT a sandbox" not in quiet.stderr
    assert table(tmp_path / "out2")["correct"]["score"] == "3"

    required = grade(mini[0], tmp_path / "one", tmp_path / "out3", "--require-sandbox",
                     env=env)
    assert required.returncode == 2
    assert required.stderr.strip().splitlines() == [
        "error: bubblewrap not found; install it with `apt-get install bubblewrap`"]


@pytest.mark.slow
@pytest.mark.skipif(BWRAP is None, reason=f"{WHY}: needs bubblewrap (apt-get install "
                                          f"bubblewrap)")
def test_notebook_wall_clock_in_the_sandbox(mini, tmp_path):
    cases = mini_class(mini, tmp_path / "class", ["correct", "sleeper", "kernel_death"])
    proc = grade(mini[0], tmp_path / "class", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = table(tmp_path / "out")
    for name, case in cases.items():
        assert re.search(case.status, got[name]["status"]), got[name]
        assert float(got[name]["score"]) == case.score
    assert no_marked_process_left(tmp_path / "out")


def test_usage_errors_are_one_clear_line(mini, tmp_path):
    run = [sys.executable, "-m", "autograder", "grade", "--course-root", mini[0].root]
    missing = subprocess.run(run + [str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
                             capture_output=True, text=True)
    assert missing.returncode == 2
    assert missing.stderr.strip() == f"error: {tmp_path / 'nope'} does not exist"
    inside = subprocess.run(run + [str(tmp_path), "--out", str(tmp_path / "o")],
                            capture_output=True, text=True)
    assert inside.returncode == 2
    assert inside.stderr.strip() == "error: --out must not be inside the submissions folder"
    (tmp_path / "notes.txt").write_text("x")
    wrong = subprocess.run(run + [str(tmp_path / "notes.txt"), "--out", str(tmp_path / "o")],
                           capture_output=True, text=True)
    assert wrong.returncode == 2 and "neither a folder nor a .zip" in wrong.stderr


def test_zip_extraction_skips_unsafe_members(tmp_path):
    archive = tmp_path / "class.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("class/ann/mini/mini.ipynb", "{}")
        z.writestr("class/ann/mini/data.csv", "1,2")
        z.writestr("/abs/mini.ipynb", "{}")
        z.writestr("class/../../up.ipynb", "{}")
        link = zipfile.ZipInfo("class/bob/mini/mini.ipynb")
        link.external_attr = (0o120777 << 16)
        z.writestr(link, "/etc/passwd")
        z.writestr("__MACOSX/class/ann/mini/._mini.ipynb", "junk")
    dest = tmp_path / "x"
    dest.mkdir()
    extracted = extract_zip(str(archive), str(dest))
    warnings = extracted.warnings
    found = sorted(os.path.relpath(os.path.join(d, f), dest) for d, _, fs in os.walk(dest)
                   for f in fs)
    assert found == ["class/ann/mini/mini.ipynb"]
    assert len(warnings) == 4 and any("a link" in w for w in warnings)
    assert extracted.problems == {}
    assert class_root(str(dest), ["mini"]) == str(dest / "class")
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="not a readable zip"):
        extract_zip(str(tmp_path / "bad.zip"), str(dest))


@pytest.mark.slow
def test_layout_problems_get_a_row_each(mini, tmp_path):
    course, release, source = mini
    klass = tmp_path / "class"
    good = corpus.dumps(corpus.solved_notebook(release, source))
    (klass / "ann" / "hw_unknown").mkdir(parents=True)
    (klass / "ann" / "hw_unknown" / "mini.ipynb").write_bytes(good)
    (klass / "ben" / "mini" / "sub").mkdir(parents=True)
    (klass / "ben" / "mini" / "sub" / "mini.ipynb").write_bytes(good)   # one folder deeper
    (klass / "bad name!" / "mini").mkdir(parents=True)
    (klass / "cid").mkdir()
    (klass / "cid" / "mini.ipynb").write_bytes(good)                      # no assignment folder
    os.symlink("/etc/passwd", klass / "ben" / "mini" / "other.ipynb")  # never followed
    proc = grade(course, klass, tmp_path / "out", "--no-sandbox")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "skipped cid/mini.ipynb: notebooks go in cid/<assignment>/" in proc.stderr
    got = table(tmp_path / "out")
    # any name a file system allows is a student (here one who sent an empty folder)
    assert set(got) == {"ann", "ben", "bad name!"}
    assert got["bad name!"]["status"] == ("missing notebook (mini.ipynb not found; found no "
                                          "notebook)")
    assert (tmp_path / "out" / "feedback" / "bad name!" / "mini" / "mini.html").exists()
    assert got["ann"]["status"] == "unknown assignment folder (expected one of: mini, toy)"
    assert got["ann"]["score"] == "0"
    assert got["ben"]["status"] == ("graded; renamed notebook: graded 'sub/mini.ipynb' as "
                                    "mini.ipynb")
    assert got["ben"]["score"] == "3"
