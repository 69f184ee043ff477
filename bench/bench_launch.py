"""How long does it take to start a 4-rank world?  paralab.launch.run against plain spawn.

Every multi-process cell of the course starts a fresh world, so this is the latency a student
waits for each time.  Both sides run the same function: join the process group, one
all_reduce, return.  `spawn` is what multiprocessing / torch.multiprocessing.spawn use by
default for torch; run() forks from a forkserver that imported torch once.

It also measures what the forkserver's preload costs a whole Python process that starts
one world (a lecture kernel, a test process, a command-line call): with the preload list
run() uses, against the same list plus `torch.distributed.tensor` and
`torch.distributed.pipelining` (which the launcher used to preload although only some
exercises' workers use them), alternating the two so that both see the same load.

    python bench/bench_launch.py [--world-size 4] [--repeats 10] [--spawn-repeats 2]
                                 [--process-repeats 3]
"""

import argparse
import datetime
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist

from paralab.launch import device, lifecycle, run

EXTRA_PRELOAD = ["torch.distributed.tensor", "torch.distributed.pipelining"]


def work(rank, world_size):
    t = torch.ones(4, device=device()) * rank
    dist.all_reduce(t)
    return t.sum().item()


def one_world_process(world_size: int, extra_preload: bool) -> float:
    """Wall time of a fresh Python process that starts one world and exits."""
    command = [sys.executable, os.path.abspath(__file__), "--one-world",
               "heavy" if extra_preload else "light", "--world-size", str(world_size)]
    t0 = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def _spawn_child(rank, world_size, port):
    # What a hand-written spawn launcher does; one thread, as run() gives its ranks.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, None, False,
                          timeout=datetime.timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    work(rank, world_size)
    dist.destroy_process_group()


def spawn_world(world_size):
    store = dist.TCPStore("127.0.0.1", 0, None, True, timeout=datetime.timedelta(seconds=60),
                          wait_for_workers=False)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_spawn_child, args=(r, world_size, store.port))
             for r in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert all(p.exitcode == 0 for p in procs)


def timed(f, *args):
    t0 = time.perf_counter()
    f(*args)
    return time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--spawn-repeats", type=int, default=2)
    parser.add_argument("--process-repeats", type=int, default=3)
    parser.add_argument("--one-world", choices=["light", "heavy"], help=argparse.SUPPRESS)
    a = parser.parse_args()
    n = a.world_size
    expected = float(4 * sum(range(n)))
    if a.one_world:  # the child of one_world_process
        if a.one_world == "heavy":
            lifecycle.PRELOAD = lifecycle.PRELOAD + EXTRA_PRELOAD
        assert run(work, n, echo=False) == [expected] * n
        return

    first = timed(lambda: run(work, n, echo=False))  # the first run() starts the forkserver
    again = []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        assert run(work, n, echo=False) == [expected] * n
        again.append(time.perf_counter() - t0)
    spawn = [timed(spawn_world, n) for _ in range(a.spawn_repeats)]

    repeated, baseline = statistics.mean(again), statistics.mean(spawn)
    print(f"{n}-rank gloo world on {os.cpu_count()} CPU cores, torch {torch.__version__}")
    print(f"  paralab.launch.run, first world (starts the forkserver): {first:6.2f} s")
    print(f"  paralab.launch.run, repeated (mean of {a.repeats}, min {min(again):.2f}):"
          f"   {repeated:6.2f} s")
    print(f"  spawn baseline (mean of {a.spawn_repeats}):"
          f"{'':26}{baseline:6.2f} s")
    print(f"  speed-up over spawn: first world {baseline / first:.1f}x, "
          f"repeated worlds {baseline / repeated:.1f}x")

    light, heavy = [], []
    for _ in range(a.process_repeats):  # alternated: both see the same load
        heavy.append(one_world_process(n, extra_preload=True))
        light.append(one_world_process(n, extra_preload=False))
    light_s, heavy_s = statistics.median(light), statistics.median(heavy)
    print(f"a Python process that starts one {n}-rank world "
          f"(median of {a.process_repeats}):")
    print(f"  {light_s:6.2f} s  preloading {', '.join(lifecycle.PRELOAD)} (run()'s list)")
    print(f"  {heavy_s:6.2f} s  preloading also {', '.join(EXTRA_PRELOAD)}")
    print(f"  ratio {heavy_s / light_s:.2f}x: what the extra preload would cost every process "
          f"that starts a world")


if __name__ == "__main__":
    main()
