"""Precision and layout of a step: bf16 gradients against fp32, channels-last against NCHW, nvJPEG against libjpeg.

The CUDA cases skip on a machine without a GPU; ``benchmarks/gpu.py`` runs them where one is lent.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from PIL import Image

from adn.loss import DistillationConfig
from pipeline.config import parse_args, resolve_config
from pipeline.precision import WEIGHT_DTYPES, use_channels_last
from pipeline.step import TrainStep

from .test_step import _model, _TorchEngine

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _step_grads(model: torch.nn.Module, mode: str, precision: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    engine = _TorchEngine(model)
    TrainStep(model, mode, DistillationConfig(alpha=0.5, temperature=1.0), precision)(engine, x, y)
    return torch.cat([g.flatten().float() for g in engine.grads.values() if g is not None])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("name", ["resnet_mini", "vit_mini"])
def test_bf16_autocast_step_gradients_stay_within_the_formats_own_error(device: str, name: str) -> None:
    """bf16 keeps 8 significant bits, so a bf16 step's gradients differ from fp32's by the format's error
    through the network, larger with batch norms (measured on CPU: 6 % relative L2 for resnet_mini, also in a
    one-pass step; 1 % for vit_mini). The two-pass step must add nothing to it: its error stays within 1.25
    times a one-pass step's on the same network and batch, and its direction within cosine 0.99 of fp32's."""
    torch.manual_seed(1)
    x, y = torch.randn(16, 3, 32, 32, device=device), torch.randint(0, 10, (16,), device=device)
    errors = {}
    for mode in ("vanilla", "adn"):
        model = _model(name).to(device)
        bf16, fp32 = _step_grads(copy.deepcopy(model), mode, "amp-bf16", x, y), _step_grads(model, mode, "fp32", x, y)
        errors[mode] = ((bf16 - fp32).norm() / fp32.norm()).item()
        assert torch.nn.functional.cosine_similarity(bf16, fp32, dim=0) > 0.99, mode
    assert errors["adn"] <= 1.25 * errors["vanilla"] + 0.005, errors
    assert errors["adn"] < 0.1, errors


@pytest.mark.parametrize(("stage", "precision"), [(0, "fp32"), (0, "bf16"), (1, "fp32"), (2, "bf16")])
def test_channels_last_survives_deepspeed_initialize_and_trains_as_nchw(deepspeed_world, stage: int,
                                                                        precision: str) -> None:
    from pipeline.trainer import deepspeed_config

    cfg = resolve_config(parse_args(["--model", "resnet_mini", "--data", "unused", "--batch-size", "8",
                                     "--zero-stage", str(stage), "--precision", precision]))

    def train(channels_last: bool) -> tuple[torch.nn.Module, list[float], bool | None]:
        model = _model("resnet_mini")
        engine, *_ = deepspeed_world.initialize(
            model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
            config=deepspeed_config(cfg, precision))
        converted = use_channels_last(model) if channels_last else None
        step, losses = TrainStep(model, "adn", DistillationConfig(), precision), []
        torch.manual_seed(1)
        for _ in range(3):
            x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
            x = x.to(WEIGHT_DTYPES[precision], memory_format=torch.channels_last if channels_last else
                     torch.preserve_format)
            losses.append(step(engine, x, y)["loss_ce"].item())
        return model, losses, converted

    nchw, nchw_losses, _ = train(False)
    last, last_losses, converted = train(True)
    convs = [p for p in last.parameters() if p.dim() == 4]
    # ZeRO 1 and 2 hold the weights in a flat buffer: they stay NCHW and only the activations are channels-last.
    assert converted == (stage == 0)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in convs) == (stage == 0)
    tol = {"fp32": 1e-4, "bf16": 3e-2}[precision]
    torch.testing.assert_close(torch.tensor(last_losses), torch.tensor(nchw_losses), rtol=tol, atol=tol)
    for a, b in zip(last.parameters(), nchw.parameters(), strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


@CUDA
def test_channels_last_outputs_equal_nchw_on_cuda() -> None:
    torch.backends.cudnn.allow_tf32 = False  # both layouts in true fp32, so only the kernels differ
    try:
        model = _model("resnet_mini").cuda().eval()
        x = torch.randn(8, 3, 32, 32, device="cuda")
        with torch.no_grad():
            nchw = model(x, skip="FTFT")
            model.to(memory_format=torch.channels_last)
            last = model(x.contiguous(memory_format=torch.channels_last), skip="FTFT")
        torch.testing.assert_close(last, nchw, rtol=1e-4, atol=1e-5)
    finally:
        torch.backends.cudnn.allow_tf32 = True


@CUDA
def test_nvjpeg_decodes_within_a_few_levels_of_libjpeg() -> None:
    """nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's: the same JPEG decodes a few levels apart."""
    from sklearn.datasets import load_sample_image
    from torchvision.io import ImageReadMode, decode_jpeg

    worst = 0
    for name in ("china.jpg", "flower.jpg"):
        buffer = io.BytesIO()
        Image.fromarray(load_sample_image(name)).save(buffer, format="JPEG", quality=90)
        data = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
        cpu = decode_jpeg(data, mode=ImageReadMode.RGB).int()
        gpu = decode_jpeg(data, mode=ImageReadMode.RGB, device="cuda").cpu().int()
        diff = (gpu - cpu).abs()
        worst = max(worst, int(diff.max()))
        assert diff.float().mean() < 1.0, (name, diff.float().mean())
    print(f"largest difference nvJPEG - libjpeg-turbo: {worst} levels")
    assert worst <= 16


def test_precision_and_layout_choices_and_their_refusals() -> None:
    from pipeline.precision import resolve_precision

    assert resolve_precision("auto", use_cuda=True, amp=True) == "amp-bf16"
    assert resolve_precision("auto", use_cuda=True, amp=False) == "fp32"
    assert resolve_precision("auto", use_cuda=False, amp=True) == "fp32"
    assert resolve_precision("bf16", use_cuda=False, amp=False) == "bf16"
    with pytest.raises(ValueError, match="--precision fp16 needs a GPU"):
        resolve_precision("fp16", use_cuda=False, amp=False)
    with pytest.raises(ValueError, match="--channels-last works with --zero-stage 0 to 2"):
        resolve_config(parse_args(["--model", "resnet_mini", "--data", "unused", "--zero-stage", "3",
                                   "--channels-last"]))
