"""Batch-norm recalibration per mask: the running statistics a sub-network uses, re-estimated from data.

Running statistics gathered during training mix augmented images and (for the norms of skippable
blocks and of stages after a skipped one) the feature distributions of other masks. Supernet work
recalibrates them per sub-network before evaluating it (OFA's ``set_running_statistics``).
``calibrate_norms`` does that for one mask: it finds the batch norms that mask runs, resets their
statistics and re-estimates them as an average over the given batches weighted by their sizes
(the mean is then exactly the mean over all images), with everything else in eval mode. Nothing
else changes: weights, other norms' statistics and the model's mode are as before. LayerNorms
keep no statistics, so ViT and Swin have nothing to calibrate (0 is returned).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from .masks import MaskLike
from .network import AdaptiveDepthMixin


def norms_used(model: nn.Module, mask: MaskLike, example: torch.Tensor) -> list[str]:
    """Names of the batch norms that run under ``mask`` (found by running ``example`` once, in eval mode)."""
    if not isinstance(model, AdaptiveDepthMixin):
        raise TypeError(f"{type(model).__name__} is not an ADN model; build one with adn.create_model.")
    names = {m: n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    seen: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda mod, _: seen.append(names[mod])) for m in names]
    was_training, before = model.training, model.skip_mask
    try:
        model.eval()
        with torch.no_grad():
            model(example[:1], skip=mask)
    finally:
        for h in hooks:
            h.remove()
        model.set_skip(before)
        model.train(was_training)
    return list(dict.fromkeys(seen))


def _images(batch: Any) -> torch.Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def calibrate_norms(model: nn.Module, mask: MaskLike, batches: Iterable[Any], max_images: int | None = None) -> int:
    """Re-estimate the running statistics of the batch norms ``mask`` runs from ``batches``; returns how many.

    ``batches`` yields image tensors or ``(images, labels)`` pairs (a validation-transform loader over
    training images, as the papers do); ``max_images`` stops after that many. The model's mask, mode
    and every other tensor are left as they were.
    """
    it = iter(batches)
    first = next(it, None)
    if first is None:
        raise ValueError("calibrate_norms needs at least one batch of images.")
    used = norms_used(model, mask, _images(first))
    if not used:
        return 0
    norms = [model.get_submodule(n) for n in used]
    saved = [(m.momentum, m.training) for m in norms]
    was_training, before = model.training, model.skip_mask
    seen = 0
    try:
        model.eval()
        for m in norms:
            m.reset_running_stats()
            m.train()
        batch: Any = first
        while batch is not None and (max_images is None or seen < max_images):
            x = _images(batch)
            if max_images is not None:
                x = x[: max_images - seen]
            for m in norms:  # running = (1 - w) running + w batch, w = this batch's share so far: a weighted mean
                m.momentum = len(x) / (seen + len(x))
            model(x, skip=mask)
            seen += len(x)
            batch = next(it, None)
    finally:
        for m, (momentum, training) in zip(norms, saved, strict=True):
            m.momentum = momentum
            m.train(training)
        model.set_skip(before)
        model.train(was_training)
    return len(norms)


@contextlib.contextmanager
def calibrated(model: nn.Module, mask: MaskLike, batches: Iterable[Any], max_images: int | None = None,
               ) -> Iterator[int]:
    """``calibrate_norms`` for the length of a ``with`` block: the saved statistics come back after it.

    Evaluation calibrates each mask in turn without touching what training keeps or saves.
    """
    saved = {n: b.clone() for n, b in model.named_buffers()
             if n.rpartition(".")[2] in ("running_mean", "running_var", "num_batches_tracked")}
    try:
        yield calibrate_norms(model, mask, batches, max_images)
    finally:
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                if name in saved:
                    buffer.copy_(saved[name])
