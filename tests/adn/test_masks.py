import numpy as np
import pytest
import torch

import adn
from adn import SkipMask


def test_parse_string_and_bools_agree():
    from_str = SkipMask.parse("TTFF", 4)
    assert from_str == SkipMask.parse([True, True, False, False], 4)
    assert from_str == SkipMask.parse(np.array([1, 1, 0, 0], dtype=bool), 4)
    assert from_str == SkipMask.parse(torch.tensor([True, True, False, False]), 4)
    assert from_str == SkipMask.parse("ttff", 4)
    assert list(from_str) == [True, True, False, False]
    assert str(from_str) == "TTFF" and from_str.num_skipped == 2


def test_none_is_the_super_net():
    assert str(SkipMask.parse(None, 5)) == "FFFFF"
    assert str(SkipMask.base_net(3)) == "TTT"


def test_all_masks_are_enumerated_super_net_first():
    masks = [str(m) for m in SkipMask.all(4)]
    assert len(masks) == len(set(masks)) == 16
    assert masks[0] == "FFFF" and masks[-1] == "TTTT"
    assert masks[:3] == ["FFFF", "FFFT", "FFTF"]


@pytest.mark.parametrize("bad", ["TTF", "TTFFF", "TTXF", "", "1100", [True, False], [1, 0, 2, 0], 12, 3.5])
def test_bad_masks_raise_naming_model_stages_and_value(bad):
    with pytest.raises(ValueError) as err:
        SkipMask.parse(bad, 4, "resnet50")
    message = str(err.value)
    assert "resnet50" in message and "4 skippable stages" in message and repr(bad) in message


@pytest.mark.parametrize("name", ["resnet_mini", "vit_mini"])
def test_model_forward_rejects_bad_mask(name):
    model = adn.create_model(name, num_classes=10)
    with pytest.raises(ValueError, match=rf"{name} has 4 skippable stages.*'TTFFT'"):
        model(torch.zeros(1, 3, 32, 32), skip="TTFFT")
    with pytest.raises(ValueError, match=rf"{name} has 4 skippable stages.*'TQFF'"):
        model(torch.zeros(1, 3, 32, 32), skip="TQFF")


def test_unknown_model_lists_the_registry():
    with pytest.raises(ValueError, match="unknown model 'resnet51'.*resnet50"):
        adn.create_model("resnet51")
