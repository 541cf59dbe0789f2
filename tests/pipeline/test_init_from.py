"""`pipeline.train --init-from`: a trained network becomes the super-net exactly, from a file, timm's cache or an
MLflow run; a source that cannot serve the run is one sentence before training starts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file
from timm.models.resnet import BasicBlock, ResNet
from torch import nn

import adn
from adn.checkpoint import load_trained, save_weights
from adn.norms import SwitchableNorm
from adn.pretrained import timm_weights
from pipeline.config import parse_args, resolve_config
from pipeline.init_from import InitError, build, resolve

from ..adn.families import randomize_norms
from ..conftest import ROOT, train, train_env
from ..daemons import free_port

FAST = ["--workers", "1", "--batch-size", "32", "--log-every", "5"]
DIGITS = [str(i) for i in range(10)]


def plain_resnet_mini(num_classes: int = 10) -> nn.Module:
    """resnet_mini as a plain timm ResNet, built here from its definition (3x3 stem, no max-pool), random norms."""
    torch.manual_seed(0)
    model = ResNet(block=BasicBlock, layers=(2, 2, 2, 2), channels=(16, 32, 64, 128), stem_type="deep",
                   stem_width=8, num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return randomize_norms(model, seed=1).eval()


@pytest.mark.slow
def test_a_plain_state_dict_through_the_training_command_computes_what_the_plain_network_does(
        digits: Path, tmp_path: Path) -> None:
    plain = plain_resnet_mini()
    torch.save(plain.state_dict(), tmp_path / "plain.pth")
    done = train("--model", "resnet_mini", *FAST, "--data", str(digits), "--init-from", str(tmp_path / "plain.pth"),
                  "--max-steps", "0", "--output", str(tmp_path / "run"), "--no-tracking", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    model, meta = load_trained(tmp_path / "run")
    assert meta["extra"]["step"] == 0
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)  # the super-net is the plain network
        assert not torch.allclose(model(x, skip="TTTT"), plain(x))
    for name, module in model.named_modules():
        if isinstance(module, SwitchableNorm):  # both halves start from the plain norm
            for key, value in module.norms[1].state_dict().items():
                assert torch.equal(value, plain.state_dict()[f"{name}.{key}"]), (name, key)
    # It is evaluated before any step, and that evaluation is what the plain network scores on the val split.
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 0 and summary["init_from"] == str(tmp_path / "plain.pth")
    assert [e["epoch"] for e in summary["evaluations"]] == [0]
    from pipeline.data import make_loader
    from pipeline.evaluate import evaluate

    loader = make_loader(digits, "val", 100, "resnet_mini", rank=0, world_size=1, num_workers=0)
    correct = sum(int((plain(b.images).argmax(1) == b.labels).sum()) for b in loader.iterate(0))
    assert summary["evaluations"][0]["acc1"]["FFFF"] == pytest.approx(correct / 360)
    assert evaluate(model, loader, ["FFFF"])["FFFF"].acc1 == pytest.approx(correct / 360)
    assert "before any step (" in done.stderr + done.stdout


def test_a_classifier_of_other_classes_is_replaced_and_the_rest_kept() -> None:
    plain = plain_resnet_mini(num_classes=1000)
    source_state = plain.state_dict()
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"plain1000-{os.getpid()}.safetensors"
    save_file({k: v.contiguous() for k, v in source_state.items()}, str(path))
    try:
        source = resolve(str(path), "resnet_mini", DIGITS)
    finally:
        path.unlink()
    assert source.notes == ["classifier fc newly initialised for 10 classes (the state dict's has 1000)"]
    model, _ = build(source, "resnet_mini", 10)
    assert model.fc.weight.shape == (10, 128)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval().forward_features(x), plain.forward_features(x), rtol=0, atol=0)


def test_weights_of_another_architecture_or_no_state_dict_are_one_sentence(tmp_path: Path) -> None:
    vit = adn.create_model("vit_mini", num_classes=10)
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    with pytest.raises(InitError, match=r"^--init-from: the tensors of .*vit.pth \(a plain state dict\) do not fit "
                                        r"that model: \d+ tensors missing \(first conv1.weight\), \d+ unexpected"):
        resolve(str(tmp_path / "vit.pth"), "resnet_mini", DIGITS)
    (tmp_path / "notes.safetensors").write_text("not tensors")
    with pytest.raises(InitError, match=r"notes.safetensors' is not a state dict that torch or safetensors can read"):
        resolve(str(tmp_path / "notes.safetensors"), "resnet_mini", DIGITS)
    with pytest.raises(InitError, match=r"is neither 'timm', 'mlflow:RUN_ID' nor an existing file"):
        resolve(str(tmp_path / "missing.pth"), "resnet_mini", DIGITS)


@pytest.mark.parametrize("argv, message", [
    (["--init-from", "x.pth", "--resume"], "--init-from starts a new run from other weights and --resume continues"),
    (["--recipe", "resnet_mini_finetune"], "recipe resnet_mini_finetune fine-tunes trained weights"),
    (["--max-steps", "-1"], "--max-steps must be 0 or more, got -1."),
])
def test_conflicting_flags_are_one_sentence(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_config(parse_args(["--model", "resnet_mini", "--data", ".", *argv]))


def test_the_finetune_recipes_are_the_paper_ones_for_a_quarter_of_the_epochs() -> None:
    """The budget and rate the small study chose (README): a quarter of the epochs, the from-scratch peak rate."""
    scratch = resolve_config(parse_args(["--model", "resnet_mini", "--data", "."]))
    tuned = resolve_config(parse_args(["--recipe", "resnet_mini_finetune", "--data", ".", "--init-from", "x"]))
    assert tuned.model == "resnet_mini" and tuned.init_from == "x"
    assert tuned.data == scratch.data and tuned.adn == scratch.adn
    assert tuned.optimizer == scratch.optimizer and tuned.epochs == 24 // 4  # make reproduce-finetune: 24 epochs
    for model in ("resnet50", "vit_b16"):
        paper = resolve_config(parse_args(["--model", model, "--data", "."]))
        fine = resolve_config(parse_args(["--recipe", f"{model}_finetune", "--data", "."]))
        weights = timm_weights(model)  # inputs normalised as timm's weights were trained
        assert fine.init_from == "timm" and fine.model == model
        assert fine.data == {**paper.data, "mean": list(weights.mean), "std": list(weights.std)}
        assert fine.optimizer == paper.optimizer and fine.epochs == round(paper.epochs / 4)
        assert fine.lr_schedule["name"] == "cosine" and fine.lr_schedule["warmup_epochs"] >= 1
        assert fine.batch_size == paper.batch_size and fine.adn == paper.adn


# -- MLflow ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vanilla_run(digits: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A short vanilla training tracked in a SQLite MLflow store: (its working directory, its run id)."""
    work = tmp_path_factory.mktemp("vanilla")
    done = train("--model", "resnet_mini", *FAST, "--data", str(digits), "--mode", "vanilla", "--max-steps", "6",
                  "--output", str(work / "run"), "--tracking-uri", f"sqlite:///{work / 'mlflow.db'}", cwd=work)
    assert done.returncode == 0, done.stderr[-3000:]
    return work, json.loads((work / "run" / "run.json").read_text())["mlflow_run_id"]


