"""``python -m adn.summary --model NAME``: parameters and GFLOPs of every skip mask of a model."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from tqdm import tqdm

from .complexity import MaskCost, count_params, mask_costs
from .registry import create_model, list_models


@dataclass(frozen=True)
class Summary:
    """Every mask's cost, plus the parameters the super-net stores (both norms of each pair)."""

    model: str
    resolution: int
    stored_params: int
    costs: list[MaskCost]

    def rows(self) -> list[dict[str, object]]:
        return [
            {"mask": c.mask, "params_m": round(c.params_m, 6), "gflops": round(c.gflops, 6),
             "stored_params_m": round(self.stored_params / 1e6, 6), "resolution": self.resolution}
            for c in self.costs
        ]

    def table(self) -> str:
        width = max(4, len(self.costs[0].mask))
        ref = self.costs[0]
        lines = [
            f"{self.model} at {self.resolution}x{self.resolution}: {self.stored_params / 1e6:.2f} M parameters "
            f"stored (both norms of each switchable pair), {len(ref.mask)} skippable stages, {len(self.costs)} masks",
            f"{'mask':<{width}}  params (M)  GFLOPs  GFLOPs / {ref.mask}",
        ]
        for c in self.costs:
            lines.append(f"{c.mask:<{width}}  {c.params_m:>10.2f}  {c.gflops:>6.2f}  {c.flops / ref.flops:>.3f}")
        return "\n".join(lines)


def summarize(name: str, resolution: int | None = None, progress: bool = False) -> Summary:
    """Cost of every mask of model ``name`` at ``resolution`` (default: the model's own input size)."""
    model = create_model(name)
    default = model.pretrained_cfg["input_size"][-1]
    if resolution is not None and resolution != default and model.pretrained_cfg.get("fixed_input_size"):
        model = create_model(name, img_size=resolution)  # ViT/Swin size their position tables at build time
    resolution = resolution or default
    masks = tqdm(model.masks(), desc=f"{name} masks", disable=None if progress else True, file=sys.stderr,
                 leave=False)
    return Summary(name, resolution, count_params(model), mask_costs(model, resolution, masks))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m adn.summary",
        description="List every skip mask of an ADN model with its parameters (M) and GFLOPs "
        "(multiply-accumulates at batch 1, counting convolutions, linear layers and attention matmuls, "
        "plus one per element of each norm and activation). T skips a stage's skippable sub-path.",
    )
    parser.add_argument("--model", required=True, help=f"one of: {', '.join(list_models())}")
    parser.add_argument("--resolution", type=int, default=None, help="input side in pixels (default: the model's)")
    parser.add_argument("--json", action="store_true",
                        help="print a JSON list of objects with keys mask, params_m, gflops (and stored_params_m)")
    args = parser.parse_args(argv)
    if args.model not in list_models():
        parser.error(f"unknown model {args.model!r}; choose one of: {', '.join(list_models())}.")
    if args.resolution is not None and not 16 <= args.resolution <= 4096:
        parser.error(f"--resolution {args.resolution} is out of range; give a side between 16 and 4096 pixels.")
    try:
        summary = summarize(args.model, args.resolution, progress=not args.json)
    except (ValueError, AssertionError, RuntimeError) as err:
        parser.exit(2, f"{parser.prog}: error: {args.model} cannot run at --resolution {args.resolution}: {err}\n")
    print(json.dumps(summary.rows(), indent=2) if args.json else summary.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
