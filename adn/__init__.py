"""Adaptive Depth Networks: one network trained once whose depth is cut at test time by a skip mask."""

from . import models  # noqa: F401  (registers the families)
from .calibrate import calibrate_norms
from .complexity import count_flops, count_params
from .export import export_subnet
from .masks import BlockMask, SkipMask
from .network import AdaptiveDepthMixin, SkippableSequential
from .norms import SwitchableNorm
from .registry import create_model, list_models, register_model
from .runtime import DepthSelector, select_mask

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
