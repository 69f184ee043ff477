"""Device checks of the tensor-parallel code, for a developer with a CUDA GPU.

    python bench/device_check.py          # on a machine with a GPU
    python bench/device_check.py --cpu    # the same checks on the CPU (checks this script)

The CPU tests cannot see a CPU tensor in GPU code: gloo moves CPU tensors happily, and a
world of one GPU sends nothing (``comm.all_reduce`` skips a 1-rank group).  This script
runs what a single GPU can:

1. NCCL, one rank: the rank's device is its GPU; every layout of ``tp.ParallelFFN`` matches
   the dense FFN, and every tensor it returns was computed on the GPU.  (NCCL refuses two
   ranks on one GPU, so that is all NCCL can do here.)
2. gloo, two ranks sharing the GPU, ``PARALAB_DEVICE=cuda``: gloo all-reduces and
   all-gathers CUDA tensors (not send/recv), which is all tensor parallelism uses; every
   layout matches the dense FFN with its collectives really moving CUDA tensors between two
   processes, and ``paralab.comm`` refuses a CPU tensor there.
3. ``backend="auto"`` picks gloo for more ranks than GPUs, NCCL otherwise; with two or more
   GPUs the parity check also runs under NCCL on two GPUs.

Without a GPU it says so and exits 0.  Exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist
from torch.testing import assert_close

from paralab import comm, launch, layouts, tp
from paralab.launch.backend import DEVICE_ENV, resolve_backend

BATCH, SEQ, D = 2, 4, 16
CASES = [("col-row", True), ("row-row", True), ("col-col", True), ("col-col", False)]


def parity_worker(rank, world_size):
    """Every layout on this rank's device; the tensors come back on the CPU, with the
    device they were computed on."""
    out = {"device": str(launch.device()), "backend": dist.get_backend(), "cases": {}}
    for variant, gathered in CASES:
        result = tp.ffn_parity_step(rank, world_size, variant, BATCH, SEQ, D,
                                    gather_output=gathered)
        tensors = {"output": result["output"], "input_grad": result["input_grad"],
                   **{f"grad:{k}": v for k, v in result["grads"].items()}}
        out["cases"][f"{variant}/{gathered}"] = {
            "devices": sorted({str(t.device) for t in tensors.values()}),
            "tensors": {k: v.cpu() for k, v in tensors.items()},
            "collectives": [(r.phase, r.op, r.elements) for r in result["records"]],
        }
    return out


def collectives_worker(rank, world_size):
    """Raw comm collectives on this rank's device, and a CPU tensor that must be refused."""
    device = launch.device()
    x = torch.arange(3, dtype=torch.float64, device=device) + 10 * rank
    total = comm.all_reduce(x, phase="forward")
    gathered = comm.all_gather(x, dim=0, phase="forward")
    refused = ""
    if device.type != "cpu":
        try:
            comm.all_reduce(torch.ones(2), phase="forward")
        except ValueError as e:
            refused = str(e)
    return str(total.device), total.cpu(), gathered.cpu(), refused


def check_parity(results, world_size, want_device_type):
    reference = tp.dense_reference(BATCH, SEQ, D)
    ref = {"output": reference["output"], "input_grad": reference["input_grad"]}
    for rank, r in enumerate(results):
        for case, got in r["cases"].items():
            devices = {torch.device(d).type for d in got["devices"]}
            assert devices == {want_device_type}, (rank, case, got["devices"])
            for name in ("output", "input_grad"):
                assert_close(got["tensors"][name], ref[name], msg=f"rank {rank} {case} {name}")
    # Shards of the parameter gradients, put back together, are the dense gradients.
    # (nn.Linear stores W as out x in: a column-parallel layer holds rows of it.)
    for case in results[0]["cases"]:
        variant = case.split("/")[0]
        for layer, kind in zip(("linear1", "linear2"), layouts.LAYOUTS[variant]):
            parts = [r["cases"][case]["tensors"] for r in results]
            weight = torch.cat([p[f"grad:{layer}.weight"] for p in parts],
                               dim=0 if kind == "column" else 1)
            assert_close(weight, reference["grads"][f"{layer}.weight"], msg=f"{case} {layer}")
            bias = (torch.cat([p[f"grad:{layer}.bias"] for p in parts]) if kind == "column"
                    else parts[0][f"grad:{layer}.bias"])
            assert_close(bias, reference["grads"][f"{layer}.bias"], msg=f"{case} {layer} bias")
    return (f"{len(results[0]['cases'])} layouts x {world_size} rank(s) match the dense FFN; "
            f"computed on {results[0]['device']} under {results[0]['backend']}")


