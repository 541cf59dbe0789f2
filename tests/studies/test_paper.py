"""`python -m studies.paper` on a tiny budget (1 seed, 1 epoch): table, figure, MLflow parent and children."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from adn import SkippableSequential, create_model
from studies.paper import MODES, naive_skipping

from .conftest import run_study

pytestmark = pytest.mark.slow  # trainings, searches or daemons in every test

MASKS = 16  # resnet_mini: 4 stages


@pytest.fixture(scope="module")
def study(digits: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("study")
    done = run_study("paper", "--data", str(digits), "--seeds", "7", "--epochs", "1", "--jobs", "2",
                     "--calibrate-norms", "64", "--out", str(work / "out"), "--tracking-uri",
                     f"sqlite:///{work / 'mlflow.db'}", cwd=work)
    assert done.returncode == 0, done.stderr[-3000:]
    return work


def test_table_has_the_four_rows_and_every_mask(study: Path) -> None:
    result = json.loads((study / "out" / "study.json").read_text())
    rows = result["rows"]
    assert list(rows) == ["adn_super", "adn_base", "vanilla", "base_alone"]
    assert [rows[k]["mask"] for k in rows] == ["FFFF", "TTTT", "FFFF", "TTTT"]
    assert rows["adn_super"]["params_m"] > rows["adn_base"]["params_m"] > 0
    assert rows["adn_super"]["gflops"] > rows["adn_base"]["gflops"] > 0
    # Each row is the per-seed evaluation it summarises: one seed, so the mean is that value and the spread 0.
    seed = result["per_seed"]["7"]
    assert set(seed) == {"adn", "adn_calibrated", "vanilla", "base"}
    assert len(seed["adn"]) == len(seed["vanilla"]) == len(seed["adn_calibrated"]) == MASKS and list(seed["base"]) == [
        "TTTT"]
    for key, kind in (("adn_super", "adn"), ("adn_base", "adn"), ("vanilla", "vanilla"), ("base_alone", "base")):
        top1 = rows[key]["top1"]
        assert top1["mean"] == pytest.approx(100 * seed[kind][rows[key]["mask"]]) and top1["std"] == 0.0
    # The runs' own end-of-training evaluation of the same weights on the same split agrees.
    for mode, kind in (("adn", "adn"), ("vanilla", "vanilla"), ("base", "base")):
        summary = json.loads((study / "out" / "seed7" / mode / "summary.json").read_text())
        for row in summary["masks"]:
            if kind != "vanilla" or row["mask"] == "FFFF":  # vanilla's skipped masks: naive, not its untrained norms
                assert seed[kind][row["mask"]] == pytest.approx(row["acc1"]), (mode, row["mask"])
    assert [c["claim"] for c in result["claims"]] == [
        "ADN super-net >= vanilla", "ADN base-net > base-net alone",
        "naive skipping of the vanilla network collapses, ADN's base-net does not"]
    # One seed: the paired comparisons have one difference each and decide nothing.
    for claim, (kind, row) in zip(result["claims"][:2], (("adn", "vanilla"), ("adn", "base_alone")), strict=True):
        assert claim["verdict"] == "undecided"
        mask = rows[row]["mask"]
        assert claim["paired"]["differences"] == pytest.approx([100 * (seed[kind][mask] - seed[
            "vanilla" if row == "vanilla" else "base"][mask])])
    # The learning curves: every training's evaluation after each epoch; the last is the table's row.
    for key, row in rows.items():
        curve = result["curves"][key]
        assert curve["epochs"][-1] == 1 and curve["per_seed"]["7"][-1] == pytest.approx(curve["mean"][-1])
        assert curve["mean"][-1] == pytest.approx(row["top1"]["mean"], abs=1e-9), key
    assert result["calibration"]["between_masks"] == MASKS - 2
    table = (study / "out" / "study.md").read_text()
    for name in ("ADN super-net", "ADN base-net", "vanilla (super-net alone)", "base-net alone"):
        assert f"| {name} |" in table
    assert sum(line.startswith(("| F", "| T")) for line in table.splitlines()) == MASKS


def test_figure_is_a_png(study: Path) -> None:
    import matplotlib.image

    path = study / "out" / "study.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width = matplotlib.image.imread(path).shape[:2]
    assert (width, height) == (1560, 576)  # figsize 13 x 4.8 at 120 dpi: Figure (b) and the learning curves


def test_mlflow_parent_run_with_one_child_per_training(study: Path) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{study / 'mlflow.db'}")
    parent_id = json.loads((study / "out" / "run.json").read_text())["mlflow_run_id"]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.params["seeds"] == "[7]"
    assert {a.path for a in client.list_artifacts(parent_id)} == {"study.md", "study.json", "study.png"}
    assert parent.data.metrics["vanilla_top1_mean"] == pytest.approx(
        json.loads((study / "out" / "study.json").read_text())["rows"]["vanilla"]["top1"]["mean"])
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    assert sorted(r.data.tags["adn.mode"] for r in children) == sorted(MODES)
    for child in children:
        assert child.info.status == "FINISHED" and child.info.run_name == f"{child.data.tags['adn.mode']}-seed7"
        assert "val_acc1_FFFF" in child.data.metrics or "val_acc1_TTTT" in child.data.metrics


def test_rerun_with_other_settings_is_one_sentence(study: Path, digits: Path) -> None:
    done = run_study("paper", "--data", str(digits), "--seeds", "7", "--epochs", "2", "--out", str(study / "out"),
                     "--no-tracking", cwd=study, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: ") and "other settings (epochs)" in done.stderr


def test_naive_skipping_is_dropping_the_blocks_of_a_plain_network() -> None:
    """Reference: the vanilla network with the skipped blocks replaced by identities, run with its one set of norms."""
    torch.manual_seed(0)
    model = create_model("resnet_mini", num_classes=10).eval()
    for m in model.modules():  # trained-looking norms (not timm's zero-init last norm), each copy different
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    reference = copy.deepcopy(model)
    for container in reference.modules():
        if isinstance(container, SkippableSequential):
            for i, bit in enumerate(container.bits):
                if bit is not None:
                    container[i] = nn.Identity()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = reference(x, skip="FFFF")
        assert not torch.allclose(model(x, skip="TTTT"), expected)
        assert torch.equal(naive_skipping(model)(x, skip="TTTT"), expected)
