"""Recipes are data: the published hyperparameters as YAML files side by side, loaded by name or path."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

RECIPE_DIR = Path(__file__).parent


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def load_recipe(recipe: str | os.PathLike[str] | dict[str, Any]) -> dict[str, Any]:
    """A recipe dict from a shipped name (``resnet50``), a YAML path, or a dict (returned as is)."""
    if isinstance(recipe, dict):
        return recipe
    path = Path(recipe)
    if not path.suffix:
        path = RECIPE_DIR / f"{recipe}.yaml"
        if not path.is_file():
            raise ValueError(f"unknown recipe {str(recipe)!r}; shipped recipes: {', '.join(list_recipes())}, "
                             "or pass the path of a YAML file.")
    if not path.is_file():
        raise ValueError(f"recipe file {str(path)!r} does not exist.")
    loaded = yaml.safe_load(path.read_text())
    if not isinstance(loaded, dict) or "data" not in loaded:
        raise ValueError(f"recipe {str(path)!r} is not a mapping with a 'data' section.")
    return loaded
