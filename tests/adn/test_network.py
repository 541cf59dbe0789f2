"""The split, the switchable norms and the masked forward of every family, against docs/design.md."""

import math

import pytest
import torch

import adn
from adn import SkipMask, SwitchableNorm

from .families import ALL_MODELS, SPLITS, randomize_norms, resolution


def _skippable_paths(name: str) -> dict[str, int]:
    """Path of every skippable block -> its stage, from the table in docs/design.md."""
    blocks, skippable, path = SPLITS[name]
    return {path(s, i): s for s, (n, k) in enumerate(zip(blocks, skippable, strict=True)) for i in range(n - k, n)}


def _all_block_paths(name: str) -> list[str]:
    blocks, _, path = SPLITS[name]
    return [path(s, i) for s, n in enumerate(blocks) for i in range(n)]


def test_mandatory_half_is_ceil_n_over_2():
    for name, (blocks, skippable, _) in SPLITS.items():
        assert [n - k for n, k in zip(blocks, skippable, strict=True)] == [math.ceil(n / 2) for n in blocks], name


def test_skipped_blocks_are_not_executed_and_norms_follow_their_stage(any_model):
    name, model = any_model
    executed: list[str] = []
    hooks = [
        model.get_submodule(p).register_forward_hook(lambda *_, p=p: executed.append(p))
        for p in _all_block_paths(name)
    ]
    norm_modes: dict[str, int] = {}
    for norm_path, norm in model.named_modules():
        if isinstance(norm, SwitchableNorm):
            for half in (0, 1):
                hooks.append(norm.norms[half].register_forward_hook(
                    lambda *_, p=norm_path, h=half: norm_modes.__setitem__(p, h)))
    skippable = _skippable_paths(name)
    x = torch.randn(1, 3, resolution(model), resolution(model))
    try:
        for mask in model.masks():
            executed.clear()
            norm_modes.clear()
            with torch.no_grad():
                model(x, skip=mask)
            expected = [p for p in _all_block_paths(name) if p not in skippable or not mask[skippable[p]]]
            assert executed == expected, (name, str(mask))
            for norm_path, norm in model.named_modules():
                if isinstance(norm, SwitchableNorm):
                    assert norm_modes[norm_path] == int(mask[norm.bit]), (name, str(mask), norm_path)
    finally:
        for h in hooks:
            h.remove()


def test_outputs_are_deterministic_and_switching_is_free(any_model):
    name, model = any_model
    x = torch.randn(2, 3, resolution(model), resolution(model))
    tensors_before = {k: v.data_ptr() for k, v in model.state_dict().items()}
    modules_before = [id(m) for m in model.modules()]
    with torch.no_grad():
        first = {str(m): model(x, skip=m) for m in model.masks()}
        again = {str(m): model(x, skip=m) for m in reversed(model.masks())}
    for mask, out in first.items():
        assert torch.equal(out, again[mask]), (name, mask)
    assert len({tuple(o.flatten()[:4].tolist()) for o in first.values()}) == len(first), "masks must differ"
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == tensors_before
    assert [id(m) for m in model.modules()] == modules_before


def test_switchable_norms_are_exactly_the_designed_ones():
    def switchable(name):
        model = adn.create_model(name, num_classes=10)
        return {p: m.bit for p, m in model.named_modules() if isinstance(m, SwitchableNorm)}

    mandatory = {s: [i for i in range(n - k)] for s, (n, k) in enumerate(zip((3, 4, 6, 3), (1, 2, 3, 1), strict=True))}
    assert switchable("resnet50") == {
        f"layer{s + 1}.{i}.bn{j}": s for s, idx in mandatory.items() for i in idx for j in (1, 2, 3)
    }
    swin = switchable("swin_t")
    assert {p: b for p, b in swin.items() if "downsample" in p} == {f"layers.{k}.downsample.norm": k for k in (1, 2, 3)}
    assert len(swin) == 3 + 2 * (1 + 1 + 3 + 1)
    vit = switchable("vit_b16")
    assert vit == {f"blocks.{3 * s + i}.norm{j}": s for s in range(4) for i in range(2) for j in (1, 2)}
    mnv2 = switchable("mobilenet_v2")
    assert mnv2["bn1"] == 0 and mnv2["blocks.0.0.bn1"] == 0 and mnv2["blocks.0.0.bn2"] == 0
    assert mnv2["bn2"] == 4 and all(mnv2[f"blocks.6.0.bn{j}"] == 4 for j in (1, 2, 3))
    assert "blocks.1.1.bn1" not in mnv2 and mnv2["blocks.4.1.bn3"] == 3


