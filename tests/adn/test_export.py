"""export_subnet: a plain, slim module that computes the super-net under a mask."""

import pytest
import torch
from torch import nn

import adn
from adn import AdaptiveDepthMixin, SkippableSequential, SwitchableNorm
from adn.complexity import count_params
from adn.export import export_subnet, fold_batch_norms

from .families import randomize_norms, resolution

CNNS = ("resnet50", "mobilenet_v2", "resnet_mini")


def test_export_matches_the_masked_super_net_for_every_mask(any_model):
    name, model = any_model
    x = torch.randn(2, 3, resolution(model), resolution(model))
    stored = count_params(model)
    for mask in model.masks():
        sub = export_subnet(model, mask)
        with torch.no_grad():
            expected = model(x, skip=mask)
            got = sub(x)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
        assert not isinstance(sub, AdaptiveDepthMixin) and sub.adn_mask == str(mask)
        assert not any(isinstance(m, (SwitchableNorm, SkippableSequential)) for m in sub.modules())
        assert count_params(sub) < stored
        if name in CNNS:
            assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in sub.modules()), "BN left unfolded"


def test_export_leaves_the_source_model_alone():
    model = randomize_norms(adn.create_model("resnet_mini", num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x, skip="FTFT")
        export_subnet(model, "TTTT")
        assert str(model.skip_mask) == "FTFT"
        assert torch.equal(model(x, skip="FTFT"), before)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("name", ["resnet_mini", "vit_mini", "mobilenet_v2"])
def test_exported_subnet_goes_through_torch_export(name):
    model = randomize_norms(adn.create_model(name, num_classes=10)).eval()
    sub = export_subnet(model, "T" * model.num_stages)
    x = torch.randn(1, 3, resolution(model), resolution(model))
    program = torch.export.export(sub, (x,))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x, skip="T" * model.num_stages), rtol=1e-4, atol=1e-4)


def test_a_conv_whose_output_is_used_twice_is_not_folded():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    module = randomize_norms(Branchy()).eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        expected = module(x)
        assert fold_batch_norms(module) == 0
        assert torch.equal(module(x), expected)


def test_folding_matches_the_batch_norm_formula():
    conv, bn = nn.Conv2d(3, 4, 3, bias=True), randomize_norms(nn.BatchNorm2d(4)).eval()
    module = nn.Sequential(conv, bn).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        y = nn.functional.conv2d(x, conv.weight, conv.bias)
        reference = (y - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
        reference = reference * bn.weight[:, None, None] + bn.bias[:, None, None]
        assert fold_batch_norms(module) == 1
        assert isinstance(module[1], nn.Identity)
        torch.testing.assert_close(module(x), reference, rtol=1e-5, atol=1e-5)
