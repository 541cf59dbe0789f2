"""The self-distillation loss against hand computations on fixed logits."""

from __future__ import annotations

import math

import pytest
import torch

from adn.loss import DistillationConfig, classification_loss, distillation_loss, feature_distillation_loss

# Two samples, four classes; numbers picked so every term is easy to recompute by hand.
STUDENT = [[1.0, 0.0, -1.0, 0.5], [0.0, 2.0, 0.0, -1.0]]
TEACHER = [[2.0, 0.5, -1.0, 0.0], [0.0, 1.0, 3.0, -2.0]]


def _softmax(row: list[float], t: float = 1.0) -> list[float]:
    e = [math.exp(v / t) for v in row]
    return [v / sum(e) for v in e]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))


@pytest.mark.parametrize("t", [1.0, 2.0, 4.0])
def test_distillation_loss_equals_hand_computation(t: float) -> None:
    expected = t * t * sum(_kl(_softmax(te, t), _softmax(st, t)) for st, te in zip(STUDENT, TEACHER, strict=True)) / 2
    got = distillation_loss(torch.tensor(STUDENT), torch.tensor(TEACHER), temperature=t)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_topk_restricts_both_distributions_to_the_teachers_top_classes() -> None:
    # Top-2 teacher classes: sample 0 -> {0, 1}; sample 1 -> {2, 1}.
    picks = [[0, 1], [2, 1]]
    expected = sum(_kl(_softmax([te[i] for i in idx]), _softmax([st[i] for i in idx]))
                   for st, te, idx in zip(STUDENT, TEACHER, picks, strict=True)) / 2
    got = distillation_loss(torch.tensor(STUDENT), torch.tensor(TEACHER), topk=2)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert distillation_loss(torch.tensor(STUDENT), torch.tensor(TEACHER), topk=4).item() == pytest.approx(
        distillation_loss(torch.tensor(STUDENT), torch.tensor(TEACHER)).item())


def test_ce_and_weighted_passes_equal_hand_computation() -> None:
    labels = [3, 1]
    ce = -sum(math.log(_softmax(st)[y]) for st, y in zip(STUDENT, labels, strict=True)) / 2
    assert classification_loss(torch.tensor(STUDENT), torch.tensor(labels)).item() == pytest.approx(ce, rel=1e-6)
    cfg = DistillationConfig(alpha=0.3, temperature=2.0)
    weighted, raw = cfg.super_loss(torch.tensor(STUDENT), torch.tensor(labels))
    assert weighted.item() == pytest.approx(0.3 * ce, rel=1e-6) and raw.item() == pytest.approx(ce, rel=1e-6)
    kd = 4.0 * sum(_kl(_softmax(te, 2.0), _softmax(st, 2.0)) for st, te in zip(STUDENT, TEACHER, strict=True)) / 2
    weighted, raw_kd, raw_feat = cfg.base_loss(torch.tensor(STUDENT), torch.tensor(TEACHER))
    assert weighted.item() == pytest.approx(0.7 * kd, rel=1e-6)
    assert raw_kd.item() == pytest.approx(kd, rel=1e-6) and raw_feat.item() == 0.0


def test_soft_targets_from_mixup() -> None:
    target = [[0.0, 0.25, 0.0, 0.75], [1.0, 0.0, 0.0, 0.0]]
    expected = -sum(sum(w * math.log(p) for w, p in zip(tg, _softmax(st), strict=True))
                    for st, tg in zip(STUDENT, target, strict=True)) / 2
    assert classification_loss(torch.tensor(STUDENT), torch.tensor(target)).item() == pytest.approx(expected, rel=1e-6)


def test_feature_kd_softmax_over_channels_at_every_position() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2)
    expected = 0.0
    for b in range(2):
        for i in range(2):
            for j in range(2):
                expected += _kl(_softmax(t[b, :, i, j].tolist()), _softmax(s[b, :, i, j].tolist()))
    expected /= 8  # mean over the 2 x 2 x 2 positions
    got = feature_distillation_loss({0: s}, {0: t}, channel_dim=1)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # Tokens (B, N, C) with channels last give the same number for the same vectors.
    s_tokens, t_tokens = s.permute(0, 2, 3, 1).flatten(1, 2), t.permute(0, 2, 3, 1).flatten(1, 2)
    tokens = feature_distillation_loss({0: s_tokens}, {0: t_tokens}, channel_dim=-1)
    assert tokens.item() == pytest.approx(expected, rel=1e-5)


def test_teacher_gets_no_gradient() -> None:
    student, teacher = torch.tensor(STUDENT, requires_grad=True), torch.tensor(TEACHER, requires_grad=True)
    distillation_loss(student, teacher, temperature=2.0, topk=3).backward()
    assert teacher.grad is None and student.grad is not None and student.grad.abs().sum() > 0


@pytest.mark.parametrize("bad", [dict(alpha=1.5), dict(temperature=0.0), dict(kd_topk=1), dict(feature_kd=-1.0)])
def test_bad_config_is_rejected(bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        DistillationConfig(**bad)
