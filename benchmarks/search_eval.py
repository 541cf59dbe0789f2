"""The search's own evaluation path: one batched pass for the 16 stage masks of resnet50 against one pass per mask.

Repeat with:  .venv/bin/python benchmarks/search_eval.py [--samples 192] [--batch-size 32] [--workers 1 2]
              [--no-blocks]

Synthetic 224x224 JPEG shards (smooth random images: decoding costs what photographs cost; timing does
not depend on what they show), a resnet50 ADN with random weights, and the search's machinery
unchanged: a local Ray, ``search.evaluation.start_eval_workers`` (the workers stream their part of the
split), ``run_pass``. For each worker count, both methods run side by side: the 16 masks in one pass
(as the grid search's one trial hands them over) and 16 passes of one mask each (what a trial per mask
costs). Printed per worker count: forward time (summed over workers), stage segments run, wall time,
their ratios, and each worker's peak memory, next to the size of the stage states one pass computes.
The counts of both methods must be identical.

Then the block space of resnet_mini_deep (128 masks, 2 epochs on the digits) searched by
``search.pareto --space blocks --sampler nsga2 --budget 38``: its segment runs against one by one.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml
from PIL import Image
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
STAGE_FLOATS = {"resnet50": (256 * 56 * 56, 512 * 28 * 28, 1024 * 14 * 14, 2048 * 7 * 7)}


def _shards(out: Path, samples: int) -> None:
    from pipeline.data.shard import write_shards
    from pipeline.data.sources import SampleRef

    rng = np.random.default_rng(0)
    refs = []
    for i in range(samples):
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((500, 375), Image.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        refs.append(SampleRef(f"img_{i:06d}", int(rng.integers(0, 1000)), "jpg", data=buffer.getvalue()))
    write_shards(refs, [f"c{k:04d}" for k in range(1000)], out, "val", shard_size=64, shuffle_seed=None)


def _weights(out: Path) -> Path:
    import torch

    from adn import create_model
    from adn.checkpoint import save_weights

    torch.manual_seed(0)
    recipe = yaml.safe_load((ROOT / "pipeline" / "recipes" / "resnet50.yaml").read_text())
    model = create_model("resnet50", num_classes=1000)
    return save_weights(model, out / "resnet50.safetensors", model_name="resnet50",
                        classes=[f"c{k:04d}" for k in range(1000)], resolution=224, recipe=recipe)


def _state_gib(samples: int) -> float:
    """Stage states one pass of the 16 masks computes (fp32): 2, 4, 8, 16 distinct prefixes after stages 1-4."""
    per_image = sum(n * 2 ** (k + 1) for k, n in enumerate(STAGE_FLOATS["resnet50"])) * 4
    return samples * per_image / 2**30


def _stages(args: argparse.Namespace, work: Path) -> None:
    import ray

    from search.evaluation import run_pass, start_eval_workers

    _shards(work / "shards", args.samples)
    weights = _weights(work)
    masks = [f"{i:04b}".replace("0", "F").replace("1", "T") for i in range(16)]
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False, num_cpus=os.cpu_count() or 1)
    rows = []
    bar = tqdm(total=len(args.workers) * 17, desc="passes", unit="pass")
    for count in args.workers:
        workers = start_eval_workers(weights, str(work / "shards"), args.batch_size, None, count, None)
        shared, shared_stats = run_pass(workers, "val", masks)
        bar.update()
        alone, alone_stats = {}, []
        for mask in masks:
            result, stats = run_pass(workers, "val", [mask])
            alone[mask] = result.counts[mask]
            alone_stats.append(stats)
            bar.update()
        if alone != shared.counts:
            raise SystemExit("the batched pass and the one-by-one passes disagree")
        one_by_one = {k: sum(s[k] for s in alone_stats) for k in ("forward_s", "segment_runs", "wall_s")}
        peak = max(w["peak_rss_mib"] for s in [shared_stats, *alone_stats] for w in s["workers"])
        rows.append((count, shared_stats, one_by_one, peak))
        for w in workers:
            ray.kill(w)
    bar.close()
    ray.shutdown()
    print(f"\nresnet50, 16 stage masks, {args.samples} synthetic 224x224 JPEGs in batches of {args.batch_size}; "
          f"one pass computes {_state_gib(args.samples):.1f} GiB of stage states (fp32)")
    print(f"{'workers':>8}{'forward s':>22}{'ratio':>7}{'segment runs':>18}{'ratio':>7}{'wall s':>20}{'ratio':>7}"
          f"{'peak MiB':>10}")
    for count, s, o, peak in rows:
        print(f"{count:>8}{s['forward_s']:>10.1f} / {o['forward_s']:>8.1f}{s['forward_s'] / o['forward_s']:>7.3f}"
              f"{s['segment_runs']:>8} / {o['segment_runs']:>7}{s['segment_runs'] / o['segment_runs']:>7.3f}"
              f"{s['wall_s']:>9.1f} / {o['wall_s']:>8.1f}{s['wall_s'] / o['wall_s']:>7.3f}{peak:>10.0f}")
    print("(batched pass / one pass per mask; forward time is summed over the workers)")


def _blocks(work: Path) -> None:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT), "ADN_LUT_DIR": str(work / "luts")}
    env.pop("MLFLOW_TRACKING_URI", None)

    def run(*args: str) -> None:
        done = subprocess.run([sys.executable, "-m", *args], env=env, cwd=work, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(done.stderr[-3000:])

    run("pipeline.data.shard", "digits", "--out", "digits")
    run("pipeline.train", "--model", "resnet_mini_deep", "--data", "digits", "--output", "deep", "--epochs", "2",
        "--no-tracking", "--workers", "1")
    run("search.pareto", "--target", "cpu", "--checkpoint", "deep", "--data", "digits", "--space", "blocks",
        "--sampler", "nsga2", "--budget", "38", "--no-tracking", "--out", "p-blocks")
    t = json.loads((work / "p-blocks" / "pareto.json").read_text())["timing"]
    print(f"\nresnet_mini_deep, block space (128 masks), NSGA-II, budget 38, on the digits' minival: "
          f"{t['passes']} passes of {t['masks_per_pass']} masks, {t['segment_runs']} segment runs against "
          f"{t['segment_runs_one_by_one']} one by one: {t['segment_runs'] / t['segment_runs_one_by_one']:.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=192)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--no-blocks", action="store_true", help="skip the resnet_mini_deep NSGA-II part")
    args = p.parse_args()
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    with tempfile.TemporaryDirectory(prefix="adn-search-eval-") as tmp:
        _stages(args, Path(tmp))
        if not args.no_blocks:
            _blocks(Path(tmp))


if __name__ == "__main__":
    main()
