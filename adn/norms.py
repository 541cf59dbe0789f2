"""Switchable normalization: one norm per mode of its stage (kept or skipped).

The base-net sees different feature statistics than the super-net, so every norm in a
mandatory block has two copies (docs/design.md, "Switchable norms"). Switching is an attribute flip.
``KeptOnly`` follows a stage bit the same way for a regulariser that only the kept mode uses.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn


class SwitchableNorm(nn.Module):
    """Two copies of a norm: ``norms[0]`` when stage ``bit`` is kept, ``norms[1]`` when it is skipped."""

    def __init__(self, norm: nn.Module, bit: int) -> None:
        super().__init__()
        self.norms = nn.ModuleList([norm, copy.deepcopy(norm)])
        self.bit = bit
        self.skipped = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norms[1](x) if self.skipped else self.norms[0](x)

    def extra_repr(self) -> str:
        return f"bit={self.bit}"


def make_switchable(module: nn.Module, names: Iterable[str], bit: int) -> None:
    """Replace the named norm submodules of ``module`` (dotted paths) by switchable pairs that follow ``bit``.

    The current weights go into both halves, so a pretrained norm starts both modes.
    """
    for name in names:
        parent, child = _parent(module, name)
        norm = getattr(parent, child)
        if isinstance(norm, SwitchableNorm):
            raise ValueError(f"{name} is already switchable; each norm follows one stage bit.")
        setattr(parent, child, SwitchableNorm(norm, bit))


class KeptOnly(nn.Module):
    """A module that runs while stage ``bit`` is kept and is the identity while it is skipped.

    The official Swin-ADN turns stochastic depth off in the mandatory blocks of a skipped stage
    (its ``SwinTransformerBlock.forward``, "No stochastic depths for base-net"); wrapping their
    ``DropPath`` in this does the same. It holds no tensors, so state-dict keys do not change.
    """

    def __init__(self, module: nn.Module, bit: int) -> None:
        super().__init__()
        self.module = module
        self.bit = bit
        self.skipped = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.skipped else self.module(x)

    def extra_repr(self) -> str:
        return f"bit={self.bit}"


def make_kept_only(module: nn.Module, names: Iterable[str], bit: int) -> None:
    """Wrap the named submodules of ``module`` in ``KeptOnly`` following ``bit``."""
    for name in names:
        parent, child = _parent(module, name)
        setattr(parent, child, KeptOnly(getattr(parent, child), bit))


def _parent(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The submodule holding dotted path ``name``, and the attribute name under it."""
    parent_name, _, child = name.rpartition(".")
    return (module.get_submodule(parent_name) if parent_name else module), child


def copy_kept_norms(model: nn.Module) -> nn.Module:
    """Give every switchable norm's skipped-mode copy its kept-mode values: a plain network cut naively.

    A network trained without ADN (a vanilla run) never runs a skipped mask, so its skipped-mode
    copies hold their initial values; a plain network has one set of norms, the kept one.
    """
    for module in model.modules():
        if isinstance(module, SwitchableNorm):
            module.norms[1].load_state_dict(module.norms[0].state_dict())
    return model
