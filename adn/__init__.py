"""Adaptive Depth Networks: one network trained once whose depth is cut at test time by a skip mask."""

from . import models  # noqa: F401  (registers the families)
from .masks import SkipMask
from .network import AdaptiveDepthMixin, SkippableSequential
from .norms import SwitchableNorm
from .registry import create_model, list_models, register_model

__all__ = [
    "AdaptiveDepthMixin",
    "SkipMask",
    "SkippableSequential",
    "SwitchableNorm",
    "create_model",
    "list_models",
    "register_model",
]
