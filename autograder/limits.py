"""The resource limits of one notebook run, as one value that travels intact.

A :class:`Limits` is built once (from the command line, the Python API or an nbgrader
config) and handed to every part that enforces a limit as the same serialised value:
the grader's watchdog (:mod:`autograder.sandbox`), the runner inside the sandbox
(:mod:`autograder.execute`), and the notebook's own environment (``PARALAB_LIMITS``), so that
a student can see what applies.  Nothing on the way rounds a field or drops one: a cell
timeout of 0.5 s stays 0.5 s.  The command line has one option per field, generated from
the field list below, so a new field cannot be forgotten there either.

This module is imported inside the sandbox: keep it to the standard library.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any

LIMITS_ENV = "PARALAB_LIMITS"


def _f(help_: str, unit: str = "") -> dict:
    return {"help": help_, "unit": unit}


@dataclass(frozen=True)
class Limits:
    """Resource limits of one notebook run (0 disables a limit)."""

    cell_timeout: float = field(default=120.0, metadata=_f(
        "seconds per cell before the kernel is interrupted", "s"))
    interrupt_grace: float = field(default=5.0, metadata=_f(
        "seconds a kernel gets to stop after the interrupt before the notebook is stopped",
        "s"))
    notebook_timeout: float = field(default=900.0, metadata=_f(
        "wall-clock seconds for the whole notebook, from its first cell on (starting the "
        "kernel has its own bound of 60 s)", "s"))
    memory_mb: int = field(default=4096, metadata=_f(
        "memory of all processes of a notebook together (proportional set size)", "MiB"))
    process_memory_mb: int = field(default=0, metadata=_f(
        "data segment of one process (RLIMIT_DATA; 0: 1.5 x --memory-mb)", "MiB"))
    max_procs: int = field(default=256, metadata=_f(
        "processes and threads of a notebook", ""))
    cpu_seconds: int = field(default=0, metadata=_f(
        "CPU seconds per process (RLIMIT_CPU; 0: twice --notebook-timeout)", "s"))
    file_size_mb: int = field(default=512, metadata=_f(
        "largest file a notebook may write (RLIMIT_FSIZE)", "MiB"))
    work_size_mb: int = field(default=512, metadata=_f(
        "all files of a notebook's work directory together", "MiB"))
    tmp_size_mb: int = field(default=512, metadata=_f(
        "size of the notebook's private /tmp (with bubblewrap)", "MiB"))
    max_cell_output: int = field(default=100_000, metadata=_f(
        "characters of output kept per cell", ""))
    max_total_output: int = field(default=2_000_000, metadata=_f(
        "characters of output kept per notebook", ""))

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", int):
                if isinstance(value, bool) or not isinstance(value, int):
                    if isinstance(value, float) and value.is_integer():
                        object.__setattr__(self, f.name, int(value))
                    else:
                        raise ValueError(f"limit {f.name} must be a whole number, got "
                                         f"{value!r}")
            else:
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(f"limit {f.name} must be a number, got {value!r}")
                object.__setattr__(self, f.name, float(value))
            if getattr(self, f.name) < 0:
                raise ValueError(f"limit {f.name} must not be negative (0 disables it), got "
                                 f"{value!r}")

    # -- derived values --------------------------------------------------------------
    def effective_cpu_seconds(self) -> int:
        if self.cpu_seconds:
            return self.cpu_seconds
        return int(2 * self.notebook_timeout) if self.notebook_timeout else 0

    def effective_process_memory_mb(self) -> int:
        # above the tree limit, so that a process growing step by step is caught by the
        # watchdog ("killed: memory limit") rather than by a MemoryError at a random point
        return self.process_memory_mb or int(1.5 * self.memory_mb)

    def ram_mb(self) -> int:
        """Memory one notebook can take: its processes plus its two RAM-backed folders
        (with bubblewrap the work directory and /tmp are tmpfs)."""
        return self.memory_mb + self.tmp_size_mb + self.work_size_mb

    # -- one serialised value ---------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Limits":
        if not isinstance(data, dict):
            raise ValueError(f"limits must be a mapping of field names to numbers, got "
                             f"{type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown limit(s) {', '.join(unknown)}; the limits are "
                             f"{', '.join(sorted(known))}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Limits":
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> "Limits":
        return Limits.from_dict({**self.to_dict(), **changes})


def option_name(name: str) -> str:
    """The command-line option of a field: ``cell_timeout`` -> ``--cell-timeout``."""
    return "--" + name.replace("_", "-")


def describe_fields() -> list[tuple[str, type, Any, str, str]]:
    """(name, type, default, help, unit) of every field, for the command line."""
    out = []
    for f in fields(Limits):
        kind = int if f.type in ("int", int) else float
        out.append((f.name, kind, f.default, f.metadata.get("help", ""),
                    f.metadata.get("unit", "")))
    return out


def mb_text(mb: int) -> str:
    return f"{mb / 1024:g} GiB" if mb >= 1024 else f"{mb} MiB"
