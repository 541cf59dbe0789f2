"""Adaptive Depth Networks: one network trained once whose depth is cut at test time by a skip mask.

The names below load on first use (PEP 562), so ``import adn.masks`` does not import torch and timm.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "AdaptiveDepthMixin": "network",
    "BlockMask": "masks",
    "DepthSelector": "runtime",
    "SkipMask": "masks",
    "SkippableSequential": "network",
    "SwitchableNorm": "norms",
    "calibrate_norms": "calibrate",
    "count_flops": "complexity",
    "count_params": "complexity",
    "create_model": "registry",
    "export_subnet": "export",
    "list_models": "registry",
    "register_model": "registry",
    "select_mask": "runtime",
}

__all__ = [
    "AdaptiveDepthMixin",
    "BlockMask",
    "DepthSelector",
    "SkipMask",
    "SkippableSequential",
    "SwitchableNorm",
    "calibrate_norms",
    "count_flops",
    "count_params",
    "create_model",
    "export_subnet",
    "list_models",
    "register_model",
    "select_mask",
]

if TYPE_CHECKING:
    from .calibrate import calibrate_norms
    from .complexity import count_flops, count_params
    from .export import export_subnet
    from .masks import BlockMask, SkipMask
    from .network import AdaptiveDepthMixin, SkippableSequential
    from .norms import SwitchableNorm
    from .registry import create_model, list_models, register_model
    from .runtime import DepthSelector, select_mask


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'adn' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
