"""Hit counts of evaluation passes: plain integers, so parts of a split evaluated anywhere add up exactly.

Kept free of torch on purpose: Ray Tune trials merge and report these without loading a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class PassResult:
    """One pass over (part of) a split for a set of masks, or several such parts summed."""

    counts: dict[str, list[int]]  # mask -> [top-1 hits, top-5 hits, samples]
    segment_runs: int = 0  # stage segments computed
    segment_runs_one_by_one: int = 0  # what evaluating each mask alone would have computed
    forward_s: float = 0.0  # time in the segments (synchronised on GPU), not in loading
    batches: int = 0
    workers: list[dict[str, Any]] = field(default_factory=list)  # where each part ran, its samples and memory

    def rates(self) -> dict[str, tuple[float, float, int]]:
        """mask -> (top-1, top-5, samples), accuracies as fractions."""
        return {m: (c1 / n if n else 0.0, c5 / n if n else 0.0, n) for m, (c1, c5, n) in self.counts.items()}

    def merge(self, other: PassResult) -> PassResult:
        """The sum of two passes over disjoint parts of the same split, for the same masks."""
        if set(other.counts) != set(self.counts):
            raise ValueError("only passes over the same masks add up.")
        counts = {m: [a + b for a, b in zip(c, other.counts[m], strict=True)] for m, c in self.counts.items()}
        return PassResult(counts, self.segment_runs + other.segment_runs,
                          self.segment_runs_one_by_one + other.segment_runs_one_by_one,
                          self.forward_s + other.forward_s, self.batches + other.batches,
                          self.workers + other.workers)

    def join(self, other: PassResult) -> PassResult:
        """Passes over the same samples for different masks (each mask calibrated apart), as one result."""
        if set(other.counts) & set(self.counts):
            raise ValueError("only passes over different masks join.")
        return PassResult({**self.counts, **other.counts}, self.segment_runs + other.segment_runs,
                          self.segment_runs_one_by_one + other.segment_runs_one_by_one,
                          self.forward_s + other.forward_s, self.batches + other.batches,
                          self.workers + other.workers)

    def stats(self, wall_s: float) -> dict[str, Any]:
        """What a pass cost, for the search's report."""
        return {"masks": len(self.counts), "wall_s": wall_s, "segment_runs": self.segment_runs,
                "segment_runs_one_by_one": self.segment_runs_one_by_one, "forward_s": self.forward_s,
                "workers": self.workers}


def summarize(passes: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals of passes (``PassResult.stats``): segment runs against one-by-one, forward time, per-worker memory."""
    workers: dict[tuple[str, int], dict[str, Any]] = {}
    for p in passes:
        for w in p["workers"]:
            seen = workers.setdefault((w["node"], w["pid"]), {
                "node": w["node"], "host": w["host"], "rank": w["rank"], "samples": 0, "peak_rss_mib": 0.0,
                "max_pass_growth_mib": 0.0})
            seen["samples"] += w["samples"]
            seen["peak_rss_mib"] = max(seen["peak_rss_mib"], w["peak_rss_mib"])
            seen["max_pass_growth_mib"] = max(seen["max_pass_growth_mib"], w["peak_rss_mib"] - w["rss_before_mib"])
    return {"passes": len(passes), "masks_per_pass": [p["masks"] for p in passes],
            "segment_runs": sum(p["segment_runs"] for p in passes),
            "segment_runs_one_by_one": sum(p["segment_runs_one_by_one"] for p in passes),
            "forward_s": sum(p["forward_s"] for p in passes), "pass_wall_s": sum(p["wall_s"] for p in passes),
            "eval_workers": sorted(workers.values(), key=lambda w: w["rank"])}
