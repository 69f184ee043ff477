"""The reader's book: Sphinx + MyST-NB + sphinx-book-theme over the lectures in this folder.

``make book`` builds it into ``_build/book`` (``make book-solutions`` into
``_build/book-solutions``, with worked solutions; instructors publish the default one).

What goes in, and where it comes from (nothing is copied by hand, so nothing needs editing
here when a lecture, a homework or a library module is added):

* every lecture ``NN_*.md`` of this folder, executed (a glob in ``index.md``);
* every homework ``assignments/<hw>/<hw>.ipynb``, the committed release notebook (no
  solutions, no hidden tests), shown without executing;
* the API reference of every module of ``paralab`` (autodoc);
* the book-only pages of ``book/``: glossary, misconceptions, homework, references.

The homework notebooks and the API pages are written at build time into ``_generated/``
(ignored by git): Sphinx only reads documents under its source folder.

Execution goes through jupyter-cache, in a cache keyed by the sources of the library and of
the checks: a second build re-runs only what changed, and editing ``paralab/`` re-runs every
page (their outputs depend on it).  A cell error or any Sphinx warning fails the build
(``-W`` in the Makefile; ``nb_execution_raise_on_error`` here).  MathJax is served from the
book itself (``_static/mathjax``), copied from the pinned ``django-static-mathjax`` package.
"""

from __future__ import annotations

import hashlib
import io
import os
import pkgutil
import re
import shutil
import sys
from pathlib import Path

COURSE = Path(__file__).resolve().parent
ROOT = COURSE.parent
GENERATED = COURSE / "_generated"
sys.path.insert(0, str(ROOT))  # the library and the checks, also without `pip install -e`

# `sphinx-build -t solutions` (make book-solutions) adds the worked solutions.
SOLUTIONS = "solutions" in globals().get("tags", ())  # Sphinx provides `tags`

# -- project ----------------------------------------------------------------------------------
project = "Tensor and pipeline parallelism"
author = "the paralab authors"
copyright = "the paralab authors, MIT license"
html_title = project + (" · with worked solutions" if SOLUTIONS else "")
language = "en"

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinxcontrib.bibtex",
]

root_doc = "index"
exclude_patterns = ["_build", "**.ipynb_checkpoints", "conf.py"]
if not SOLUTIONS:
    # Worked solutions never enter the default book, even when an earlier
    # `make book-solutions` left them in _generated/.
    exclude_patterns.append("_generated/solutions")

# -- MyST and notebooks -----------------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
# Markdown displayed by code cells (tables with $...$ math) goes through MyST too, so its
# math is rendered like the text's.
nb_render_markdown_format = "myst"
nb_execution_mode = "cache"
nb_execution_timeout = 120          # per cell; a lecture as a whole stays under a minute
nb_execution_raise_on_error = True  # a cell error fails the build
nb_execution_show_tb = True
# Homework is shown as released: questions and empty answer cells, never run.
nb_execution_excludepatterns = ["_generated/homework/*"]
nb_merge_streams = True


