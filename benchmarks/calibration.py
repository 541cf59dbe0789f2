"""What batch-norm recalibration gives each mask of a trained ADN, and what it costs.

Repeat with:  .venv/bin/python benchmarks/calibration.py --checkpoint runs/demo --data data/digits
              [--split val] [--images 256] [--batch-size 128]

Evaluates every mask of the checkpoint on ``--split`` twice, side by side in one run: with the
statistics training saved, and after ``adn.calibrate_norms`` re-estimated the statistics each mask
uses from the first ``--images`` training images through the validation transforms (the switch of
``pipeline.evaluate.evaluate``). Prints top-1 per mask for both, the gain, and the cost: the time of
the calibrations against the time of one evaluation pass of all masks without them. Supernet work
(OFA) recalibrates per sub-network; on the digits demo, masks between the super-net and the
base-net scored below both ends, which calibration is expected to repair.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="weights.safetensors or a training output directory")
    p.add_argument("--data", required=True, help="shards with a train split and --split")
    p.add_argument("--split", default="val")
    p.add_argument("--images", type=int, default=256, help="training images per calibration")
    p.add_argument("--batch-size", type=int, default=128, help="evaluation batch (calibration: batches of 128)")
    args = p.parse_args()

    import torch
    from tqdm import tqdm

    from adn.calibrate import calibrated
    from adn.checkpoint import load_trained
    from pipeline.data import make_loader
    from pipeline.evaluate import calibration_loader, evaluate

    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, meta = load_trained(args.checkpoint)
    recipe = meta["recipe"]
    val = make_loader(args.data, args.split, args.batch_size, recipe, rank=0, world_size=1, num_workers=0)
    train = calibration_loader(args.data, recipe, args.images)
    masks = [str(m) for m in model.masks()]
    start = time.perf_counter()
    plain = evaluate(model, val, masks)
    plain_s = time.perf_counter() - start
    calibrated_acc, calib_s, eval_s, counts = {}, [], 0.0, []
    for mask in tqdm(masks, desc="calibrate + evaluate", file=sys.stderr):
        start = time.perf_counter()
        with calibrated(model, mask, train, args.images) as count:
            calib_s.append(time.perf_counter() - start)
            counts.append(count)
            start = time.perf_counter()
            calibrated_acc[mask] = evaluate(model, val, [mask])[mask]
            eval_s += time.perf_counter() - start
    print(f"{meta['model']} from {args.checkpoint}, {args.split} ({plain[masks[0]].samples} images); "
          f"{min(counts)} to {max(counts)} batch norms per mask recalibrated from {args.images} training images")
    print(f"{'mask':<8}{'top-1 saved stats':>19}{'calibrated':>12}{'gain':>8}")
    for m in masks:
        a, b = plain[m].acc1, calibrated_acc[m].acc1
        print(f"{m:<8}{a:>19.2%}{b:>12.2%}{(b - a) * 100:>+7.2f}")
    gains = [(calibrated_acc[m].acc1 - plain[m].acc1) * 100 for m in masks]
    between = [g for m, g in zip(masks, gains, strict=True) if "T" in m and "F" in m]
    print(f"median gain {statistics.median(gains):+.2f} points (masks between the ends: "
          f"{statistics.median(between):+.2f}); worst mask saved {min(plain[m].acc1 for m in masks):.2%}, "
          f"calibrated {min(calibrated_acc[m].acc1 for m in masks):.2%}")
    print(f"cost: {statistics.median(calib_s):.2f} s per calibration (median of {len(masks)}), "
          f"{sum(calib_s):.1f} s for all masks against {plain_s:.1f} s for one pass of all masks "
          f"without calibration (ratio {sum(calib_s) / plain_s:.2f}); per-mask passes took {eval_s:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
