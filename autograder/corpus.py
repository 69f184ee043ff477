"""Build broken and adversarial submissions from a correct one.

The grader's tests (and the sample class of the course) need submissions that misbehave
in every way a real class does.  Writing them by hand per assignment would not survive the
next edit of the assignment, so they are made by transforming notebooks:

* :func:`solved_notebook` fills a release notebook with the solutions of its source (what a
  student who got everything right submits);
* the transforms (:func:`inject_cell`, :func:`replace_solution`, :func:`tamper_test`,
  :func:`delete_cell`, :func:`change_metadata`, :func:`change_cell_ids`,
  :func:`change_kernel`, :func:`corrupt_json`) each break one thing;
* :func:`adversarial_corpus` combines them into the standard corpus, one :class:`Case` per
  kind of trouble, each with the status and score the grader must give it.

All functions work on an assignment's *structure* (solution cells, test cells and their
points, read from the source) so the same corpus applies to any assignment; the few cases
that need assignment-specific code (a deadlock in a multi-process exercise) take it as an
argument.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any

import nbformat

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"


# ---------------------------------------------------------------------------------------
# Notebooks


def load(path: str) -> Any:
    return nbformat.read(path, as_version=4)


def dumps(nb: Any) -> bytes:
    return (nbformat.writes(nb) + "\n").encode()


def _strip_markers(source: str) -> str:
    lines = [line for line in source.split("\n")
             if line.strip() not in (BEGIN, END) and BEGIN not in line and END not in line]
    return "\n".join(lines)


def _gid(cell: Any) -> str | None:
    return cell.metadata.get("nbgrader", {}).get("grade_id")


def find(nb: Any, grade_id: str) -> int:
    for i, cell in enumerate(nb.cells):
        if _gid(cell) == grade_id:
            return i
    raise KeyError(f"no cell with grade_id {grade_id!r}")


def solved_notebook(release: Any, source: Any) -> Any:
    """``release`` with every solution cell holding the source's solution (markers
    removed): the notebook of a student who answered everything correctly."""
    nb = copy.deepcopy(release)
    solutions = {_gid(c): c for c in source.cells
                 if c.metadata.get("nbgrader", {}).get("solution")}
    for cell in nb.cells:
        gid = _gid(cell)
        if gid in solutions:
            cell.source = _strip_markers(solutions[gid].source)
    return nb


def replace_solution(nb: Any, grade_id: str, code: str) -> Any:
    """The student's answer in solution cell ``grade_id`` becomes ``code``."""
    nb = copy.deepcopy(nb)
    nb.cells[find(nb, grade_id)].source = code
    return nb


def inject_cell(nb: Any, code: str, after: str | int | None = None) -> Any:
    """A new code cell (no nbgrader metadata, as a student adds one) after the cell with
    grade_id ``after`` (or index ``after``; None: at the top)."""
    nb = copy.deepcopy(nb)
    if after is None:
        index = 0
    elif isinstance(after, int):
        index = after + 1
    else:
        index = find(nb, after) + 1
    cell = nbformat.v4.new_code_cell(code)
    used = {c.get("id") for c in nb.cells}
    n = 1
    while f"injected-{n}" in used:
        n += 1
    cell["id"] = f"injected-{n}"
    nb.cells.insert(index, cell)
    return nb


def tamper_test(nb: Any, grade_id: str, source: str = 'print("all tests passed")') -> Any:
    """The student rewrote test cell ``grade_id``."""
    nb = copy.deepcopy(nb)
    nb.cells[find(nb, grade_id)].source = source
    return nb


def delete_cell(nb: Any, grade_id: str) -> Any:
    nb = copy.deepcopy(nb)
    del nb.cells[find(nb, grade_id)]
    return nb


