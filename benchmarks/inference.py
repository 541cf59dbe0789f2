"""Inference latency of ADN resnet50 against timm's plain resnet50, side by side (CPU, fp32, eval).

Repeat with:  .venv/bin/python benchmarks/inference.py [--batch-sizes 1 16] [--rounds 15]

Every round times each candidate once, in a rotating order, so machine noise hits all of them
alike; figures are medians over rounds, and the ratios are of those medians. Both memory formats
are measured, every candidate in the same one: channels_last is how oneDNN runs CPU convolutions
fastest (timm's benchmark has --channels-last for this), contiguous NCHW is PyTorch's default.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import timm
import torch
from tqdm import tqdm

import adn
from adn.complexity import count_flops
from adn.export import export_subnet


def _time_once(fn: Callable[[], object], iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters * 1e3


def measure(candidates: dict[str, Callable[[], object]], rounds: int, iters: int, warmup: int = 3) -> dict[str, float]:
    """Median milliseconds per call of each candidate, interleaved round by round."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    names = list(candidates)
    for r in tqdm(range(rounds), desc="rounds", leave=False):
        for name in names[r % len(names):] + names[: r % len(names)]:
            samples[name].append(_time_once(candidates[name], iters))
    return {name: statistics.median(v) for name, v in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--memory-formats", nargs="+", choices=["channels_last", "contiguous"],
                        default=["channels_last", "contiguous"])
    args = parser.parse_args()

    torch.manual_seed(0)
    plain = timm.create_model("resnet50").eval()
    model = adn.create_model("resnet50").eval()
    exported = export_subnet(model, "TTTT")
    flops_ratio = count_flops(model, "TTTT", args.resolution) / count_flops(model, "FFFF", args.resolution)

    print(f"torch {torch.__version__}, timm {timm.__version__}, {torch.get_num_threads()} threads, "
          f"resnet50 at {args.resolution}, fp32, eval; medians of {args.rounds} interleaved rounds")
    for fmt in args.memory_formats:
        memory_format = getattr(torch, fmt.replace("contiguous", "contiguous_format"))
        for module in (plain, model, exported):
            module.to(memory_format=memory_format)
        for batch in args.batch_sizes:
            x = torch.randn(batch, 3, args.resolution, args.resolution).to(memory_format=memory_format)
            candidates = {
                "timm resnet50": lambda x=x: plain(x),
                "ADN FFFF": lambda x=x: model(x, skip="FFFF"),
                "ADN TTTT": lambda x=x: model(x, skip="TTTT"),
                "exported TTTT": lambda x=x: exported(x),
            }
            with torch.inference_mode():
                ms = measure(candidates, args.rounds, iters=max(1, 8 // batch))
            print(f"\n{fmt}, batch {batch}")
            for name, value in ms.items():
                print(f"  {name:<14} {value:9.2f} ms  ({batch / value * 1e3:7.1f} img/s)")
            print(f"  ADN FFFF / timm resnet50  = {ms['ADN FFFF'] / ms['timm resnet50']:.3f}   (target <= 1.03)")
            print(f"  ADN TTTT / ADN FFFF       = {ms['ADN TTTT'] / ms['ADN FFFF']:.3f}   (GFLOPs ratio "
                  f"{flops_ratio:.3f}; target <= {1.05 * flops_ratio:.3f} at batch 1)")
            print(f"  exported TTTT / ADN TTTT  = {ms['exported TTTT'] / ms['ADN TTTT']:.3f}   (target <= 0.95)")

if __name__ == "__main__":
    main()