def _library_hash() -> str:
    """A digest of what the executed pages' outputs depend on besides their own text."""
    digest = hashlib.sha256()
    for folder in ("paralab", "autograder/checks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            digest.update(str(path.relative_to(ROOT)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


LIBRARY_HASH = _library_hash()
paralab_library_hash = LIBRARY_HASH  # registered in setup() as part of the environment
CACHE_ROOT = ROOT / "_build" / ".jupyter_cache"
nb_execution_cache_path = str(CACHE_ROOT / LIBRARY_HASH)

# -- API reference ----------------------------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True}
# Signatures as written, not with every default value expanded (torch dtypes, big tuples).
autodoc_preserve_defaults = True
autodoc_typehints = "description"
napoleon_google_docstring = True
napoleon_numpy_docstring = False

# -- references -------------------------------------------------------------------------------
bibtex_bibfiles = ["book/references.bib"]
bibtex_default_style = "plain"


def _round_brackets():
    """Author-year citations in round brackets, "(Huang et al., 2019)", as the lectures'
    text reads (sphinxcontrib-bibtex's author_year style uses square ones)."""
    from dataclasses import dataclass, field

    import sphinxcontrib.bibtex.plugin
    from sphinxcontrib.bibtex.style.referencing import BracketStyle
    from sphinxcontrib.bibtex.style.referencing.author_year import AuthorYearReferenceStyle

    def round_brackets() -> BracketStyle:
        return BracketStyle(left="(", right=")")

    @dataclass
    class RoundAuthorYear(AuthorYearReferenceStyle):
        bracket_parenthetical: BracketStyle = field(default_factory=round_brackets)
        bracket_textual: BracketStyle = field(default_factory=round_brackets)
        bracket_author: BracketStyle = field(default_factory=round_brackets)
        bracket_label: BracketStyle = field(default_factory=round_brackets)
        bracket_year: BracketStyle = field(default_factory=round_brackets)

    sphinxcontrib.bibtex.plugin.register_plugin(
        "sphinxcontrib.bibtex.style.referencing", "author_year_round", RoundAuthorYear,
        force=True)
    return "author_year_round"


bibtex_reference_style = _round_brackets()

# -- HTML -------------------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_static_path = ["book/_static"]
html_css_files = ["book.css"]
html_js_files = ["book.js"]
html_favicon = "book/_static/favicon.svg"  # else a served book's browser asks for /favicon.ico
html_theme_options = {
    "home_page_in_toc": True,
    "show_toc_level": 2,
    "use_download_button": True,
    "use_fullscreen_button": False,
    "use_source_button": False,
    "use_repository_button": False,
    "launch_buttons": {},
    "navigation_with_keys": False,
}
# A first visit has no stored light/dark choice; without a default the theme logs an error.
html_context = {"default_mode": "light"}
html_show_sourcelink = False
html_last_updated_fmt = None
# MathJax 3 from the book itself (copied into _static/mathjax by `install_mathjax` below),
# never from a CDN: the book must render math offline.
mathjax_path = "mathjax/tex-chtml.js"


# -- generated pages --------------------------------------------------------------------------
def _write_if_changed(path: Path, text: str) -> None:
    """Write ``text`` unless ``path`` already holds it (Sphinx then does not re-read it)."""
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _sync(folder: Path, files: dict[str, str]) -> None:
    """Make ``folder`` hold exactly ``files`` (name -> text)."""
    for name, text in files.items():
        _write_if_changed(folder / name, text)
    if folder.is_dir():
        for path in folder.iterdir():
            if path.name not in files:
                shutil.rmtree(path) if path.is_dir() else path.unlink()


def homework_releases() -> list[Path]:
    """Every released homework notebook, ``assignments/<hw>/<hw>.ipynb``, in order."""
    return sorted(p for p in (ROOT / "assignments").glob("*/*.ipynb")
                  if p.stem == p.parent.name)


READ_ONLY_NOTE = (
    "```{{note}}\nThis is the problem statement of `{path}`, as released to students: "
    "answer cells are empty and nothing here has run.  To work on it, open the notebook in "
    "JupyterLab (see the course README), write your answers in the cells marked "
    "`# YOUR CODE HERE` and run the test cell under each answer.\n```"
)

SOLUTION_NOTE = (
    "```{{note}}\nWorked solutions of `{path}`: every answer cell filled in and the whole "
    "notebook run, so each test cell shows what the checks say about a right answer.  Try "
    "the problems first.\n```"
)


def _notebook_page(nb, note: str) -> str:
    """``nb`` with ``note`` after its title, as notebook JSON text."""
    import copy

    import nbformat
    nb = copy.deepcopy(nb)
    cell = nbformat.v4.new_markdown_cell(note)
    cell["id"] = "book-note"  # fixed, so that an unchanged page is not rewritten
    first = nb.cells[0] if nb.cells else None
    nb.cells.insert(1 if first is not None and first.cell_type == "markdown" else 0, cell)
    return nbformat.writes(nb) + "\n"


def homework_pages() -> dict[str, str]:
    import nbformat
    pages = {}
    for release in homework_releases():
        nb = nbformat.read(release, as_version=4)
        path = release.relative_to(ROOT).as_posix()
        pages[release.name] = _notebook_page(nb, READ_ONLY_NOTE.format(path=path))
    return pages


def solution_pages() -> dict[str, str]:
    """Each release with the answer cells of ``solutions/<hw>/<hw>.pct.py`` filled in."""
    import nbformat

    from autograder.corpus import solved_notebook
    from autograder.course import read_source
    pages = {}
    for release in homework_releases():
        source = ROOT / "solutions" / release.stem / f"{release.stem}.pct.py"
        if not source.is_file():
            raise FileNotFoundError(f"no solution source {source} for {release}")
        nb = solved_notebook(nbformat.read(release, as_version=4), read_source(str(source)))
        path = release.relative_to(ROOT).as_posix()
        pages[f"{release.stem}_solutions.ipynb"] = _notebook_page(
            nb, SOLUTION_NOTE.format(path=path))
    return pages


def library_modules() -> list[str]:
    """Every public module of ``paralab``, subpackages' modules included."""
    import paralab
    return sorted(m.name for m in pkgutil.walk_packages(paralab.__path__, "paralab.")
                  if not any(part.startswith("_") for part in m.name.split(".")))


def api_pages() -> dict[str, str]:
    """One reStructuredText page per module: autodoc's output is reST, which a MyST page
    would show as text."""
    pages = {}
    for name in library_modules():
        title = f"``{name}``"
        pages[f"{name}.rst"] = f"{title}\n{'=' * len(title)}\n\n.. automodule:: {name}\n"
    return pages


def generate_pages(app) -> None:
    _sync(GENERATED / "homework", homework_pages())
    _sync(GENERATED / "api", api_pages())
    if SOLUTIONS:
        _sync(GENERATED / "solutions", solution_pages())


def add_solutions_toctree(app, docname: str, source: list[str]) -> None:
    """The homework page lists the worked solutions too in ``make book-solutions``."""
    if SOLUTIONS and docname == "book/homework":
        source[0] += ("\n\n## Worked solutions\n\n```{toctree}\n:glob:\n:maxdepth: 1\n\n"
                      "/_generated/solutions/*\n```\n")


def prune_caches(app) -> None:
    """Keep only the execution cache of the current library sources."""
    if CACHE_ROOT.is_dir():
        for folder in CACHE_ROOT.iterdir():
            if folder.is_dir() and folder.name != LIBRARY_HASH:
                shutil.rmtree(folder, ignore_errors=True)


def drop_solutions(app, exception) -> None:
    """Worked solutions are not left in the source tree once the book is built."""
    shutil.rmtree(GENERATED / "solutions", ignore_errors=True)


def install_mathjax(app, exception) -> None:
    if exception is not None or app.builder.format != "html":
        return
    from autograder import pages
    if not pages.install_mathjax(os.path.join(app.outdir, "_static", "mathjax")):
        raise RuntimeError("MathJax is not installed (the pinned django-static-mathjax "
                           "package): the book would show raw TeX offline")


# -- docstrings that are not reStructuredText ---------------------------------------------
# autodoc reads docstrings as reST.  A library docstring written otherwise (a hanging
# indent, ``Fraction``s) would make docutils warn, and warnings fail the build; the library
# belongs to its authors, not to the book.  Such a docstring is shown as written, in a
# preformatted block, and listed at the end of the build so that it gets fixed at its
# source.  Every other warning still fails the build.
_ROLE = re.compile(r":[A-Za-z0-9_.+-]+(?::[A-Za-z0-9_.+-]+)*:`")
NOT_RST: list[str] = []


def _rst_problems(text: str) -> str:
    """docutils' complaints about ``text`` (Sphinx roles read as plain interpreted text)."""
    import docutils.core

    stream = io.StringIO()
    try:
        docutils.core.publish_doctree(_ROLE.sub("`", text), settings_overrides={
            "report_level": 2, "halt_level": 5, "warning_stream": stream,
            "file_insertion_enabled": False, "raw_enabled": False})
    except Exception:  # noqa: BLE001 - what plain docutils cannot read, Sphinx judges
        return ""
    return stream.getvalue().strip()


def keep_docstrings_readable(app, what, name, obj, options, lines: list[str]) -> None:
    owner = name if what == "module" else getattr(obj, "__module__", None) or name
    if not owner.startswith("paralab"):
        return  # autodoc also reads imported helpers (contextlib's) while it sorts members
    problems = _rst_problems("\n".join(lines))
    if problems:
        NOT_RST.append(f"{name}: {problems.splitlines()[0]}")
        lines[:] = ["::", ""] + [f"    {line}" for line in lines] + [""]


def report_docstrings(app, exception) -> None:
    if NOT_RST:
        print("Docstrings that are not valid reStructuredText (shown as written in the API "
              "reference; fix them in the library):", file=sys.stderr)
        for item in NOT_RST:
            print(f"  {item}", file=sys.stderr)


def setup(app):
    app.connect("autodoc-process-docstring", keep_docstrings_readable)
    app.connect("build-finished", report_docstrings)
    # Part of the environment: when the library changes, every page is read (and executed)
    # again, from the cache of the new library sources.
    app.add_config_value("paralab_library_hash", LIBRARY_HASH, "env")
    app.connect("builder-inited", generate_pages)
    app.connect("builder-inited", prune_caches)
    app.connect("source-read", add_solutions_toctree)
    app.connect("build-finished", install_mathjax)
    app.connect("build-finished", drop_solutions)
