"""Originality probes: the student's code, run once more with the library's answers removed.

The course library contains the reference answers of the coding exercises (the schedule
generators, the tensor-parallel operators).  Whether a submission delegates to them cannot be
decided inside the student's kernel: any check made there (a profiler hook, a patched
function) can be switched off by the student's own cells.  So the verdict comes from a
separate run that the student's kernel never touched:

1. once per grading run, :func:`strip_library` copies ``paralab`` and replaces the body of
   every function a check module's ``PROBES`` names as unavailable by
   ``raise ReferenceUnavailable(...)`` (decorators, signatures and everything else stay);
2. for each submission, :func:`probe_notebook` builds a small notebook from the submitted
   cells the probe needs (e.g. the setup cell and the cell defining ``one_f_one_b``) and
   one last cell, written here, that calls the function and records the outcome with
   ``checks.check(key, lambda: <call>)``;
3. the grader runs that notebook (one per submission, all probes of the assignment) in the sandbox against the stripped copy and keeps its
   answers as ``<notebook>.probe.jsonl``, the only place :mod:`autograder.verify` reads the
   probe's key from.

A submission that delegates gets ``ReferenceUnavailable`` as its answer; one that uses the
rest of the library (``simulate``, ``validate``, the plots) is unaffected.  This stops
delegation, not a determined copy of the library's source (see the README).
"""

from __future__ import annotations

import ast
import json
import os
import shutil
from typing import Any, Iterable

EXCEPTION = "ReferenceUnavailable"
_EXCEPTION_SOURCE = f'''

class {EXCEPTION}(RuntimeError):
    """A reference implementation of the library that this test makes unavailable: the
    exercise asks for your own."""
'''


class ProbeError(Exception):
    """A check module's PROBES names something the library does not have (course error)."""


def unavailable_names(module: Any) -> list[str]:
    """Every ``module:qualname`` the PROBES of a check module make unavailable, sorted."""
    names = set()
    for probe in (getattr(module, "PROBES", None) or {}).values():
        names.update(probe.unavailable)
    return sorted(names)


def _parse(name: str) -> tuple[str, list[str]]:
    module, sep, qualname = name.partition(":")
    if not sep or not module.startswith("paralab") or not qualname:
        raise ProbeError(f"{name!r}: name a function as 'paralab.module:qualname'")
    return module, qualname.split(".")


def _find(tree: ast.Module, path: list[str]) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
    body: list[ast.stmt] = tree.body
    for i, part in enumerate(path):
        last = i == len(path) - 1
        match = None
        for node in body:
            if last and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) \
                    and node.name == part:
                match = node
            elif not last and isinstance(node, ast.ClassDef) and node.name == part:
                match = node
        if match is None:
            return None
        if last:
            return match  # type: ignore[return-value]
        body = match.body  # type: ignore[union-attr]
    return None


def _raise(name: str) -> ast.stmt:
    text = f"{name} is not available in this test: write it yourself"
    return ast.parse(f"raise __import__('paralab').{EXCEPTION}({text!r})").body[0]


def strip_library(paralab_dir: str, names: Iterable[str], dest: str) -> str:
    """Copy the package at ``paralab_dir`` to ``dest/paralab`` with the functions ``names``
    (``"paralab.schedules:one_f_one_b"``, ``"paralab.tp:Class.method"``) made to raise
    ``paralab.ReferenceUnavailable``; returns the copy's path.  Raises :class:`ProbeError`
    when a name does not exist."""
    target = os.path.join(dest, "paralab")
    shutil.copytree(paralab_dir, target,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    by_file: dict[str, list[tuple[str, list[str]]]] = {}
    for name in names:
        module, path = _parse(name)
        rel = module.split(".")[1:]
        candidates = [os.path.join(target, *rel) + ".py",
                      os.path.join(target, *rel, "__init__.py")]
        file = next((c for c in candidates if os.path.isfile(c)), None)
        if file is None:
            raise ProbeError(f"{name!r}: the library has no module {module}")
        by_file.setdefault(file, []).append((name, path))
    for file, targets in by_file.items():
        with open(file, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=file)
        for name, path in targets:
            node = _find(tree, path)
            if node is None:
                raise ProbeError(f"{name!r}: {'.'.join(path)} is not defined in "
                                 f"{os.path.relpath(file, dest)}")
            node.body = [_raise(name)]
        with open(file, "w", encoding="utf-8") as f:
            f.write(ast.unparse(ast.fix_missing_locations(tree)) + "\n")
    with open(os.path.join(target, "__init__.py"), "a", encoding="utf-8") as f:
        f.write(_EXCEPTION_SOURCE)
    return target


def probe_notebook(submitted: dict, assignment: str, probes: dict[str, Any]) -> dict:
    """The notebook that runs all ``probes`` (key -> Probe) of one submission: the submitted
    cells they need, in order of first use (a cell the submission lacks is left out: the
    call then fails on its own), then one recording cell."""
    by_id: dict[str, dict] = {}
    for cell in submitted.get("cells", []):
        gid = cell.get("metadata", {}).get("nbgrader", {}).get("grade_id")
        if gid and cell.get("cell_type") == "code":
            by_id.setdefault(gid, cell)
    wanted: list[str] = []
    for probe in probes.values():
        wanted += [gid for gid in probe.cells if gid not in wanted]
    cells = []
    for gid in wanted:
        if gid in by_id:
            source = by_id[gid].get("source", "")
            cells.append(_code_cell("".join(source) if isinstance(source, list) else source))
    calls = "".join(f"checks.check({key!r}, lambda: {probe.call})\n"
                    for key, probe in probes.items())
    cells.append(_code_cell(f"from autograder.checks import {assignment} as checks\n{calls}"))
    return {"cells": cells, "metadata": submitted.get("metadata", {}), "nbformat": 4,
            "nbformat_minor": 5}


def _code_cell(source: str) -> dict:
    return {"cell_type": "code", "source": source, "metadata": {}, "outputs": [],
            "execution_count": None}


def read_notebook(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            nb = json.load(f)
    except (OSError, ValueError):
        return None
    return nb if isinstance(nb, dict) else None
