"""Adaptive depth on top of a timm model: skippable block sequences and the mask-driven forward.

A family file builds the plain timm model, replaces each stage's block sequence by a
``SkippableSequential``, makes the norms of mandatory blocks switchable, and calls ``adaptify``.
The model stays an instance of its timm class (a subclass of it), so timm's state-dict keys,
``forward_features`` and data config keep working; only ``forward`` gains the ``skip`` argument.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .masks import BlockMask, MaskLike, SkipMask, parse_any, stage_view
from .norms import KeptOnly, SwitchableNorm, make_switchable


class SkippableSequential(nn.Sequential):
    """Blocks run in order; block ``i`` is left out when stage ``bits[i]`` is skipped (``None``: mandatory)."""

    def __init__(self, blocks: Iterable[nn.Module], bits: Sequence[int | None]) -> None:
        super().__init__(*blocks)
        if len(bits) != len(self):
            raise ValueError(f"got {len(bits)} stage bits for {len(self)} blocks; give one per block.")
        self.bits = tuple(bits)
        self.keep = (True,) * len(self.bits)
        self.grad_checkpointing = False
        # A stage ends after its last (skippable) block; its output is taken there whether that block runs or not.
        self.stage_ends = {i: bit for bit in {b for b in bits if b is not None}
                           for i in [max(j for j, b in enumerate(bits) if b == bit)]}
        self.recorder: dict[int, torch.Tensor] | None = None
        self.block_offset = 0  # index of this container's first skippable block in the model (set by adaptify)

    def _keep_for(self, mask: SkipMask | BlockMask) -> tuple[bool, ...]:
        if isinstance(mask, BlockMask):
            dropped = iter(mask[self.block_offset :])
            return tuple(True if bit is None else not next(dropped) for bit in self.bits)
        return tuple(bit is None or not mask[bit] for bit in self.bits)

    def set_skip(self, mask: SkipMask | BlockMask) -> None:
        self.keep = self._keep_for(mask)

    def kept_blocks(self, mask: SkipMask | BlockMask) -> list[nn.Module]:
        """The blocks ``mask`` runs, in order."""
        return [block for block, keep in zip(self, self._keep_for(mask), strict=True) if keep]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_range(x, 0, len(self))

    def forward_range(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Run blocks ``start`` up to ``stop`` (exclusive) under the current mask."""
        for i in range(start, stop):
            block, keep = self[i], self.keep[i]
            if keep:
                if self.grad_checkpointing and torch.is_grad_enabled():
                    x = checkpoint(block, x, use_reentrant=False)
                else:
                    x = block(x)
            if self.recorder is not None and i in self.stage_ends:
                self.recorder[self.stage_ends[i]] = x
        return x


def split_stage(
    blocks: Iterable[nn.Module], bit: int, norm_names: Iterable[str]
) -> list[tuple[nn.Module, int | None]]:
    """Split one stage as the paper does: the first ceil(n/2) blocks are mandatory, the rest skippable.

    The named norms of the mandatory blocks become switchable pairs following ``bit``.
    Returns (block, bit or None) pairs for ``SkippableSequential``.
    """
    blocks = list(blocks)
    if len(blocks) < 2:
        raise ValueError(f"stage {bit + 1} has {len(blocks)} block(s); a skippable stage needs at least 2.")
    num_mandatory = math.ceil(len(blocks) / 2)
    norm_names = tuple(norm_names)
    for block in blocks[:num_mandatory]:
        make_switchable(block, norm_names, bit)
    return [(b, None if i < num_mandatory else bit) for i, b in enumerate(blocks)]


def skippable(pairs: Iterable[tuple[nn.Module, int | None]]) -> SkippableSequential:
    """Build a ``SkippableSequential`` from ``split_stage`` output (one or more stages concatenated)."""
    pairs = list(pairs)
    return SkippableSequential([b for b, _ in pairs], [bit for _, bit in pairs])


