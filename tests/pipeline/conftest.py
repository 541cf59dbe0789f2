"""Shared by the pipeline tests: the digits shards, and the environment a launched training gets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.data.shard import main as shard_main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded digits as shards of 400 (4 train shards, 1 val shard)."""
    out = tmp_path_factory.mktemp("digits")
    assert shard_main(["digits", "--out", str(out), "--shard-size", "400"]) == 0
    return out


def train_env(**extra: str) -> dict[str, str]:
    """This environment minus any launcher's rank variables: DeepSpeed on CPU, one thread per rank."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT",
                                                            "MASTER_ADDR", "MLFLOW_TRACKING_URI")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)
    return env
