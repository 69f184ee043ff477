"""What the feedback pages need beyond nbgrader's: readable test-cell titles, math that
renders offline, and the grading status at the top.

nbgrader's feedback page lists every test cell as "Test cell" in its table of contents and
loads MathJax from a CDN, so a student reading it offline sees raw ``$t_f (p-1)$``.  These
functions rewrite the generated HTML in place:

* :func:`question_titles` names each test cell after the question it follows (the bold
  ``**A1.**`` label of the markdown above it, or the part's heading) and the answers it
  checks: ``A4 · T_total_16, T_ideal_16, time_ratio_16``;
* :func:`install_mathjax` copies MathJax 3 (from the ``mathjax`` static package on PyPI,
  a dependency of the course) next to the pages once, and :func:`localize_math` points each
  page at that copy, falling back to the CDN only when the copy is missing (a page mailed
  on its own).
"""

from __future__ import annotations

import html
import os
import re
import shutil
from typing import Any

MATHJAX_DIR = "_mathjax"   # under OUT/feedback/
CDN = "https://cdn.jsdelivr.net/npm/mathjax@3.2.2/es5/tex-chtml.js"
# the parts of MathJax's es5 distribution the pages use: the TeX -> CommonHTML bundle and
# what it loads on demand (TeX extensions, fonts, the menu, assistive MathML)
_PARTS = ("tex-chtml.js", "input/tex/extensions", "output/chtml", "ui", "a11y", "adaptors")

_LABEL = re.compile(r"\*\*([A-Z]\d+[a-z]?)\.\*\*")
_PART = re.compile(r"^#+\s*Part\s+([A-Z])\b", re.MULTILINE)


def question_titles(cells: list[dict], grade_cells: dict[str, Any]) -> dict[str, str]:
    """grade_id -> title of every autograded test cell of a notebook's ``cells`` (as
    :func:`autograder.course.source_cells` returns them)."""
    titles = {}
    label = None
    for cell in cells:
        if cell["cell_type"] == "markdown":
            found = _LABEL.findall(cell["source"])
            if found:
                label = found[-1]
            else:
                part = _PART.findall(cell["source"])
                if part:
                    label = f"Part {part[-1]}"
        elif cell["grade"] and not cell["solution"] and cell["cell_type"] == "code":
            keys = list(grade_cells.get(cell["grade_id"], []))
            what = ", ".join(keys) if keys else cell["grade_id"]
            titles[cell["grade_id"]] = f"{label} \u00b7 {what}" if label else what
    return titles


def retitle(text: str, titles: dict[str, str]) -> str:
    """Replace the "Test cell" entries of the table of contents by ``titles``."""
    for grade_id, title in titles.items():
        anchor = f'<a href="#{html.escape(grade_id)}">'
        text = text.replace(anchor + "Test cell</a>", anchor + html.escape(title) + "</a>")
    return text


def mathjax_source() -> str | None:
    """The es5 folder of the installed MathJax, or None when it is not installed."""
    try:
        import mathjax  # the static files of MathJax 3, on PyPI as django-static-mathjax
    except ImportError:
        return None
    folder = os.path.join(os.path.dirname(os.path.abspath(mathjax.__file__)), "static",
                          "mathjax", "es5")
    return folder if os.path.isfile(os.path.join(folder, "tex-chtml.js")) else None


def install_mathjax(dest: str) -> bool:
    """Copy the parts of MathJax the pages use into ``dest`` (once); False when MathJax is
    not installed (the pages then use the CDN)."""
    source = mathjax_source()
    if source is None:
        return False
    if os.path.isfile(os.path.join(dest, "tex-chtml.js")):
        return True
    for part in _PARTS:
        src, out = os.path.join(source, part), os.path.join(dest, part)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        if os.path.isdir(src):
            shutil.copytree(src, out, dirs_exist_ok=True)
        elif os.path.isfile(src):
            shutil.copyfile(src, out)
    return True


def mathjax_tags(local_src: str | None) -> str:
    """The tags that load MathJax 3 from ``local_src`` (a relative URL), or from the CDN
    when that file cannot be loaded."""
    config = ("<script>window.MathJax = {tex: {inlineMath: [['$', '$'], ['\\\\(', '\\\\)']], "
              "displayMath: [['$$', '$$'], ['\\\\[', '\\\\]']], processEscapes: true}, "
              "options: {ignoreHtmlClass: 'tex2jax_ignore', processHtmlClass: "
              "'tex2jax_process'}};</script>\n")
    if local_src is None:
        return config + f'<script src="{CDN}" async></script>\n'
    fallback = ("var s = document.createElement('script'); s.src = '" + CDN + "'; "
                "document.head.appendChild(s);")
    return config + (f'<script src="{html.escape(local_src)}" async '
                     f'onerror="{html.escape(fallback)}"></script>\n')


_MATHJAX2 = re.compile(r"<!-- Load mathjax -->.*?</script>\s*<!-- MathJax configuration -->"
                       r"\s*<script type=\"text/x-mathjax-config\">.*?</script>", re.DOTALL)
_ANY_MATHJAX = re.compile(r"<script[^>]*src=\"[^\"]*mathjax[^\"]*\"[^>]*>\s*</script>",
                          re.IGNORECASE)


def localize_math(text: str, local_src: str | None) -> str:
    """Swap the page's CDN MathJax 2 for :func:`mathjax_tags`."""
    tags = mathjax_tags(local_src)
    new, n = _MATHJAX2.subn(lambda _: tags, text, count=1)
    if n == 0:
        new, n = _ANY_MATHJAX.subn(lambda _: tags, text, count=1)
    if n == 0:  # no MathJax at all: add it before </head>
        new = text.replace("</head>", tags + "</head>", 1)
    return new


def status_banner(text: str, status: str) -> str:
    """Put the grading status at the top of the page's body."""
    banner = (f'<div style="padding:0.6em 1em;margin:0.5em 0;border:1px solid #aaa;'
              f'background:#f6f6f6;font-family:sans-serif">Grading status: '
              f'{html.escape(status)}</div>')
    at = text.find("<body")
    if at < 0:
        return text
    close = text.find(">", at)
    return text[:close + 1] + banner + text[close + 1:]


# A check's message is one long line: wrap it instead of hiding its end past the right edge.
WRAP_OUTPUT = ("<style>div.output_area pre, div.output_subarea pre "
               "{white-space: pre-wrap; word-break: break-word;}</style>\n")


def rewrite(path: str, *, status: str, titles: dict[str, str], mathjax_src: str | None) -> None:
    """Apply the rewrites to the page at ``path``."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    text = status_banner(localize_math(retitle(text, titles), mathjax_src), status)
    text = text.replace("</head>", WRAP_OUTPUT + "</head>", 1)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def relative_mathjax(page_dir: str, feedback_root: str) -> str:
    """The URL of the installed MathJax relative to a page in ``page_dir``."""
    target = os.path.join(feedback_root, MATHJAX_DIR, "tex-chtml.js")
    return os.path.relpath(target, page_dir).replace(os.sep, "/")

