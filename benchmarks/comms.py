"""Communication of an ADN step against a vanilla step at world size 2: collectives and bytes per step.

Repeat with:  .venv/bin/python benchmarks/comms.py [--model resnet_mini] [--zero 0 1 2] [--steps 3]

Two gloo ranks on this machine (``DS_ACCELERATOR=cpu``), each a DeepSpeed engine running
``pipeline.step.TrainStep`` exactly as training does. Every collective is counted twice, by two
independent witnesses: DeepSpeed's comms logger (``comms_logger`` in the engine config; every
``deepspeed.comm`` call with its message size) and the torch profiler (the ``c10d::`` operators
that reach the process group, whoever calls them). A warm-up step runs first; counts are per step,
averaged over ``--steps``. Bytes are the message sizes handed to the collectives (what a ring
all-reduce moves ~2x of over each link).
"""

from __future__ import annotations

import argparse
import os
from collections import Counter
from typing import Any

import torch
import torch.multiprocessing as mp

from pipeline.distributed import free_port

MODES = ("vanilla", "adn")


def _profiled_collectives(prof: Any) -> Counter:
    """Calls of each c10d collective operator seen by the profiler (one event per call)."""
    calls: Counter = Counter()
    for event in prof.events():
        if event.name.startswith("c10d::") and not event.name.startswith("c10d::barrier"):
            calls[event.name.removeprefix("c10d::").rstrip("_")] += 1
    return calls


def _measure(rank: int, args: argparse.Namespace, zero: int, mode: str) -> dict[str, Any]:
    import deepspeed
    from deepspeed.comm import comm as ds_comm

    import adn
    from adn.loss import DistillationConfig
    from pipeline.step import TrainStep

    torch.manual_seed(0)
    model = adn.create_model(args.model, num_classes=args.classes).train()
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9),
        config={"train_micro_batch_size_per_gpu": args.batch_size, "gradient_accumulation_steps": 1,
                "zero_optimization": {"stage": zero, "overlap_comm": args.overlap_comm},
                "zero_allow_untested_optimizer": True,
                "steps_per_print": 2**31 - 1,
                "comms_logger": {"enabled": True, "verbose": False, "prof_all": True, "debug": False}})
    step = TrainStep(model, mode, DistillationConfig())
    x = torch.randn(args.batch_size, 3, args.resolution, args.resolution)
    y = torch.randint(0, args.classes, (args.batch_size,))
    step(engine, x, y)  # warm-up: DeepSpeed's first-step buckets and the optimizer state
    ds_comm.comms_logger.comms_dict.clear()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step(engine, x, y)
    logged = {op: {msg: v[0] / args.steps for msg, v in sizes.items()}  # op -> {message bytes: calls per step}
              for op, sizes in ds_comm.comms_logger.comms_dict.items()}
    profiled = {op: n / args.steps for op, n in _profiled_collectives(prof).items()}
    params = sum(p.numel() for p in model.parameters())
    return {"logged": logged, "profiled": profiled, "grad_bytes": params * 4}


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, queue: Any) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    from deepspeed.utils import logger

    from pipeline.distributed import setup_distributed

    logger.setLevel("ERROR")
    setup_distributed()
    for zero in args.zero:
        for mode in MODES:
            result = _measure(rank, args, zero, mode)
            if rank == 0:
                queue.put((zero, mode, result))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _mib(size: float) -> str:
    return f"{size / 2**20:.2f} MiB" if size >= 2**16 else f"{size:.0f} B"


def _totals(logged: dict[str, dict[int, float]]) -> tuple[float, float]:
    calls = sum(n for sizes in logged.values() for n in sizes.values())
    size = sum(msg * n for sizes in logged.values() for msg, n in sizes.items())
    return calls, size


def _detail(logged: dict[str, dict[int, float]]) -> str:
    return "; ".join(f"{op} " + " + ".join(f"{n:g} x {_mib(msg)}" for msg, n in sorted(sizes.items(), reverse=True))
                     for op, sizes in sorted(logged.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet_mini")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--zero", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--overlap-comm", action="store_true", help="ZeRO's overlap_comm (reduce during backward)")
    args = parser.parse_args()

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.spawn(_worker, args=(2, free_port(), args, queue), nprocs=2, join=True)
    results = {}
    while not queue.empty():
        zero, mode, result = queue.get()
        results[(zero, mode)] = result
    grad_bytes = next(iter(results.values()))["grad_bytes"]
    print(f"{args.model} at {args.resolution}, batch {args.batch_size} per rank, world size 2 (gloo, CPU), "
          f"{args.steps} steps after a warm-up, overlap_comm {args.overlap_comm}; fp32 gradients of all parameters: "
          f"{_mib(grad_bytes)}")
    print(f"{'ZeRO':>4} {'step':<8} {'calls':>6} {'MiB':>8} {'x grads':>8}  per step, DeepSpeed comms logger "
          "(calls x message) | torch profiler (c10d calls)")
    for zero in args.zero:
        for mode in MODES:
            r = results[(zero, mode)]
            calls, size = _totals(r["logged"])
            seen = ", ".join(f"{n:g} {op}" for op, n in sorted(r["profiled"].items()))
            print(f"{zero:>4} {mode:<8} {calls:>6g} {size / 2**20:>8.2f} {size / grad_bytes:>8.2f}  "
                  f"{_detail(r['logged'])} | {seen}")
        ratio = _totals(results[(zero, "adn")]["logged"])[1] / _totals(results[(zero, "vanilla")]["logged"])[1]
        print(f"     bytes per step adn / vanilla at ZeRO {zero}: {ratio:.2f}")


if __name__ == "__main__":
    main()
