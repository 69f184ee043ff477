"""The course code a notebook may import, copied once per grading run.

A notebook imports ``paralab``, ``autograder.checks`` (and the runner itself is
``autograder.execute``).  The grader copies exactly these files into one folder laid out
as the sandbox's ``/sandbox/course``:

    paralab/...                      the library
    autograder/__init__.py ...       the runner and the few modules it needs
    autograder/checks/...            the check modules
    extra_checks_<i>/...             check modules of a course root that is not this one

Copying (rather than mounting the checkout) means that the sandbox names no host path,
that an edit of the checkout during a long grading run changes nothing halfway, and that a
variant of the library can be made for one kind of run (:mod:`autograder.probes`).  The
modules are compiled to unchecked-hash bytecode next to the copy, so that a notebook does
not recompile them on every run (the copies are new files, whose times would not match).
"""

from __future__ import annotations

import importlib.util
import os
import py_compile
import shutil
import tempfile
from dataclasses import dataclass
from typing import Callable, Iterable

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# the modules of this package the sandbox needs (all standard library only)
RUNNER_MODULES = ("__init__.py", "execute.py", "events.py", "limits.py", "trees.py")


def paralab_dir() -> str:
    spec = importlib.util.find_spec("paralab")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the paralab package is not importable")
    return list(spec.submodule_search_locations)[0]


@dataclass(frozen=True)
class CourseCode:
    """A folder laid out as ``/sandbox/course`` and the files in it."""

    root: str
    files: tuple[str, ...]          # relative paths, bytecode included
    extra_checks: int = 0           # how many extra_checks_<i> folders

    def manifest(self) -> list[tuple[str, str]]:
        """(relative path, host path) of every file."""
        return [(rel, os.path.join(self.root, rel)) for rel in self.files]

    def extra_checks_dirs(self, inside: str) -> list[str]:
        return [f"{inside}/extra_checks_{i}" for i in range(self.extra_checks)]

    @classmethod
    def build(cls, dest: str, extra_checks_dirs: Iterable[str] = (),
              transform: Callable[[str, str], str] | None = None,
              library: str | None = None) -> "CourseCode":
        """Copy the course code into ``dest`` (created, must not exist).  ``transform``:
        (path relative to the library, source) -> source, applied to the library's
        modules; ``library``: the library folder to copy (default: paralab's)."""
        os.makedirs(dest)
        files: list[str] = []
        _copy_tree(library or paralab_dir(), dest, "paralab", files, transform)
        for name in RUNNER_MODULES:
            _copy_file(os.path.join(PACKAGE_DIR, name), dest, f"autograder/{name}", files)
        own = os.path.join(PACKAGE_DIR, "checks")
        _copy_tree(own, dest, "autograder/checks", files)
        extra = [os.path.abspath(d) for d in extra_checks_dirs
                 if os.path.isdir(d) and os.path.realpath(d) != os.path.realpath(own)]
        for i, d in enumerate(extra):
            _copy_tree(d, dest, f"extra_checks_{i}", files)
        compiled = []
        for rel in files:
            if rel.endswith(".py"):
                source = os.path.join(dest, rel)
                target = importlib.util.cache_from_source(source)
                try:
                    py_compile.compile(source, cfile=target, doraise=True,
                                       dfile=f"/sandbox/course/{rel}",
                                       invalidation_mode=py_compile.PycInvalidationMode
                                       .UNCHECKED_HASH)
                except py_compile.PyCompileError:
                    continue  # the notebook sees the syntax error when it imports it
                compiled.append(os.path.relpath(target, dest))
        return cls(dest, tuple(files + compiled), len(extra))

    @classmethod
    def temporary(cls, extra_checks_dirs: Iterable[str] = ()) -> "CourseCode":
        """A copy in a new temporary folder (removed when this process exits)."""
        import atexit
        base = tempfile.mkdtemp(prefix="paralab-code-")
        atexit.register(shutil.rmtree, base, True)
        return cls.build(os.path.join(base, "course"), extra_checks_dirs)


def _copy_file(src: str, dest_root: str, rel: str, files: list[str],
               transform: Callable[[str, str], str] | None = None,
               transform_rel: str = "") -> None:
    target = os.path.join(dest_root, rel)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if transform is not None and rel.endswith(".py"):
        with open(src, encoding="utf-8") as f:
            text = transform(transform_rel, f.read())
        with open(target, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        shutil.copyfile(src, target)
    os.chmod(target, 0o644)
    files.append(rel)


def _copy_tree(src: str, dest_root: str, prefix: str, files: list[str],
               transform: Callable[[str, str], str] | None = None) -> None:
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = sorted(d for d in dirnames
                             if not d.startswith(".") and d != "__pycache__")
        for name in sorted(filenames):
            if name.startswith(".") or name.endswith((".pyc", ".pyo")):
                continue
            path = os.path.join(dirpath, name)
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            inner = os.path.relpath(path, src)
            _copy_file(path, dest_root, f"{prefix}/{inner}", files, transform, inner)
