"""A checkpoint for the cluster tests that need one but not its accuracy (made in a second, not trained)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from adn.checkpoint import save_weights
from adn.registry import create_model
from pipeline.data import read_manifest

from ..conftest import ROOT


@pytest.fixture(scope="session")
def trained_checkpoint(digits: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """resnet_mini with seeded initial weights and the demo recipe's metadata, as training writes it."""
    recipe = yaml.safe_load((ROOT / "pipeline" / "recipes" / "resnet_mini.yaml").read_text())
    classes = read_manifest(str(digits), "val").classes
    torch.manual_seed(0)
    model = create_model("resnet_mini", num_classes=len(classes))
    return save_weights(model, tmp_path_factory.mktemp("checkpoint") / "weights.safetensors", model_name="resnet_mini",
                        classes=classes, resolution=int(recipe["data"]["val_crop"]), recipe=recipe)