@pytest.mark.parametrize("name", ALL_MODELS)
def test_gradients_reach_only_the_active_path(name):
    torch.manual_seed(0)
    model = randomize_norms(adn.create_model(name, num_classes=10)).train()
    x = torch.randn(2, 3, resolution(model), resolution(model))
    skippable = _skippable_paths(name)
    S = model.num_stages

    model.zero_grad(set_to_none=True)
    model(x, skip=SkipMask.super_net(S)).logsumexp(-1).sum().backward()
    for path, norm in model.named_modules():
        if isinstance(norm, SwitchableNorm):
            assert all(p.grad is None for p in norm.norms[1].parameters()), f"{name}: skip-side {path} got a gradient"
            assert all(p.grad is not None for p in norm.norms[0].parameters()), path

    model.zero_grad(set_to_none=True)
    model(x, skip=SkipMask.base_net(S)).logsumexp(-1).sum().backward()
    for path in skippable:
        assert all(p.grad is None for p in model.get_submodule(path).parameters()), f"{name}: {path} got a gradient"
    for norm in (m for m in model.modules() if isinstance(m, SwitchableNorm)):
        assert all(p.grad is None for p in norm.norms[0].parameters())
        assert all(p.grad is not None for p in norm.norms[1].parameters())


def test_gradient_checkpointing_keeps_the_mask():
    torch.manual_seed(0)
    model = randomize_norms(adn.create_model("resnet_mini", num_classes=10)).train()
    x = torch.randn(4, 3, 32, 32)
    reference = {}
    for checkpointing in (False, True):
        model.set_grad_checkpointing(checkpointing)
        torch.manual_seed(1)
        model.zero_grad(set_to_none=True)
        out = model(x, skip="TFTF")
        out.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        reference.setdefault("out", out.detach())
        reference.setdefault("grads", grads)
        torch.testing.assert_close(out.detach(), reference["out"])
        assert grads.keys() == reference["grads"].keys()
        assert not any(k.startswith(("layer1.1.", "layer3.1.")) for k in grads)
        for k, g in grads.items():
            torch.testing.assert_close(g, reference["grads"][k])


def test_swin_mandatory_blocks_drop_no_path_while_their_stage_is_skipped():
    """The official Swin-ADN: stochastic depth off in the mandatory blocks of a skipped stage, on elsewhere."""
    torch.manual_seed(0)
    model = adn.create_model("swin_t", num_classes=10, drop_path_rate=0.5).train()
    x = torch.randn(2, 3, 224, 224)

    def twice(mask: str) -> tuple[torch.Tensor, torch.Tensor]:
        outs = []
        for seed in (1, 2):
            torch.manual_seed(seed)
            with torch.no_grad():
                outs.append(model(x, skip=mask))
        return outs[0], outs[1]

    assert torch.equal(*twice("TTTT"))  # the base-net trains without stochastic depth, as in the official code
    assert not torch.equal(*twice("FFFF"))
    assert not torch.equal(*twice("TTTF"))  # stage 4 kept: its mandatory block still drops paths
    model.set_skip("TFFF")
    first, second = model.layers[0].blocks[0], model.layers[1].blocks[0]
    assert first.drop_path1.skipped and first.drop_path2.skipped
    assert not second.drop_path1.skipped and not second.drop_path2.skipped
    assert "drop_path" not in " ".join(k for k in model.state_dict())  # no new tensors, official keys unchanged
    sub = adn.export_subnet(model, "TFFF", fold_bn=False)
    assert not any(isinstance(m, adn.norms.KeptOnly) for m in sub.modules())


def test_mobilenet_v2_has_the_official_classifier_dropout():
    torch.manual_seed(0)
    model = adn.create_model("mobilenet_v2", num_classes=10)
    assert model.drop_rate == 0.2  # torchvision's MobileNetV2, which the official ADN code trains
    features = torch.randn(4, 1280, 7, 7)
    model.train()
    torch.manual_seed(1)
    a = model.forward_head(features)
    torch.manual_seed(2)
    assert not torch.equal(a, model.forward_head(features))
    model.eval()
    assert torch.equal(model.forward_head(features), model.forward_head(features))
    assert adn.create_model("mobilenet_v2", num_classes=10, drop_rate=0.0).drop_rate == 0.0