def change_metadata(nb: Any, cell_id: str, /, **changes: Any) -> Any:
    """Edit the nbgrader metadata of the cell whose grade_id is ``cell_id`` (e.g.
    ``points=100``, ``grade=False``, ``grade_id="mine"``); ``None`` removes a key, and
    ``nbgrader=None`` removes the whole nbgrader metadata."""
    nb = copy.deepcopy(nb)
    cell = nb.cells[find(nb, cell_id)]
    if "nbgrader" in changes and changes["nbgrader"] is None:
        cell.metadata.pop("nbgrader", None)
        return nb
    meta = cell.metadata["nbgrader"]
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    return nb


def change_cell_ids(nb: Any) -> Any:
    nb = copy.deepcopy(nb)
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"renumbered-{i}"
    return nb


def change_kernel(nb: Any, name: str = "julia-1.10", language: str = "julia") -> Any:
    nb = copy.deepcopy(nb)
    nb.metadata["kernelspec"] = {"name": name, "display_name": name, "language": language}
    nb.metadata["language_info"] = {"name": language}
    return nb


def corrupt_json(data: bytes) -> bytes:
    """A notebook file cut in the middle (an interrupted upload)."""
    return data[: len(data) // 2]


# ---------------------------------------------------------------------------------------
# Structure of an assignment


@dataclass
class Layout:
    """What the corpus needs to know about one notebook of an assignment."""

    solutions: list[str]                 # solution cells, in order
    tests: dict[str, float]              # autograded test cell -> points
    depends: dict[str, list[str]]        # solution cell -> test cells that need it
    first_test: str                      # the first test cell
    before_solutions: str | None         # last cell before the first solution cell

    @property
    def total(self) -> float:
        return float(sum(self.tests.values()))

    def without(self, *solutions: str) -> float:
        """Score when the given solution cells are wrong and everything else is right."""
        lost = {t for s in solutions for t in self.depends.get(s, [])}
        return self.total - sum(self.tests[t] for t in lost)

    @classmethod
    def of(cls, source: Any) -> "Layout":
        solutions, tests, depends = [], {}, {}
        current = None
        before = None
        for cell in source.cells:
            meta = cell.metadata.get("nbgrader", {})
            gid = meta.get("grade_id")
            if meta.get("solution") and not meta.get("grade"):
                solutions.append(gid)
                current = gid
                depends[gid] = []
            elif meta.get("grade") and not meta.get("solution") and cell.cell_type == "code":
                tests[gid] = float(meta.get("points", 0))
                if current is not None:
                    depends[current].append(gid)
            if not solutions and gid:
                before = gid
        if not solutions or not tests:
            raise ValueError("the notebook needs solution cells and autograded test cells")
        return cls(solutions, tests, depends, next(iter(tests)), before)


# ---------------------------------------------------------------------------------------
# The standard corpus


@dataclass
class Case:
    """One submission of the corpus: the files of ``<student>/<assignment>/``, and what
    the grader must say about it (``status`` is a regular expression matched against the
    status column, ``score`` the exact score)."""

    student: str
    files: dict[str, bytes]
    status: str
    score: float
    about: str
    forbidden: list[str] = field(default_factory=list)  # text that must not appear in the
    # autograded notebook or the feedback (proof that an attack did not work)
    unsafe_html: list[str] = field(default_factory=list)  # must not reach the feedback HTML
    corrupt_in_zip: bool = False  # written into a zip by write_zip with a damaged CRC


PROBE_LEAK = "LEAKED:"
PROBE_NET = "NETWORK REACHED"
PROBE_WROTE = "WROTE OUTSIDE:"


def read_probe(paths: list[str], search: list[str] = (), markers: list[str] = ()) -> str:
    """Code that tries to read ``paths`` and to find a file containing one of ``markers``
    under the folders ``search``; prints LEAKED: for anything it gets.

    The Python installation is skipped: it is meant to be readable, and nbgrader's own
    sources contain the markers (a checkout under /tmp puts its .venv in the search)."""
    # the marker is assembled at run time, so that only an output can contain it
    return ("import os, sys\n"
            f"_leak = {PROBE_LEAK[:4]!r} + {PROBE_LEAK[4:]!r}\n"
            "_python = tuple(os.path.realpath(p) + os.sep for p in {sys.prefix, "
            "sys.base_prefix})\n"
            f"for _p in {list(paths)!r}:\n"
            "    try:\n"
            "        with open(_p, 'rb') as _f:\n"
            "            _found = _f.read(200)\n"
            "        print(_leak, _p, str(_found)[:80])\n"
            "    except Exception as _e:\n"
            "        print('blocked:', _p, type(_e).__name__)\n"
            f"for _root in {list(search)!r}:\n"
            "    for _dir, _dirs, _files in os.walk(_root):\n"
            "        if (os.path.realpath(_dir) + os.sep).startswith(_python):\n"
            "            _dirs[:] = []\n"
            "            continue\n"
            "        for _name in _files:\n"
            "            try:\n"
            "                with open(os.path.join(_dir, _name), 'rb') as _f:\n"
            "                    _data = _f.read(1 << 20)\n"
            "            except Exception:\n"
            "                continue\n"
            f"            for _m in {[m.encode() for m in markers]!r}:\n"
            "                if _m in _data:\n"
            "                    print(_leak, os.path.join(_dir, _name))\n"
            "print('search done')\n")


def network_probe(targets: list[tuple[str, int]]) -> str:
    return ("import socket\n"
            f"_reached = {PROBE_NET[:4]!r} + {PROBE_NET[4:]!r}\n"
            f"for _host, _port in {targets!r}:\n"
            "    try:\n"
            "        socket.create_connection((_host, _port), timeout=3).close()\n"
            "        print(_reached, _host, _port)\n"
            "    except Exception as _e:\n"
            "        print('blocked:', _host, _port, type(_e).__name__)\n")


def write_probe(paths: list[str]) -> str:
    return ("import os\n"
            f"for _p in {paths!r}:\n"
            "    try:\n"
            "        with open(_p, 'w') as _f:\n"
            "            _f.write('written by a submission')\n"
            f"        print({PROBE_WROTE!r}, _p)\n"
            "    except Exception as _e:\n"
            "        print('blocked:', _p, type(_e).__name__)\n")


MONKEYPATCH = '''\
# Make every check pass without recording anything, whatever the answers are.
import numpy, sympy, torch, torch.testing
import autograder.checks as _checks
from autograder.checks import {assignment} as _mine
_mine.check = lambda key, value: print("\\u2713", key + ":", "correct")
_checks.run_check = lambda *a, **k: _checks.Verdict(True, "correct")
_checks.answer = lambda key, value: None
numpy.isclose = lambda *a, **k: True
numpy.allclose = lambda *a, **k: True
sympy.simplify = lambda *a, **k: 0
torch.allclose = lambda *a, **k: True
torch.testing.assert_close = lambda *a, **k: None
import builtins
builtins.AssertionError = type("AssertionError", (Exception,), {{}})
'''

INFINITE_LOOP = "while True:\n    pass\n"
IGNORES_INTERRUPT = ("import signal, time\n"
                     "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
                     "while True:\n"
                     "    time.sleep(0.05)\n")
MEMORY_BOMB = ("hog = []\n"
               "while True:\n"
               "    hog.append(bytearray(50 * 2**20))\n"
               "    hog[-1][::4096] = b'x' * len(hog[-1][::4096])\n")
FORK_BOMB = ("import os\n"
             "while True:\n"
             "    try:\n"
             "        os.fork()\n"
             "    except OSError:\n"
             "        pass\n")
OUTPUT_FLOOD = ("from IPython.display import HTML, display\n"
                "display(HTML('<scr' + 'ipt>document.title = \"owned\"</scr' + 'ipt>'))\n"
                "print('x' * 20_000_000)\nfor _ in range(2000):\n    print('y' * 1000)\n")
UNSAFE_HTML = '<script>document.title = "owned"</script>'
# A tree a few thousand levels deep, with a locked directory at the bottom: whatever
# removes the work directory must not recurse once per level or give up on permissions.
DEEP_TREE = ("import os\n"
             "_top = os.getcwd()\n"
             "for _ in range(3000):\n"
             "    os.mkdir('d')\n"
             "    os.chdir('d')\n"
             "os.mkdir('locked')\n"
             "os.chmod('locked', 0)\n"
             "os.chdir(_top)\n"
             "print('built a tree 3000 levels deep')\n")
# The kernel's parent is the grader's runner: it must survive being signalled (or, without
# a pid namespace, its death must be put down to the notebook).  Never pid 1 itself: without
# bubblewrap that is the machine's init.
KILL_RUNNER = ("import os, signal, time\n"
               "_runner = os.getppid()\n"
               "for _sig in (signal.SIGTERM, signal.SIGINT, signal.SIGKILL):\n"
               "    try:\n"
               "        os.kill(_runner, _sig)\n"
               "    except Exception as _e:\n"
               "        print(type(_e).__name__)\n"
               "    time.sleep(0.3)\n"
               "print('the runner is still there')\n")
# What the sandbox shows of the machine it runs on.
HOST_PATHS = ("import glob, os, sys, traceback\n"
              "def _show(_path):\n"
              "    try:\n"
              "        with open(_path, 'rb') as _f:\n"
              "            print(_path, _f.read(50000).decode('utf-8', 'replace'))\n"
              "    except Exception as _e:\n"
              "        print(_path, type(_e).__name__)\n"
              "_site = glob.glob(sys.prefix + '/lib/python*/site-packages/')\n"
              "for _p in ['/proc/self/mountinfo', '/proc/1/cmdline', '/proc/1/environ',\n"
              "           '/proc/self/cmdline', '/proc/self/environ', '/etc/hosts',\n"
              "           sys.prefix + '/pyvenv.cfg'] + sorted(\n"
              "        _q for _s in _site for _pat in ('*.pth', '__editable__*',\n"
              "                                         '*/direct_url.json', '*.egg-link')\n"
              "        for _q in glob.glob(_s + _pat)):\n"
              "    _show(_p)\n"
              "print(sys.executable, sys.path, os.getcwd(), dict(os.environ))\n"
              "import paralab\n"
              "from paralab import schedules\n"
              "print(paralab.__file__)\n"
              "try:\n"
              "    schedules.gpipe(0, 1)\n"
              "except Exception:\n"
              "    traceback.print_exc(file=sys.stdout)\n")
NAMES = ("zoë", "ann marie", "张三")


def disk_filler(total_mb: int) -> str:
    """Writes ``total_mb`` MiB in 4 MiB files (each under the per-file limit)."""
    return ("for _i in range(%d):\n"
            "    with open(f'fill-{_i}.bin', 'wb') as _f:\n"
            "        _f.write(b'x' * (4 * 2**20))\n"
            "print('wrote %d MiB')\n" % (max(1, total_mb // 4), total_mb))


def forged_record(key: str) -> str:
    """Appends to the answers file a record of ``key`` holding an integer too large for
    any float: the clean re-check must fail that check and nothing else."""
    return ("import json, os\n"
            f"_record = {{'key': {key!r}, 'value': {{'tensor': [[10 ** 400]], "
            f"'dtype': 'float32', 'shape': [1, 1]}}}}\n"
            "with open(os.environ['PARALAB_ANSWERS'], 'a') as _f:\n"
            "    _f.write(json.dumps(_record) + '\\n')\n")


def oversized(nb: Any, size: int) -> bytes:
    """``nb`` padded with a markdown cell to more than ``size`` bytes."""
    padded = copy.deepcopy(nb)
    cell = nbformat.v4.new_markdown_cell("x" * size)
    cell["id"] = "padding"
    padded.cells.append(cell)
    return dumps(padded)


def adversarial_corpus(assignment: str, notebook: str, release: Any, source: Any, *,
                       deadlock: tuple[str, str] | None = None,
                       read_paths: list[str] = (), write_paths: list[str] = (),
                       search_paths: list[str] = ("/sandbox", "/tmp", "."),
                       secret_markers: list[str] = ("BEGIN HIDDEN TESTS", "BEGIN SOLUTION"),
                       depends: dict[str, list[str]] | None = None,
                       network: list[tuple[str, int]] = (("pypi.org", 443), ("1.1.1.1", 53)),
                       prefix: str = "", sandboxed: bool = True,
                       work_size_mb: int | None = None,
                       hidden_paths: list[str] | None = None,
                       forged: tuple[str, str] | None = None,
                       max_notebook_bytes: int | None = None) -> list[Case]:
    """The standard corpus for one notebook of ``assignment``.

    ``deadlock``: (solution cell, code whose ranks hang) for the multi-process exercise;
    ``read_paths`` / ``write_paths``: host paths the sandbox must keep out of reach (the
    course's solutions, the gradebook, other submissions, the grader's home...);
    ``search_paths``: folders searched for a file holding one of ``secret_markers``;
    ``depends``: solution cell -> every test cell that fails when that answer is wrong,
    where it is more than the tests that follow it (a later test reusing an earlier
    answer); the expected scores are computed from it.
    Whether a write reached the host must be checked on the host: inside the sandbox
    ``/tmp`` is private and writable.

    ``sandboxed``: graded with bubblewrap (what a notebook can do to its runner differs);
    ``work_size_mb``: the work-directory limit of the run (adds a case that writes twice
    as much); ``hidden_paths``: host paths no output may show (adds a case that prints
    what the sandbox reveals; with bubblewrap only); ``forged``: (test cell, answer key)
    for a case that records a crafted, unreadable answer for that key after that test;
    ``max_notebook_bytes``: adds a notebook just over that size."""
    lay = Layout.of(source)
    if depends:
        lay.depends.update({k: list(v) for k, v in depends.items()})
    good = solved_notebook(release, source)
    name = f"{notebook}.ipynb"
    s1, s2 = lay.solutions[0], lay.solutions[min(1, len(lay.solutions) - 1)]
    t1 = lay.depends[s1][0] if lay.depends[s1] else lay.first_test
    start = lay.before_solutions  # inject after the setup, before any answer

    def case(student: str, nb_or_bytes: Any, status: str, score: float, about: str,
             filename: str = name, forbidden: list[str] = (), unsafe_html: list[str] = ()
             ) -> Case:
        data = nb_or_bytes if isinstance(nb_or_bytes, bytes) else dumps(nb_or_bytes)
        return Case(prefix + student, {filename: data}, status, score, about, list(forbidden),
                    list(unsafe_html))

    wrong = "raise RuntimeError('not done yet')\n"
    wrong_nb, sabotaged = _all_wrong(good, lay)
    cases = [
        case("correct", good, r"^graded$", lay.total, "every answer right"),
        case("release", release, r"^graded$", 0.0, "the release, untouched"),
        case("exception", replace_solution(good, s1, wrong), r"^graded$", lay.without(s1),
             "the first answer raises"),
        case("syntax_error", replace_solution(good, s2, good.cells[find(good, s2)].source
                                              + "\nthis is not python (\n"),
             r"^graded$", lay.without(s2), "the second answer does not parse"),
        case("infinite_loop", inject_cell(good, INFINITE_LOOP, start),
             r"^graded; cell \d+ interrupted at the cell time limit$", lay.total,
             "an infinite loop in a cell of its own"),
        case("ignores_interrupt", inject_cell(good, IGNORES_INTERRUPT, t1),
             r"^timed out: ignored the interrupt .* in cell \d+$",
             lay.tests[t1], "a loop that ignores SIGINT after the first test"),
        case("memory_bomb", inject_cell(good, MEMORY_BOMB, t1),
             r"^killed: memory limit .* in cell \d+$", lay.tests[t1],
             "allocates until something stops it, after the first test"),
        case("fork_bomb", inject_cell(good, FORK_BOMB, start),
             r"^killed: process limit .* in cell \d+$", 0.0, "forks forever, before any test"),
        case("output_flood", inject_cell(good, OUTPUT_FLOOD, start), r"^graded$", lay.total,
             "prints tens of megabytes and displays a script",
             forbidden=["y" * 1000 + "\n" + "y" * 1000 + "\n" + "y" * 1000 + "\n" + "y" * 1000],
             unsafe_html=[UNSAFE_HTML]),
        case("tampered_test", tamper_test(replace_solution(good, s1, wrong), t1),
             rf"^graded; tests tampered: restored {t1}$", lay.without(s1),
             "a wrong answer and its test rewritten to pass"),
        case("deleted_test", delete_cell(replace_solution(good, s1, wrong), t1),
             rf"^graded; tests deleted: restored {t1}$", lay.without(s1),
             "a wrong answer and its test deleted"),
        case("metadata", change_metadata(replace_solution(good, s1, wrong), t1, points=100,
                                         grade=False, locked=False),
             rf"^graded; cell metadata changed: restored {t1}$", lay.without(s1),
             "a wrong answer; its test's points raised and marked as not graded"),
        case("renamed_grade_id", change_metadata(replace_solution(good, s1, wrong), t1,
                                                 grade_id="my_own_cell"),
             rf"^graded; tests deleted: restored {t1}; cell metadata changed: restored "
             rf"my_own_cell$", lay.without(s1), "a wrong answer; its test cell renamed"),
        case("cell_ids", change_cell_ids(good), r"^graded; cell metadata changed: restored ",
             lay.total, "every cell id changed"),
        case("kernel", change_kernel(good), r"^graded; kernel changed: ran with python3 "
                                           r"instead of julia-1.10$", lay.total,
             "the notebook asks for another kernel"),
        case("malformed", corrupt_json(dumps(good)),
             r"^malformed notebook \(not valid JSON", 0.0, "the file is cut in the middle"),
        Case(prefix + "missing", {"notes.txt": b"I forgot the notebook\n"},
             r"^missing notebook", 0.0, "no notebook at all"),
        case("renamed", good, rf"^graded; renamed notebook: graded '{notebook} \(1\)\.ipynb' "
                              rf"as {notebook}\.ipynb$", lay.total,
             "the notebook saved under another name", filename=f"{notebook} (1).ipynb"),
        case("monkeypatch", inject_cell(wrong_nb, MONKEYPATCH.format(assignment=assignment),
                                        start),
             r"^graded; \d+ checks? re-checked outside the notebook: kernel result not "
             r"trusted$", lay.without(*sabotaged), "every answer wrong, every check helper "
                                                  "replaced"),
        case("read_secrets", inject_cell(good, read_probe(list(read_paths), list(search_paths),
                                                          list(secret_markers)), start),
             r"^graded$", lay.total, "tries to read solutions, gradebook, other submissions",
             forbidden=[PROBE_LEAK]),
        case("network", inject_cell(good, network_probe(list(network)), start), r"^graded$",
             lay.total, "tries to open network connections", forbidden=[PROBE_NET]),
        case("write_outside", inject_cell(good, write_probe(list(write_paths)), start),
             r"^graded$", lay.total, "tries to write outside its work directory"),
    ]
    if deadlock is not None:
        cell, code = deadlock
        cases.append(case("deadlock", replace_solution(good, cell, code),
                          r"^graded; cell \d+ \([^)]*\) interrupted at the cell time limit$",
                          lay.without(cell), "ranks of the multi-process exercise hang"))
    cases.append(case("deep_tree", inject_cell(good, DEEP_TREE, start), r"^graded$",
                      lay.total, "leaves a directory tree 3000 levels deep in its work dir"))
    if sandboxed:
        cases.append(case("kill_runner", inject_cell(good, KILL_RUNNER, t1), r"^graded$",
                          lay.total, "signals the grader's runner (pid 1 of the sandbox)"))
    else:
        cases.append(case("kill_runner", inject_cell(good, KILL_RUNNER, t1),
                          r"^killed: the notebook's code killed the grader's runner \(SIGKILL\) "
                          r"in cell \d+$", lay.tests[t1],
                          "kills the grader's runner (same user without a sandbox)"))
    for name in NAMES:
        cases.append(case(name, good, r"^graded$", lay.total,
                          "a student folder name nbgrader cannot use as an id"))
    if work_size_mb:
        cases.append(case("disk_filler", inject_cell(good, disk_filler(2 * work_size_mb), t1),
                          rf"^killed: work directory limit \({work_size_mb} MiB\) in cell \d+$",
                          lay.tests[t1], "writes twice the work directory's limit"))
    if hidden_paths and sandboxed:
        cases.append(case("host_paths", inject_cell(good, HOST_PATHS, start), r"^graded$",
                          lay.total, "prints what the sandbox shows of the host",
                          forbidden=list(hidden_paths)))
    if forged is not None:
        test, key = forged
        cases.append(case("forged_record", inject_cell(good, forged_record(key), test),
                          r"^graded; 1 check re-checked outside the notebook: kernel "
                          r"result not trusted$", lay.total - lay.tests[test],
                          "records an answer the codec cannot read as a float"))
    if max_notebook_bytes:
        cases.append(case("oversized", oversized(good, max_notebook_bytes),
                          r"^malformed notebook \(larger than \d+ MiB\)$", 0.0,
                          "a notebook over the size limit"))
    return cases


# Switches off, for the call, any watch a grader might have set in the student's kernel.
CLEARS_HOOKS = """import sys as _sys
import threading as _threading


def _unwatched(_f):
    def _g(*_a, **_k):
        _sys.setprofile(None)
        _sys.settrace(None)
        _threading.setprofile(None)
        _threading.settrace(None)
        return _f(*_a, **_k)
    return _g
"""
# Rebinds every helper a test cell could use to watch or judge the student's function.
REBINDS_HELPERS = """import sys as _sys
import autograder.checks as _checks
from autograder.checks import {assignment} as _mine
_record = _checks.answer


def _quiet_check(key, *value):  # records, never judges, never watches
    if not value:  # check(key): the variable of that name
        value = (_sys._getframe(1).f_globals[key],)
    _record(key, value[0]() if callable(value[0]) and getattr(value[0], "__name__", "")
            == "<lambda>" else value[0])


_mine.check = _quiet_check
for _name in dir(_mine):
    if _name.startswith("without"):
        setattr(_mine, _name, lambda call, *args, **kwargs: call())
try:
    import autograder.checks.originality as _originality
    _originality.without = lambda functions, call: call()
except ImportError:
    pass
"""


def originality_cases(assignment: str, notebook: str, release: Any, source: Any, *,
                      answer_cell: str, delegating: str, honest: str, delegating_score: float,
                      honest_score: float, prefix: str = "") -> list[Case]:
    """Submissions that call the library's reference implementation while switching off
    what could notice it in their own kernel (the profiler hook, the check helpers), and an
    honest one that uses the rest of the library in its answer.  ``delegating`` and
    ``honest`` are the code of ``answer_cell``; the scores are the ones a delegation and an
    honest answer must get (the originality checks lost or kept)."""
    import ast
    good = solved_notebook(release, source)
    functions = [n.name for n in ast.parse(delegating).body
                 if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    unwatched = CLEARS_HOOKS + "\n\n" + delegating + "\n" + "".join(
        f"{name} = _unwatched({name})\n" for name in functions)
    rebound = inject_cell(replace_solution(good, answer_cell, delegating),
                          REBINDS_HELPERS.format(assignment=assignment), 0)

    def case(student: str, nb: Any, score: float, about: str) -> Case:
        return Case(prefix + student, {f"{notebook}.ipynb": dumps(nb)}, r"^graded(;|$)",
                    score, about)

    return [
        case("probe_hook_cleared", replace_solution(good, answer_cell, unwatched),
             delegating_score, "delegates to the library with the profiler switched off"),
        case("probe_helper_rebound", rebound, delegating_score,
             "delegates to the library with every check helper rebound"),
        case("probe_honest", replace_solution(good, answer_cell, honest), honest_score,
             "its own answer, which also runs the library's simulator"),
    ]


def zip_cases(assignment: str, notebook: str, release: Any, source: Any,
              prefix: str = "") -> list[Case]:
    """Cases that only a zip can hold: a member with a damaged CRC."""
    good = solved_notebook(release, source)
    return [Case(prefix + "corrupt_member", {f"{notebook}.ipynb": dumps(good)},
                 rf"^corrupt archive member '{notebook}\.ipynb' \(", 0.0,
                 "its notebook's CRC in the zip is wrong", corrupt_in_zip=True)]


def write_zip(cases: list[Case], path: str, assignment: str, top: str = "submissions"
              ) -> str:
    """A class zip ``top/<student>/<assignment>/...`` of ``cases`` (members of the cases
    marked ``corrupt_in_zip`` get a damaged CRC); returns ``path``."""
    import zipfile
    corrupt = []
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for case in cases:
            for rel, data in case.files.items():
                name = f"{top}/{case.student}/{assignment}/{rel}"
                z.writestr(name, data)
                if case.corrupt_in_zip:
                    corrupt.append(name)
    if corrupt:
        _damage_crcs(path, corrupt)
    return path


def _damage_crcs(path: str, names: list[str]) -> None:
    """Flip the CRC-32 of ``names`` in both their local and central headers."""
    import struct
    import zipfile
    with zipfile.ZipFile(path) as z:
        offsets = {z.getinfo(n).header_offset for n in names}
        start = z.start_dir
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        for offset in offsets:  # local header: the CRC is at byte 14
            data[offset + 14:offset + 18] = bytes(b ^ 0xFF for b in data[offset + 14:offset + 18])
        at = start
        while data[at:at + 4] == b"PK\x01\x02":  # central directory: CRC at byte 16
            n, m, k = struct.unpack("<HHH", data[at + 28:at + 34])
            if struct.unpack("<I", data[at + 42:at + 46])[0] in offsets:
                data[at + 16:at + 20] = bytes(b ^ 0xFF for b in data[at + 16:at + 20])
            at += 46 + n + m + k
        f.seek(0)
        f.write(data)


def _all_wrong(nb: Any, lay: Layout) -> tuple[Any, list[str]]:
    """Every answer made wrong where possible; returns the notebook and the solution cells
    that were sabotaged."""
    done = []
    for s in lay.solutions:
        extra = _sabotage(nb, s)
        if extra.strip():
            nb = replace_solution(nb, s, nb.cells[find(nb, s)].source + "\n" + extra)
            done.append(s)
    return nb, done


def _sabotage(nb: Any, grade_id: str) -> str:
    """Code appended to a solution cell that makes whatever it defined wrong: every name it
    assigns becomes None and every function or class it defines returns None."""
    import ast
    try:
        tree = ast.parse(nb.cells[find(nb, grade_id)].source)
    except SyntaxError:
        return ""
    names: list[str] = []

    def targets(node: Any) -> None:
        if isinstance(node, ast.Name):
            names.append(node.id)
        elif isinstance(node, (ast.Tuple, ast.List)):
            for element in node.elts:
                targets(element)
        elif isinstance(node, ast.Starred):
            targets(node.value)

    lines = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            lines.append(f"{node.name} = lambda *args, **kwargs: None")
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                targets(target)
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            targets(node.target)
    lines += [f"{n} = None" for n in dict.fromkeys(names)]
    return "\n".join(lines) + "\n" if lines else ""


def write_case(case: Case, root: str, assignment: str) -> str:
    """Write ``case`` under ``root/<student>/<assignment>/``; returns that folder."""
    folder = os.path.join(root, case.student, assignment)
    os.makedirs(folder, exist_ok=True)
    for rel, data in case.files.items():
        path = os.path.join(folder, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    return folder


def expectations(cases: list[Case]) -> dict[str, dict]:
    """{student: {"status": regex, "score": float}} for a test to compare with grades.csv."""
    return {c.student: {"status": c.status, "score": c.score, "about": c.about}
            for c in cases}


def load_pair(release_path: str, source_path: str) -> tuple[Any, Any]:
    """The release notebook and the source notebook (from its ``.pct.py``)."""
    from .course import read_source
    return load(release_path), read_source(source_path)

