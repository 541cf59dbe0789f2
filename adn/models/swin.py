"""Swin Transformer ADN (timm's SwinTransformer).

Stages of 2, 2, 6, 2 blocks, the last 1, 1, 3, 1 skippable. Both LayerNorms of mandatory blocks
switch, and so does the patch-merging norm in front of stage k, which follows bit k. As in the
official Swin-ADN, a mandatory block drops no path while its stage is skipped (the base-net
trains without stochastic depth); the rate is timm's and the official 0.1, linear over the blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import timm
import torch
from timm.models.swin_transformer import SwinTransformer
from torch import nn

from ..network import AdaptiveDepthMixin, adaptify, skippable, split_stage
from ..norms import make_kept_only, make_switchable
from ..registry import register_model


class ADNSwinTransformer(AdaptiveDepthMixin, SwinTransformer):
    """timm Swin with one skippable sub-path per stage."""

    channel_dim = -1

    def stage_segments(self) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        first, *rest = list(self.layers)
        return [lambda x: first(self.patch_embed(x)), *rest, lambda x: self.forward_head(self.norm(x))]


@register_model
def swin_t(pretrained: bool = False, **kwargs: Any) -> ADNSwinTransformer:
    """Swin-T-ADN at 224x224."""
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=pretrained, **kwargs)
    for bit, stage in enumerate(model.layers):
        if not isinstance(stage.downsample, nn.Identity):
            make_switchable(stage.downsample, ["norm"], bit)
        pairs = split_stage(stage.blocks, bit, ("norm1", "norm2"))
        for block, block_bit in pairs:
            if block_bit is None:
                make_kept_only(block, ("drop_path1", "drop_path2"), bit)
        stage.blocks = skippable(pairs)
    return adaptify(model, ADNSwinTransformer, "swin_t")
