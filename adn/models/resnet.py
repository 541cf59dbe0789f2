"""ResNet ADN (timm's ResNet): every stage keeps its first ceil(n/2) blocks, the rest are skippable.

Norms switch only inside mandatory blocks (bn1..bn3); the stem and downsample norms stay single.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import timm
import torch
from timm.models.resnet import BasicBlock, ResNet
from torch import nn

from ..network import AdaptiveDepthMixin, adaptify, skippable, split_stage
from ..registry import register_model
from ._small import small_input_cfg


class ADNResNet(AdaptiveDepthMixin, ResNet):
    """timm ResNet with one skippable sub-path per stage."""

    def stage_segments(self) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        def stem_and_layer1(x: torch.Tensor) -> torch.Tensor:
            return self.layer1(self.maxpool(self.act1(self.bn1(self.conv1(x)))))

        return [stem_and_layer1, self.layer2, self.layer3, self.layer4, self.forward_head]


def _adaptify(model: ResNet, name: str) -> ADNResNet:
    for bit in range(4):
        layer = getattr(model, f"layer{bit + 1}")
        norms = ("bn1", "bn2", "bn3") if hasattr(layer[0], "bn3") else ("bn1", "bn2")
        setattr(model, f"layer{bit + 1}", skippable(split_stage(layer, bit, norms)))
    return adaptify(model, ADNResNet, name)


@register_model
def resnet50(pretrained: bool = False, **kwargs: Any) -> ADNResNet:
    """ResNet50-ADN: stages of 3, 4, 6, 3 bottlenecks, the last 1, 2, 3, 1 skippable."""
    return _adaptify(timm.create_model("resnet50", pretrained=pretrained, **kwargs), "resnet50")


@register_model
def resnet_mini(pretrained: bool = False, **kwargs: Any) -> ADNResNet:
    """A CIFAR-style residual CNN for 32x32 inputs on CPU: 3x3 stem, no max-pool, 2 basic blocks per stage."""
    if pretrained:
        raise ValueError("resnet_mini has no pretrained weights; train it, or pass checkpoint_path=.")
    kwargs = {"block": BasicBlock, "layers": (2, 2, 2, 2), "channels": (16, 32, 64, 128), **kwargs}
    width = kwargs["channels"][0]
    # timm sizes the stem to 64 channels unless it is "deep" (2 x stem_width); the 3x3 stem replaces it.
    model = ResNet(stem_type="deep", stem_width=width // 2, **kwargs)
    model.conv1 = nn.Conv2d(kwargs.get("in_chans", 3), width, 3, padding=1, bias=False)
    model.maxpool = nn.Identity()
    model.pretrained_cfg = small_input_cfg(model.num_classes, "fc")
    return _adaptify(model, "resnet_mini")



@register_model
def resnet_mini_deep(pretrained: bool = False, **kwargs: Any) -> ADNResNet:
    """resnet50's stage layout (3, 4, 6, 3) with resnet_mini's basic blocks and widths, for 32x32 on CPU.

    Its 7 skippable blocks (1, 2, 3, 1) make a block space as large as resnet50's (2^7), small enough
    to search exhaustively on a laptop.
    """
    return _rename(resnet_mini(pretrained, layers=(3, 4, 6, 3), **kwargs), "resnet_mini_deep")


def _rename(model: ADNResNet, name: str) -> ADNResNet:
    model.adn_name = name
    return model
