"""Shared fixtures: every family, with norms randomized so that every mask computes something different."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import adn

from .families import ALL_MODELS, randomize_norms


@pytest.fixture(scope="module", params=ALL_MODELS)
def any_model(request: pytest.FixtureRequest) -> tuple[str, nn.Module]:
    """(name, eval-mode ADN model with 10 classes and randomized norms), built once per test module."""
    torch.manual_seed(0)
    return request.param, randomize_norms(adn.create_model(request.param, num_classes=10)).eval()
