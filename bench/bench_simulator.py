"""How long building and simulating a large schedule takes.

Target: a GPT-scale step -- p=64 ranks, m=1024 microbatches, interleaved with v=4 chunks
(524,288 actions) -- is built and simulated in under 2 seconds, so students can explore
real sizes interactively.  1F1B at the same p and m is measured too, and, for information,
the time of what a notebook asks for next: peak activations, then the summary with every
rank's action order (``python -m paralab simulate`` is timed by ``bench/bench_cli.py``).

    .venv/bin/python bench/bench_simulator.py            # prints the numbers
    .venv/bin/python bench/bench_simulator.py --check    # exit status 1 if over target

Times are the best of ``--repeat`` runs (default 3) in this process; the ratio is
measured time / target, so below 1 means the target is met.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time

from paralab.schedules import build
from paralab.simulator import simulate

TARGET_S = 2.0
CASES = [("interleaved", 64, 1024, 4), ("1f1b", 64, 1024, 1)]


def measure(name: str, p: int, m: int, v: int) -> dict:
    t0 = time.perf_counter()
    schedule = build(name, p, m, v)
    t1 = time.perf_counter()
    timeline = simulate(schedule, 2, 4)
    t2 = time.perf_counter()
    # The first collection after simulating walks every new object once, whatever runs
    # next; do it here so that the times below are those of the metrics themselves.
    gc.collect()
    t3 = time.perf_counter()
    timeline.peak_activations
    t4 = time.perf_counter()
    timeline.summary()
    t5 = time.perf_counter()
    return {"actions": sum(len(row) for row in schedule.orders), "build": t1 - t0,
            "simulate": t2 - t1, "gc": t3 - t2, "peaks": t4 - t3, "summary": t5 - t4,
            "makespan": timeline.makespan}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--check", action="store_true", help="exit 1 if over the target")
    args = parser.parse_args(argv)
    over = False
    for name, p, m, v in CASES:
        runs = [measure(name, p, m, v) for _ in range(args.repeat)]
        best = min(runs, key=lambda r: r["build"] + r["simulate"])
        total = best["build"] + best["simulate"]
        over |= total > TARGET_S
        label = f"{name} p={p} m={m}" + (f" v={v}" if v > 1 else "")
        print(f"{label}: {best['actions']} actions, build {best['build']:.3f} s + simulate "
              f"{best['simulate']:.3f} s = {total:.3f} s; ratio to the {TARGET_S:g} s target "
              f"{total / TARGET_S:.2f} | then one GC pass {best['gc']:.3f} s, peak "
              f"activations {best['peaks']:.3f} s, summary with the order "
              f"{best['summary']:.3f} s | makespan {best['makespan']}")
    return 1 if (over and args.check) else 0


if __name__ == "__main__":
    sys.exit(main())
