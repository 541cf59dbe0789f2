"""What the tests know of each family (from the paper via docs/design.md, not from the code) and shared helpers."""

from __future__ import annotations

import torch
from torch import nn

# The split each family must have, written from docs/design.md, "The split per family" (not from the code under test):
# blocks per skippable stage, how many of them are skippable, and the module path of block i of stage s.
SPLITS = {
    "resnet50": ((3, 4, 6, 3), (1, 2, 3, 1), lambda s, i: f"layer{s + 1}.{i}"),
    "mobilenet_v2": ((2, 3, 4, 3, 3), (1, 1, 2, 1, 1), lambda s, i: f"blocks.{s + 1}.{i}"),
    "vit_b16": ((3, 3, 3, 3), (1, 1, 1, 1), lambda s, i: f"blocks.{3 * s + i}"),
    "swin_t": ((2, 2, 6, 2), (1, 1, 3, 1), lambda s, i: f"layers.{s}.blocks.{i}"),
    "resnet_mini": ((2, 2, 2, 2), (1, 1, 1, 1), lambda s, i: f"layer{s + 1}.{i}"),
    "vit_mini": ((2, 2, 2, 2), (1, 1, 1, 1), lambda s, i: f"blocks.{2 * s + i}"),
    "resnet_mini_deep": ((3, 4, 6, 3), (1, 2, 3, 1), lambda s, i: f"layer{s + 1}.{i}"),
}
PAPER_MODELS = ("resnet50", "mobilenet_v2", "vit_b16", "swin_t")
ALL_MODELS = tuple(SPLITS)


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every norm (each half of each pair separately) random affine weights and running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model


def resolution(model: nn.Module) -> int:
    return model.pretrained_cfg["input_size"][-1]
