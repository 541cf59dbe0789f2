"""Parameters and FLOPs of each sub-network.

FLOPs follow the paper's convention (docs/design.md, "Costs per mask"): multiply-accumulates at batch 1,
counting convolutions, linear layers and every matmul including attention (fused kernels too),
plus one per element for each normalization and activation. Softmax, residual adds and pooling
are not counted. The count runs the model under PyTorch's ``FlopCounterMode``, so it sees exactly
the ops the chosen mask executes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from .masks import BlockMask, MaskLike, SkipMask, stage_view
from .network import AdaptiveDepthMixin, SkippableSequential
from .norms import SwitchableNorm

aten = torch.ops.aten

_NORM_OPS = (
    aten.native_batch_norm,
    aten._native_batch_norm_legit,
    aten._native_batch_norm_legit_no_training,
    aten.native_layer_norm,
    aten.native_group_norm,
)
_ACT_OPS = (
    aten.relu, aten.relu_, aten.hardtanh, aten.hardtanh_, aten.gelu, aten.gelu_, aten.silu, aten.silu_,
    aten.sigmoid, aten.sigmoid_, aten.hardswish, aten.hardswish_, aten.hardsigmoid, aten.hardsigmoid_,
)


def _per_element(input_shape: torch.Size, *args: object, **kwargs: object) -> int:
    # FlopCounterMode counts a MAC as 2 FLOPs; 2 here makes one element count as one MAC.
    return 2 * math.prod(input_shape)


def _cpu_flash_attention(query_shape, key_shape, value_shape, *args: object, **kwargs: object) -> int:
    # PyTorch's counter has no formula for the CPU flash-attention kernel; it is the same matmuls.
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_EXTRA_FORMULAS = {
    **{op: _per_element for op in _NORM_OPS + _ACT_OPS},
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention,
}


@dataclass(frozen=True)
class MaskCost:
    """What one sub-network costs: active parameters and GFLOPs (multiply-accumulates)."""

    mask: str
    params: int
    flops: int

    @property
    def params_m(self) -> float:
        return self.params / 1e6

    @property
    def gflops(self) -> float:
        return self.flops / 1e9


def count_params(model: nn.Module, mask: MaskLike = None) -> int:
    """Parameters the sub-network of ``mask`` uses: kept blocks, and one norm of each switchable pair.

    ``mask=None`` on a plain module, or ``count_params(model)`` of an ADN's stored weights, is
    ``sum(p.numel() for p in model.parameters())``; with a mask only the executed parts count.
    """
    if mask is None or not isinstance(model, AdaptiveDepthMixin):
        return sum(p.numel() for p in model.parameters())
    return _active_params(model, model.parse_mask(mask))


def _active_params(module: nn.Module, mask: SkipMask | BlockMask) -> int:
    if isinstance(module, SwitchableNorm):
        return _active_params(module.norms[int(stage_view(mask)[module.bit])], mask)
    total = sum(p.numel() for p in module.parameters(recurse=False))
    children = module.kept_blocks(mask) if isinstance(module, SkippableSequential) else module.children()
    return total + sum(_active_params(child, mask) for child in children)


@torch.no_grad()
def count_flops(model: nn.Module, mask: MaskLike = None, resolution: int = 224) -> int:
    """Multiply-accumulates of one forward at batch 1 and ``resolution`` x ``resolution``, under ``mask``."""
    param = next(model.parameters())
    x = torch.zeros(1, getattr(model, "in_chans", 3), resolution, resolution, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter:
            if isinstance(model, AdaptiveDepthMixin):
                model(x, skip=mask)
            else:
                model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def mask_costs(model: nn.Module, resolution: int = 224, masks: Iterable[MaskLike] | None = None) -> list[MaskCost]:
    """Params and FLOPs of ``masks`` (default: every mask, super-net first); the model keeps its current mask."""
    if not isinstance(model, AdaptiveDepthMixin):
        raise TypeError(f"{type(model).__name__} is not an ADN model; build one with adn.create_model.")
    previous = model.skip_mask
    costs = []
    try:
        for m in model.masks() if masks is None else masks:
            mask = model.parse_mask(m)
            costs.append(MaskCost(str(mask), count_params(model, mask), count_flops(model, mask, resolution)))
        return costs
    finally:
        model.set_skip(previous)
