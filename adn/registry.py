"""Model registry and the one entry point, ``adn.create_model`` (as ``timm.create_model``)."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .norms import SwitchableNorm
from .pretrained import TIMM_ARCH, locate

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a builder ``fn(pretrained=False, **kwargs)`` under its function name."""
    if fn.__name__ in _MODELS:
        raise ValueError(f"model {fn.__name__!r} is registered twice.")
    _MODELS[fn.__name__] = fn
    return fn


def _families() -> dict[str, Callable[..., nn.Module]]:
    """The registry, once every family module under ``adn.models`` has registered itself (loaded as plugins,
    by name: the families import this module, not the other way round)."""
    importlib.import_module(f"{__package__}.models")
    return _MODELS


def list_models() -> list[str]:
    return sorted(_families())


def create_model(
    name: str,
    num_classes: int = 1000,
    pretrained: bool = False,
    checkpoint_path: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build an ADN super-net by name.

    ``pretrained=True`` starts from timm's weights (the hub cache, a download, or ``pretrained_cfg_overlay=dict(
    file=...)``; offline without the cached file it raises ``adn.pretrained.PretrainedUnavailable`` at once);
    ``checkpoint_path`` loads a local state dict, either a plain timm one (each norm is copied into both
    halves of its switchable pair) or one saved from an ADN model. Other kwargs go to the timm constructor.
    """
    if name not in _families():
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}.")
    if pretrained and name in TIMM_ARCH and "file" not in (kwargs.get("pretrained_cfg_overlay") or {}):
        cached = locate(name)  # offline: one sentence now, not minutes of hub retries
        if cached is not None:
            kwargs["pretrained_cfg_overlay"] = {**(kwargs.get("pretrained_cfg_overlay") or {}), "file": str(cached)}
    model = _MODELS[name](pretrained=pretrained, num_classes=num_classes, **kwargs)
    if checkpoint_path is not None:
        load_timm_state_dict(model, load_state_dict_file(checkpoint_path))
    return model


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state dict from safetensors or a torch file, never unpickling arbitrary objects."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist; pass the path of a state-dict file.")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path!r} holds a {type(state).__name__}, expected a state dict.")
    return state


def map_timm_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A plain timm state dict's keys as the ADN model names them (ADN keys pass through).

    A plain key ``<norm>.<param>`` of a switchable norm fills ``<norm>.norms.0.<param>`` and
    ``<norm>.norms.1.<param>``: the pretrained norm starts both modes.
    """
    switchable = {n for n, m in model.named_modules() if isinstance(m, SwitchableNorm)}
    mapped: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        prefix, _, leaf = key.rpartition(".")
        if prefix in switchable:
            mapped[f"{prefix}.norms.0.{leaf}"] = value
            mapped[f"{prefix}.norms.1.{leaf}"] = value.clone()
        else:
            mapped[key] = value
    return mapped


def load_timm_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load a plain timm state dict (or an ADN one) into an ADN model, strictly (``map_timm_state_dict``)."""
    missing, unexpected = model.load_state_dict(map_timm_state_dict(model, state_dict), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not fit {getattr(model, 'adn_name', type(model).__name__)}: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})."
        )
