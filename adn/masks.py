"""Skip masks: one bit per skippable stage, written like ``"TTFF"``.

``T`` skips the skippable sub-path of that stage, ``F`` keeps it. ``FF..F`` is the super-net,
``TT..T`` the base-net (DESIGN.md section 1).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Union

MaskLike = Union["SkipMask", str, Sequence[bool], None]


class SkipMask(Sequence[bool]):
    """An immutable skip mask; parses strings and bool sequences, prints as ``TTFF``."""

    __slots__ = ("_bits",)

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

    @property
    def num_skipped(self) -> int:
        return sum(self._bits)

    def __len__(self) -> int:
        return len(self._bits)

    def __getitem__(self, index):  # type: ignore[override]
        return self._bits[index]

    def __iter__(self) -> Iterator[bool]:
        return iter(self._bits)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SkipMask):
            return self._bits == other._bits
        if isinstance(other, str):
            return str(self) == other.upper()
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._bits)

    def __str__(self) -> str:
        return "".join("T" if b else "F" for b in self._bits)

    def __repr__(self) -> str:
        return f"SkipMask('{self}')"


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
