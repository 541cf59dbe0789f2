"""Accuracy of all 16 stage masks of resnet50: shared stage prefixes against one-by-one passes (CPU, side by side).

Repeat with:  .venv/bin/python benchmarks/search_eval.py [--samples 64] [--batch-size 32] [--rounds 3]

A small validation set of random 224x224 images (timing does not depend on pixel values; the
counts of both methods are compared and must be identical). Each round runs both methods, in
alternating order; figures are medians. One-by-one is ``pipeline.evaluate.evaluate`` (one full
forward per mask and batch); shared is ``search.accuracy.MaskEvaluator`` (one run per distinct
stage prefix, no cache across calls). Then Ray Tune's overhead per trial: 16 trials that each
evaluate one mask with a warm evaluator, against the same evaluations called directly.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import adn
from pipeline.evaluate import evaluate
from search.accuracy import MaskEvaluator


def _ray_overhead(trials: int) -> tuple[float, float]:
    """(seconds per trial of a Tune run of trivial-to-evaluate trials, seconds per direct call)."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    import ray
    from ray import tune

    model = adn.create_model("resnet_mini", num_classes=10).eval()
    batches = [(torch.randn(50, 3, 32, 32), torch.randint(0, 10, (50,)))]
    masks = [str(m) for m in model.masks()][:trials]
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    evaluator_ref = ray.put((model, batches))

    def trial(config: dict) -> None:
        model, batches = ray.get(evaluator_ref)
        tune.report({"acc1": MaskEvaluator(model, batches).evaluate([config["mask"]])[config["mask"]].acc1})

    start = time.perf_counter()
    tune.Tuner(tune.with_resources(trial, {"cpu": 1}), param_space={"mask": tune.grid_search(masks)},
               tune_config=tune.TuneConfig(reuse_actors=True, max_concurrent_trials=1),
               run_config=tune.RunConfig(verbose=0, storage_path="/tmp/adn-bench-ray")).fit()
    tuned = (time.perf_counter() - start) / len(masks)
    start = time.perf_counter()
    for m in masks:
        MaskEvaluator(model, batches).evaluate([m])
    direct = (time.perf_counter() - start) / len(masks)
    ray.shutdown()
    return tuned, direct


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray Tune overhead measurement")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = adn.create_model("resnet50").eval()
    batches = []
    for start in range(0, args.samples, args.batch_size):
        n = min(args.batch_size, args.samples - start)
        batches.append((torch.randn(n, 3, 224, 224), torch.randint(0, 1000, (n,))))
    masks = model.masks()

    def one_by_one() -> dict:
        return evaluate(model, batches, masks)

    def shared() -> dict:
        return MaskEvaluator(model, batches, cache_bytes=0).evaluate(masks)

    assert one_by_one() == shared(), "shared-prefix results differ from one-by-one evaluation"
    times: dict[str, list[float]] = {"one-by-one": [], "shared": []}
    for r in range(args.rounds):
        for name, fn in ((("one-by-one", one_by_one), ("shared", shared)) if r % 2 == 0 else
                         (("shared", shared), ("one-by-one", one_by_one))):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"resnet50, all {len(masks)} stage masks, {args.samples} images at 224 in batches of {args.batch_size}, "
          f"fp32 CPU, {torch.get_num_threads()} threads, median of {args.rounds} alternating rounds")
    print(f"  one-by-one {med['one-by-one']:7.2f} s   (a full forward per mask and batch: {len(masks) * len(batches)})")
    print(f"  shared     {med['shared']:7.2f} s   (one run per distinct stage prefix, identical counts)")
    print(f"shared / one-by-one = {med['shared'] / med['one-by-one']:.3f}  (target <= 0.6)")
    if not args.no_ray:
        tuned, direct = _ray_overhead(16)
        print(f"Ray Tune: {tuned:.3f} s per trial against {direct:.3f} s per direct call: "
              f"overhead {tuned - direct:.3f} s per trial (local Ray, 1 trial at a time, reused actor)")


if __name__ == "__main__":
    main()
