"""Check 6 of the training issue: the demo's training reaches 95 % top-1 for both the super-net and the base-net.

This is `make demo`'s training command (model resnet_mini, its shipped recipe, no overrides) on
the embedded digits; about 1.5 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.data.shard import main as shard_main

pytestmark = pytest.mark.slow  # trainings, searches or daemons in every test

ROOT = Path(__file__).resolve().parents[2]


def test_demo_training_reaches_95_percent_on_both_ends(tmp_path: Path) -> None:
    assert shard_main(["digits", "--out", str(tmp_path / "digits")]) == 0
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.train", "--model", "resnet_mini", "--data", str(tmp_path / "digits"),
         "--output", str(tmp_path / "demo"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"],
        cwd=tmp_path, env={**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=1800)  # a loaded 2-core machine: 3 to 4 times the idle 2 to 5 min
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r["mask"]: r for r in json.loads((tmp_path / "demo" / "summary.json").read_text())["masks"]}
    assert rows["FFFF"]["acc1"] >= 0.95, rows
    assert rows["TTTT"]["acc1"] >= 0.95, rows
    assert "top-1: super-net FFFF" in done.stdout and "MLflow run" in done.stdout
