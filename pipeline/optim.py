"""Optimizer with the recipes' weight-decay exclusions, and the per-iteration LR schedules.

Norm weights and biases get their own decay (0 in every paper recipe), as in torchvision's
references (``--norm-weight-decay``, ``--bias-weight-decay``); so do the parameters a timm model
names in ``no_weight_decay()`` (position embeddings, class token, relative position tables):
``embedding_weight_decay``, 0 unless a recipe says otherwise (torchvision's
``--transformer-embedding-decay``; the official ViT-b/16-ADN command leaves it unset, so there
they decay as the weights do).
The schedule is a ``LambdaLR`` stepped once per optimizer step, so a resumed run continues at
the exact LR; epoch-based milestones and warm-up are converted to steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


def param_groups(model: nn.Module, weight_decay: float, norm_weight_decay: float | None = None,
                 bias_weight_decay: float | None = None, embedding_weight_decay: float = 0.0,
                 ) -> list[dict[str, Any]]:
    """Split parameters into decay groups: weights, norm parameters, biases (and no-decay names)."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    groups: dict[str, list[nn.Parameter]] = {"default": [], "norm": [], "bias": [], "none": []}
    norm_params = {id(p) for m in model.modules() if isinstance(m, _NORMS) for p in m.parameters(recurse=False)}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name in skip or name.split(".")[-1] in skip:
            groups["none"].append(p)
        elif id(p) in norm_params and norm_weight_decay is not None:
            groups["norm"].append(p)
        elif name.endswith(".bias") and bias_weight_decay is not None:
            groups["bias"].append(p)
        else:
            groups["default"].append(p)
    decay = {"default": weight_decay, "norm": norm_weight_decay, "bias": bias_weight_decay,
             "none": embedding_weight_decay}
    return [{"params": ps, "weight_decay": decay[k], "name": k} for k, ps in groups.items() if ps]


def build_optimizer(model: nn.Module, cfg: dict[str, Any]) -> torch.optim.Optimizer:
    """SGD (momentum, optional Nesterov) or AdamW from a recipe's ``optimizer`` section."""
    name = cfg["name"].lower()
    groups = param_groups(model, cfg.get("weight_decay", 0.0), cfg.get("norm_weight_decay"),
                          cfg.get("bias_weight_decay"), cfg.get("embedding_weight_decay", 0.0))
    if name == "sgd":
        return torch.optim.SGD(groups, lr=cfg["lr"], momentum=cfg.get("momentum", 0.9),
                               nesterov=cfg.get("nesterov", False))
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg["lr"], betas=tuple(cfg.get("betas", (0.9, 0.999))),
                                 eps=cfg.get("eps", 1e-8))
    raise ValueError(f"unknown optimizer {cfg['name']!r}; expected 'sgd' or 'adamw'.")


def lr_factor(schedule: dict[str, Any], epochs: int, steps_per_epoch: int, base_lr: float) -> Callable[[int], float]:
    """The multiplier of the base LR at optimizer step ``i`` (step or cosine, after an optional linear warm-up)."""
    name = schedule.get("name", "step")
    if name not in ("step", "cosine", "constant"):
        raise ValueError(f"unknown lr_schedule {name!r}; expected 'step', 'cosine' or 'constant'.")
    warmup = schedule.get("warmup_epochs", 0) * steps_per_epoch
    start = schedule.get("warmup_start_factor", 0.0)
    total = max(epochs * steps_per_epoch, 1)
    milestones = [m * steps_per_epoch for m in schedule.get("milestones", [])]
    gamma = schedule.get("gamma", 0.1)
    floor = schedule.get("min_lr", 0.0) / base_lr if base_lr else 0.0

    def factor(i: int) -> float:
        if i < warmup:
            return start + (1.0 - start) * i / warmup
        if name == "step":
            return gamma ** sum(i >= m for m in milestones)
        if name == "cosine":
            progress = min((i - warmup) / max(total - warmup, 1), 1.0)
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: dict[str, Any], epochs: int,
                    steps_per_epoch: int, base_lr: float) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(schedule, epochs, steps_per_epoch, base_lr))
