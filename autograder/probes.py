"""Probes: a question asked of a submission in a run of its own, without the library's
reference implementations.

Some answers are only worth their points if the student wrote them ("own implementation"
of 1F1B, of the tensor-parallel f and g).  Asking that inside the student's kernel cannot
work: the student's code runs there first and can switch off any watch (a profiler hook,
the check helper itself).  So a check module may declare probes::

    PROBES = {"own_implementation": Probe(
        cells=("setup", "q_one_f_one_b"),             # grade_ids, in this order
        call="one_f_one_b(5, 7)",                     # evaluated after them
        unavailable=("paralab.schedules:one_f_one_b",))}

and for every graded submission the grader runs, in the sandbox and with the same limits,
a *probe notebook* (:func:`probe_notebook`): the submission's cells with those grade_ids
(as nbgrader restored them), then one cell of the grader's::

    from autograder.checks import <assignment> as checks
    checks.check("<key>", lambda: <call>)

In that run ``paralab`` is a copy (made once per grading run, :func:`library_without`) in
which each ``unavailable`` function keeps its name, signature and decorators but its body
only raises ``paralab.ReferenceUnavailable``; the rest of the library works as usual.  The
probe's answers go to the main answers file's name with ``.probe.jsonl``
(:func:`answers_path`), where the clean re-check takes the probes' keys from.  A probe that
times out or crashes records nothing, and its key then fails.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import os
from typing import Any, Iterable

PROBE_SUFFIX = ".probe.jsonl"
EXCEPTION = "ReferenceUnavailable"
EXCEPTION_SOURCE = (
    f"\n\nclass {EXCEPTION}(Exception):\n"
    f'    """Raised by a reference implementation of the library in a run where it is '
    f'not available."""\n\n\n')


class ProbeError(Exception):
    """A check module's PROBES is wrong (a course author's bug)."""


def probes_of(module: Any) -> dict[str, Any]:
    """The module's PROBES, checked: {key: probe with cells, call, unavailable}."""
    probes = getattr(module, "PROBES", None)
    if probes is None:
        return {}
    name = getattr(module, "__name__", "the check module")
    if not isinstance(probes, dict):
        raise ProbeError(f"{name}: PROBES must be a dict {{answer key: Probe(...)}}")
    for key, probe in probes.items():
        cells, call = getattr(probe, "cells", None), getattr(probe, "call", None)
        unavailable = getattr(probe, "unavailable", None)
        if not isinstance(key, str) or not isinstance(call, str) or not call.strip() or \
                not isinstance(cells, (tuple, list)) or \
                not all(isinstance(c, str) for c in cells) or \
                not isinstance(unavailable, (tuple, list)) or \
                not all(isinstance(u, str) and ":" in u for u in unavailable):
            raise ProbeError(f"{name}: PROBES[{key!r}] must be Probe(cells=(grade_id, ...), "
                             f"call='python expression', unavailable=('module:qualname', "
                             f"...))")
        try:
            ast.parse(call, mode="eval")
        except SyntaxError as e:
            raise ProbeError(f"{name}: PROBES[{key!r}].call is not a Python expression "
                             f"({e.msg})") from None
    return dict(probes)


def answers_path(main: str) -> str:
    """``.../<notebook>.jsonl`` -> ``.../<notebook>.probe.jsonl``."""
    return (main[:-len(".jsonl")] if main.endswith(".jsonl") else main) + PROBE_SUFFIX


def probe_notebook(nb: dict, probe: Any, assignment: str, key: str) -> dict | None:
    """The probe notebook for ``nb`` (a notebook as a dict, as nbgrader executes it), or
    None when it has none of the probe's cells."""
    by_id = {}
    for cell in nb.get("cells", []):
        gid = cell.get("metadata", {}).get("nbgrader", {}).get("grade_id")
        if gid and gid not in by_id:
            by_id[gid] = cell
    cells = [copy.deepcopy(by_id[g]) for g in probe.cells if g in by_id]
    if not cells:
        return None
    for cell in cells:
        if cell.get("cell_type") == "code":
            cell["outputs"], cell["execution_count"] = [], None
    cells.append({
        "cell_type": "code", "id": "probe", "metadata": {}, "outputs": [],
        "execution_count": None,
        "source": f"from autograder.checks import {assignment} as checks\n"
                  f"checks.check({key!r}, lambda: {probe.call})\n"})
    out = {k: copy.deepcopy(v) for k, v in nb.items() if k != "cells"}
    out["cells"] = cells
    return out


