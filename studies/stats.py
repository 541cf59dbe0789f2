"""Paired comparisons over seeds: the mean difference of two trainings that share a seed, its t-interval, and
the verdict on a claim at that number of seeds."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from scipy import stats

KINDS = ("superior", "non-inferior")
VERDICTS = ("holds", "does not hold", "undecided")


@dataclass(frozen=True)
class Paired:
    """``a - b`` per seed, their mean and the two-sided t-interval of the mean at ``confidence``."""

    differences: list[float]
    mean: float
    low: float
    high: float
    confidence: float

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def paired(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> Paired:
    """The paired difference of ``a`` and ``b`` (one value per seed, in the same seed order).

    With one seed the interval is unbounded: a single pair decides nothing.
    """
    if len(a) != len(b) or not a:
        raise ValueError(f"paired values need the same seeds on both sides, got {len(a)} and {len(b)}.")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}.")
    d = [float(x) - float(y) for x, y in zip(a, b, strict=True)]
    mean = statistics.fmean(d)
    if len(d) < 2:
        return Paired(d, mean, -math.inf, math.inf, confidence)
    half = float(stats.t.ppf((1 + confidence) / 2, len(d) - 1)) * statistics.stdev(d) / math.sqrt(len(d))
    return Paired(d, mean, mean - half, mean + half, confidence)


def verdict(p: Paired, kind: str, margin: float = 0.0) -> str:
    """Whether ``a`` beats ``b`` (``superior``: the interval lies above 0) or is at least as good up to ``margin``
    (``non-inferior``: the interval lies above ``-margin``); ``does not hold`` when the interval lies below the
    same bound (0 or ``-margin``); ``undecided`` when it contains it."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}.")
    bound = 0.0 if kind == "superior" else -margin
    if p.low > bound:
        return "holds"
    if p.high < bound:
        return "does not hold"
    return "undecided"
