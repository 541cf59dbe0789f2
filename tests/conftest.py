"""Fixtures every test package shares."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.data.shard import main as shard_main


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
