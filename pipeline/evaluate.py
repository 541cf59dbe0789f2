"""Top-1/top-5 of sub-networks on validation shards, summed over ranks.

The validation loader gives every sample to exactly one rank, so the counts summed with one
all-reduce are the exact accuracy over the whole split, whatever the world size.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from adn import SkipMask

CALIBRATION_BATCH = 128  # batch statistics normalise as they are gathered, so the batch size is part of the result


def calibration_loader(data: str | os.PathLike[str], recipe: dict[str, Any], images: int,
                       device: str | torch.device = "cpu") -> Iterable:
    """The first ``images`` training images through the validation transforms, the same on every rank and worker."""
    from pipeline.data import make_loader

    return make_loader(data, "train", min(images, CALIBRATION_BATCH), {"data": recipe["data"]}, train=False, rank=0,
                       world_size=1, num_workers=0, device=device, max_samples=images)


@dataclass(frozen=True)
class Accuracy:
    acc1: float  # fraction in 0..1
    acc5: float
    samples: int


def topk_hits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-1 hits, top-5 hits) of one batch as device scalars (no sync); top-5 is top-all under 5 classes."""
    k = min(5, logits.shape[-1])
    hit = logits.topk(k, dim=-1).indices.eq(labels.view(-1, 1))
    return hit[:, 0].sum(), hit.any(dim=1).sum()


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, masks: Sequence[SkipMask | str], *,
             device: str | torch.device = "cpu", total: int | None = None, progress: bool = False,
             desc: str = "eval", calibration: Iterable | None = None,
             calibration_images: int | None = None) -> dict[str, Accuracy]:
    """Accuracy of each mask over ``batches`` of (images, labels, ...), reduced across ranks when distributed.

    With ``calibration`` (a re-iterable source of training batches, e.g. a validation-transform
    loader over the train split), each mask is evaluated in its own pass after ``adn.calibrate_norms``
    re-estimated its batch-norm statistics from up to ``calibration_images`` of them; the model's
    statistics are restored afterwards.
    """
    masks = [str(m) for m in masks]
    if calibration is not None:
        from adn.calibrate import calibrated

        result = {}
        for mask in masks:
            with calibrated(model, mask, calibration, calibration_images):
                result.update(evaluate(model, batches, [mask], device=device, total=total, progress=progress,
                                       desc=f"{desc} {mask}"))
        return result
    was_training = model.training
    model.eval()
    counts = torch.zeros(len(masks), 3, dtype=torch.float64, device=device)
    try:
        for batch in tqdm(batches, total=total, desc=desc, disable=not progress, leave=False, unit="batch"):
            images, labels = batch[0], batch[1]
            for i, mask in enumerate(masks):
                top1, top5 = topk_hits(model(images, skip=mask), labels)
                counts[i, 0] += top1
                counts[i, 1] += top5
                counts[i, 2] += labels.numel()
    finally:
        model.train(was_training)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(counts)
    result = {}
    for mask, (c1, c5, n) in zip(masks, counts.tolist(), strict=True):
        result[mask] = Accuracy(c1 / n if n else 0.0, c5 / n if n else 0.0, int(n))
    return result
