"""`python -m studies.finetune` on a tiny budget: the conversion is the vanilla network, every training's
images are counted, the table, figure and MLflow runs exist, and a rerun reuses what it trained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from studies.finetune import budget_epochs

from .conftest import run_study

pytestmark = pytest.mark.slow  # trainings, searches or daemons in every test

FLAGS = ["--seeds", "5", "--epochs", "2", "--budgets", "0", "0.5", "--lrs", "0.01"]


@pytest.fixture(scope="module")
def study(digits: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("finetune")
    done = run_study("finetune", *FLAGS, "--data", str(digits), "--out", str(work / "out"),
                     "--tracking-uri", f"sqlite:///{work / 'mlflow.db'}", cwd=work)
    assert done.returncode == 0, done.stderr[-3000:]
    return work


def test_the_table_counts_every_training_and_the_conversion_is_the_vanilla_network(study: Path) -> None:
    result = json.loads((study / "out" / "finetune.json").read_text())
    rows = {r["name"]: r for r in [result["vanilla"], result["scratch"], *result["finetunes"]]}
    assert list(rows) == ["vanilla", "adn", "convert", "finetune-1ep-lr0.01"]
    summaries = {n: json.loads((study / "out" / "seed5" / n / "summary.json").read_text()) for n in rows}
    batch = 32
    assert summaries["adn"]["steps"] == summaries["vanilla"]["steps"] == 2 * summaries["finetune-1ep-lr0.01"]["steps"]
    for name, row in rows.items():
        assert row["images"] == summaries[name]["steps"] * batch
        acc = {m["mask"]: 100 * m["acc1"] for m in summaries[name]["masks"] if m["acc1"] is not None}
        assert row["super"]["mean"] == pytest.approx(acc["FFFF"]) and row["super"]["std"] == 0.0
    assert rows["convert"]["images"] == 0 and summaries["convert"]["init_from"].endswith("seed5/vanilla")
    # The conversion alone is the vanilla network: the same super-net top-1 on the same split, before any step.
    assert rows["convert"]["super"]["mean"] == pytest.approx(rows["vanilla"]["super"]["mean"])
    assert result["target_base_top1"] == pytest.approx(rows["adn"]["base"]["mean"])
    for row in result["finetunes"]:
        assert row["matches"] == (row["base"]["mean"] >= result["target_base_top1"])
    # Each training's per-epoch evaluations: the fine-tune starts with the conversion's evaluation at epoch 0.
    assert [e["epoch"] for e in summaries["finetune-1ep-lr0.01"]["evaluations"]] == [0, 1]
    assert summaries["finetune-1ep-lr0.01"]["evaluations"][0]["acc1"] == summaries["convert"]["evaluations"][0]["acc1"]
    table = (study / "out" / "finetune.md").read_text()
    assert "## Answer" in table and "| conversion only (no step) |" in table
    assert "| fine-tune 1 epoch (50%), lr 0.01 |" in table


def test_figure_and_mlflow_parent_with_one_child_per_training(study: Path) -> None:
    from mlflow import MlflowClient

    assert (study / "out" / "finetune.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    client = MlflowClient(f"sqlite:///{study / 'mlflow.db'}")
    parent_id = json.loads((study / "out" / "finetune-run.json").read_text())["mlflow_run_id"]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.params["budget_epochs"] == "[0, 1]"
    assert {a.path for a in client.list_artifacts(parent_id)} == {"finetune.md", "finetune.json", "finetune.png"}
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    assert sorted(r.info.run_name for r in children) == sorted(
        f"{n}-seed5" for n in ("vanilla", "adn", "convert", "finetune-1ep-lr0.01"))
    assert all(r.info.status == "FINISHED" for r in children)
    tuned = next(r for r in children if r.info.run_name.startswith("finetune"))
    assert tuned.data.params["init_from"].endswith("seed5/vanilla") and tuned.data.params["optimizer.lr"] == "0.01"


def test_a_rerun_reuses_every_training(study: Path, digits: Path) -> None:
    done = run_study("finetune", *FLAGS, "--data", str(digits), "--out", str(study / "out"), "--no-tracking",
                     cwd=study, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    reused = json.loads((study / "out" / "finetune.json").read_text())["timing"]["reused_from_an_earlier_invocation"]
    assert len(reused) == 4


@pytest.mark.parametrize("budget, epochs, expected", [(0, 24, 0), (0.05, 24, 1), (0.1, 24, 2), (0.25, 24, 6),
                                                      (0.5, 24, 12), (0.01, 24, 1)])
def test_budgets_are_whole_epochs(budget: float, epochs: int, expected: int) -> None:
    assert budget_epochs(budget, epochs) == expected
