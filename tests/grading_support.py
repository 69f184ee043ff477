"""What the tests that grade the real homework share: the ``grade`` command as the README
runs it, and what a mutant's row and feedback must show."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def grade(submissions: Path, out: Path) -> dict:
    """Grade the folder ``submissions`` into ``out``; {(student, assignment): row}."""
    command = [sys.executable, "-m", "autograder", "grade", str(submissions), "--out", str(out),
               "--cell-timeout", "30", "--jobs", "2", "--no-progress",
               "--sandbox-uid", str(63000 + os.getpid() % 1000)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(out / "grades.csv", newline="") as f:
        return {(r["student"], r["assignment"]): r for r in csv.DictReader(f)}


def feedback(out: Path, student: str, assignment: str) -> str:
    page = out / "feedback" / student / assignment / f"{assignment}.html"
    return page.read_text(encoding="utf-8") if page.exists() else ""


def loses_exactly(rows: dict, out: Path, student: str, mutants: list, expected: float) -> None:
    """``student``'s notebook carries ``mutants`` (one assignment's): it is graded, scores
    ``expected`` (the total less what the mutants' failing checks weigh), and its feedback
    has every phrase each mutant must show."""
    assignment = mutants[0].assignment
    what = "+".join(m.name for m in mutants)
    row = rows[(student, assignment)]
    assert row["status"] == "graded", (what, row["status"])
    assert float(row["score"]) == expected, (what, row["score"], expected)
    # nothing to fail: honest variants, which must keep every point
    honest = not any(m.fails for m in mutants)
    assert (float(row["score"]) == float(row["max_score"])) == honest, what
    page = feedback(out, student, assignment)
    for mutant in mutants:
        for phrase in mutant.feedback:
            assert phrase.replace("'", "&#39;") in page or phrase in page, (mutant.name, phrase)
