"""Our pipeline executor vs torch.distributed.pipelining, and measured vs simulated bubbles.

    python bench/bench_pipeline.py [--steps 20]

Part 1 runs the same model (8 x Linear(256)+Tanh split over 4 gloo ranks, batch 64, 8
microbatches) with our executor and with PyTorch's ScheduleGPipe / Schedule1F1B /
ScheduleInterleaved1F1B in the same world, and prints the mean steady step time of each and
the ratio ours / PyTorch (goal: <= 1.0).

Part 2 runs every schedule in synthetic mode (each action sleeps its cost) and prints the
measured makespan against the simulator's prediction for the same costs.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

from paralab import launch, pipeline, schedules

WIDTH, LAYERS, BATCH, M, P = 256, 8, 64, 8, 4


def _torch_schedule(name, rank, model_stages, n_stages):
    from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleGPipe,
                                              ScheduleInterleaved1F1B)

    def loss(output, target):
        return ((output - target) ** 2).mean()

    mine = [s for s in range(n_stages) if s % P == rank]
    stages = [PipelineStage(model_stages[s], s, n_stages, torch.device("cpu")) for s in mine]
    if name == "interleaved":
        return ScheduleInterleaved1F1B(stages, n_microbatches=M, loss_fn=loss), mine
    cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[name]
    return cls(stages[0], n_microbatches=M, loss_fn=loss), mine


def _compare(rank, world_size, steps):
    results = {}
    for name in ("gpipe", "1f1b", "interleaved"):
        ours = schedules.build(name, P, M, 2 if name == "interleaved" else 1)
        model = pipeline.PipelineModel(width=WIDTH, layers_per_stage=LAYERS // ours.num_stages,
                                       batch=BATCH, dtype="float32")
        executor = pipeline.RankExecutor(rank, ours, model)
        executor.warm_up()
        times_ours = []
        for _ in range(steps + 2):
            dist.barrier()
            start = time.perf_counter()
            executor.step()
            dist.barrier()
            times_ours.append(time.perf_counter() - start)

        torch_sched, mine = _torch_schedule(name, rank, model.build(ours.num_stages),
                                            ours.num_stages)
        x, y = model.data()
        times_torch = []
        for _ in range(steps + 2):
            dist.barrier()
            start = time.perf_counter()
            kwargs = {}
            if 0 in mine:
                kwargs["args"] = (x,)
            if ours.num_stages - 1 in mine:
                kwargs["target"], kwargs["losses"] = y, []
            torch_sched.step(*kwargs.pop("args", ()), **kwargs)
            dist.barrier()
            times_torch.append(time.perf_counter() - start)
        # drop the first two steps of each: connection set-up and allocator warm-up
        results[name] = (sum(times_ours[2:]) / steps, sum(times_torch[2:]) / steps)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    print(f"model: {LAYERS} x Linear({WIDTH})+Tanh, batch {BATCH}, {M} microbatches, "
          f"{P} gloo ranks on {torch.get_num_threads()} cores")
    results = launch.run(_compare, P, args.steps, echo=False, timeout=600)[0]
    print(f"{'schedule':<12} {'ours ms':>9} {'torch ms':>9} {'ours/torch':>11}")
    for name, (ours, theirs) in results.items():
        print(f"{name:<12} {ours * 1e3:>9.2f} {theirs * 1e3:>9.2f} {ours / theirs:>11.2f}")

    print("\nsynthetic costs t_f=20 ms, t_b=40 ms, t_w=20 ms per rank, p=4, m=8")
    print(f"{'schedule':<12} {'measured s':>11} {'simulated s':>12} {'ratio':>7}")
    for name, v in (("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("zb-h1", 1)):
        result = pipeline.run_pipeline(schedules.build(name, P, M, v),
                                       synthetic=(0.02, 0.04, 0.02), echo=False)
        measured, simulated = result.timeline.makespan, float(result.simulated.makespan)
        print(f"{name:<12} {measured:>11.3f} {simulated:>12.3f} {measured / simulated:>7.3f}")


if __name__ == "__main__":
    main()
