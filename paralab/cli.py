"""The command line: ``python -m paralab <command> [options]``.

``simulate`` runs a schedule on the cost model::

    python -m paralab simulate --schedule 1f1b -p 4 -m 8 --tf 2 --tb 4
    python -m paralab simulate --schedule interleaved -p 4 -m 8 -v 2 --tf 2 --tb 4 --json
    python -m paralab simulate --schedule zb-h1 -p 4 -m 8 --tf 1/3 --tb 0.5 --tw 1/4 --plot g.png

Costs are read exactly (``fractions.Fraction``): ``2``, ``0.5`` and ``1/3`` all work, and the
results are exact too.

Adding a command
----------------
Commands live in the :data:`COMMANDS` registry.  Register one with::

    add_subcommand("tp-ffn", setup, run, help="one line for the command list")

``setup(parser)`` declares the command's arguments on its ``argparse`` parser; ``run(args)``
does the work and returns the exit status (0 for success).  Either may be given as a
``"module:function"`` string, imported only when that command is used -- so a command that
needs torch does not slow down the others.  Registrations go at the bottom of this module
(or in a module imported before :func:`main` runs).

Errors a user can cause (a bad number, an impossible schedule) are raised as
:class:`CLIError`, ``ScheduleError`` or ``ValueError`` with a message that says what is wrong
and what the rule is; :func:`main` prints it as a single ``error: ...`` line on stderr and
returns 2, without a traceback.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import re
import sys
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Sequence, Union

from .schedules import GENERATORS, ScheduleError

Hook = Union[Callable, str]
_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?(/\d+)?$")


class CLIError(Exception):
    """A mistake in the command line, explained."""


@dataclass
class Command:
    name: str
    setup: Hook
    run: Hook
    help: str = ""


COMMANDS: dict[str, Command] = {}


def add_subcommand(name: str, setup: Hook, run: Hook, help: str = "") -> Command:
    """Register ``python -m paralab <name>`` (see the module docstring)."""
    if name in COMMANDS:
        raise ValueError(f"a command named {name!r} is already registered")
    command = Command(name, setup, run, help)
    COMMANDS[name] = command
    return command


def _resolve(hook: Hook) -> Callable:
    if callable(hook):
        return hook
    module, _, attribute = hook.partition(":")
    return getattr(importlib.import_module(module), attribute)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors become one ``error: ...`` line, not usage + exit."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # argparse takes "-1/2" for an option (it knows only "-1" and "-0.5" as numbers), so
        # "--tw -1/2" would say "expected one argument" instead of "negative".
        self._negative_number_matcher = _NEGATIVE_NUMBER

    def error(self, message):
        raise CLIError(f"{message} (see '{self.prog} --help')")


# -- argument types -----------------------------------------------------------------------------
def parse_number(text: str) -> Fraction:
    """An exact number from ``"2"``, ``"0.5"``, ``"1/3"`` (or ``"1e-3"``)."""
    try:
        return Fraction(str(text).strip())
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number: write an integer, a decimal or a fraction, "
            f"e.g. 2, 0.5 or 1/3") from None


def nonnegative_number(text: str) -> Fraction:
    value = parse_number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative; times cannot be")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _plain(x: Fraction):
    """Fractions that are whole become ints (so results print as 66, not 66/1)."""
    return int(x) if isinstance(x, Fraction) and x.denominator == 1 else x


def format_number(x) -> str:
    """``66``, ``11/8 = 1.375``, ``3/11 = 0.2727``; floats with 4 significant digits."""
    if isinstance(x, Fraction):
        if x.denominator == 1:
            return str(x.numerator)
        return f"{x.numerator}/{x.denominator} = {float(x):.4g}"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _exact_text(x) -> str:
    return str(x) if isinstance(x, (int, Fraction)) else repr(float(x))


# -- simulate ------------------------------------------------------------------------------------
MAX_ORDER_ACTIONS = 2000  # beyond this the order is printed only with --order


def setup_simulate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--schedule", required=True, choices=list(GENERATORS),
                        help="which schedule to build")
    parser.add_argument("-p", type=positive_int, required=True, metavar="P",
                        help="pipeline ranks (stages, or ranks holding v chunks each)")
    parser.add_argument("-m", type=positive_int, required=True, metavar="M",
                        help="microbatches per step")
    parser.add_argument("-v", type=positive_int, default=None, metavar="V",
                        help="chunks per rank, interleaved schedule only (default 2)")
    parser.add_argument("--tf", type=nonnegative_number, required=True, metavar="TF",
                        help="forward time of one microbatch through one rank")
    parser.add_argument("--tb", type=nonnegative_number, required=True, metavar="TB",
                        help="backward (input-gradient) time of one microbatch on one rank")
    parser.add_argument("--tw", type=nonnegative_number, default=Fraction(0), metavar="TW",
                        help="weight-gradient time (a separate W in zb-h1, else added to B)")
    parser.add_argument("--comm", type=nonnegative_number, default=Fraction(0), metavar="C",
                        help="time to send activations or gradients to another rank")
    parser.add_argument("--tfb", type=nonnegative_number, default=None, metavar="TFB",
                        help="time of an overlapped forward + full backward on one rank "
                             "(DualPipe's F&B, dualpipev; default: the sum, no overlap)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object instead of the text summary")
    parser.add_argument("--order", action="store_true",
                        help=f"include every rank's action order even beyond "
                             f"{MAX_ORDER_ACTIONS} actions (text and JSON)")
    parser.add_argument("--gantt", action="store_true", help="also print a text Gantt chart")
    parser.add_argument("--plot", metavar="FILE.png", help="write a Gantt chart image")


def run_simulate(args: argparse.Namespace) -> int:
    # A large step allocates a million objects that form no reference cycles; the cyclic
    # collector would walk them all again after every phase for nothing (see gc_paused).
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _simulate_command(args)
    finally:
        if collecting:
            gc.enable()


def _simulate_command(args: argparse.Namespace) -> int:
    from .schedules import build
    from .simulator import simulate

    if args.v is not None and args.schedule != "interleaved":
        raise CLIError(f"-v (chunks per rank) only applies to --schedule interleaved, not "
                       f"{args.schedule}: {_chunks_of(args.schedule)}")
    v = args.v if args.v is not None else (2 if args.schedule == "interleaved" else 1)
    schedule = build(args.schedule, args.p, args.m, v)
    costs = {name: _plain(getattr(args, name)) for name in ("tf", "tb", "tw", "comm")}
    fb = None if args.tfb is None else _plain(args.tfb)
    if fb is not None and not schedule.fused:
        raise CLIError(f"--tfb is the cost of an overlapped forward and backward, which "
                       f"{args.schedule} never runs (dualpipev does)")
    timeline = simulate(schedule, costs["tf"], costs["tb"], costs["tw"], costs["comm"],
                        t_fb=fb)
    total = sum(len(row) for row in schedule.orders)
    with_order = args.order or total <= MAX_ORDER_ACTIONS

    plot_note = None
    if args.plot:
        plot_note = _write_gantt(timeline, args.plot)

    if args.json:
        summary = timeline.summary(order=False)
        summary["actions"] = total
        summary["costs"] = {"t_f": str(costs["tf"]), "t_b": str(costs["tb"]),
                            "t_w": str(costs["tw"]), "comm": str(costs["comm"])}
        summary["exact"] = {key: _exact_text(getattr(timeline, key)) for key in
                            ("makespan", "ideal", "time_ratio", "bubble_fraction",
                             "bubble_overhead")}
        if not with_order:
            summary["order"] = None
            summary["order_note"] = (f"{total} actions: not included; pass --order to get "
                                     f"every rank's order")
        _write_json(summary, schedule if with_order else None)
        if plot_note:
            print(plot_note, file=sys.stderr)
        return 0

    print(_text_summary(timeline, costs, gantt=args.gantt, order=with_order))
    if plot_note:
        print(plot_note)
    return 0


def _chunks_of(name: str) -> str:
    if name in ("zb-v", "dualpipev"):
        return "it holds two chunks per rank, placed in a V (stages r and 2p-1-r)"
    return "it holds one stage per rank"


def _write_json(summary: dict, schedule=None) -> None:
    """Print ``summary`` as one JSON object, with ``"order"`` (one list of action strings
    per rank) when ``schedule`` is given -- written a rank at a time, so that memory does
    not grow with the text of the whole order."""
    text = json.dumps(summary)
    if schedule is None:
        sys.stdout.write(text + "\n")
        return
    write = sys.stdout.write
    write(text[:-1] + ', "order": [')
    for rank, row in enumerate(schedule.orders):
        write(("," if rank else "") + json.dumps([str(a) for a in row]))
    write("]}\n")


def _text_summary(timeline, costs: dict, gantt: bool = False, order: bool = True) -> str:
    from .schedules import format_orders

    s = timeline.schedule
    chunk_note = f", v={s.chunks} chunks per rank" if s.chunks > 1 else ""
    lines = [
        f"schedule {s.name}: p={s.num_ranks} ranks, m={s.num_microbatches} microbatches"
        f"{chunk_note}",
        f"costs per rank and microbatch: t_f={costs['tf']} t_b={costs['tb']} "
        f"t_w={costs['tw']} comm={costs['comm']}",
    ]
    if order:
        lines += ["order per rank:"] + ["  " + line for line in format_orders(s).splitlines()]
    else:
        total = sum(len(row) for row in s.orders)
        lines.append(f"order per rank: {total} actions, not printed (use --order to print "
                     f"them)")
    rows = [
        ("makespan T", timeline.makespan),
        ("ideal T_ideal (busiest rank's work)", timeline.ideal),
        ("time ratio T / T_ideal", timeline.time_ratio),
        ("bubble overhead bubble / T_ideal", timeline.bubble_overhead),
        ("bubble fraction bubble / T", timeline.bubble_fraction),
    ]
    unit = " (in chunks)" if s.chunks > 1 else ""
    rows.append((f"peak activations per rank{unit}",
                 " ".join(str(x) for x in timeline.peak_activations)))
    width = max(len(label) for label, _ in rows) + 2
    lines += [f"{label + ':':<{width}} {format_number(value)}" for label, value in rows]
    if gantt:
        lines += ["", timeline.ascii()]
    return "\n".join(lines)


def _write_gantt(timeline, path: str) -> str:
    from matplotlib.figure import Figure

    from .plots import gantt

    figure = Figure(figsize=(10, 0.6 * timeline.schedule.num_ranks + 1.2))
    gantt(timeline, ax=figure.add_subplot())
    try:
        figure.savefig(path, dpi=120, bbox_inches="tight")
    except (OSError, ValueError) as error:
        raise CLIError(f"cannot write the plot to {path!r}: {error}") from None
    return f"wrote {path}"


add_subcommand("simulate", setup_simulate, run_simulate,
               help="simulate a pipeline schedule on the cost model")


# -- run-pipeline ---------------------------------------------------------------------------------
def _synthetic_ms(text: str) -> tuple:
    try:
        values = tuple(float(x) / 1000 for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give TF_MS,TB_MS[,TW_MS] in milliseconds, e.g. 20,40") from None
    if not 2 <= len(values) <= 3 or any(x < 0 for x in values):
        raise argparse.ArgumentTypeError(
            f"{text!r}: give two or three non-negative times TF_MS,TB_MS[,TW_MS]")
    return values


def setup_run_pipeline(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--schedule", required=True, choices=sorted(GENERATORS))
    parser.add_argument("-p", type=positive_int, required=True, help="ranks (processes)")
    parser.add_argument("-m", type=positive_int, required=True, help="microbatches")
    parser.add_argument("-v", type=positive_int, default=None,
                        help="chunks per rank (interleaved only; default 2)")
    parser.add_argument("--synthetic", type=_synthetic_ms, metavar="TF_MS,TB_MS[,TW_MS]",
                        help="make each action last this long (per rank-stage, split over "
                             "the chunks of an interleaved schedule); it computes, then sleeps")
    parser.add_argument("--recompute", action="store_true",
                        help="keep only stage inputs in the forward; recompute in the backward")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run_run_pipeline(args: argparse.Namespace) -> int:
    from . import launch, pipeline
    from .schedules import build

    v = args.v if args.v is not None else (2 if args.schedule == "interleaved" else 1)
    schedule = build(args.schedule, args.p, args.m, v)
    model = pipeline.PipelineModel(batch=4 * args.m)
    try:
        result = pipeline.run_pipeline(schedule, model, synthetic=args.synthetic,
                                       recompute=args.recompute, timeout=args.timeout,
                                       echo=False)
    except launch.WorkerError as error:
        print(f"error: the pipeline failed on {args.p} processes:\n{error}", file=sys.stderr)
        return 1
    _, reference = pipeline.reference_step(model, schedule.num_stages, args.m)
    report = {
        "schedule": schedule.name, "stages": args.p, "microbatches": args.m,
        "chunks": schedule.chunks,
        "max_grad_error": result.max_grad_error(reference),
        "measured_makespan_s": result.timeline.makespan,
        "simulated_makespan_s": (float(result.simulated.makespan) if result.simulated
                                 else None),
        "calibrated_makespan_s": float(result.calibrated().makespan),
        "peak_activations": result.peak_activations,
        "peak_saved_bytes": result.peak_saved_bytes,
        "synthetic_s": list(args.synthetic) if args.synthetic else None,
        "recompute": args.recompute,
    }
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{schedule.name}: p={args.p}, m={args.m}" + (f", v={v}" if v > 1 else "")
          + f" on {args.p} processes")
    print(f"max |grad - single-process grad|: {report['max_grad_error']:.3g}")
    print(f"measured makespan:   {report['measured_makespan_s'] * 1e3:.1f} ms")
    if result.simulated is not None:
        print(f"simulated makespan:  {report['simulated_makespan_s'] * 1e3:.1f} ms "
              f"(the cost model with the synthetic costs)")
    print(f"calibrated makespan: {report['calibrated_makespan_s'] * 1e3:.1f} ms "
          f"(the cost model with the measured mean action times)")
    print(f"peak activations per rank (microbatch-stages in flight): "
          f"{report['peak_activations']}")
    print(f"peak bytes saved for backward per rank: {report['peak_saved_bytes']}")
    return 0


add_subcommand("run-pipeline", setup_run_pipeline, run_run_pipeline,
               help="run a schedule on real processes and compare with one process")


# -- tp-ffn ---------------------------------------------------------------------------------------
def setup_tp_ffn(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--world-size", type=positive_int, required=True, metavar="P")
    from .layouts import FFN_VARIANTS  # light: no torch at start-up

    parser.add_argument("--variant", default="col-row", choices=list(FFN_VARIANTS))
    parser.add_argument("--batch", type=positive_int, default=8, metavar="B")
    parser.add_argument("--seq", type=positive_int, default=128, metavar="S")
    parser.add_argument("--hidden", type=positive_int, default=1024, metavar="d")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run_tp_ffn(args: argparse.Namespace) -> int:
    import torch

    from . import comm, formulas, launch, tp

    if args.hidden % args.world_size:
        raise CLIError(f"--hidden {args.hidden} is not divisible by --world-size "
                       f"{args.world_size}: each rank needs an equal slice of d (and of 4d)")
    try:
        results = launch.run(tp.ffn_parity_run, args.world_size, args.variant, args.batch,
                             args.seq, args.hidden, 0, torch.float32, echo=False,
                             timeout=args.timeout)
    except launch.WorkerError as error:
        print(f"error: the tensor-parallel FFN failed on {args.world_size} processes:\n{error}",
              file=sys.stderr)
        return 1
    dense = tp.dense_reference(args.batch, args.seq, args.hidden, 0, torch.float32)
    error = max(max(float((r["output"] - dense["output"]).abs().max()),
                    float((r["input_grad"] - dense["input_grad"]).abs().max()))
                for r in results)
    records = results[0]["records"]
    sizes = dict(B=args.batch, S=args.seq, d=args.hidden, P=args.world_size)
    expected = [(c.phase, c.op, int(formulas.evaluate(c.elements, **sizes)))
                for c in formulas.ffn_collectives(args.variant)]
    measured = [(r.phase, r.op, r.elements) for r in records]
    report = {"variant": args.variant, "world_size": args.world_size, "max_error": error,
              "collectives": [r.as_dict() for r in records],
              "matches_formulas": measured == expected}
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{args.variant} FFN on {args.world_size} processes, B={args.batch}, S={args.seq}, "
          f"d={args.hidden}, float32")
    print(f"max |output or dL/dX - dense|: {error:.3g}")
    print(comm.CommLog(records).table())
    print("matches paralab.formulas.ffn_collectives:", "yes" if report["matches_formulas"]
          else f"NO (formulas: {expected})")
    return 0


add_subcommand("tp-ffn", setup_tp_ffn, run_tp_ffn,
               help="run the tensor-parallel FFN and show its communication")


# -- entry point ---------------------------------------------------------------------------------
def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser with every registered command.  With ``only``, only that command's
    arguments are set up (so its setup, and whatever it imports, is the only one that runs;
    ``""`` sets up none, enough to list the commands)."""
    parser = _Parser(prog="python -m paralab",
                     description="paralab: pipeline- and tensor-parallel training, hands on.")
    sub = parser.add_subparsers(dest="command", metavar="command", parser_class=_Parser)
    sub.required = True
    for command in COMMANDS.values():
        child = sub.add_parser(command.name, help=command.help, description=command.help)
        if only is None or command.name == only:
            _resolve(command.setup)(child)
    return parser


def _one_line(message: str) -> str:
    return "; ".join(line.strip() for line in str(message).splitlines() if line.strip())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 on success, 2 on a user error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    only = argv[0] if argv and argv[0] in COMMANDS else ""
    try:
        args = build_parser(only).parse_args(argv)
        return int(_resolve(COMMANDS[args.command].run)(args) or 0)
    except (CLIError, ScheduleError, ValueError) as error:
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return 2
