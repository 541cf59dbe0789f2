"""One training step on a DeepSpeed engine: ADN's two-pass self-distillation, or a one-pass baseline.

``adn``: super-net forward + backward of ``alpha * CE``, then base-net forward + backward of the
KD loss against the detached super-net logits, then one ``engine.step()``. The accumulation
boundary is set by hand (docs/design.md, "The step"): False for the first backward, True for the second,
so gradients of both passes add up locally and are reduced once, and ZeRO-2 keeps both. The first
backward frees the super-net graph before the base-net runs, so peak memory stays near a
vanilla step's; only the teacher logits (and stage outputs, with feature KD) are kept.
``vanilla`` trains the super-net alone with CE; ``base`` the base-net alone: the paper's baselines.
Under ``amp-bf16`` each forward runs in ``torch.autocast`` and the losses are computed in fp32.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from adn import SkipMask
from adn.loss import DistillationConfig, classification_loss

from .config import MODES
from .precision import autocast


class Engine(Protocol):
    """What the step needs of ``deepspeed.DeepSpeedEngine``."""

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor: ...
    def backward(self, loss: torch.Tensor) -> Any: ...
    def set_gradient_accumulation_boundary(self, is_boundary: bool) -> None: ...
    def step(self) -> None: ...


class TrainStep:
    """Callable ``step(engine, images, labels) -> {"loss_ce": ..., "loss_kd": ..., "loss_feat": ...}``.

    The returned losses are unweighted (CE of the trained pass, KD and feature KD of the base-net).

    ``model`` is the ADN module the engine wraps (for its stage count and stage-output recording);
    ``precision`` is the run's (``pipeline.precision``).
    """

    def __init__(self, model: torch.nn.Module, mode: str, loss: DistillationConfig, precision: str = "fp32") -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}.")
        self.model, self.mode, self.loss, self.precision = model, mode, loss, precision
        self.super_mask = SkipMask.super_net(model.num_stages)
        self.base_mask = SkipMask.base_net(model.num_stages)

    @property
    def train_masks(self) -> list[SkipMask]:
        """The sub-networks this mode trains (and evaluates by default)."""
        return {"adn": [self.super_mask, self.base_mask], "vanilla": [self.super_mask],
                "base": [self.base_mask]}[self.mode]

    def __call__(self, engine: Engine, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.mode != "adn":
            mask = self.super_mask if self.mode == "vanilla" else self.base_mask
            engine.set_gradient_accumulation_boundary(True)
            loss = classification_loss(self._forward(engine, images, mask), labels, self.loss.label_smoothing)
            engine.backward(loss)
            engine.step()
            zero = torch.zeros((), device=loss.device)
            return {"loss_ce": loss.detach(), "loss_kd": zero, "loss_feat": zero}

        features = self.loss.feature_kd > 0
        engine.set_gradient_accumulation_boundary(False)
        teacher_features: dict[int, torch.Tensor] = {}
        if features:
            with self.model.record_stage_outputs() as recorded:
                logits = self._forward(engine, images, self.super_mask)
            teacher_features = {k: v.detach().float() for k, v in recorded.items()}
        else:
            logits = self._forward(engine, images, self.super_mask)
        loss, loss_ce = self.loss.super_loss(logits, labels)
        engine.backward(loss)
        teacher = logits.detach()
        del logits  # the super-net graph is gone after backward; drop the last reference to its output

        engine.set_gradient_accumulation_boundary(True)
        if features:
            with self.model.record_stage_outputs() as recorded:
                logits = self._forward(engine, images, self.base_mask)
            student_features = {k: v.float() for k, v in recorded.items()}
            loss, loss_kd, loss_feat = self.loss.base_loss(logits, teacher, student_features, teacher_features,
                                                           self.model.channel_dim)
        else:
            logits = self._forward(engine, images, self.base_mask)
            loss, loss_kd, loss_feat = self.loss.base_loss(logits, teacher)
        engine.backward(loss)
        engine.step()
        return {"loss_ce": loss_ce, "loss_kd": loss_kd, "loss_feat": loss_feat}

    def _forward(self, engine: Engine, images: torch.Tensor, mask: SkipMask) -> torch.Tensor:
        """Logits of ``mask`` in fp32 for the loss (the forward itself in bf16 under ``amp-bf16``)."""
        with autocast(self.precision, images.device):
            logits = engine(images, skip=mask)
        return logits.float()
