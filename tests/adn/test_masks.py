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


def test_block_mask_parses_and_expands_stage_masks() -> None:
    from adn import BlockMask

    stages = (0, 1, 1, 2, 2, 2, 3)  # resnet50's skippable blocks
    m = BlockMask.parse("FTFFTFF", stages, "resnet50")
    assert str(m) == "FTFFTFF" and m.num_skipped == 2
    assert m.stage_mask() == "FFFF"  # no stage drops its whole sub-path
    assert BlockMask.parse("FTTFFFT", stages).stage_mask() == "FTFT"
    full = BlockMask.from_stage_mask(SkipMask.parse("TFTF", 4), stages)
    assert str(full) == "TFFTTTF" and full.stage_mask() == "TFTF"
    assert len(list(BlockMask.all(stages))) == 2**7
    with pytest.raises(ValueError, match="resnet50 has 7 skippable blocks"):
        BlockMask.parse("TTF", stages, "resnet50")


def test_block_mask_runs_the_blocks_it_keeps_and_matches_stage_masks() -> None:
    from adn import BlockMask, create_model, export_subnet
    from adn.complexity import count_flops

    torch.manual_seed(0)
    model = create_model("resnet_mini", num_classes=10, layers=(2, 4, 2, 2)).eval()
    assert model.block_stages == (0, 1, 1, 2, 3)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for mask in ("TFFT", "FTTF"):
            expanded = BlockMask.from_stage_mask(SkipMask.parse(mask, 4), model.block_stages)
            assert torch.equal(model(x, skip=mask), model(x, skip=expanded))
        partial = model.parse_mask("FTFFF")  # one of stage 2's two skippable blocks: its norms stay in kept mode
        assert isinstance(partial, BlockMask) and partial.stage_mask() == "FFFF"
        ran = []
        hooks = [model.layer2[i].register_forward_hook(lambda *a, i=i: ran.append(i)) for i in (2, 3)]
        model(x, skip=partial)
        for h in hooks:
            h.remove()
        assert ran == [3]  # layer2's first skippable block (index 2) is dropped, the second runs
        slim = export_subnet(model, partial)
        torch.testing.assert_close(slim(x), model(x, skip=partial), rtol=1e-4, atol=1e-4)
    assert count_flops(model, partial, 32) < count_flops(model, None, 32)
