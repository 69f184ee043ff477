"""Lectures are stored as text, and the book is built from them.  That each one runs top to
bottom in well under a minute is tested in ``tests/test_book.py``, whose executed notebooks
the book then reuses."""

from pathlib import Path

COURSE = Path(__file__).resolve().parents[1] / "course"
LECTURES = sorted(COURSE.glob("[0-9][0-9]_*.md"))


def test_there_are_lectures_and_no_committed_notebooks():
    assert [p.name for p in LECTURES][:2] == ["01_tensor_parallel.md", "02_pipeline_bubbles.md"]
    # course/_generated/ holds the book's pages made at build time (ignored by git)
    notebooks = [p for p in COURSE.rglob("*.ipynb") if "_generated" not in p.parts]
    assert not notebooks, "lectures are stored as MyST text, not .ipynb"


def test_make_book_builds_the_sphinx_book_and_fails_on_warnings():
    """``make book`` is Sphinx over course/ (tests/test_book.py builds and reads it)."""
    makefile = (COURSE.parent / "Makefile").read_text()
    book = makefile.split("\nbook:", 1)[1].split("\n\n", 1)[0]
    assert "-m sphinx -W" in makefile and "course _build/book" in book
    assert not (COURSE / "build.py").exists(), "one renderer: Sphinx (course/conf.py)"
