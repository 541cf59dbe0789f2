"""Building models by name and starting them from a local timm state dict."""

import pytest
import timm
import torch
from safetensors.torch import save_file

import adn
from adn import SwitchableNorm
from adn.pretrained import TIMM_ARCH

from .families import randomize_norms


@pytest.fixture(scope="module")
def plain_mobilenet():
    """timm's plain MobileNetV2 with random weights, standing in for a pretrained one (no hub here)."""
    torch.manual_seed(0)
    return randomize_norms(timm.create_model("mobilenetv2_100", num_classes=10), seed=1).eval()


def _check_started_from(model, plain):
    x = torch.randn(2, 3, 224, 224)
    plain_state = plain.state_dict()
    pairs = [(p, m) for p, m in model.named_modules() if isinstance(m, SwitchableNorm)]
    assert pairs
    for path, pair in pairs:
        for half in pair.norms:
            for key, value in half.state_dict().items():
                assert torch.equal(value, plain_state[f"{path}.{key}"]), (path, key)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)
        assert not torch.allclose(model(x, skip="TTTTT"), plain(x))


def test_checkpoint_path_copies_each_norm_into_both_halves(tmp_path, plain_mobilenet):
    path = tmp_path / "mobilenetv2_100.pth"
    torch.save(plain_mobilenet.state_dict(), path)
    _check_started_from(adn.create_model("mobilenet_v2", num_classes=10, checkpoint_path=path), plain_mobilenet)


def test_safetensors_checkpoint(tmp_path, plain_mobilenet):
    path = tmp_path / "mobilenetv2_100.safetensors"
    save_file({k: v.contiguous() for k, v in plain_mobilenet.state_dict().items()}, str(path))
    _check_started_from(adn.create_model("mobilenet_v2", num_classes=10, checkpoint_path=path), plain_mobilenet)


def test_pretrained_goes_through_timm_with_a_local_file(tmp_path, plain_mobilenet):
    path = tmp_path / "weights.pth"
    torch.save(plain_mobilenet.state_dict(), path)
    model = adn.create_model("mobilenet_v2", num_classes=10, pretrained=True,
                             pretrained_cfg_overlay={"file": str(path), "num_classes": 10})
    _check_started_from(model, plain_mobilenet)


def test_an_adn_state_dict_round_trips(tmp_path):
    model = randomize_norms(adn.create_model("vit_mini", num_classes=10), seed=3).eval()
    path = tmp_path / "adn.pth"
    torch.save(model.state_dict(), path)
    again = adn.create_model("vit_mini", num_classes=10, checkpoint_path=path).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for mask in ("FFFF", "TFTF", "TTTT"):
            assert torch.equal(again(x, skip=mask), model(x, skip=mask))


def test_checkpoint_of_another_model_is_a_clear_error(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save(adn.create_model("resnet_mini", num_classes=10).state_dict(), path)
    with pytest.raises(ValueError, match="checkpoint does not fit vit_mini: .* missing keys"):
        adn.create_model("vit_mini", num_classes=10, checkpoint_path=path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        adn.create_model("vit_mini", checkpoint_path=tmp_path / "nope.pth")


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "obj": object()}, path)
    with pytest.raises(Exception, match="[Ww]eights only"):
        adn.create_model("vit_mini", num_classes=10, checkpoint_path=path)


def test_small_variants_have_no_pretrained_weights():
    with pytest.raises(ValueError, match="resnet_mini has no pretrained weights"):
        adn.create_model("resnet_mini", pretrained=True)


@pytest.mark.parametrize("name", sorted(TIMM_ARCH))
def test_each_family_is_built_on_the_timm_architecture_whose_weights_it_looks_up(name):
    """`adn.pretrained` finds weights by TIMM_ARCH; a family built on another architecture would load the wrong ones."""
    assert adn.create_model(name, num_classes=10).pretrained_cfg["architecture"] == TIMM_ARCH[name]
