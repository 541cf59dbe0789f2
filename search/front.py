"""The Pareto front of skip masks: candidates, the non-dominated ones, the best within a budget, hypervolume."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Candidate:
    """One evaluated mask: top-1 on the search split, predicted latency, cost, and where its trial ran."""

    mask: str
    acc1: float
    latency_ms: float
    gflops: float
    params_m: float
    acc5: float = 0.0
    node: str = ""  # the Ray node that ran its trial
    val_acc1: float | None = None  # on the report split (front members only)
    val_acc5: float | None = None


def pareto_front(candidates: list[Candidate]) -> list[Candidate]:
    """The non-dominated candidates (higher top-1, lower latency), by latency; one mask per point (of masks
    with the same latency and top-1, the first given)."""
    unique = {c.mask: c for c in candidates}.values()
    ordered = sorted(unique, key=lambda c: (c.latency_ms, -c.acc1))
    front: list[Candidate] = []
    for c in ordered:
        if not front or c.acc1 > front[-1].acc1:
            front.append(c)
    return front


def hypervolume(points: list[Candidate], ref_acc: float, ref_latency: float) -> float:
    """Area dominated by ``points`` above ``ref_acc`` and below ``ref_latency`` (accuracy x ms)."""
    area, best = 0.0, ref_acc
    for c in sorted(pareto_front(points), key=lambda c: c.latency_ms):
        if c.latency_ms >= ref_latency or c.acc1 <= best:
            continue
        area += (c.acc1 - best) * (ref_latency - c.latency_ms)
        best = c.acc1
    return area


def best_within(front: list[Candidate], max_latency_ms: float) -> Candidate | None:
    """The most accurate front member within ``max_latency_ms`` (the faster on a tie); None if none fits."""
    fits = [c for c in front if c.latency_ms <= max_latency_ms]
    return max(fits, key=lambda c: (c.acc1, -c.latency_ms)) if fits else None
