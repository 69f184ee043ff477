"""``python -m paralab.launch MODULE:FUNCTION [--world-size N] [--backend B] [--timeout S] [ARG ...]``

Calls ``FUNCTION(rank, world_size, *ARGS)`` on every rank and prints each rank's result:
on N local processes started by :func:`~paralab.launch.run`, or, under torchrun, on the
processes torchrun started (then the world is torchrun's, and a different ``--world-size``
is refused rather than silently ignored).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import os
import sys

from .backend import BACKENDS
from .errors import WorkerError
from .lifecycle import run
from .torchrun import from_env, under_torchrun

DEFAULT_WORLD_SIZE = 2
DEFAULT_TIMEOUT_S = 60.0


def literal(text: str):
    """A command-line argument as the Python literal it spells (``3``, ``0.5``, ``[1, 2]``),
    else the string itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


def _target(text: str) -> str:
    module, _, function = text.partition(":")
    if not module or not function:
        raise argparse.ArgumentTypeError(f"expected MODULE:FUNCTION (e.g. mymod:work), "
                                         f"got {text!r}")
    return text


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _world_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of processes >= 1, "
                                         f"got {text!r}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m paralab.launch",
        description="Calls FUNCTION(rank, world_size, *ARGS) on every rank and prints each "
                    "rank's result. Under torchrun the world is torchrun's; otherwise N local "
                    "processes are started.",
        epilog="ARGs are Python literals where they parse as one (3, 0.5, \"[1,2]\"), else "
               "strings; put them after -- if they start with a dash and are not numbers.")
    p.add_argument("target", metavar="MODULE:FUNCTION", type=_target,
                   help="the function to run, from a module on PYTHONPATH or in the current "
                        "directory")
    p.add_argument("args", metavar="ARG", nargs="*", help="passed after world_size")
    p.add_argument("--world-size", metavar="N", type=_world_size, default=None,
                   help=f"local processes to start (default {DEFAULT_WORLD_SIZE}); under "
                        f"torchrun it must equal torchrun's world size")
    p.add_argument("--backend", metavar="B", choices=BACKENDS, default="auto",
                   help="auto (NCCL with a GPU per rank, else gloo), gloo or nccl")
    p.add_argument("--timeout", metavar="S", type=_positive, default=None,
                   help=f"seconds (default {DEFAULT_TIMEOUT_S:g} for local processes, "
                        f"PyTorch's default under torchrun)")
    return p


def _import(target: str):
    module_name, _, func_name = target.partition(":")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # `python -m` has it; torchrun -m may not
    fn = importlib.import_module(module_name)
    for part in func_name.split("."):
        fn = getattr(fn, part)
    return fn


def main(argv: list[str] | None = None) -> int:
    """Command line: see the module docstring.  Returns the exit status."""
    try:
        ns = parser().parse_intermixed_args(sys.argv[1:] if argv is None else list(argv))
    except SystemExit as e:  # --help (0) or a usage error (2), already printed
        return 0 if e.code is None else int(e.code)
    fn = _import(ns.target)
    args = [literal(a) for a in ns.args]

    if under_torchrun():
        ws = int(os.environ["WORLD_SIZE"])
        if ns.world_size is not None and ns.world_size != ws:
            print(f"--world-size {ns.world_size} disagrees with torchrun's WORLD_SIZE={ws}; "
                  f"under torchrun the world size is torchrun's (--nnodes x "
                  f"--nproc-per-node).", file=sys.stderr)
            return 2
        result = from_env(fn, *args, backend=ns.backend, timeout=ns.timeout)
        print(f"[rank {os.environ['RANK']}] returned {result!r}", flush=True)
        return 0
    ws = DEFAULT_WORLD_SIZE if ns.world_size is None else ns.world_size
    try:
        results = run(fn, ws, *args, backend=ns.backend,
                      timeout=DEFAULT_TIMEOUT_S if ns.timeout is None else ns.timeout)
    except WorkerError as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return 1
    for r, result in enumerate(results):
        print(f"[rank {r}] returned {result!r}", flush=True)
    return 0
