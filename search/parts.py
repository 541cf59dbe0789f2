"""The parts a skip mask includes or excludes, and the inputs each part sees.

A part is one block of a skippable stage (mandatory or skippable), or one module outside the
stages (stem, patch embedding, patch merging, final norm, head). Together they cover every
module the forward calls; what runs between them (reshapes, position embeddings) is the
remainder, attributed to the whole network. Latency tables hold one entry per part.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from adn import AdaptiveDepthMixin, SkippableSequential, SwitchableNorm, create_model, list_models


@functools.cache
def skeleton(name: str) -> nn.Module:
    """The ADN model ``name`` built on the meta device: its stages, blocks and input size, no weights, no compute."""
    if name not in list_models():
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}.")
    with torch.device("meta"):
        return create_model(name)


def default_resolution(name: str) -> int:
    return int(skeleton(name).pretrained_cfg["input_size"][-1])


@dataclass
class Part:
    """One unit of a latency table: ``skip_bit`` set when the part is dropped by that stage's bit,
    ``norm_bit`` set when its switchable norms follow a stage's bit (its cost may depend on it)."""

    name: str
    module: nn.Module = field(repr=False)
    skip_bit: int | None = None
    norm_bit: int | None = None
    args: tuple[Any, ...] = field(default=(), repr=False)
    kwargs: dict[str, Any] = field(default_factory=dict, repr=False)
    called: bool = False


def _norm_bit(name: str, module: nn.Module) -> int | None:
    bits = {m.bit for m in module.modules() if isinstance(m, SwitchableNorm)}
    if len(bits) > 1:
        raise ValueError(f"part {name!r} holds switchable norms of several stages {sorted(bits)}; split it.")
    return bits.pop() if bits else None


def model_parts(model: nn.Module) -> list[Part]:
    """The model's parts in module order: each block of each ``SkippableSequential``, and the top-most
    modules that hold no skippable stage."""
    if not isinstance(model, AdaptiveDepthMixin):
        raise TypeError(f"{type(model).__name__} is not an ADN model; build one with adn.create_model.")
    parts: list[Part] = []

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if isinstance(child, SkippableSequential):
                for i, (block, bit) in enumerate(zip(child, child.bits, strict=True)):
                    parts.append(Part(f"{full}.{i}", block, skip_bit=bit, norm_bit=_norm_bit(f"{full}.{i}", block)))
            elif any(isinstance(m, SkippableSequential) for m in child.modules()):
                visit(child, f"{full}.")
            else:
                parts.append(Part(full, child, norm_bit=_norm_bit(full, child)))

    visit(model, "")
    return parts


@torch.no_grad()
def capture_inputs(model: nn.Module, parts: list[Part], x: torch.Tensor) -> list[Part]:
    """Run the super-net once and keep each part's first call arguments; parts never called are dropped."""
    handles = []
    for part in parts:
        def hook(module: nn.Module, args: tuple, kwargs: dict, part: Part = part) -> None:
            if not part.called:
                part.args, part.kwargs, part.called = args, kwargs, True
        handles.append(part.module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        model(x, skip=None)
    finally:
        for h in handles:
            h.remove()
    return [p for p in parts if p.called]
