"""The two-pass step: its gradients equal one backward of the combined loss, on plain torch and on DeepSpeed."""

from __future__ import annotations

import copy

import pytest
import torch

from adn import create_model
from adn.loss import DistillationConfig
from pipeline.step import TrainStep


def _model(name: str) -> torch.nn.Module:
    """A fresh ADN model with noisy weights: at init timm zeroes each block's last norm, which makes the
    skippable blocks identities and the base-net equal to the super-net (every KD term would be 0)."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


class _TorchEngine:
    """The engine surface TrainStep uses, on a plain module: backward accumulates, step records the grads."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module, self.boundaries, self.grads = module, [], None

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def set_gradient_accumulation_boundary(self, is_boundary: bool) -> None:
        self.boundaries.append(is_boundary)

    def step(self) -> None:
        self.grads = {n: None if p.grad is None else p.grad.clone() for n, p in self.module.named_parameters()}


@pytest.mark.parametrize("name", ["resnet_mini", "vit_mini"])
@pytest.mark.parametrize("feature_kd", [0.0, 0.5])
def test_two_backward_step_equals_one_backward_of_the_combined_loss(name: str, feature_kd: float) -> None:
    model = _model(name)
    reference = copy.deepcopy(model)
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    cfg = DistillationConfig(alpha=0.4, temperature=2.0, kd_topk=5, feature_kd=feature_kd)

    with reference.record_stage_outputs() as teacher_feats:
        logits_super = reference(x, skip="FFFF")
    teacher_feats = dict(teacher_feats)
    with reference.record_stage_outputs() as student_feats:
        logits_base = reference(x, skip="TTTT")
    loss_super, _ = cfg.super_loss(logits_super, y)
    loss_base, _, feat = cfg.base_loss(logits_base, logits_super, student_feats, teacher_feats, reference.channel_dim)
    (loss_super + loss_base).backward()
    assert (feat.item() > 0) == (feature_kd > 0)

    engine = _TorchEngine(model)
    losses = TrainStep(model, "adn", cfg)(engine, x, y)
    assert engine.boundaries == [False, True]
    assert set(losses) == {"loss_ce", "loss_kd", "loss_feat"}
    for n, p in reference.named_parameters():
        assert (p.grad is None) == (engine.grads[n] is None), n
        if p.grad is not None:
            torch.testing.assert_close(engine.grads[n], p.grad, rtol=1e-5, atol=1e-7, msg=n)


def test_baseline_modes_run_one_pass_on_their_sub_network() -> None:
    torch.manual_seed(0)
    model = create_model("resnet_mini", num_classes=10).train()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    engine = _TorchEngine(model)
    losses = TrainStep(model, "base", DistillationConfig())(engine, x, y)
    assert engine.boundaries == [True] and losses["loss_kd"].item() == 0.0
    skippable = {n for n, _ in model.named_parameters() if n.startswith("layer1.1.")}
    assert skippable and all(engine.grads[n] is None for n in skippable)
    with pytest.raises(ValueError, match="unknown mode"):
        TrainStep(model, "both", DistillationConfig())


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_deepspeed_step_keeps_both_passes_gradients_and_reduces_once(deepspeed_world, stage: int) -> None:
    """docs/design.md, "The step": without boundary control ZeRO-2 would keep only the base-net pass's gradients."""
    deepspeed = deepspeed_world
    model = _model("resnet_mini")
    reference = copy.deepcopy(model)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    cfg = DistillationConfig(alpha=0.5, temperature=1.0)
    logits_super = reference(x, skip="FFFF")
    loss_super, _ = cfg.super_loss(logits_super, y)
    loss_base, _, _ = cfg.base_loss(reference(x, skip="TTTT"), logits_super)
    (loss_super + loss_base).backward()

    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        config={"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1,
                "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
                "steps_per_print": 2**31 - 1})
    grads, reductions = {}, []
    take_step, reduce = engine.step, engine.buffered_allreduce_fallback

    def step() -> None:
        for n, p in model.named_parameters():
            g = deepspeed.utils.safe_get_full_grad(p) if stage else p.grad
            grads[n] = None if g is None else g.detach().clone()
        take_step()

    def counted_reduce(*args, **kwargs):
        reductions.append(engine.is_gradient_accumulation_boundary())
        return reduce(*args, **kwargs)

    engine.step, engine.buffered_allreduce_fallback = step, counted_reduce
    TrainStep(model, "adn", cfg)(engine, x, y)
    if stage == 0:
        assert reductions == [True]  # one all-reduce per step, at the boundary, after both passes
    assert engine.global_steps == 1
    compared = 0
    for n, p in reference.named_parameters():
        if p.grad is None or p.grad.abs().sum() == 0:
            continue
        assert grads[n] is not None, n
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-7, msg=n)
        compared += 1
    assert compared > 20
