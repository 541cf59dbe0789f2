"""What the 32x32 CPU variants share: their timm-style data config."""

from __future__ import annotations

from typing import Any


def small_input_cfg(num_classes: int, classifier: str) -> dict[str, Any]:
    """timm-style data config for 32x32 inputs, so ``timm.data.resolve_data_config(model=...)`` works."""
    return {
        "num_classes": num_classes,
        "classifier": classifier,
        "input_size": (3, 32, 32),
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
    }
