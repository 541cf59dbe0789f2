"""Fixtures every test package shares: the digits shards, the environment a launched training gets, the
uninterrupted reference run that every resume test compares its weights with (and the search tests search), and
the test run's latency tables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.data.shard import main as shard_main

ROOT = Path(__file__).resolve().parents[1]

# Small and fast: 2 epochs of 39 steps at batch 32 (1,257 training digits), 1 loader worker.
FAST = ["--model", "resnet_mini", "--epochs", "2", "--batch-size", "32", "--workers", "1", "--log-every", "5"]


def train_env(**extra: str) -> dict[str, str]:
    """This environment minus any launcher's rank variables: DeepSpeed on CPU, one thread per rank."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT",
                                                            "MASTER_ADDR", "MLFLOW_TRACKING_URI")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)
    return env


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded digits as shards of 400 (4 train shards, 1 val shard)."""
    out = tmp_path_factory.mktemp("digits")
    assert shard_main(["digits", "--out", str(out), "--shard-size", "400"]) == 0
    return out


@pytest.fixture(scope="session")
def measured_tables(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """resnet_mini's and resnet_mini_deep's CPU latency tables, timed once per test run (``tests.luts``)."""
    from .luts import measure

    path = tmp_path_factory.mktemp("luts") / "tables.json"
    path.write_text(json.dumps(measure(["resnet_mini", "resnet_mini_deep"])))
    return path


@pytest.fixture(scope="session")
def reference_run(digits: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The FAST run uninterrupted, tracked in a SQLite MLflow store, checkpointing every 10 steps (once per test
    run: its weights are what every interrupted and resumed FAST run must end with)."""
    work = tmp_path_factory.mktemp("reference")
    done = subprocess.run([sys.executable, "-m", "pipeline.train", *FAST, "--data", str(digits), "--output",
                           str(work / "run"), "--save-every-steps", "10", "--tracking-uri",
                           f"sqlite:///{work / 'mlflow.db'}"], cwd=work, env=train_env(), capture_output=True,
                          text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    return work


@pytest.fixture(scope="session")
def first_epoch(digits: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The FAST run stopped at the end of its first epoch (``--max-steps 39``), checkpointing every 10 steps: the
    checkpoints step000000030 and step000000039 (the epoch end) are kept. Tests copy it before changing it."""
    out = tmp_path_factory.mktemp("first-epoch") / "run"
    done = subprocess.run([sys.executable, "-m", "pipeline.train", *FAST, "--data", str(digits), "--output", str(out),
                           "--save-every-steps", "10", "--max-steps", "39", "--no-tracking"], cwd=out.parent,
                          env=train_env(), capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    return out
