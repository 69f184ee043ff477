"""Build the lectures into a small static book: ``python course/build.py [OUT]``.

Each MyST lecture (``course/NN_*.md``) is executed top to bottom and rendered to HTML with
its outputs and figures; ``index.html`` links them in order.  The default output folder is
``_build/book``.  Nothing is written next to the sources, so the repository never holds
executed notebooks.
"""

from __future__ import annotations

import html
import sys
from pathlib import Path

import jupytext
from nbclient import NotebookClient
from nbconvert import HTMLExporter

COURSE = Path(__file__).resolve().parent


def lectures(folder: Path = COURSE) -> list[Path]:
    return sorted(folder.glob("[0-9][0-9]_*.md"))


def title_of(notebook) -> str:
    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
    return "untitled"


def build(sources: list[Path], out: Path, timeout: int = 300) -> Path:
    """Execute and render ``sources`` into ``out``; returns the index page."""
    from autograder import pages  # MathJax served from the book itself, not a CDN

    out.mkdir(parents=True, exist_ok=True)
    local = "_mathjax/tex-chtml.js" if pages.install_mathjax(str(out / "_mathjax")) else None
    exporter = HTMLExporter()
    entries = []
    for source in sources:
        notebook = jupytext.read(source)
        NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": str(source.parent)}}).execute()
        body, _ = exporter.from_notebook_node(notebook)
        body = pages.localize_math(body, local)
        page = out / f"{source.stem}.html"
        page.write_text(body, encoding="utf-8")
        entries.append((page.name, title_of(notebook)))
        print(f"built {page}", flush=True)
    items = "\n".join(f'<li><a href="{name}">{html.escape(title)}</a></li>'
                      for name, title in entries)
    index = out / "index.html"
    index.write_text(f"<!doctype html>\n<html><head><meta charset='utf-8'>"
                     f"<title>Tensor and pipeline parallelism</title></head><body>\n"
                     f"<h1>Tensor and pipeline parallelism</h1>\n<ol>\n{items}\n</ol>\n"
                     f"</body></html>\n", encoding="utf-8")
    return index


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else COURSE.parent / "_build" / "book"
    print(f"book: {build(lectures(), target)}")
