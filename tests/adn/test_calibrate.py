"""``calibrate_norms``: only the statistics of the batch norms a mask runs change, re-estimated exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import adn
from adn.calibrate import norms_used

from .families import randomize_norms

STATS = ("running_mean", "running_var", "num_batches_tracked")


@pytest.fixture()
def model() -> nn.Module:
    torch.manual_seed(0)
    return randomize_norms(adn.create_model("resnet_mini", num_classes=10)).eval()


SIZES = (16, 8, 24)


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 3, 32, 32, generator=g) * 2 + 0.5, torch.zeros(n, dtype=torch.long)) for n in SIZES]


@pytest.mark.parametrize("mask", ["FFTF", "TTTT"])
def test_only_the_statistics_of_the_norms_the_mask_runs_change(model: nn.Module, mask: str) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.set_skip("FFFF")
    used = norms_used(model, mask, _batches()[0][0])
    assert adn.calibrate_norms(model, mask, _batches()) == len(used) > 0
    assert not model.training and str(model.skip_mask) == "FFFF"  # mode and mask as they were
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    expected = {f"{n}.{s}" for n in used for s in STATS}
    assert changed == expected
    if mask == "TTTT":  # the base-net runs the skipped halves of the switchable pairs, never the kept ones
        assert all(".norms.1" in n or "norms" not in n for n in used)
        assert not any(".norms.0" in k for k in changed)


def test_statistics_are_the_average_over_the_batches(model: nn.Module) -> None:
    """The stem's norm sees conv1's output alone: its mean is the mean over every image, its variance the
    batches' unbiased variances averaged by batch size (not a momentum average, which favours the last)."""
    batches = _batches()
    adn.calibrate_norms(model, "FFFF", batches)
    with torch.no_grad():
        stem = model.conv1(torch.cat([x for x, _ in batches]))
    per_batch = stem.split(list(SIZES))
    mean = stem.mean(dim=(0, 2, 3))
    var = sum(n * b.var(dim=(0, 2, 3), unbiased=True) for n, b in zip(SIZES, per_batch, strict=True)) / sum(SIZES)
    torch.testing.assert_close(model.bn1.running_mean, mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.bn1.running_var, var, rtol=1e-4, atol=1e-5)
    assert model.bn1.momentum == 0.1 and int(model.bn1.num_batches_tracked) == 3


def test_max_images_and_an_empty_source(model: nn.Module) -> None:
    ref = randomize_norms(adn.create_model("resnet_mini", num_classes=10)).eval()
    ref.load_state_dict(model.state_dict())
    adn.calibrate_norms(model, "TFTF", _batches(), max_images=20)  # 16 + the first 4 of the second batch
    first, second = _batches()[0][0], _batches()[1][0][:4]
    adn.calibrate_norms(ref, "TFTF", [first, second])
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref.state_dict()[k]), k
    with pytest.raises(ValueError, match="at least one batch"):
        adn.calibrate_norms(model, "TFTF", [])


def test_layer_norm_models_have_nothing_to_calibrate() -> None:
    torch.manual_seed(0)
    vit = adn.create_model("vit_mini", num_classes=10).eval()
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    assert adn.calibrate_norms(vit, "TTTT", [torch.randn(4, 3, 32, 32)]) == 0
    assert all(torch.equal(v, before[k]) for k, v in vit.state_dict().items())


def test_calibrated_block_restores_the_statistics(model: nn.Module) -> None:
    from adn.calibrate import calibrated

    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = _batches()[0][0]
    with calibrated(model, "FFTF", _batches()) as count:
        assert count > 0
        inside = model(x, skip="FFTF")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not torch.equal(inside, model(x, skip="FFTF"))


def test_evaluation_switch_equals_calibrating_each_mask_by_hand(digits) -> None:
    import copy
    from pathlib import Path

    import yaml

    from pipeline.data import make_loader
    from pipeline.evaluate import evaluate

    recipe = yaml.safe_load((Path(__file__).resolve().parents[2] / "pipeline/recipes/resnet_mini.yaml").read_text())
    torch.manual_seed(0)
    model = randomize_norms(adn.create_model("resnet_mini", num_classes=10)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    val = make_loader(digits, "val", 120, recipe, rank=0, world_size=1, num_workers=0)
    train = make_loader(digits, "train", 100, recipe, train=False, rank=0, world_size=1, num_workers=0,
                        max_samples=300)
    got = evaluate(model, val, ["FFFF", "FTFT", "TTTT"], calibration=train, calibration_images=200)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    plain = evaluate(model, val, ["FFFF", "FTFT", "TTTT"])
    for mask in ("FFFF", "FTFT", "TTTT"):
        by_hand = copy.deepcopy(model)
        adn.calibrate_norms(by_hand, mask, train, max_images=200)
        assert got[mask] == evaluate(by_hand, val, [mask])[mask]
    assert got != plain  # random norms: the calibrated statistics change what the masks score
