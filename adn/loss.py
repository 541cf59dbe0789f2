"""The self-distillation loss of ADN training (docs/design.md, "The loss").

Pass 1, super-net: ``alpha * CE(y, z_super)``. Pass 2, base-net:
``(1 - alpha) * T^2 * KL(softmax(z_super / T) || softmax(z_base / T))`` with the super-net's logits
detached (the teacher gets no gradient from the student), optionally restricted to the teacher's
top-k classes, plus optionally the same KL on the stage outputs with a softmax over channels.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def classification_loss(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy against class indices or soft (mixup/cutmix) targets, mean over the batch."""
    return F.cross_entropy(logits, target, label_smoothing=label_smoothing)


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0, topk: int | None = None
) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, summed over classes, mean over the batch.

    With ``topk``, both distributions are taken over the teacher's ``topk`` largest logits of each
    sample (the published ImageNet code uses the top 500 of 1000 classes).
    """
    teacher = teacher.detach()
    if topk is not None and topk < teacher.shape[-1]:
        index = teacher.topk(topk, dim=-1).indices
        teacher, student = teacher.gather(-1, index), student.gather(-1, index)
    t = float(temperature)
    log_student = F.log_softmax(student / t, dim=-1)
    log_teacher = F.log_softmax(teacher / t, dim=-1)
    return t * t * F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)


def feature_distillation_loss(
    student: Mapping[int, torch.Tensor], teacher: Mapping[int, torch.Tensor], channel_dim: int = 1,
    temperature: float = 1.0,
) -> torch.Tensor:
    """The same KL on stage outputs: a softmax over channels at every position, summed over stages.

    Each stage's KL is the mean over all positions (pixels or tokens) of all samples.
    """
    if set(student) != set(teacher):
        raise ValueError(f"student stages {sorted(student)} differ from teacher stages {sorted(teacher)}.")
    total = torch.zeros((), device=next(iter(student.values())).device)
    for bit in sorted(student):
        s = student[bit].movedim(channel_dim, -1).flatten(0, -2)
        t = teacher[bit].detach().movedim(channel_dim, -1).flatten(0, -2)
        total = total + distillation_loss(s, t, temperature)
    return total


@dataclass(frozen=True)
class DistillationConfig:
    """The knobs of the two-pass step: loss weight, temperature, top-k logits, feature-KD weight."""

    alpha: float = 0.5
    temperature: float = 1.0
    kd_topk: int | None = None
    feature_kd: float = 0.0
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {self.alpha}.")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}.")
        if self.kd_topk is not None and self.kd_topk < 2:
            raise ValueError(f"kd_topk must be at least 2 (or None for all classes), got {self.kd_topk}.")
        if self.feature_kd < 0:
            raise ValueError(f"feature_kd must be non-negative, got {self.feature_kd}.")

    def super_loss(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pass 1: returns (``alpha * CE`` to back-propagate, the unweighted CE to report)."""
        ce = classification_loss(logits, target, self.label_smoothing)
        return self.alpha * ce, ce.detach()

    def base_loss(
        self, logits: torch.Tensor, teacher_logits: torch.Tensor,
        features: Mapping[int, torch.Tensor] | None = None,
        teacher_features: Mapping[int, torch.Tensor] | None = None, channel_dim: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pass 2: returns (``(1 - alpha) * (KD + feature_kd * feature KD)`` to back-propagate, KD, feature KD).

        The last two are unweighted, for reporting.
        """
        kd = distillation_loss(logits, teacher_logits, self.temperature, self.kd_topk)
        feat = torch.zeros_like(kd)
        if self.feature_kd > 0:
            if features is None or teacher_features is None:
                raise ValueError("feature_kd > 0 needs the stage outputs of both passes.")
            feat = feature_distillation_loss(features, teacher_features, channel_dim, self.temperature)
        return (1.0 - self.alpha) * (kd + self.feature_kd * feat), kd.detach(), feat.detach()