def unavailable_sets(probes: Iterable[Any]) -> list[tuple[str, ...]]:
    return sorted({tuple(sorted(set(p.unavailable))) for p in probes})


def variant_name(unavailable: tuple[str, ...]) -> str:
    """A stable name for the library copy without ``unavailable``."""
    return "probe-" + hashlib.sha256("\n".join(unavailable).encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------
# The library without its references


def library_without(unavailable: Iterable[str], package: str = "paralab"):
    """A transform for :meth:`autograder.coursecode.CourseCode.build`: (path relative to
    the library, source) -> source with the body of each ``unavailable`` function
    (``module:qualname``, e.g. ``paralab.tp:ColumnParallelLinear.forward``) replaced by a
    ``raise``.  Raises :class:`ProbeError` (when the copy is made) for a name that is not a
    function of the library."""
    wanted: dict[str, set[str]] = {}
    for item in unavailable:
        module, _, qualname = item.partition(":")
        if not module.split(".")[0] == package or not qualname:
            raise ProbeError(f"{item!r} is not 'module:qualname' of the {package} library")
        wanted.setdefault(module, set()).add(qualname)
    found: set[str] = set()

    def transform(rel: str, source: str) -> str:
        parts = rel[:-3].split(os.sep) if rel.endswith(".py") else []
        if parts and parts[-1] == "__init__":
            parts = parts[:-1]
        module = ".".join([package] + parts)
        if rel == "__init__.py":
            source = _add_exception(source)
        names = wanted.get(module)
        if not names:
            return source
        new, done = _replace_bodies(source, module, names, package)
        found.update(f"{module}:{q}" for q in done)
        return new

    def check() -> None:
        missing = sorted({f"{m}:{q}" for m, qs in wanted.items() for q in qs} - found)
        if missing:
            raise ProbeError(f"PROBES name {', '.join(missing)}, which "
                             f"{'is not a function' if len(missing) == 1 else 'are not functions'}"
                             f" of the {package} library")

    transform.check = check  # type: ignore[attr-defined]
    return transform


def _add_exception(source: str) -> str:
    """The exception class, defined in the package's ``__init__`` before anything else
    it runs (after the docstring and ``from __future__`` imports)."""
    tree = ast.parse(source)
    at = 0
    for node in tree.body:
        is_doc = isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and \
            isinstance(node.value.value, str)
        is_future = isinstance(node, ast.ImportFrom) and node.module == "__future__"
        if (is_doc and at == 0) or is_future:
            at = node.end_lineno
            continue
        break
    lines = source.splitlines(keepends=True)
    return "".join(lines[:at]) + EXCEPTION_SOURCE + "".join(lines[at:])


def _replace_bodies(source: str, module: str, qualnames: set[str], package: str
                    ) -> tuple[str, set[str]]:
    """``source`` with the bodies of the functions ``qualnames`` replaced (text edits on
    the original lines: everything else stays byte for byte, decorators included)."""
    tree = ast.parse(source)
    targets: list[tuple[ast.AST, str]] = []

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                qual = prefix + node.name
                if qual in qualnames:
                    targets.append((node, qual))
            elif isinstance(node, ast.ClassDef):
                visit(node.body, prefix + node.name + ".")

    visit(tree.body, "")
    lines = source.splitlines(keepends=True)
    # from the bottom up, so that earlier line numbers stay valid
    for node, qual in sorted(targets, key=lambda t: -t[0].lineno):
        first, last = node.body[0], node.body[-1]
        i, end = first.lineno - 1, last.end_lineno
        before = lines[i].encode()[:first.col_offset].decode("utf-8", "replace")
        message = f"{module}:{qual} is not available in this test"
        body = " " * (node.col_offset + 4) + \
            f"raise __import__({package!r}).{EXCEPTION}({message!r})\n"
        if before.strip():  # a one-line function: ``def f(x): return x``
            lines[i:end] = [before.rstrip() + "\n", body]
        else:
            lines[i:end] = [body]
    return "".join(lines), {q for _, q in targets}