class AdaptiveDepthMixin:
    """Mixed in front of a timm model class: ``model(x, skip="TTFF")`` runs that sub-network.

    Switching sets a flag on each stage container and switchable norm, and only when the mask
    changes: no weights move and nothing is rebuilt. ``forward_features``/``forward_head`` use
    the mask of the last ``forward`` or ``set_skip`` call. One mask at a time per model object:
    serve different masks concurrently from ``export_subnet`` copies.
    """

    adn_name: str
    num_stages: int
    #: the channel dimension of stage outputs (NCHW CNNs: 1; token and NHWC transformers: -1)
    channel_dim: int = 1
    _skippable: tuple[SkippableSequential, ...]
    _switchable_norms: tuple[SwitchableNorm, ...]
    _kept_only: tuple[KeptOnly, ...]
    #: the stage bit of each skippable block, in forward order (one entry per bit of a ``BlockMask``)
    block_stages: tuple[int, ...]
    _skip_mask: SkipMask | BlockMask

    def forward(self, x: torch.Tensor, skip: MaskLike = None) -> torch.Tensor:
        self.set_skip(skip)
        return super().forward(x)  # type: ignore[misc]

    def stage_segments(self) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        """The forward cut into S + 1 functions run one after the other under the current mask.

        Segment k < S ends with stage k's last block and depends only on mask bits 0..k (of a
        block mask: the blocks of stages 0..k); the last segment is the head. Masks that agree on
        stages 0..k can therefore share the first k + 1 segments (``search.accuracy``).
        """
        raise NotImplementedError(f"{type(self).__name__} does not define its stage segments.")

    def parse_mask(self, skip: MaskLike) -> SkipMask | BlockMask:
        """A stage mask (S letters), or a block mask (one letter per skippable block, or a ``BlockMask``)."""
        return parse_any(skip, self.num_stages, self.block_stages, self.adn_name)

    def set_skip(self, skip: MaskLike) -> SkipMask | BlockMask:
        """Select the sub-network used by later forwards; returns the parsed mask."""
        mask = self.parse_mask(skip)
        if mask != self._skip_mask:
            self._switch_to(mask)
        return mask

    def _switch_to(self, mask: SkipMask | BlockMask) -> None:
        stages = stage_view(mask)
        for switch in (*self._switchable_norms, *self._kept_only):
            switch.skipped = stages[switch.bit]
        for container in self._skippable:
            container.set_skip(mask)
        self._skip_mask = mask

    @property
    def skip_mask(self) -> SkipMask | BlockMask:
        return self._skip_mask

    def masks(self) -> list[SkipMask]:
        """All 2^S masks, super-net first, base-net last."""
        return list(SkipMask.all(self.num_stages))

    @contextlib.contextmanager
    def record_stage_outputs(self) -> Iterator[dict[int, torch.Tensor]]:
        """Collect each skippable stage's output (keyed by stage bit) during forwards in this block.

        A skipped stage's output is that of its mandatory sub-path, so the super-net's and a
        sub-network's outputs of the same stage can be compared (intermediate-feature distillation).
        """
        outputs: dict[int, torch.Tensor] = {}
        for container in self._skippable:
            container.recorder = outputs
        try:
            yield outputs
        finally:
            for container in self._skippable:
                container.recorder = None

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        # timm's own checkpointing iterates the raw blocks and would ignore the mask.
        for container in self._skippable:
            container.grad_checkpointing = enable


M = TypeVar("M", bound=nn.Module)


def adaptify(model: nn.Module, cls: type[M], name: str) -> M:
    """Turn a timm model whose stages were made skippable into the ADN class ``cls`` (a subclass of its own)."""
    if not issubclass(cls, type(model)) or not issubclass(cls, AdaptiveDepthMixin):
        raise TypeError(f"{cls.__name__} must subclass AdaptiveDepthMixin and {type(model).__name__}.")
    model.__class__ = cls
    model.adn_name = name
    model._skippable = tuple(m for m in model.modules() if isinstance(m, SkippableSequential))
    model._switchable_norms = tuple(m for m in model.modules() if isinstance(m, SwitchableNorm))
    model._kept_only = tuple(m for m in model.modules() if isinstance(m, KeptOnly))
    bits = {b for c in model._skippable for b in c.bits if b is not None}
    if not bits or bits != set(range(max(bits) + 1)):
        raise ValueError(f"{name}: skippable stage bits must be 0..S-1 with none missing, got {sorted(bits)}.")
    model.num_stages = len(bits)
    offset = 0
    for container in model._skippable:
        container.block_offset = offset
        offset += sum(bit is not None for bit in container.bits)
    model.block_stages = tuple(b for c in model._skippable for b in c.bits if b is not None)
    model._switch_to(SkipMask.super_net(model.num_stages))
    return model


def container_segments(container: SkippableSequential) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """One function per stage held in ``container`` (several stages in one block list, as in ViT)."""
    ends = sorted(container.stage_ends)
    starts = [0] + [e + 1 for e in ends[:-1]]
    return [lambda x, a=a, b=b: container.forward_range(x, a, b + 1) for a, b in zip(starts, ends, strict=True)]


def plain_class(model: nn.Module) -> type[nn.Module]:
    """The timm class an ADN model was built from (what an exported sub-network is an instance of)."""
    return next(c for c in type(model).__mro__ if not issubclass(c, AdaptiveDepthMixin))
