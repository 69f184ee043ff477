"""Every lecture runs top to bottom, well under a minute, and is stored as text."""

import time
from pathlib import Path

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient

COURSE = Path(__file__).resolve().parents[1] / "course"
LECTURES = sorted(COURSE.glob("[0-9][0-9]_*.md"))


def test_there_are_lectures_and_no_committed_notebooks():
    assert [p.name for p in LECTURES][:2] == ["01_tensor_parallel.md", "02_pipeline_bubbles.md"]
    # course/_generated/ holds the book's pages made at build time (ignored by git)
    notebooks = [p for p in COURSE.rglob("*.ipynb") if "_generated" not in p.parts]
    assert not notebooks, "lectures are stored as MyST text, not .ipynb"


@pytest.mark.slow
@pytest.mark.parametrize("path", LECTURES, ids=lambda p: p.stem)
def test_lecture_executes(path):
    notebook = jupytext.read(path)
    start = time.monotonic()
    NotebookClient(notebook, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(COURSE)}}).execute()
    elapsed = time.monotonic() - start
    errors = [o for c in notebook.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    assert elapsed < 60, f"{path.name} took {elapsed:.0f} s; lectures must stay under a minute"
    nbformat.validate(notebook)


def test_make_book_builds_the_sphinx_book_and_fails_on_warnings():
    """``make book`` is Sphinx over course/ (tests/test_book.py builds and reads it)."""
    makefile = (COURSE.parent / "Makefile").read_text()
    book = makefile.split("\nbook:", 1)[1].split("\n\n", 1)[0]
    assert "-m sphinx -W" in makefile and "course _build/book" in book
    assert not (COURSE / "build.py").exists(), "one renderer: Sphinx (course/conf.py)"
