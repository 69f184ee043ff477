"""The sample class and the mutant submissions: proof that the grader tells right from wrong.

* The **sample class** (``autograder/samples/class/``) is what ``make grade-sample`` grades:
  a handful of students who each show one thing a real class does -- everything right,
  classic misconceptions, a crash, a notebook that never finishes, edited tests, a broken
  file, a "1F1B" that is really GPipe.
* The **mutants** each change one answer of a correct submission in one well-known wrong
  way (a wrong number, a missing all-reduce, a wrong schedule...).  The tests grade them
  all and require each to lose exactly the points of the checks it should fail.

Each assignment has a module in ``autograder/mutants/`` (named after it) with its
``MUTANTS`` and a ``samples(root)`` function returning its notebooks of the sample class;
this module collects them (a new homework adds its own module and nothing else here).
Both are built from the release notebooks and the solutions by the transforms of
:mod:`autograder.corpus`, so they follow the assignments when these change;
``python -m autograder.samples build`` rewrites the committed sample class and the tests
fail if it drifted.  Expected scores are never typed: each sample and mutant names the
*checks* (answer keys) that must fail, and the expected score is the total minus what those
checks weigh in their test cells (a cell's points are split over its checks by the weights
of ``GRADE_CELLS``), read from the sources and the check modules.
"""

from __future__ import annotations

import csv
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from . import corpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASS_DIR = os.path.join(ROOT, "autograder", "samples", "class")


def notebooks(assignment: str, root: str = ROOT):
    """(release, source) notebooks of ``assignment``."""
    import jupytext
    release = corpus.load(os.path.join(root, "assignments", assignment, f"{assignment}.ipynb"))
    source = jupytext.read(os.path.join(root, "solutions", assignment, f"{assignment}.pct.py"))
    return release, source


def layout(assignment: str, root: str = ROOT) -> corpus.Layout:
    return corpus.Layout.of(notebooks(assignment, root)[1])


def solved(assignment: str, root: str = ROOT):
    return corpus.solved_notebook(*notebooks(assignment, root))


def expected_score(assignment: str, failing: set[str], root: str = ROOT) -> float:
    """Score of a submission of ``assignment`` whose checks ``failing`` fail and every other
    check passes: each test cell keeps the share of its points its passing checks weigh."""
    import importlib

    from .checks import cell_weights

    lay = layout(assignment, root)
    module = importlib.import_module(f"autograder.checks.{assignment}")
    unknown = set(failing) - set(module.CHECKS)
    if unknown:
        raise ValueError(f"not checks of {assignment}: {sorted(unknown)}")
    score = 0.0
    for gid, points in lay.tests.items():
        weights = cell_weights(module.GRADE_CELLS[gid])
        kept = sum(w for k, w in weights.items() if k not in failing)
        score += round(points * kept / sum(weights.values()), 3)
    return round(score, 3)


# -- the building blocks of each assignment's module in autograder/mutants/ ---------------------
def apply(nb, mutants: list["Mutant"], *names: str):
    """``nb`` with the answers of the named ``mutants`` put in."""
    by_name = {m.name: m for m in mutants}
    for name in names:
        for cell, code in by_name[name].answers.items():
            nb = corpus.replace_solution(nb, cell, code)
    return nb


@dataclass
class Mutant:
    """A correct submission with some answer cells replaced; ``fails`` are the checks
    (answer keys) that must then fail (none: an honest variant that keeps every point),
    ``feedback`` phrases the feedback must contain."""

    name: str
    assignment: str
    answers: dict[str, str]
    fails: set[str]
    feedback: list[str] = field(default_factory=list)

    def notebook(self, root: str = ROOT):
        nb = solved(self.assignment, root)
        for cell, code in self.answers.items():
            nb = corpus.replace_solution(nb, cell, code)
        return nb

    def expected_score(self, root: str = ROOT) -> float:
        return expected_score(self.assignment, self.fails, root)


@dataclass
class Work:
    """One notebook of one student of the sample class: what it shows (``about``), the
    notebook (or raw bytes), the regular expression its status must match and the checks
    that must fail."""

    student: str
    about: str
    notebook: Any
    status: str
    fails: set[str]


def assignment_modules() -> dict[str, Any]:
    """assignment -> its module of sample students and mutants (``autograder/mutants/``)."""
    import importlib
    import pkgutil

    from . import mutants
    return {info.name: importlib.import_module(f"autograder.mutants.{info.name}")
            for info in pkgutil.iter_modules(mutants.__path__)}


