"""Putting what the sandbox reported back into the notebook nbgrader grades.

Everything that comes out of the sandbox is untrusted: an output is rebuilt field by field
into a well-formed nbformat output (:func:`clean_output`) or dropped, so that one malformed
output cannot make the graded notebook unreadable.  Where the run stopped is written into
the notebook, and the code cells that never ran are marked so that they cannot pass.
"""

from __future__ import annotations

from typing import Any


def apply_results(nb: Any, result: Any) -> Any:
    """Write the outputs of ``result`` (a :class:`autograder.sandbox.RunResult`) into
    ``nb`` (a NotebookNode), explain where and why the run stopped, and mark the code
    cells that never ran so that they cannot pass."""
    from nbformat.notebooknode import from_dict

    stopped = result.status != "completed"
    where = result.running
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        data = result.cells.get(index)
        if data is not None:
            cell.outputs = [from_dict(o) for o in map(clean_output, data["outputs"]) if o]
            cell.execution_count = data.get("execution_count")
        else:
            cell.outputs = []
            cell.execution_count = None
        if stopped and index == where and not _has_error(cell):
            cell.outputs.append(from_dict(_error_output(
                "GraderStop", f"{result.status}: {result.reason}; the notebook was stopped "
                              f"while this cell was running")))
        elif data is None and cell.source.strip() and (stopped or where is not None):
            cell.outputs = [from_dict(_error_output(
                "NotRun", f"this cell did not run: the notebook was stopped earlier "
                          f"({result.status}: {result.reason})"))]
    return nb


def clean_output(o: Any) -> dict | None:
    """A well-formed nbformat output built from ``o`` (which came out of the sandbox), or
    None: one malformed output must not make the whole notebook unreadable."""
    if not isinstance(o, dict):
        return None
    kind = o.get("output_type")
    if kind == "stream":
        name = o.get("name") if o.get("name") in ("stdout", "stderr") else "stdout"
        return {"output_type": "stream", "name": name, "text": str(o.get("text", ""))}
    if kind == "error":
        tb = o.get("traceback")
        return {"output_type": "error", "ename": str(o.get("ename", "")),
                "evalue": str(o.get("evalue", "")),
                "traceback": [str(t) for t in tb] if isinstance(tb, list) else []}
    if kind in ("display_data", "execute_result"):
        data = o.get("data")
        if not isinstance(data, dict):
            return None
        kept = {}
        for mime, value in data.items():
            if not isinstance(mime, str) or "/" not in mime:
                continue
            if isinstance(value, str):
                kept[mime] = value
            elif isinstance(value, list) and all(isinstance(v, str) for v in value):
                kept[mime] = "".join(value)
            elif mime.endswith("json") and isinstance(value, (dict, list)):
                kept[mime] = value
        if not kept:
            return None
        meta = o.get("metadata") if isinstance(o.get("metadata"), dict) else {}
        out = {"output_type": kind, "data": kept, "metadata": meta}
        if kind == "execute_result":
            count = o.get("execution_count")
            out["execution_count"] = count if isinstance(count, int) else None
        return out
    return None


def _has_error(cell: Any) -> bool:
    return any(o.get("output_type") == "error" for o in cell.get("outputs", []))


def _error_output(ename: str, evalue: str) -> dict:
    return {"output_type": "error", "ename": ename, "evalue": evalue,
            "traceback": [f"{ename}: {evalue}"]}
