"""The paper recipes decay exactly what the official ADN training commands decay (torchvision's reference script)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from adn import create_model
from pipeline.optim import build_optimizer

RECIPES = Path(__file__).resolve().parents[2] / "pipeline" / "recipes"


def _decay_of(model_name: str) -> dict[str, float]:
    recipe = yaml.safe_load((RECIPES / f"{model_name}.yaml").read_text())
    model = create_model(model_name, num_classes=10)
    optimizer = build_optimizer(model, recipe["optimizer"])
    by_id = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    return {name: by_id[id(p)] for name, p in model.named_parameters()}


def test_vit_b16_decays_every_parameter_as_the_official_command_does() -> None:
    """`--wd 0.2`, no norm, bias or embedding exclusions: torchvision then decays all parameters by 0.2."""
    decay = _decay_of("vit_b16")
    assert set(decay.values()) == {0.2}
    assert "pos_embed" in decay and "cls_token" in decay


@pytest.mark.parametrize("model_name, weight_decay", [("swin_t", 0.05), ("resnet50", 1e-4), ("mobilenet_v2", 1e-5)])
def test_norms_biases_and_embeddings_are_not_decayed(model_name: str, weight_decay: float) -> None:
    """`--norm-weight-decay 0 --bias-weight-decay 0` (and Swin's `--transformer-embedding-decay 0`)."""
    decay = _decay_of(model_name)
    model = create_model(model_name, num_classes=10)
    norms = {f"{n}.{p}" for n, m in model.named_modules()
             if isinstance(m, (torch.nn.modules.batchnorm._NormBase, torch.nn.LayerNorm))
             for p, _ in m.named_parameters(recurse=False)}
    for name, value in decay.items():
        zero = name in norms or name.endswith(".bias") or "relative_position_bias_table" in name
        assert value == (0.0 if zero else weight_decay), name
    if model_name == "swin_t":
        assert any("relative_position_bias_table" in n for n in decay)