def all_mutants() -> list[Mutant]:
    """The mutants of every assignment."""
    return [m for module in assignment_modules().values() for m in module.MUTANTS]


@dataclass
class Pack:
    """Mutants of one assignment graded as one submission: their answers are in different
    cells and their failing checks are disjoint, so the submission must lose exactly the
    sum of their points (a mutant whose answer changes another's verdict shows up as a
    wrong total).  Grading is the expensive part of the tests; a pack costs one notebook."""

    assignment: str
    mutants: list[Mutant]

    @property
    def name(self) -> str:
        return "+".join(m.name for m in self.mutants)

    @property
    def fails(self) -> set[str]:
        return set().union(*(m.fails for m in self.mutants))

    def notebook(self, root: str = ROOT):
        return apply(solved(self.assignment, root), self.mutants,
                     *(m.name for m in self.mutants))

    def expected_score(self, root: str = ROOT) -> float:
        return expected_score(self.assignment, self.fails, root)


def packs(mutants: list[Mutant], size: int = 8) -> list[Pack]:
    """``mutants`` packed greedily, in order, into submissions of at most ``size`` whose
    answer cells and failing checks do not overlap.  Honest variants (nothing to fail) are
    packed only with each other, so that each pack either keeps every point or must not."""
    out: list[Pack] = []
    for mutant in mutants:
        for pack in out:
            if (pack.assignment == mutant.assignment and len(pack.mutants) < size
                    and bool(pack.fails) == bool(mutant.fails)
                    and not pack.fails & mutant.fails
                    and not any(set(m.answers) & set(mutant.answers) for m in pack.mutants)):
                pack.mutants.append(mutant)
                break
        else:
            out.append(Pack(mutant.assignment, [mutant]))
    return out


def mutant_submissions(root: str = ROOT) -> tuple[list[Pack], dict[str, tuple[str, str]]]:
    """What to grade so that every mutant is graded once: a mutant whose notebook is a
    sample student's (the sample class shows several misconceptions as students) is graded
    as that student -- ``{(assignment, mutant): (student, assignment)}`` --, the others in
    packs.  (Mutant names are unique within an assignment only.)"""
    students = {data: (sample.student, name.split("/")[0])
                for sample in sample_class(root) for name, data in sample.files.items()}
    as_student, rest = {}, []
    for mutant in all_mutants():
        same = students.get(corpus.dumps(mutant.notebook(root)))
        if same is not None:
            as_student[(mutant.assignment, mutant.name)] = same
        else:
            rest.append(mutant)
    return packs(rest), as_student


def homework() -> tuple[str, ...]:
    """The assignments that have sample students and mutants."""
    return tuple(sorted(assignment_modules()))


# -- the sample class ------------------------------------------------------------------------
@dataclass
class Sample:
    """One student of the sample class: what they submit and what the grader must say."""

    student: str
    about: str
    files: dict[str, bytes]          # "<assignment>/<file>" -> content
    status: dict[str, str]           # assignment -> regular expression for the status
    fails: dict[str, set[str]]       # assignment -> checks (answer keys) that must fail

    def submitted(self, assignment: str) -> bool:
        return any(name.startswith(assignment + "/") for name in self.files)

    def status_of(self, assignment: str) -> str:
        return self.status.get(assignment, r"^no submission$")

    def expected_score(self, assignment: str, root: str = ROOT) -> float:
        if not self.submitted(assignment) or self.status_of(assignment).startswith("^malformed"):
            return 0.0
        return expected_score(assignment, self.fails.get(assignment, set()), root)

    def explain(self, assignment: str) -> str:
        """Why the expected score is what it is, for the report."""
        if not self.submitted(assignment):
            return "no submission"
        if self.status_of(assignment).startswith("^malformed"):
            return "the notebook cannot be read: nothing to grade"
        failing = sorted(self.fails.get(assignment, set()))
        if not failing:
            return "every check passes"
        return "loses " + ", ".join(failing)


