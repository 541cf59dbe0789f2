"""MobileNetV2 ADN (timm's ``mobilenetv2_100``).

The five inverted-residual stages with at least two blocks (2, 3, 4, 3, 3) are the skippable
stages. Norms outside them switch too: the stem and the first (single-block) stage follow bit 1,
the last (single-block) stage and the final 1x1 conv follow bit 5 (docs/design.md, "The split per family").
Dropout 0.2 before the classifier, as the official model (torchvision's) has; timm's default is 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import timm
import torch
from timm.models.efficientnet import EfficientNet
from torch import nn

from ..network import AdaptiveDepthMixin, SkippableSequential, adaptify, skippable, split_stage
from ..norms import make_switchable
from ..registry import register_model


class ADNMobileNetV2(AdaptiveDepthMixin, EfficientNet):
    """timm MobileNetV2 with one skippable sub-path in each of its five multi-block stages."""

    def stage_segments(self) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        segments: list[Callable[[torch.Tensor], torch.Tensor]] = []
        pending: list[nn.Module] = [self.conv_stem, self.bn1]
        for stage in self.blocks:
            pending.append(stage)
            if isinstance(stage, SkippableSequential):  # single-block stages join the next skippable one
                segments.append(nn.Sequential(*pending))
                pending = []
        tail = nn.Sequential(*pending, self.conv_head, self.bn2)
        return [*segments, lambda x: self.forward_head(tail(x))]


def _block_norms(block: Any) -> tuple[str, ...]:
    return tuple(n for n in ("bn1", "bn2", "bn3") if hasattr(block, n))


@register_model
def mobilenet_v2(pretrained: bool = False, **kwargs: Any) -> ADNMobileNetV2:
    """MobileNetV2-ADN, width 1.0."""
    kwargs.setdefault("drop_rate", 0.2)
    model = timm.create_model("mobilenetv2_100", pretrained=pretrained, **kwargs)
    stages = list(model.blocks)
    multi = [i for i, stage in enumerate(stages) if len(stage) >= 2]
    first, last = multi[0], multi[-1]
    make_switchable(model, ["bn1"], 0)
    for i in range(first):
        for block in stages[i]:
            make_switchable(block, _block_norms(block), 0)
    for i in range(last + 1, len(stages)):
        for block in stages[i]:
            make_switchable(block, _block_norms(block), len(multi) - 1)
    make_switchable(model, ["bn2"], len(multi) - 1)
    for bit, i in enumerate(multi):
        model.blocks[i] = skippable(split_stage(stages[i], bit, _block_norms(stages[i][0])))
    return adaptify(model, ADNMobileNetV2, "mobilenet_v2")
