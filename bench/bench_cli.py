"""How much `python -m paralab simulate` costs on top of building and simulating a schedule.

Target: the whole command -- start-up, summary, peak activations, JSON -- within 1.5x of
building and simulating the same schedule in-process (``interleaved_one_f_one_b`` +
``simulate``), at p=64, m=1024, v=4 (524,288 actions); every part growing linearly; memory
proportional to the output asked for (the full action order only with ``--order``).

Each round runs, in fresh processes and in alternating order, (a) a Python that imports
the library, then builds and simulates the schedule and reports how long those two took,
and (b) the command itself, timed from outside (start-up and imports included); the ratio
printed is the median of the per-round ratios b / a, in wall-clock time and, less
sensitive to a shared machine's load, in CPU time.  Then, for information, each part of
the command at a quarter and at the full size, with the growth exponent
log(t_full / t_quarter) / log 4 (1 = linear), and the command's peak memory with and
without ``--order``.

    .venv/bin/python bench/bench_cli.py [--rounds 5] [--check]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

TARGET = 1.5
P, M, V = 64, 1024, 4
COMMAND = ["-m", "paralab", "simulate", "--schedule", "interleaved", "-p", str(P), "-m",
           str(M), "-v", str(V), "--tf", "2", "--tb", "4", "--json"]

IN_PROCESS = f"""
import time
from paralab.schedules import interleaved_one_f_one_b
from paralab.simulator import simulate
t0, c0 = time.perf_counter(), time.process_time()
timeline = simulate(interleaved_one_f_one_b({P}, {M}, {V}), 2, 4)
print(time.perf_counter() - t0, time.process_time() - c0)
"""

PARTS = """
import gc, json, os, sys, time
from paralab import cli
from paralab.schedules import interleaved_one_f_one_b
from paralab.simulator import simulate
m = int(sys.argv[1])
gc.disable()  # as the command does
times = {}
t = time.perf_counter()
schedule = interleaved_one_f_one_b(64, m, 4)
times["build"] = time.perf_counter() - t; t = time.perf_counter()
timeline = simulate(schedule, 2, 4)
times["simulate"] = time.perf_counter() - t; t = time.perf_counter()
timeline.makespan, timeline.busy, timeline.time_ratio, timeline.bubble_fraction
times["metrics"] = time.perf_counter() - t; t = time.perf_counter()
timeline.peak_activations
times["peaks"] = time.perf_counter() - t; t = time.perf_counter()
sys.stdout = open(os.devnull, "w")
cli._write_json(timeline.summary(order=False))
times["json"] = time.perf_counter() - t; t = time.perf_counter()
cli._write_json(timeline.summary(order=False), schedule)
times["json --order"] = time.perf_counter() - t
sys.stdout = sys.__stdout__
print(json.dumps(times))
"""


def _run(argv: list[str]) -> str:
    """The standard output of ``python argv``."""
    done = subprocess.run([sys.executable, *argv], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{argv} failed: {done.stderr}")
    return done.stdout


def _run_with_memory(argv: list[str]) -> tuple[float, float, int, int]:
    """Wall time, CPU time, bytes written to stdout and peak resident memory (KiB)."""
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL)
    size = 0
    while chunk := child.stdout.read(1 << 20):
        size += len(chunk)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"{argv} failed with status {child.returncode}")
    return wall, usage.ru_utime + usage.ru_stime, size, usage.ru_maxrss


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--check", action="store_true",
                        help=f"exit 1 if the command takes over {TARGET}x")
    args = parser.parse_args(argv)

    ratios, cpu_ratios, commands, baselines = [], [], [], []
    for k in range(args.rounds):
        order = ("baseline", "command") if k % 2 == 0 else ("command", "baseline")
        for which in order:
            if which == "baseline":
                baseline, baseline_cpu = map(float, _run(["-c", IN_PROCESS]).split())
            else:
                command, command_cpu, size, rss = _run_with_memory(COMMAND)
        ratios.append(command / baseline)
        cpu_ratios.append(command_cpu / baseline_cpu)
        commands.append(command)
        baselines.append(baseline)
    ratio = statistics.median(ratios)
    print(f"interleaved p={P} m={M} v={V} ({2 * P * M * V} actions), {args.rounds} rounds:")
    print(f"  build + simulate in-process: {statistics.median(baselines):.3f} s (median)")
    print(f"  python -m paralab simulate ... --json: {statistics.median(commands):.3f} s "
          f"(median, start-up included), {size} bytes of JSON, peak memory {rss / 1024:.0f} MiB")
    print(f"  ratio command / (build + simulate): {ratio:.2f} (median of per-round ratios; "
          f"target <= {TARGET}); in CPU time {statistics.median(cpu_ratios):.2f}")

    _, _, size_order, rss_order = _run_with_memory(COMMAND + ["--order"])
    print(f"  with --order: {size_order} bytes of JSON, peak memory {rss_order / 1024:.0f} MiB")

    def parts(m: int) -> dict:  # the best of three fresh processes, part by part
        runs = [json.loads(_run(["-c", PARTS, str(m)])) for _ in range(3)]
        return {part: min(run[part] for run in runs) for part in runs[0]}

    quarter, full = parts(M // 4), parts(M)
    print(f"parts of the command at m={M // 4} and m={M}, best of 3 "
          f"(growth exponent, 1 = linear):")
    for part in full:
        exponent = math.log(full[part] / quarter[part]) / math.log(4)
        print(f"  {part:<13} {quarter[part]:7.3f} s {full[part]:7.3f} s   {exponent:5.2f}")
    return 1 if (args.check and ratio > TARGET) else 0


if __name__ == "__main__":
    sys.exit(main())