def sample_class(root: str = ROOT) -> list[Sample]:
    """ada, who answers every assignment right, then the students of each assignment's
    module (a student may appear in several; their notebooks are merged)."""
    ada = Sample("ada", "every answer right", {}, {}, {})
    students: dict[str, Sample] = {"ada": ada}
    for assignment, module in sorted(assignment_modules().items()):
        ada.files[f"{assignment}/{assignment}.ipynb"] = corpus.dumps(solved(assignment, root))
        ada.status[assignment] = r"^graded$"
        for work in module.samples(root):
            sample = students.setdefault(work.student, Sample(work.student, "", {}, {}, {}))
            data = work.notebook if isinstance(work.notebook, bytes) else \
                corpus.dumps(work.notebook)
            sample.files[f"{assignment}/{assignment}.ipynb"] = data
            sample.status[assignment] = work.status
            sample.fails[assignment] = set(work.fails)
            sample.about = "; ".join(filter(None, [sample.about, work.about]))
    return list(students.values())


def write_class(dest: str = CLASS_DIR, root: str = ROOT) -> list[str]:
    """Write the sample class under ``dest``; returns the files written."""
    written = []
    for sample in sample_class(root):
        for name, data in sample.files.items():
            path = os.path.join(dest, sample.student, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
            written.append(path)
    return written


def drift(dest: str = CLASS_DIR, root: str = ROOT) -> list[str]:
    """Files of the committed sample class that differ from what the builders make."""
    problems = []
    expected = {}
    for sample in sample_class(root):
        for name, data in sample.files.items():
            expected[os.path.join(sample.student, name)] = data
    for rel, data in expected.items():
        path = os.path.join(dest, rel)
        if not os.path.exists(path):
            problems.append(f"{rel} is missing")
        elif open(path, "rb").read() != data:
            problems.append(f"{rel} differs from what the builders make")
    from .course import EDITOR_DIRS, _editor_dropping

    for folder, dirs, files in os.walk(dest):
        dirs[:] = [d for d in dirs if d not in EDITOR_DIRS]
        for name in files:
            if _editor_dropping(name):
                continue
            rel = os.path.relpath(os.path.join(folder, name), dest)
            if rel not in expected:
                problems.append(f"{rel} is not part of the sample class")
    return problems


def report(out: str) -> str:
    """The score table of ``out/grades.csv`` and where the feedback is, for people.  For the
    students of the sample class it also says what each one shows and which checks it must
    fail (every other check passes: a test cell keeps the share of its points its passing
    checks weigh)."""
    with open(os.path.join(out, "grades.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    samples = {s.student: s for s in sample_class()}
    width = max([7] + [len(r["student"]) for r in rows])
    lines = [f"{'student':<{width}}  {'assignment':<22} {'score':>11}  status"]
    # a sample student works on some assignments only: their empty rows are as expected
    absent = [r for r in rows if r["status"] == "no submission" and r["student"] in samples
              and not samples[r["student"]].submitted(r["assignment"])]
    for r in rows:
        if r in absent:
            continue
        score = f"{r['score']}/{r['max_score']}"
        lines.append(f"{r['student']:<{width}}  {r['assignment']:<22} {score:>11}  "
                     f"{r['status']}")
        sample = samples.get(r["student"])
        if sample is not None:
            expected = sample.expected_score(r["assignment"])
            verdict = "as expected" if float(r["score"]) == expected else "NOT AS EXPECTED"
            lines.append(f"{'':<{width}}  {'':<22} {'':>11}  expected {expected:g} "
                         f"({verdict}): {sample.explain(r['assignment'])}")
    if absent:
        lines.append(f"({len(absent)} rows of sample students for assignments they did not "
                     f"submit, scored 0 as expected, are left out)")
    if samples.keys() & {r["student"] for r in rows}:
        lines.append("\nthe sample class: " + "; ".join(f"{s.student}: {s.about}"
                                                        for s in samples.values()))
    lines.append(f"\nfeedback: {os.path.join(out, 'feedback')}/<student>/<assignment>/*.html")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    usage = "usage: python -m autograder.samples build | check | report OUT"
    if argv[:1] == ["build"]:
        for path in write_class():
            print(os.path.relpath(path, ROOT))
        return 0
    if argv[:1] == ["check"]:
        problems = drift()
        print("\n".join(problems) or "the sample class is up to date")
        return 1 if problems else 0
    if argv[:1] == ["report"] and len(argv) == 2:
        print(report(argv[1]))
        return 0
    print(usage, file=sys.stderr)
    return 2


if __name__ == "__main__":
    # the assignments' modules import autograder.samples: use that module, not this copy
    from autograder.samples import main as _main
    sys.exit(_main(sys.argv[1:]))
