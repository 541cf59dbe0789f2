"""Cost of ADN's two-pass training step against a vanilla step, side by side (CPU, fp32, DeepSpeed engine).

Repeat with:  .venv/bin/python benchmarks/train_step.py [--model resnet50] [--batch-size 8] [--rounds 7]

Both steps are ``pipeline.step.TrainStep`` on the same DeepSpeed engine (one gloo rank,
``DS_ACCELERATOR=cpu``, NCHW as in training: DeepSpeed's initial weight broadcast cannot take
channels_last weights): ``adn`` runs super-net forward/backward, base-net forward/backward and one
optimizer step; ``vanilla`` runs one forward/backward of the super-net and one step. Rounds
alternate the two, figures are medians, and the time ratio is compared with the issue's bound
``1.05 * (1 + GFLOPs(base) / GFLOPs(super))``.

Peak memory is what the step allocates above what is live before it (weights, gradients from the
previous step, optimizer state), read from PyTorch's own allocation events
(``torch.profiler`` with ``profile_memory=True``: the highest "Total Allocated" during the step
minus its value at the start). That is the activation and gradient memory a step needs; the
process's peak RSS is printed too, for reference.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def peak_allocated(fn) -> float:
    """Bytes allocated at the step's peak above the bytes live when it starts (PyTorch's allocation events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events
              if e.get("name") == "[memory]" and "Total Allocated" in e.get("args", {})]
    first = next(e for e in events if e.get("name") == "[memory]")
    start = first["args"]["Total Allocated"] - first["args"]["Bytes"]
    return max(totals) - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    from pipeline.distributed import setup_distributed

    setup_distributed()
    import deepspeed
    from deepspeed.utils import logger

    import adn
    from adn.complexity import count_flops
    from adn.loss import DistillationConfig
    from pipeline.step import TrainStep

    logger.setLevel("WARNING")
    torch.manual_seed(0)
    model = adn.create_model(args.model, num_classes=1000).train()
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9),
        config={"train_micro_batch_size_per_gpu": args.batch_size, "gradient_accumulation_steps": 1,
                "steps_per_print": 2**31 - 1})
    x = torch.randn(args.batch_size, 3, args.resolution, args.resolution)
    y = torch.randint(0, 1000, (args.batch_size,))
    loss = DistillationConfig(alpha=0.5, temperature=1.0, kd_topk=500)
    steps = {mode: TrainStep(model, mode, loss) for mode in ("vanilla", "adn")}

    def run(mode: str) -> float:
        start = time.perf_counter()
        steps[mode](engine, x, y)
        return time.perf_counter() - start

    for mode in steps:  # warm-up: oneDNN primitives, optimizer state, allocator
        run(mode)
        run(mode)
    times: dict[str, list[float]] = {m: [] for m in steps}
    for r in tqdm(range(args.rounds), desc="rounds", leave=False):
        for mode in (("vanilla", "adn") if r % 2 == 0 else ("adn", "vanilla")):
            times[mode].append(run(mode))
    peaks = {m: peak_allocated(lambda m=m: steps[m](engine, x, y)) for m in steps}

    base = adn.SkipMask.base_net(model.num_stages)
    flops = count_flops(model, base, args.resolution) / count_flops(model, None, args.resolution)
    bound = 1.05 * (1 + flops)
    med = {m: statistics.median(v) for m, v in times.items()}
    print(f"{args.model} at {args.resolution}, batch {args.batch_size}, fp32, {torch.get_num_threads()} threads, "
          f"NCHW, DeepSpeed {deepspeed.__version__} on CPU, "
          f"median of {args.rounds} alternating rounds")
    for m in ("vanilla", "adn"):
        print(f"  {m:<8} {med[m] * 1e3:8.1f} ms/step  {args.batch_size / med[m]:6.2f} img/s  "
              f"peak step memory {peaks[m] / 2**20:8.1f} MiB")
    print(f"time ratio adn/vanilla   {med['adn'] / med['vanilla']:.3f}  (bound 1.05 x (1 + {flops:.3f}) = {bound:.3f})")
    print(f"memory ratio adn/vanilla {peaks['adn'] / peaks['vanilla']:.3f}  (bound 1.10)")
    print(f"process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB")


if __name__ == "__main__":
    main()
