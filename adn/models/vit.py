"""Vision Transformer ADN (timm's VisionTransformer).

The encoder blocks form 4 equal stages (ViT-b/16: 4 x 3); the last ceil-half of each stage is
skippable (one block of three). Both LayerNorms of every mandatory block switch; the final norm is single.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from ..network import AdaptiveDepthMixin, adaptify, container_segments, skippable, split_stage
from ..registry import register_model
from ._small import small_input_cfg


class ADNVisionTransformer(AdaptiveDepthMixin, VisionTransformer):
    """timm ViT whose encoder is cut into stages with one skippable sub-path each."""

    channel_dim = -1

    def stage_segments(self) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        first, *rest = container_segments(self.blocks)

        def embed_and_stage1(x: torch.Tensor) -> torch.Tensor:
            return first(self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x)))))

        return [embed_and_stage1, *rest, lambda x: self.forward_head(self.norm(x))]


def _adaptify(model: VisionTransformer, name: str, num_stages: int = 4) -> ADNVisionTransformer:
    blocks = list(model.blocks)
    if len(blocks) % num_stages:
        raise ValueError(f"{name}: depth {len(blocks)} does not split into {num_stages} equal stages.")
    per_stage = len(blocks) // num_stages
    pairs = []
    for bit in range(num_stages):
        pairs += split_stage(blocks[bit * per_stage : (bit + 1) * per_stage], bit, ("norm1", "norm2"))
    model.blocks = skippable(pairs)
    return adaptify(model, ADNVisionTransformer, name)


@register_model
def vit_b16(pretrained: bool = False, **kwargs: Any) -> ADNVisionTransformer:
    """ViT-b/16-ADN at 224x224: 12 blocks as 4 stages of 3, the last block of each skippable."""
    return _adaptify(timm.create_model("vit_base_patch16_224", pretrained=pretrained, **kwargs), "vit_b16")


@register_model
def vit_mini(pretrained: bool = False, **kwargs: Any) -> ADNVisionTransformer:
    """A small ViT for 32x32 inputs on CPU: 4x4 patches, width 128, 8 blocks as 4 stages of 2."""
    if pretrained:
        raise ValueError("vit_mini has no pretrained weights; train it, or pass checkpoint_path=.")
    kwargs = {"img_size": 32, "patch_size": 4, "embed_dim": 128, "depth": 8, "num_heads": 4, "mlp_ratio": 2.0,
              **kwargs}
    model = VisionTransformer(**kwargs)
    model.pretrained_cfg = small_input_cfg(model.num_classes, "head")
    return _adaptify(model, "vit_mini")
