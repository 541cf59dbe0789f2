"""Pick the sub-network to run for a latency budget, from a Pareto file written by ``search.pareto``.

Serving code that adapts depth to load keeps one ``DepthSelector`` and asks it for a mask
whenever the budget changes; switching the model to that mask is a flag flip
(``model.set_skip(mask)``), so this can run per request.
"""

from __future__ import annotations

import bisect
import json
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class FrontPoint:
    mask: str
    acc1: float
    latency_ms: float


class DepthSelector:
    """The Pareto front of one model on one target, sorted by latency; ``select(budget_ms)`` -> mask.

    ``model`` and ``target`` say what the front was searched for, when the file says it.
    """

    def __init__(self, front: list[FrontPoint], model: str | None = None, target: str | None = None) -> None:
        if not front:
            raise ValueError("the Pareto front is empty; run python -m search.pareto first.")
        self.front = sorted(front, key=lambda p: p.latency_ms)
        self.model, self.target = model, target
        self._latencies = [p.latency_ms for p in self.front]

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> DepthSelector:
        """Read ``pareto.json`` (or the directory holding it)."""
        path = Path(path)
        if path.is_dir():
            path = path / "pareto.json"
        try:
            data = json.loads(path.read_text())
            front = [FrontPoint(p["mask"], float(p["acc1"]), float(p["latency_ms"])) for p in data["front"]]
            model, target = data.get("model"), data.get("target")
        except FileNotFoundError:
            raise FileNotFoundError(f"no Pareto file at {str(path)!r}; run python -m search.pareto first.") from None
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{str(path)!r} is not a pareto.json written by search.pareto ({err}).") from err
        return cls(front, model, target)

    def select(self, budget_ms: float) -> str:
        """The most accurate front mask whose latency fits ``budget_ms``; the fastest one when none fits.

        On a front, accuracy grows with latency, so that is the slowest point within the budget.
        Serving under overload degrades to the base-net rather than failing.
        """
        i = bisect.bisect_right(self._latencies, budget_ms)
        return self.front[max(i - 1, 0)].mask


def select_mask(pareto: str | os.PathLike[str], budget_ms: float) -> str:
    """One-shot form of ``DepthSelector.from_file(pareto).select(budget_ms)``."""
    return DepthSelector.from_file(pareto).select(budget_ms)
