"""Fixtures every test package shares."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.data.shard import main as shard_main


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded digits as shards of 400 (4 train shards, 1 val shard)."""
    out = tmp_path_factory.mktemp("digits")
    assert shard_main(["digits", "--out", str(out), "--shard-size", "400"]) == 0
    return out