def check_collectives(results, world_size, want_device_type):
    xs = [torch.arange(3, dtype=torch.float64) + 10 * r for r in range(world_size)]
    for rank, (device, total, gathered, refused) in enumerate(results):
        assert torch.device(device).type == want_device_type, (rank, device)
        assert_close(total, sum(xs))
        assert_close(gathered, torch.cat(xs))
        if want_device_type != "cpu":
            assert refused.startswith("all_reduce was handed a tensor on cpu"), refused
    return (f"all_reduce and all_gather of {want_device_type} tensors over {world_size} "
            f"rank(s) are right" + ("; a CPU tensor is refused" if want_device_type != "cpu"
                                    else ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true",
                        help="run the checks on the CPU with gloo (checks the script itself)")
    args = parser.parse_args()
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not gpus and not args.cpu:
        print("device_check: no CUDA GPU is visible (torch.cuda.is_available() is False), so "
              "there is nothing to check here. Run it on a machine with a GPU, or with --cpu "
              "to try the checks themselves on the CPU.")
        return 0
    print(f"torch {torch.__version__}, {gpus} GPU(s)"
          + (f": {torch.cuda.get_device_name(0)}" if gpus else "")
          + (", checks on the CPU (--cpu)" if args.cpu else ""))
    os.environ.pop(DEVICE_ENV, None)
    device_type = "cpu" if args.cpu else "cuda"
    one_rank_backend = "gloo" if args.cpu else "nccl"

    checks = [
        (f"{one_rank_backend}, 1 rank: TP parity", lambda: check_parity(
            launch.run(parity_worker, 1, backend=one_rank_backend, echo=False), 1, device_type)),
        (f"{one_rank_backend}, 1 rank: collectives", lambda: check_collectives(
            launch.run(collectives_worker, 1, backend=one_rank_backend, echo=False), 1,
            device_type)),
    ]

    def on_shared_gpu(fn, check):
        os.environ[DEVICE_ENV] = device_type
        try:
            return check(launch.run(fn, 2, backend="gloo", echo=False), 2, device_type)
        finally:
            del os.environ[DEVICE_ENV]

    checks += [
        (f"gloo, 2 ranks, {DEVICE_ENV}={device_type}: TP parity",
         lambda: on_shared_gpu(parity_worker, check_parity)),
        (f"gloo, 2 ranks, {DEVICE_ENV}={device_type}: collectives",
         lambda: on_shared_gpu(collectives_worker, check_collectives)),
    ]

    def auto_backend():
        chosen = {n: resolve_backend("auto", n) for n in (1, 2)}
        want = {n: "nccl" if 0 < n <= gpus else "gloo" for n in (1, 2)}
        assert chosen == want, (chosen, want)
        return f"auto picks {chosen[1]} for 1 rank, {chosen[2]} for 2 ranks on {gpus} GPU(s)"

    checks.append(("backend='auto'", auto_backend))
    if gpus >= 2 and not args.cpu:
        checks.append(("nccl, 2 ranks on 2 GPUs: TP parity", lambda: check_parity(
            launch.run(parity_worker, 2, backend="nccl", echo=False), 2, "cuda")))

    failed = 0
    for name, check in checks:
        t0 = time.perf_counter()
        try:
            detail = check()
            print(f"PASS  {name} ({time.perf_counter() - t0:.1f} s): {detail}", flush=True)
        except Exception:  # noqa: BLE001 - report every check, then fail
            failed += 1
            print(f"FAIL  {name} ({time.perf_counter() - t0:.1f} s)", flush=True)
            traceback.print_exc()
    print(f"{len(checks) - failed} of {len(checks)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
