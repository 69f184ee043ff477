"""Finding, reading and repairing submitted notebooks before nbgrader sees them.

Submissions are laid out ``<student>/<assignment>/<notebook>.ipynb`` (a folder or a zip of
one, possibly inside one more top-level folder).  nbgrader turns most problems into silent
zeros, so each one is named here instead:

* a notebook that is not JSON or has no cell list is *malformed*;
* a missing notebook is looked for under another name (``toy (1).ipynb``, a subfolder), and
  graded under its expected name when found (*renamed notebook*);
* test cells that were edited, deleted or had their nbgrader metadata or ids changed are
  restored from the release (*tests tampered*, *tests deleted*, *cell metadata changed*);
* a changed kernel is set back to ``python3`` (*kernel changed*);
* a zip member that cannot be read (bad CRC, truncated) or is larger than the notebook
  limit is that student's problem, reported in their row, never the whole run's.

Student folders may have any name a file system allows (``zoë``, ``ann marie``, ``张三``):
nbgrader gets a safe id made from it (:func:`student_id`), ``grades.csv`` and the feedback
folders keep the name.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import os
import re
import stat
import unicodedata
import zipfile
from dataclasses import dataclass, field
from typing import Any

MAX_NOTEBOOK_BYTES = 50 * 2**20
ZIP_MAX_TOTAL = 4 * 2**30
ZIP_MAX_FILES = 50_000
STUDENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,99}$")
_KEEP_CELL_META = ("nbgrader", "tags", "deletable", "editable")
_NBGRADER_KEYS = ("grade", "grade_id", "locked", "points", "solution", "task", "cell_type")


class InputError(Exception):
    """The submissions path cannot be used (usage error)."""


# ---------------------------------------------------------------------------------------
# Input: folder or zip


@dataclass
class Extracted:
    """What :func:`extract_zip` did: warnings for the instructor, and the members that
    belong to a student but could not be used (extracted path -> the status to give)."""

    warnings: list[str] = field(default_factory=list)
    problems: dict[str, str] = field(default_factory=dict)


def extract_zip(path: str, dest: str) -> Extracted:
    """Extract the notebooks of a zip safely into ``dest``.

    Only ``*.ipynb`` members are extracted.  Absolute paths, ``..`` components, links and
    encrypted members are skipped with a warning.  A member that cannot be read (bad CRC,
    truncated data) or that is larger than the notebook limit is left as an empty file and
    listed in ``problems``, so that its student gets a row saying so."""
    out = Extracted()
    warnings = out.warnings
    total = 0
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise InputError(f"{path} is not a readable zip file ({e})") from None
    with archive:
        members = archive.infolist()
        if len(members) > ZIP_MAX_FILES:
            raise InputError(f"{path} has {len(members)} members (more than {ZIP_MAX_FILES})")
        for info in members:
            name = info.filename
            parts = name.replace("\\", "/").rstrip("/").split("/")
            unsafe = name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or \
                any(p in ("..", ".", "") for p in parts) or "__MACOSX" in parts or \
                any("\x00" in p for p in parts)
            if info.is_dir() or not name.lower().endswith(".ipynb"):
                # not extracted, but its folder is: a student who sent only other files
                # gets a row ("missing notebook") like in a folder of submissions
                if not unsafe:
                    folder = parts if info.is_dir() else parts[:-1]
                    if folder:
                        try:
                            os.makedirs(os.path.join(dest, *folder), exist_ok=True)
                        except OSError:
                            pass
                continue
            if unsafe:
                warnings.append(f"skipped zip member {name!r} (unsafe or system path)")
                continue
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                warnings.append(f"skipped zip member {name!r} (a link)")
                continue
            if info.flag_bits & 0x1:
                warnings.append(f"skipped zip member {name!r} (encrypted)")
                continue
            target = os.path.join(dest, *parts)
            try:
                os.makedirs(os.path.dirname(target), exist_ok=True)
            except OSError as e:
                warnings.append(f"skipped zip member {name!r} ({e.strerror or e})")
                continue
            if info.file_size > MAX_NOTEBOOK_BYTES:
                _placeholder(target)
                out.problems[target] = _too_large()
                warnings.append(f"zip member {name!r} is larger than "
                                f"{MAX_NOTEBOOK_BYTES // 2**20} MiB: not graded")
                continue
            total += info.file_size
            if total > ZIP_MAX_TOTAL:
                raise InputError(f"{path} unpacks to more than {ZIP_MAX_TOTAL // 2**30} GiB")
            problem = _extract_member(archive, info, target)
            if problem is not None:
                _placeholder(target)
                out.problems[target] = problem
                warnings.append(f"zip member {name!r}: {problem}")
    return out


def _too_large() -> str:
    return f"malformed notebook (larger than {MAX_NOTEBOOK_BYTES // 2**20} MiB)"


def _placeholder(target: str) -> None:
    """An empty file where an unusable member was, so that its folder is found."""
    try:
        with open(target, "wb"):
            pass
    except OSError:
        pass


def _extract_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, target: str
                    ) -> str | None:
    """Extract one member; the status of its student when it cannot be used."""
    written = 0
    try:
        with archive.open(info) as src, open(target, "wb") as out:
            while True:
                chunk = src.read(1 << 20)
                if not chunk:
                    break
                written += len(chunk)
                if written > MAX_NOTEBOOK_BYTES:  # the header lied about the size
                    return _too_large()
                out.write(chunk)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError,
            NotImplementedError, RuntimeError) as e:
        # a bad CRC, a truncated member, an unsupported compression method...
        reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        return f"corrupt archive member {os.path.basename(target)!r} ({reason})"
    return None


def class_root(path: str, assignments: list[str]) -> str:
    """The folder whose children are the student folders (descending through single
    wrapper folders such as the one a zip tool adds)."""
    current = path
    for _ in range(4):
        children = _subdirs(current)
        if any(a in _subdirs(os.path.join(current, c)) for c in children for a in assignments):
            return current
        if len(children) == 1 and not any(f.endswith(".ipynb") for f in os.listdir(current)):
            current = os.path.join(current, children[0])
            continue
        break
    return path


def _subdirs(path: str) -> list[str]:
    try:
        return sorted(d for d in os.listdir(path)
                      if not d.startswith(".") and d != "__MACOSX"
                      and os.path.isdir(os.path.join(path, d))
                      and not os.path.islink(os.path.join(path, d)))
    except OSError:
        return []


@dataclass
class Found:
    """One ``<student>/<assignment>/`` folder of the input."""

    student: str             # the folder's name, as the instructor named it
    assignment: str          # the folder's name (may not be a known assignment)
    folder: str
    sid: str = ""            # the student's id for nbgrader (see student_id)
    notebooks: dict[str, str] = field(default_factory=dict)  # expected name -> file
    renamed: dict[str, str] = field(default_factory=dict)    # expected name -> what it was
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)


def discover(root: str, expected: dict[str, list[str]], releases: dict[str, dict[str, Any]]
             ) -> tuple[list[Found], list[str]]:
    """Every ``<student>/<assignment>/`` folder under ``root``; ``expected`` maps an
    assignment to its notebook names, ``releases`` to {name: release notebook}."""
    found, warnings = [], []
    for student in _subdirs(root):
        loose = [f for f in sorted(os.listdir(os.path.join(root, student)))
                 if f.lower().endswith(".ipynb")]
        if loose and not _subdirs(os.path.join(root, student)):
            warnings.append(f"skipped {student}/{loose[0]}: notebooks go in "
                            f"{student}/<assignment>/ (one folder per assignment)")
        for folder in _subdirs(os.path.join(root, student)):
            item = Found(student, folder, os.path.join(root, student, folder),
                         sid=student_id(student))
            if folder in expected:
                match_notebooks(item, expected[folder], releases.get(folder, {}))
            found.append(item)
    return found, warnings


def student_id(name: str) -> str:
    """The id nbgrader knows a student by: the folder's name when it is a plain id
    (letters, digits and ``. _ @ + -``), otherwise an ASCII rendering of it with a hash of
    the exact name (``zoë`` -> ``zoe-5d41402a``, ``张三`` -> ``student-...``), so that two
    names never share an id and grading the same folder again finds the same student."""
    if STUDENT_ID.match(name):
        return name
    raw = name.encode("utf-8", "surrogateescape")
    ascii_ = unicodedata.normalize("NFKD", display_name(name)).encode("ascii", "ignore")
    slug = re.sub(r"[^A-Za-z0-9]+", "-", ascii_.decode()).strip("-").lower()[:40]
    return f"{slug or 'student'}-{hashlib.sha256(raw).hexdigest()[:8]}"


def display_name(name: str) -> str:
    """``name`` as text (a name that is not UTF-8 shows replacement characters)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _notebook_files(folder: str) -> list[str]:
    """Relative paths of the .ipynb files under ``folder`` (no links, no checkpoints)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__MACOSX"
                             and not os.path.islink(os.path.join(dirpath, d)))
        for f in sorted(filenames):
            full = os.path.join(dirpath, f)
            if f.lower().endswith(".ipynb") and not f.startswith(".") and \
                    not os.path.islink(full) and os.path.isfile(full):
                out.append(os.path.relpath(full, folder))
    return out


def match_notebooks(item: Found, names: list[str], releases: dict[str, Any]) -> None:
    files = _notebook_files(item.folder)
    unmatched = list(files)
    for name in names:
        if f"{name}.ipynb" in unmatched:
            item.notebooks[name] = os.path.join(item.folder, f"{name}.ipynb")
            unmatched.remove(f"{name}.ipynb")
    missing = [n for n in names if n not in item.notebooks]
    for name in missing:
        if not unmatched:
            break
        best = max(unmatched, key=lambda rel: (_overlap(os.path.join(item.folder, rel),
                                                        releases.get(name)),
                                               os.path.basename(rel) == f"{name}.ipynb",
                                               difflib.SequenceMatcher(None, rel, name).ratio()))
        if len(missing) > 1 and _overlap(os.path.join(item.folder, best), releases.get(name)) <= 0:
            continue
        item.notebooks[name] = os.path.join(item.folder, best)
        item.renamed[name] = best
        unmatched.remove(best)
    item.missing = [n for n in names if n not in item.notebooks]
    item.extra = unmatched


def _overlap(path: str, release: Any) -> int:
    """How many grade_ids of the release the notebook at ``path`` has (-1: unreadable)."""
    if release is None:
        return 0
    try:
        nb = json.loads(_read_capped(path))
        ids = {c.get("metadata", {}).get("nbgrader", {}).get("grade_id")
               for c in nb.get("cells", []) if isinstance(c, dict)}
    except (ValueError, OSError, AttributeError, UnicodeDecodeError):
        return -1
    return len(ids & {c.metadata.get("nbgrader", {}).get("grade_id") for c in release.cells})


def _read_capped(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError("not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(MAX_NOTEBOOK_BYTES + 1)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------
# Reading and repairing one notebook


class Malformed(Exception):
    """The file is not a notebook we can grade; the message says why (for the status)."""


def read_submission(path: str) -> Any:
    """The submitted notebook as a clean nbformat-4 NotebookNode (outputs dropped, unknown
    cell metadata dropped, cell ids made valid); raises :class:`Malformed`."""
    import nbformat
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_raw_cell

    try:
        data = _read_capped(path)
    except OSError as e:
        raise Malformed(f"cannot read the file ({e.strerror or e})") from None
    if len(data) > MAX_NOTEBOOK_BYTES:
        raise Malformed(f"larger than {MAX_NOTEBOOK_BYTES // 2**20} MiB")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise Malformed("not UTF-8 text") from None
    try:
        raw = json.loads(text)
    except ValueError as e:
        line = getattr(e, "lineno", None)
        raise Malformed(f"not valid JSON{f' (line {line})' if line else ''}") from None
    except RecursionError:
        raise Malformed("not valid JSON (nested too deeply)") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("cells"), list):
        if isinstance(raw, dict) and isinstance(raw.get("worksheets"), list):
            try:  # an nbformat 3 notebook: let nbformat upgrade it
                raw = json.loads(nbformat.writes(nbformat.reads(text, as_version=4)))
            except Exception:  # noqa: BLE001
                raise Malformed("an old notebook format that cannot be upgraded") from None
        else:
            raise Malformed("not a Jupyter notebook (no list of cells)")
    meta = raw.get("metadata") if isinstance(raw.get("metadata"), dict) else {}
    nb = new_notebook()
    nb.metadata = {k: v for k, v in meta.items() if k in ("kernelspec", "language_info")
                   and isinstance(v, dict)}
    used = set()
    makers = {"code": new_code_cell, "markdown": new_markdown_cell, "raw": new_raw_cell}
    for index, cell in enumerate(raw["cells"]):
        if not isinstance(cell, dict):
            continue
        kind = cell.get("cell_type")
        if kind not in makers:
            continue
        source = cell.get("source", "")
        if isinstance(source, list):
            source = "".join(s for s in source if isinstance(s, str))
        elif not isinstance(source, str):
            source = ""
        cmeta = cell.get("metadata") if isinstance(cell.get("metadata"), dict) else {}
        kept = {}
        for key in _KEEP_CELL_META:
            if key in cmeta:
                kept[key] = copy.deepcopy(cmeta[key])
        if not (isinstance(kept.get("tags"), list) and all(isinstance(t, str)
                                                            for t in kept.get("tags", []))):
            kept.pop("tags", None)
        for key in ("deletable", "editable"):
            if not isinstance(kept.get(key), bool):
                kept.pop(key, None)
        if not isinstance(kept.get("nbgrader"), dict):
            kept.pop("nbgrader", None)
        new = makers[kind](source=source, metadata=kept)
        cid = cell.get("id")
        if not (isinstance(cid, str) and re.match(r"^[A-Za-z0-9_-]{1,64}$", cid)) or cid in used:
            cid = f"cell-{index}"
            n = 1
            while cid in used:
                n += 1
                cid = f"cell-{index}-{n}"
        used.add(cid)
        new["id"] = cid
        nb.cells.append(new)
    return nb


def _nbgrader_view(meta: Any) -> dict:
    if not isinstance(meta, dict):
        return {}
    view = {k: meta.get(k) for k in _NBGRADER_KEYS if k in meta}
    if "points" in view:
        try:
            view["points"] = float(view["points"])
        except (TypeError, ValueError):
            pass
    view.pop("cell_type", None)
    return view


@dataclass
class Repair:
    """What :func:`restore` changed, for the status."""

    tampered: list[str] = field(default_factory=list)   # test cells whose source was edited
    deleted: list[str] = field(default_factory=list)    # test cells put back
    answers_deleted: list[str] = field(default_factory=list)  # solution cells put back
    metadata: list[str] = field(default_factory=list)   # cells whose metadata/ids changed
    kernel: str | None = None                           # the kernel it asked for

    def notes(self, prefix: str = "") -> list[str]:
        out = []
        if self.kernel is not None:
            out.append(f"{prefix}kernel changed: ran with python3 instead of {self.kernel}")
        if self.tampered:
            out.append(f"{prefix}tests tampered: restored {', '.join(self.tampered)}")
        if self.deleted:
            out.append(f"{prefix}tests deleted: restored {', '.join(self.deleted)}")
        if self.answers_deleted:
            out.append(f"{prefix}answer cells deleted: restored {', '.join(self.answers_deleted)}")
        if self.metadata:
            out.append(f"{prefix}cell metadata changed: restored "
                       f"{', '.join(self.metadata[:5])}{' ...' if len(self.metadata) > 5 else ''}")
        return out


def restore(nb: Any, release: Any) -> Repair:
    """Make ``nb`` consistent with ``release`` in place: nbgrader metadata, ids and
    read-only sources of every release cell, missing cells put back where they were,
    kernel python3.  Cells the student added stay (without nbgrader metadata)."""
    repair = Repair()
    by_id = {}
    order = []
    for cell in release.cells:
        gid = cell.metadata.get("nbgrader", {}).get("grade_id")
        if gid:
            by_id[gid] = cell
            order.append(gid)
    seen: dict[str, Any] = {}
    for cell in nb.cells:
        meta = cell.metadata.get("nbgrader")
        if meta is None:
            continue
        gid = meta.get("grade_id") if isinstance(meta, dict) else None
        if not isinstance(gid, str) or gid not in by_id or gid in seen:
            # an unknown, duplicated or unreadable nbgrader cell: keep it as a plain cell
            del cell.metadata["nbgrader"]
            repair.metadata.append(str(gid) if isinstance(gid, str) else "(unnamed cell)")
            continue
        ref = by_id[gid]
        seen[gid] = cell
        ref_meta = ref.metadata["nbgrader"]
        changed = False
        if cell.cell_type != ref.cell_type:
            _set_type(cell, ref.cell_type)
            changed = True
        if _nbgrader_view(meta) != _nbgrader_view(ref_meta):
            changed = True
        cell.metadata["nbgrader"] = copy.deepcopy(ref_meta)
        for key in ("deletable", "editable"):
            if key in ref.metadata:
                cell.metadata[key] = ref.metadata[key]
            else:
                cell.metadata.pop(key, None)
        if cell.get("id") != ref.get("id"):
            changed = True
        is_test = bool(ref_meta.get("grade")) and not ref_meta.get("solution")
        locked = is_test or (bool(ref_meta.get("locked")) and not ref_meta.get("solution"))
        if locked and cell.source != ref.source:
            cell.source = ref.source
            if is_test:
                repair.tampered.append(gid)
        if changed:
            repair.metadata.append(gid)
    # cells whose id clashes with a release id they do not carry get a fresh one
    release_ids = {c.get("id") for c in release.cells}
    for cell in nb.cells:
        gid = cell.metadata.get("nbgrader", {}).get("grade_id")
        if gid:
            cell["id"] = by_id[gid]["id"]
        elif cell.get("id") in release_ids:
            cell["id"] = _fresh_id(nb, cell.get("id"))
    # put back missing cells after the release cell that precedes them
    for pos, gid in enumerate(order):
        if gid in seen:
            continue
        ref = by_id[gid]
        new = copy.deepcopy(ref)
        if new.cell_type == "code":
            new.outputs = []
            new.execution_count = None
        index = 0
        for prev in reversed(order[:pos]):
            if prev in seen:
                index = nb.cells.index(seen[prev]) + 1
                break
        nb.cells.insert(index, new)
        seen[gid] = new
        ref_meta = ref.metadata["nbgrader"]
        if ref_meta.get("grade") and not ref_meta.get("solution"):
            repair.deleted.append(gid)
        elif ref_meta.get("solution"):
            repair.answers_deleted.append(gid)
    kernel = nb.metadata.get("kernelspec", {})
    name = kernel.get("name") if isinstance(kernel, dict) else None
    if name != release.metadata.get("kernelspec", {}).get("name"):
        repair.kernel = str(name) if name else "no kernel"
    nb.metadata["kernelspec"] = copy.deepcopy(release.metadata.get("kernelspec", {}))
    if "language_info" in release.metadata:
        nb.metadata["language_info"] = copy.deepcopy(release.metadata["language_info"])
    else:
        nb.metadata.pop("language_info", None)
    return repair


def _fresh_id(nb: Any, base: str) -> str:
    used = {c.get("id") for c in nb.cells}
    n = 2
    while f"{base}-{n}" in used:
        n += 1
    return f"{base}-{n}"


def _set_type(cell: Any, kind: str) -> None:
    cell.cell_type = kind
    if kind == "code":
        cell.outputs = []
        cell.execution_count = None
    else:
        cell.pop("outputs", None)
        cell.pop("execution_count", None)


def copy_original(src: str, dest: str) -> None:
    """Keep the student's file as submitted (for the record), without following links."""
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    try:
        data = _read_capped(src)
    except OSError:
        return
    with open(dest, "wb") as f:
        f.write(data[:MAX_NOTEBOOK_BYTES])


def clear_dir(path: str) -> None:
    from .trees import remove_tree
    problems = remove_tree(path)
    if problems:
        raise OSError(f"could not remove {path}: {problems[0]}")
