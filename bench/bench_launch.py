"""How long does it take to start a 4-rank world?  paralab.launch.run against plain spawn.

Every multi-process cell of the course starts a fresh world, so this is the latency a student
waits for each time.  Both sides run the same function: join the process group, one
all_reduce, return.  `spawn` is what multiprocessing / torch.multiprocessing.spawn use by
default for torch; run() forks from a forkserver that imported torch once.

    python bench/bench_launch.py [--world-size 4] [--repeats 10] [--spawn-repeats 2]
"""

import argparse
import datetime
import multiprocessing as mp
import os
import statistics
import time

import torch
import torch.distributed as dist

from paralab.launch import run


def work(rank, world_size):
    t = torch.ones(4) * rank
    dist.all_reduce(t)
    return t.sum().item()


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
    a = parser.parse_args()
    n = a.world_size
    expected = float(4 * sum(range(n)))

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


if __name__ == "__main__":
    main()