@pytest.mark.slow
def test_init_from_an_mlflow_run_downloads_and_converts_its_weights(vanilla_run: tuple[Path, str], digits: Path,
                                                                    ) -> None:
    work, run_id = vanilla_run
    out = work / "converted"
    shutil.move(work / "run" / "weights.safetensors", work / "source.safetensors")  # only MLflow holds it now
    try:
        done = train("--model", "resnet_mini", *FAST, "--data", str(digits), "--init-from", f"mlflow:{run_id}",
                      "--max-steps", "0", "--output", str(out), "--tracking-uri", f"sqlite:///{work / 'mlflow.db'}",
                      cwd=work)
    finally:
        shutil.move(work / "source.safetensors", work / "run" / "weights.safetensors")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"initialised from MLflow run {run_id} (resnet_mini, vanilla training, step 6)" in done.stderr
    source, _ = load_trained(work / "run")
    converted, _ = load_trained(out)
    ours, theirs = converted.state_dict(), source.state_dict()
    copied = 0
    for key, value in ours.items():
        if ".norms.1." in key:  # a vanilla run never trained its skipped-mode norms: they start as the kept ones
            assert torch.equal(value, theirs[key.replace(".norms.1.", ".norms.0.")]), key
            copied += not torch.equal(value, theirs[key])
        else:
            assert torch.equal(value, theirs[key]), key
    assert copied > 0
    first = json.loads((out / "summary.json").read_text())["evaluations"][0]
    last = json.loads((work / "run" / "summary.json").read_text())["masks"][0]
    assert last["mask"] == "FFFF" and first["acc1"]["FFFF"] == pytest.approx(last["acc1"])
    from mlflow import MlflowClient

    params = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}").get_run(
        json.loads((out / "run.json").read_text())["mlflow_run_id"]).data.params
    assert params["init_from"] == f"mlflow:{run_id}"


def _logged_run(work: Path, name: str, model: nn.Module, model_name: str, classes: list[str]) -> str:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("adn-train").experiment_id
    run = client.create_run(experiment, run_name=name)
    path = save_weights(model, work / name / "weights.safetensors", model_name=model_name, classes=classes,
                        resolution=32)
    client.log_artifact(run.info.run_id, str(path))
    client.set_terminated(run.info.run_id)
    return run.info.run_id


