"""Skip masks: one bit per skippable stage, written like ``"TTFF"``.

``T`` skips the skippable sub-path of that stage, ``F`` keeps it. ``FF..F`` is the super-net,
``TT..T`` the base-net (docs/design.md, "Stages, sub-paths and masks"). A ``BlockMask`` has one bit per skippable block
instead, so a stage's sub-path can be cut part way (the search's ``--space blocks``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Union

MaskLike = Union["SkipMask", "BlockMask", str, Sequence[bool], None]


class _Bits(Sequence[bool]):
    """Immutable bits that print as T/F letters."""

    __slots__ = ("_bits",)
    _bits: tuple[bool, ...]

    @property
    def num_skipped(self) -> int:
        return sum(self._bits)

    def __len__(self) -> int:
        return len(self._bits)

    def __getitem__(self, index):  # type: ignore[override]
        return self._bits[index]

    def __iter__(self) -> Iterator[bool]:
        return iter(self._bits)

    def __str__(self) -> str:
        return "".join("T" if b else "F" for b in self._bits)


class SkipMask(_Bits):
    """An immutable skip mask; parses strings and bool sequences, prints as ``TTFF``."""

    __slots__ = ()

    def __init__(self, bits: Sequence[bool]) -> None:
        self._bits = tuple(bool(b) for b in bits)

    @classmethod
    def parse(cls, value: MaskLike, num_stages: int, model_name: str = "this model") -> SkipMask:
        """Turn a string, bool sequence or None (the super-net) into a mask of ``num_stages`` bits."""
        if value is None:
            return cls.super_net(num_stages)
        if isinstance(value, SkipMask):
            bits = value._bits
        elif isinstance(value, str):
            letters = value.strip().upper()
            if not letters or set(letters) - {"T", "F"}:
                raise _bad_mask(value, num_stages, model_name)
            bits = tuple(c == "T" for c in letters)
        elif isinstance(value, Sequence) or _is_array(value):
            items = list(value)
            if not all(_is_bool(b) for b in items):
                raise _bad_mask(value, num_stages, model_name)
            bits = tuple(bool(b) for b in items)
        else:
            raise _bad_mask(value, num_stages, model_name)
        if len(bits) != num_stages:
            raise _bad_mask(value, num_stages, model_name)
        return cls(bits)

    @classmethod
    def super_net(cls, num_stages: int) -> SkipMask:
        return cls((False,) * num_stages)

    @classmethod
    def base_net(cls, num_stages: int) -> SkipMask:
        return cls((True,) * num_stages)

    @classmethod
    def all(cls, num_stages: int) -> Iterator[SkipMask]:
        """Every mask, from the super-net ``FF..F`` to the base-net ``TT..T``, in binary order."""
        for bits in itertools.product((False, True), repeat=num_stages):
            yield cls(bits)


    def __eq__(self, other: object) -> bool:
        if isinstance(other, SkipMask):
            return self._bits == other._bits
        if isinstance(other, str):
            return str(self) == other.upper()
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._bits)

    def __repr__(self) -> str:
        return f"SkipMask('{self}')"


class BlockMask(_Bits):
    """One bit per skippable block, in forward order; ``stages[i]`` is the stage bit of block ``i``.

    Norm rule: the switchable norms of stage k take their skipped half only when every skippable
    block of stage k is dropped (``stage_mask()``). The kept half was trained with the stage's
    refining blocks after the mandatory ones, the skipped half with none; a stage that keeps any
    of its refining blocks is closer to the first case. With whole stages dropped, a block mask
    computes exactly what the stage mask ``stage_mask()`` computes.
    """

    __slots__ = ("stages",)

    def __init__(self, bits: Sequence[bool], stages: Sequence[int]) -> None:
        self._bits = tuple(bool(b) for b in bits)
        self.stages = tuple(stages)
        if len(self._bits) != len(self.stages):
            raise ValueError(f"a block mask needs one bit per skippable block ({len(self.stages)}), got {len(bits)}.")

    @classmethod
    def parse(cls, value: MaskLike, stages: Sequence[int], model_name: str = "this model") -> BlockMask:
        """A string of T/F per skippable block, a bool sequence, a stage mask (expanded), or None (keep all)."""
        stages = tuple(stages)
        if value is None:
            return cls((False,) * len(stages), stages)
        if isinstance(value, BlockMask):
            if value.stages != stages:
                raise _bad_blocks(value, stages, model_name)
            return value
        if isinstance(value, SkipMask):
            return cls.from_stage_mask(value, stages)
        if isinstance(value, str):
            letters = value.strip().upper()
            if not letters or set(letters) - {"T", "F"} or len(letters) != len(stages):
                raise _bad_blocks(value, stages, model_name)
            return cls(tuple(c == "T" for c in letters), stages)
        items = list(value) if isinstance(value, Sequence) or _is_array(value) else None
        if items is None or len(items) != len(stages) or not all(_is_bool(b) for b in items):
            raise _bad_blocks(value, stages, model_name)
        return cls(tuple(bool(b) for b in items), stages)

    @classmethod
    def from_stage_mask(cls, mask: SkipMask, stages: Sequence[int]) -> BlockMask:
        """Every skippable block of a skipped stage dropped: the same sub-network as ``mask``."""
        return cls(tuple(mask[s] for s in stages), stages)

    @classmethod
    def all(cls, stages: Sequence[int]) -> Iterator[BlockMask]:
        """All 2^B block masks, from keeping every block to dropping every one, in binary order."""
        for bits in itertools.product((False, True), repeat=len(stages)):
            yield cls(bits, stages)

    def stage_mask(self) -> SkipMask:
        """The stages whose whole skippable sub-path is dropped: where the switchable norms switch."""
        num_stages = max(self.stages) + 1 if self.stages else 0
        return SkipMask(tuple(all(b for b, s in zip(self._bits, self.stages, strict=True) if s == k)
                              for k in range(num_stages)))


    def __eq__(self, other: object) -> bool:
        if isinstance(other, BlockMask):
            return (self._bits, self.stages) == (other._bits, other.stages)
        if isinstance(other, str):
            return str(self) == other.upper()
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self._bits, self.stages))

    def __repr__(self) -> str:
        return f"BlockMask('{self}')"


def parse_any(value: MaskLike, num_stages: int, block_stages: Sequence[int],
              model_name: str = "this model") -> SkipMask | BlockMask:
    """A stage mask (S letters or bools), or a block mask (a ``BlockMask``, or one letter per skippable block).

    Where a model has one skippable block per stage both readings are the same sub-network.
    """
    if isinstance(value, BlockMask) or (
            isinstance(value, str) and len(value.strip()) == len(block_stages) != num_stages):
        return BlockMask.parse(value, block_stages, model_name)
    return SkipMask.parse(value, num_stages, model_name)


def stage_view(mask: SkipMask | BlockMask) -> SkipMask:
    """The per-stage mask the switchable norms follow."""
    return mask.stage_mask() if isinstance(mask, BlockMask) else mask


def _bad_blocks(value: object, stages: Sequence[int], model_name: str) -> ValueError:
    return ValueError(f"{model_name} has {len(stages)} skippable blocks, so a block mask is {len(stages)} letters of "
                      f"T (drop) or F (keep), or {len(stages)} bools; got {value!r}.")


def _is_bool(value: object) -> bool:
    # Accepts Python, NumPy and 0-d torch booleans without importing either library.
    return isinstance(value, bool) or str(getattr(value, "dtype", "")).endswith("bool")


def _is_array(value: object) -> bool:
    return hasattr(value, "__len__") and hasattr(value, "dtype")


def _bad_mask(value: object, num_stages: int, model_name: str) -> ValueError:
    example = "T" * (num_stages // 2) + "F" * (num_stages - num_stages // 2)
    return ValueError(
        f"{model_name} has {num_stages} skippable stages, so a skip mask is {num_stages} letters of "
        f"T (skip) or F (keep), like {example!r}, or {num_stages} bools; got {value!r}."
    )
