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
    assert not list(COURSE.rglob("*.ipynb")), "lectures are stored as MyST text, not .ipynb"


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


def test_book_build_renders_executed_pages_and_an_index(tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("course_build", COURSE / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    lecture = tmp_path / "01_tiny.md"
    lecture.write_text("---\njupytext:\n  text_representation:\n    format_name: myst\n"
                       "kernelspec:\n  name: python3\n  display_name: Python 3\n---\n\n"
                       "# A tiny lecture\n\n```{code-cell} ipython3\nprint(6 * 7)\n```\n")
    index = build.build([lecture], tmp_path / "book")
    page = (tmp_path / "book" / "01_tiny.html").read_text()
    assert "42" in page  # executed: the output is in the page
    assert 'src="_mathjax/tex-chtml.js"' in page and (tmp_path / "book" / "_mathjax"
                                                      / "tex-chtml.js").is_file()
    assert '<a href="01_tiny.html">A tiny lecture</a>' in index.read_text()
    assert build.lectures()[0].name == "01_tensor_parallel.md"
