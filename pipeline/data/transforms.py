"""Image transforms from a recipe's ``data`` section, built from torchvision's v2 transforms.

They follow torchvision's ``references/classification/presets.py`` (what the paper's code uses):
random resized crop, flip, RandAugment / TrivialAugmentWide / AutoAugment, random erasing for
training, and mixup/cutmix on batches; resize and center crop for validation. Per image the
workers stop at uint8 tensors; ``Normalize`` finishes each batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

AUTO_AUGMENT = ("ra", "ta_wide", "augmix", "autoaugment")


def _interpolation(data: dict[str, Any]) -> InterpolationMode:
    return InterpolationMode(data.get("interpolation", "bilinear"))


class Normalize:
    """uint8 batch -> float batch: scale to [0, 1], subtract the mean, divide by the std; then random erasing.

    The same arithmetic as ``ToDtype(scale=True)`` + ``Normalize`` (+ ``RandomErasing``) per image,
    done once per batch on the loader's device: workers ship uint8 (4x fewer bytes) and the
    float work runs vectorized, on the GPU when there is one (as timm's PrefetchLoader does).
    """

    def __init__(self, data: dict[str, Any], train: bool) -> None:
        self.mean = torch.tensor(data["mean"]).view(1, -1, 1, 1) * 255.0
        self.inv_std = 1.0 / (torch.tensor(data["std"]).view(1, -1, 1, 1) * 255.0)
        p = data.get("random_erase", 0.0) if train else 0.0
        self.erase = v2.RandomErasing(p=p) if p > 0 else None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        mean, inv_std = self.mean.to(images.device), self.inv_std.to(images.device)
        out = images.to(torch.float32).sub_(mean).mul_(inv_std)
        if self.erase is not None:
            out = torch.stack([self.erase(image) for image in out])
        return out


def per_image_steps(data: dict[str, Any]) -> list[v2.Transform]:
    """What ``Normalize`` does, as per-image torchvision steps (for a loader that has no batch stage)."""
    steps: list[v2.Transform] = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(data["mean"], data["std"])]
    if data.get("random_erase", 0.0) > 0:
        steps.append(v2.RandomErasing(p=data["random_erase"]))
    return steps


def train_transform(data: dict[str, Any]) -> Callable[[Any], torch.Tensor]:
    """PIL image -> uint8 CHW tensor with the recipe's training augmentation (``Normalize`` follows per batch)."""
    interpolation = _interpolation(data)
    steps: list[v2.Transform] = [
        v2.RandomResizedCrop(data["train_crop"], scale=tuple(data.get("scale", (0.08, 1.0))),
                             interpolation=interpolation, antialias=True)
    ]
    if data.get("hflip", 0.5) > 0:
        steps.append(v2.RandomHorizontalFlip(data.get("hflip", 0.5)))
    policy = data.get("auto_augment")
    if policy == "ra":
        steps.append(v2.RandAugment(magnitude=data.get("ra_magnitude", 9), interpolation=interpolation))
    elif policy == "ta_wide":
        steps.append(v2.TrivialAugmentWide(interpolation=interpolation))
    elif policy == "augmix":
        steps.append(v2.AugMix(interpolation=interpolation))
    elif policy == "autoaugment":
        steps.append(v2.AutoAugment(interpolation=interpolation))
    elif policy is not None:
        raise ValueError(f"unknown auto_augment {policy!r} in the recipe; "
                         f"use one of {', '.join(AUTO_AUGMENT)} or null.")
    steps.append(v2.PILToTensor())
    return v2.Compose(steps)


class ValTransform:
    """PIL image -> uint8 CHW tensor: resize the short side, center crop (``Normalize`` follows per batch).

    The same kernels as ``v2.Compose([v2.Resize, v2.CenterCrop, v2.PILToTensor])``, called directly: the pixels are
    identical, without the per-call dispatch of ``v2.Transform`` (a third of the time of a small image).
    """

    def __init__(self, resize: int, crop: int, interpolation: InterpolationMode) -> None:
        self.resize, self.crop, self.interpolation = [int(resize)], [int(crop)], interpolation

    def __call__(self, image: Any) -> torch.Tensor:
        image = F.resize(image, self.resize, interpolation=self.interpolation, antialias=True)
        return F.pil_to_tensor(F.center_crop(image, self.crop))


def val_transform(data: dict[str, Any]) -> ValTransform:
    """The recipe's validation transform (``ValTransform``)."""
    return ValTransform(data["val_resize"], data["val_crop"], _interpolation(data))


def batch_transform(data: dict[str, Any], num_classes: int) -> Callable[[torch.Tensor, torch.Tensor], Any] | None:
    """Mixup / cutmix on a batch (one of them chosen per batch), or None when the recipe has neither."""
    mixers = []
    if data.get("mixup_alpha", 0.0) > 0:
        mixers.append(v2.MixUp(alpha=data["mixup_alpha"], num_classes=num_classes))
    if data.get("cutmix_alpha", 0.0) > 0:
        mixers.append(v2.CutMix(alpha=data["cutmix_alpha"], num_classes=num_classes))
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)
