"""The Ray Tune trial of the search: one pass over the search split for a batch of masks.

Kept apart and light on purpose: a trial imports Ray and nothing else (no torch, no model); the
evaluation workers it calls hold the models (``search.evaluation``).
"""

from __future__ import annotations

import json
from typing import Any


def mask_of(config: dict[str, Any], num_bits: int) -> str:
    """Optuna's per-bit choices ``b0 .. b{n-1}`` as a mask string."""
    return "".join("T" if config[f"b{i}"] else "F" for i in range(num_bits))


def batch_trial(config: dict[str, Any], workers: list[Any], split: str) -> None:
    """Evaluate ``config["masks"]`` on ``split`` in one pass over ``workers``; report every mask's accuracy."""
    import ray
    from ray import tune

    from .evaluation import run_pass

    result, stats = run_pass(workers, split, list(config["masks"]))
    tune.report({"masks": len(config["masks"]), "accuracy": json.dumps(result.rates()),
                 "pass": json.dumps(stats), "node": ray.util.get_node_ip_address()})
