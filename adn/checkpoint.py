"""Portable trained weights: one safetensors file that says what it holds.

Training writes ``weights.safetensors`` with metadata (model name, classes, input resolution,
recipe, step); ``load_trained`` rebuilds the ADN model from it without DeepSpeed and without
unpickling anything, so ``search``, serving code and notebooks all start from the same file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from .registry import create_model

WEIGHTS_NAME = "weights.safetensors"
_JSON_FIELDS = ("classes", "recipe", "extra")


def save_weights(model: nn.Module, path: str | os.PathLike[str], *, model_name: str, classes: list[str],
                 resolution: int, recipe: dict[str, Any] | None = None, **extra: Any) -> Path:
    """Write the model's state dict and its metadata atomically (a temp file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    metadata = {
        "format": "adn-weights/1",
        "model": model_name,
        "num_classes": str(len(classes)),
        "classes": json.dumps(classes),
        "resolution": str(resolution),
        "recipe": json.dumps(recipe or {}),
        "extra": json.dumps(extra, default=str),
    }
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(state, str(tmp), metadata=metadata)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a partial file on a full disk would keep it full
        raise
    os.replace(tmp, path)
    return path


def resolve_weights(path: str | os.PathLike[str]) -> Path:
    """A weights file, or the training output directory that holds ``weights.safetensors``."""
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no trained weights at {str(path)!r}; pass a weights.safetensors file or a "
                                "training output directory that holds one.")
    return path


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata of a weights file (JSON fields decoded), without loading the tensors."""
    path = resolve_weights(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{str(path)!r} is not a readable safetensors file: {err}") from err
    if raw.get("format") != "adn-weights/1":
        raise ValueError(f"{str(path)!r} carries no ADN metadata; it was not written by adn.save_weights.")
    meta: dict[str, Any] = dict(raw)
    for key in _JSON_FIELDS:
        meta[key] = json.loads(raw.get(key, "null"))
    meta["num_classes"] = int(raw["num_classes"])
    meta["resolution"] = int(raw["resolution"])
    return meta


def load_trained(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the trained ADN model from a weights file or training directory; returns (model, metadata)."""
    path = resolve_weights(path)
    meta = read_metadata(path)
    model = create_model(meta["model"], num_classes=meta["num_classes"])
    state = load_file(str(path), device=str(map_location))
    check_fits(model, state, f"{str(path)!r} ({meta['model']}, {meta['num_classes']} classes by its metadata)")
    model.load_state_dict(state)
    return model.to(map_location).eval(), meta


def check_fits(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Raise one ``ValueError`` sentence when ``state`` does not fit ``model`` (torch's is a page of names)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} for {tuple(v.shape)}" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    if missing or extra or shapes:
        found = [f"{len(missing)} tensors missing (first {missing[0]})" if missing else "",
                 f"{len(extra)} unexpected (first {extra[0]})" if extra else "",
                 f"{len(shapes)} of another shape (first {shapes[0]})" if shapes else ""]
        raise ValueError(f"the tensors of {what} do not fit that model: {', '.join(f for f in found if f)}.")
