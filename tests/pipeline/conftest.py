"""Shared by the pipeline tests (and the cluster tests): the environment a launched training gets."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def train_env(**extra: str) -> dict[str, str]:
    """This environment minus any launcher's rank variables: DeepSpeed on CPU, one thread per rank."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT",
                                                            "MASTER_ADDR", "MLFLOW_TRACKING_URI")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)
    return env