@pytest.mark.slow
def test_a_run_of_another_model_or_other_classes_is_one_sentence_before_training(
        vanilla_run: tuple[Path, str], digits: Path) -> None:
    work, _ = vanilla_run
    vit = _logged_run(work, "vit", adn.create_model("vit_mini", num_classes=10), "vit_mini", DIGITS)
    letters = _logged_run(work, "letters", adn.create_model("resnet_mini", num_classes=3), "resnet_mini",
                          ["a", "b", "c"])
    uri = f"sqlite:///{work / 'mlflow.db'}"
    start = time.monotonic()
    done = train("--model", "resnet_mini", *FAST, "--data", str(digits), "--init-from", f"mlflow:{vit}",
                  "--output", str(work / "refused"), "--tracking-uri", uri, cwd=work)
    assert done.returncode == 2 and time.monotonic() - start < 60
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: --init-from mlflow:{vit}: MLflow run {vit} (vit_mini, ADN weights) "
                           "holds a vit_mini, and this run trains a resnet_mini")
    assert "Traceback" not in done.stderr and not (work / "refused").exists()  # nothing was started
    with pytest.raises(InitError, match=r"was trained on 3 classes \(a, b, c\), this run's data has 10 \(0, 1, 2, "
                                        r"\.\.\.\); start from a run on the same classes"):
        resolve(f"mlflow:{letters}", "resnet_mini", DIGITS, uri)
    with pytest.raises(InitError, match="the MLflow store .* has no run 'nope'"):
        resolve("mlflow:nope", "resnet_mini", DIGITS, uri)


# -- timm's cache ------------------------------------------------------------------------------------------------------
def _offline_env(hf_home: Path) -> dict[str, str]:
    """An empty hub cache and an endpoint on 127.0.0.1 where nothing listens: the hub cannot be reached."""
    return train_env(HF_HOME=str(hf_home), HF_ENDPOINT=f"http://127.0.0.1:{free_port()}")


def _can_unshare_net() -> bool:
    """Whether this process may start a command in a network namespace of its own (root, and allowed here)."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "--net", "true"], capture_output=True, timeout=30).returncode == 0


def test_offline_timm_without_the_cached_file_is_one_sentence_within_10_s(digits: Path, tmp_path: Path) -> None:
    """Within 10 s of the same command refused for a missing local file: no wait on the network (the start-up
    itself, which a busy machine stretches beyond 10 s, is the same in both)."""
    env = _offline_env(tmp_path / "hf")

    def refused(source: str) -> tuple[subprocess.CompletedProcess, float]:
        cmd = [sys.executable, "-m", "pipeline.train", "--model", "resnet50", "--data", str(digits), "--init-from",
               source, "--output", str(tmp_path / "run"), "--no-tracking"]
        if _can_unshare_net():
            cmd = ["unshare", "--net", *cmd]  # no network at all, as on an offline cluster node
        start = time.monotonic()
        done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        return done, time.monotonic() - start

    local, baseline = refused(str(tmp_path / "missing.pth"))
    assert local.returncode == 2 and "missing.pth" in local.stderr, local.stderr[-2000:]
    done, elapsed = refused("timm")
    assert done.returncode == 2, done.stderr[-2000:]
    assert elapsed < baseline + 10, (elapsed, baseline)
    lines = done.stderr.strip().splitlines()
    place = tmp_path / "hf" / "hub" / "models--timm--resnet50.a1_in1k" / "snapshots" / "main" / "model.safetensors"
    assert lines[-1].startswith("error: timm's pretrained weights of resnet50 (timm/resnet50.a1_in1k, "
                                "model.safetensors) are not in the hub cache and ")
    assert lines[-1].endswith(f"place it at {place}, or pass that file's path instead.")
    assert "Traceback" not in done.stderr and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_timm_weights_placed_where_the_sentence_says_start_the_run_offline(digits: Path, tmp_path: Path) -> None:
    plain = randomize_norms(timm.create_model("resnet50"), seed=2).eval()
    place = tmp_path / "hf" / "hub" / "models--timm--resnet50.a1_in1k" / "snapshots" / "main" / "model.safetensors"
    place.parent.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, str(place))
    recipe = yaml.safe_load((ROOT / "pipeline" / "recipes" / "resnet50_finetune.yaml").read_text())
    recipe["data"].update(train_crop=32, val_resize=32, val_crop=32)  # digits: 32 x 32
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    done = train("--recipe", str(tmp_path / "recipe.yaml"), *FAST, "--data", str(digits), "--max-steps", "0",
                  "--output", str(tmp_path / "run"), "--no-tracking", cwd=tmp_path, env=_offline_env(tmp_path / "hf"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"initialised from timm's pretrained weights ({place})" in done.stderr
    assert "classifier fc newly initialised for 10 classes (timm's weights have 1000)" in done.stderr
    model, _ = load_trained(tmp_path / "run")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), plain.forward_features(x), rtol=0, atol=0)


@pytest.mark.slow
def test_the_cluster_launcher_checks_the_source_and_hands_every_node_an_absolute_path(
        digits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.launch import check_train_args

    monkeypatch.chdir(tmp_path)
    torch.save(plain_resnet_mini().state_dict(), tmp_path / "plain.pth")
    job = check_train_args(["--model", "resnet_mini", "--data", str(digits), "--init-from", "plain.pth",
                            "--no-tracking"])
    at = job.args.index("--init-from")
    assert job.args[at + 1] == str(tmp_path / "plain.pth") and job.args.count("--init-from") == 1
    with pytest.raises(InitError, match="the MLflow store .* has no run 'nope'"):
        check_train_args(["--model", "resnet_mini", "--data", str(digits), "--init-from", "mlflow:nope",
                          "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
