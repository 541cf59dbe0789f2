"""What a serving replica is told: one dataclass of plain values, checked in one place, with no heavy imports
(``python -m serving --help`` answers at once)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .policy import ON_LATE

POLICIES = ("deadline", "fixed")


@dataclass
class ServeSettings:
    """Everything a replica needs, as plain values (Ray ships it to every replica; ``serve run`` args map to it)."""

    checkpoint: str | None = None
    pareto: str | None = None
    model_uri: str | None = None
    tracking_uri: str | None = None
    target: str | None = "cpu"
    policy: str = "deadline"
    mask: str | None = None
    slo_ms: float = 100.0
    on_late: str = "shed"
    max_batch: int = 16
    batch_wait_ms: float = 0.0
    margin_ms: float = 3.0
    calm_s: float = 0.5
    pressure: float = 0.5
    speed_tolerance: float = 0.1
    max_body_bytes: int = 8 * 1024 * 1024
    max_ongoing: int = 512
    replicas: int = 1
    threads: int = 1
    device: str = "cpu"
    latency_budget_s: float = 20.0

    def check(self) -> None:
        """One sentence for the first setting a replica could not serve with."""
        if self.policy not in POLICIES:
            raise ValueError(f"--policy must be one of {', '.join(POLICIES)}, got {self.policy!r}.")
        if self.policy == "fixed" and not self.mask:
            raise ValueError("--policy fixed needs --mask (for example --mask TTFF).")
        if self.policy == "deadline" and self.mask:
            raise ValueError("--mask goes with --policy fixed; the deadline policy picks masks from the front.")
        if self.on_late not in ON_LATE:
            raise ValueError(f"--on-late must be one of {', '.join(ON_LATE)}, got {self.on_late!r}.")
        if not 0 < self.pressure <= 1:
            raise ValueError(f"--pressure must be in (0, 1], got {self.pressure}.")
        for name in ("slo_ms", "batch_wait_ms", "margin_ms", "latency_budget_s", "calm_s", "speed_tolerance"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0 or (name == "slo_ms" and value == 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a positive number, got {value}.")
        for name in ("max_batch", "max_body_bytes", "max_ongoing", "replicas", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}.")
