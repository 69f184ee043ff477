"""How long does it take to start a 4-rank world?  paralab.launch.run against plain spawn.

Every multi-process cell of the course starts a fresh world, so this is the latency a student
waits for each time.  Both sides run the same function: join the process group, one
all_reduce, return.  `spawn` is what multiprocessing / torch.multiprocessing.spawn use by
default for torch; run() forks from a forkserver that imported torch once.

It also measures what the forkserver's preload of `torch._dynamo` does to a whole Python
process that starts one world (a lecture kernel, a test process, a command-line call): with
run()'s preload list against the same list without it, alternating the two so that both see
the same load, for two kinds of world.  In a world that trains (each rank a forward, a
backward and an optimizer step, as the course's worlds do) every rank would otherwise import
it itself; in a bare world (one all_reduce) it is paid for nothing.

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

MEASURED = "torch._dynamo"


def work(rank, world_size):
    t = torch.ones(4, device=device()) * rank
    dist.all_reduce(t)
    return t.sum().item()


def train(rank, world_size):
    """What a rank of the course's worlds does: forward, backward, an optimizer step, and
    the all_reduce of ``work``."""
    model = torch.nn.Linear(8, 8).to(device())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.ones(2, 8, device=device())).sum().backward()
    optimizer.step()
    return work(rank, world_size)


def one_world_process(world_size: int, preload: bool, kind: str) -> float:
    """Wall time of a fresh Python process that starts one world of ``kind`` and exits."""
    command = [sys.executable, os.path.abspath(__file__), "--one-world",
               "with" if preload else "without", "--kind", kind,
               "--world-size", str(world_size)]
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
    parser.add_argument("--one-world", choices=["with", "without"], help=argparse.SUPPRESS)
    parser.add_argument("--kind", choices=["train", "bare"], help=argparse.SUPPRESS)
    a = parser.parse_args()
    n = a.world_size
    expected = float(4 * sum(range(n)))
    if a.one_world:  # the child of one_world_process
        if a.one_world == "without":
            lifecycle.PRELOAD = [m for m in lifecycle.PRELOAD if m != MEASURED]
        fn = train if a.kind == "train" else work
        assert run(fn, n, echo=False) == [expected] * n
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

    assert MEASURED in lifecycle.PRELOAD
    print(f"a Python process that starts one {n}-rank world, run()'s preload list "
          f"({', '.join(lifecycle.PRELOAD)}) against the same without {MEASURED} "
          f"(medians of {a.process_repeats}):")
    for kind, what in (("train", "ranks train (forward, backward, optimizer step)"),
                       ("bare", "ranks only all_reduce")):
        with_, without = [], []
        for _ in range(a.process_repeats):  # alternated: both see the same load
            without.append(one_world_process(n, False, kind))
            with_.append(one_world_process(n, True, kind))
        w, wo = statistics.median(with_), statistics.median(without)
        print(f"  {what}: {w:5.2f} s with, {wo:5.2f} s without: "
              f"without/with {wo / w:.2f}x")


if __name__ == "__main__":
    main()
