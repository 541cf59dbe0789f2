"""``python -m pipeline.export``: write the sub-network of a trained ADN for a mask or a latency budget.

    python -m pipeline.export --checkpoint runs/demo --mask TTFF --out slim.onnx
    python -m pipeline.export --pareto runs/demo/pareto-cpu --max-latency-ms 1.2 --out slim.pt2
    python -m pipeline.export --checkpoint runs/demo --mask FFTF --calibrate-norms 512 --data data/digits \
        --out slim.onnx
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from adn.calibrate import calibrate_norms
from adn.checkpoint import load_trained
from adn.export.files import FORMATS, export_file, format_of
from adn.runtime import DepthSelector

from .evaluate import calibration_loader


def main(argv: list[str] | None = None) -> int:
    """Parse the flags, export, print what was written; one sentence and exit 2 on bad input."""
    p = argparse.ArgumentParser(
        prog="python -m pipeline.export", description="Write one sub-network of a trained ADN as a slim, plain model "
        "(skipped blocks removed, one norm per pair, batch norms folded), check the file against the "
        "super-net under that mask, and print its params and GFLOPs.")
    p.add_argument("--checkpoint", help="weights.safetensors or a training output directory (default with "
                                        "--pareto: the weights that search used)")
    pick = p.add_mutually_exclusive_group(required=True)
    pick.add_argument("--mask", help="skip mask (TTFF) or block mask")
    pick.add_argument("--pareto", metavar="DIR", help="a search.pareto output: take the best front mask within "
                                                      "--max-latency-ms")
    p.add_argument("--max-latency-ms", type=float, help="latency budget for --pareto")
    p.add_argument("--fastest-if-none", action="store_true",
                   help="with --pareto: take the fastest front mask when none fits the budget (default: refuse)")
    p.add_argument("--format", choices=list(FORMATS), help="default: from the --out extension (.safetensors, .pt, "
                   ".onnx, .pt2); torchscript is deprecated in PyTorch 2, pt2 (torch.export) replaces it")
    p.add_argument("--out", required=True, help="file to write")
    p.add_argument("--check-batch", type=int, default=2, help="batch size of the export's example (default 2)")
    p.add_argument("--calibrate-norms", type=int, metavar="N",
                   help="first re-estimate the batch-norm statistics the mask uses from N training images of "
                        "--data, through the validation transforms (adn.calibrate_norms)")
    p.add_argument("--data", help="shards (directory or URL) whose train split --calibrate-norms reads")
    args = p.parse_args(argv)
    try:
        if args.calibrate_norms is not None and (args.calibrate_norms < 1 or not args.data):
            raise ValueError(f"--calibrate-norms takes a positive image count and --data with a train split, got "
                             f"{args.calibrate_norms} images and --data {args.data or 'missing'}.")
        fmt = args.format or format_of(args.out)
        checkpoint, mask = args.checkpoint, args.mask
        if args.pareto:
            if args.max_latency_ms is None:
                raise ValueError("--pareto needs --max-latency-ms, the budget to pick the mask for.")
            selector = DepthSelector.from_file(args.pareto)
            fastest = selector.front[0]
            if args.max_latency_ms < fastest.latency_ms and not args.fastest_if_none:
                raise ValueError(f"no front mask fits {args.max_latency_ms:g} ms: the fastest, {fastest.mask}, takes "
                                 f"{fastest.latency_ms:.3g} ms; raise --max-latency-ms, or pass --fastest-if-none.")
            mask = selector.select(args.max_latency_ms)
            report = Path(args.pareto) / "pareto.json" if Path(args.pareto).is_dir() else Path(args.pareto)
            checkpoint = checkpoint or json.loads(report.read_text()).get("weights")
        elif args.max_latency_ms is not None:
            raise ValueError("--max-latency-ms picks from a search: pass --pareto DIR with it, or --mask alone.")
        if not checkpoint:
            raise ValueError("pass --checkpoint (weights.safetensors or a training directory).")
        model, meta = load_trained(checkpoint)
        calibrated = _calibrate(model, meta, mask, args.data, args.calibrate_norms) if args.calibrate_norms else None
        done = export_file(model, mask, args.out, fmt, model_name=meta["model"], classes=meta["classes"],
                           resolution=meta["resolution"], batch_size=args.check_batch)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {done.path} ({done.fmt}): {meta['model']} under {done.mask}, {done.params / 1e6:.3f} M params, "
          f"{done.gflops:.4f} GFLOPs at {meta['resolution']}x{meta['resolution']}; logits within "
          f"{done.max_abs_diff:.1e} of the super-net under {done.mask}"
          + (f" (batch norms recalibrated: {calibrated})" if calibrated else ""))
    return 0


def _calibrate(model: Any, meta: dict[str, Any], mask: str, data: str, images: int) -> str:
    """Recalibrate the norms ``mask`` uses from the first ``images`` training images, validation transforms."""
    loader = calibration_loader(data, meta["recipe"], images)
    seen = 0

    def counted() -> Any:
        nonlocal seen
        for batch in loader:
            seen += len(batch[0])
            yield batch

    count = calibrate_norms(model, mask, counted(), max_images=images)
    return f"{count} norms from {seen} training images" if count else "none, the model has no batch norms"


if __name__ == "__main__":
    raise SystemExit(main())
