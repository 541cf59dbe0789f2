"""`python -m pipeline.export`: each format written, loaded back, and equal to the super-net under the mask.

The CLI's ``main`` runs in this process (as ``python -m`` runs it, without the interpreter start per
call); one test runs the module as users type it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import adn
from adn.checkpoint import save_weights
from adn.export import FORMATS, load_subnet
from pipeline.export import main

from ..adn.families import randomize_norms

ROOT = Path(__file__).resolve().parents[2]
CLASSES = [str(i) for i in range(10)]


def _export(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module", params=["resnet_mini", "vit_mini"])
def trained(request, tmp_path_factory) -> tuple[str, Path, torch.nn.Module]:
    """Random weights with trained-looking norms (running statistics away from 0 and 1), as training saves them."""
    torch.manual_seed(0)
    model = randomize_norms(adn.create_model(request.param, num_classes=10)).eval()
    path = save_weights(model, tmp_path_factory.mktemp(request.param) / "weights.safetensors",
                        model_name=request.param, classes=CLASSES, resolution=32)
    return request.param, path, model


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_each_format_loads_back_and_matches_the_masked_super_net(trained, fmt: str, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    name, weights, model = trained
    out = tmp_path / f"slim{FORMATS[fmt]}"
    code, stdout, stderr = _export(capsys, "--checkpoint", str(weights), "--mask", "TFTF", "--out", str(out))
    assert code == 0, stderr[-2000:]
    assert f"wrote {out} ({fmt}): {name} under TFTF" in stdout
    params = sum(p.numel() for p in adn.export_subnet(model, "TFTF").parameters())
    assert f"{params / 1e6:.3f} M params, {adn.count_flops(model, 'TFTF', 32) / 1e9:.4f} GFLOPs" in stdout
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model(x, skip="TFTF")
        got = load_subnet(out)(x)  # ONNX through onnxruntime
    assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_the_mask_for_a_latency_budget_comes_from_a_search(trained, tmp_path: Path) -> None:
    """`python -m pipeline.export --pareto DIR --max-latency-ms X` as typed: the checkpoint is the search's."""
    name, weights, model = trained
    front = [{"mask": "TTTT", "acc1": 0.8, "latency_ms": 1.0}, {"mask": "FTFT", "acc1": 0.9, "latency_ms": 2.0},
             {"mask": "FFFF", "acc1": 0.95, "latency_ms": 3.0}]
    (tmp_path / "pareto.json").write_text(json.dumps({"front": front, "weights": str(weights)}))
    done = subprocess.run([sys.executable, "-m", "pipeline.export", "--pareto", str(tmp_path), "--max-latency-ms",
                           "2.5", "--out", str(tmp_path / "slim.pt2")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0 and "Warning" not in done.stderr, done.stderr[-2000:]
    assert f"{name} under FTFT" in done.stdout
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (load_subnet(tmp_path / "slim.pt2")(x) - model(x, skip="FTFT")).abs().max().item() <= 1e-4


@pytest.mark.parametrize(("args", "message"), [
    (["--mask", "TFT", "--out", "x.pt"], "a skip mask is 4 letters"),
    (["--mask", "TFTF", "--out", "x.bin"], "cannot tell the format of"),
    (["--pareto", "nowhere", "--max-latency-ms", "1", "--out", "x.pt"], "no Pareto file"),
    (["--mask", "TFTF", "--max-latency-ms", "1", "--out", "x.pt"], "pass --pareto DIR with it"),
])
def test_bad_input_is_one_sentence(args: list[str], message: str, tmp_path: Path,
                                   capsys: pytest.CaptureFixture) -> None:
    weights = save_weights(adn.create_model("resnet_mini", num_classes=10), tmp_path / "w.safetensors",
                           model_name="resnet_mini", classes=CLASSES, resolution=32)
    args = [str(tmp_path / a) if a.startswith("x.") or a == "nowhere" else a for a in args]
    code, _, stderr = _export(capsys, "--checkpoint", str(weights), *args)
    assert code == 2 and stderr.count("\n") == 1 and message in stderr


def test_calibrated_export_carries_statistics_from_the_training_images(digits: Path, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    """`--calibrate-norms N --data DIR`: the file computes what ``calibrate_norms`` on the first N training
    images (validation transforms) makes of the model, not what the saved statistics give."""
    import yaml

    from pipeline.data import make_loader
    from pipeline.evaluate import CALIBRATION_BATCH

    recipe = yaml.safe_load((ROOT / "pipeline" / "recipes" / "resnet_mini.yaml").read_text())
    torch.manual_seed(0)
    model = randomize_norms(adn.create_model("resnet_mini", num_classes=10)).eval()
    weights = save_weights(model, tmp_path / "weights.safetensors", model_name="resnet_mini", classes=CLASSES,
                           resolution=32, recipe=recipe)
    out = tmp_path / "slim.safetensors"
    code, stdout, stderr = _export(capsys, "--checkpoint", str(weights), "--mask", "FFTF", "--calibrate-norms", "200",
                                   "--data", str(digits), "--out", str(out))
    assert code == 0, stderr[-2000:]
    assert "batch norms recalibrated:" in stdout and "from 200 training images" in stdout
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        saved = model(x, skip="FFTF")
    loader = make_loader(digits, "train", CALIBRATION_BATCH, recipe, train=False, rank=0, world_size=1,
                         num_workers=0, max_samples=200)
    adn.calibrate_norms(model, "FFTF", loader, max_images=200)
    with torch.no_grad():
        expected = model(x, skip="FFTF")
        got = load_subnet(out)(x)
    assert (got - expected).abs().max().item() <= 1e-4
    assert (got - saved).abs().max().item() > 1e-2  # the saved statistics are not what was written
    code, _, stderr = _export(capsys, "--checkpoint", str(weights), "--mask", "FFTF", "--calibrate-norms", "200",
                              "--out", str(out))
    assert code == 2 and "--calibrate-norms takes a positive image count and --data" in stderr


def test_a_budget_no_front_mask_meets_is_refused_unless_the_fastest_is_asked_for(tmp_path: Path,
                                                                               capsys: pytest.CaptureFixture) -> None:
    weights = save_weights(adn.create_model("resnet_mini", num_classes=10), tmp_path / "w.safetensors",
                           model_name="resnet_mini", classes=CLASSES, resolution=32)
    front = [{"mask": "TTTT", "acc1": 0.8, "latency_ms": 1.2}, {"mask": "FFFF", "acc1": 0.95, "latency_ms": 3.0}]
    (tmp_path / "pareto.json").write_text(json.dumps({"front": front, "weights": str(weights)}))
    pick = ["--pareto", str(tmp_path), "--max-latency-ms", "0.01", "--out", str(tmp_path / "slim.pt")]
    code, _, stderr = _export(capsys, *pick)
    assert code == 2 and stderr == ("error: no front mask fits 0.01 ms: the fastest, TTTT, takes 1.2 ms; raise "
                                    "--max-latency-ms, or pass --fastest-if-none.\n")
    assert not (tmp_path / "slim.pt").exists()
    code, stdout, _ = _export(capsys, *pick, "--fastest-if-none")
    assert code == 0 and "resnet_mini under TTTT" in stdout
