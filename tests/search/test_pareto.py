"""`python -m search.pareto` on small trained checkpoints: the front, its accuracies on the search split (the
digits' minival) and the report split (val), batched passes, MLflow runs, samplers."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from adn import BlockMask, DepthSelector, select_mask
from adn.checkpoint import load_trained
from pipeline.data import make_loader
from pipeline.data.shard import main as shard_main
from pipeline.evaluate import evaluate
from search.accuracy import MaskEvaluator
from search.front import Candidate, hypervolume, pareto_front
from search.roofline import estimate_table
from search.tables import load_table, predict, save_table, table_filename

from ..conftest import run_module
from ..daemons import stop
from ..luts import seed

pytestmark = pytest.mark.slow  # trainings, searches or daemons in every test

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def work(tmp_path_factory, measured_tables: Path) -> Path:
    """Digits shards, and the env every command of this module runs with: its own table cache, holding this
    CPU's tables of the test run (``tests.luts``) so that ``--target cpu`` searches do not measure under load."""
    work = tmp_path_factory.mktemp("pareto")
    assert shard_main(["digits", "--out", str(work / "digits")]) == 0
    seed(measured_tables, _env(work), [("resnet_mini", 10), ("resnet_mini_deep", 10)])
    return work


def _env(work: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR",
                                                            "LOCAL_RANK", "MLFLOW_TRACKING_URI")}
    env.update(DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT), ADN_LUT_DIR=str(work / "luts"))
    return env


def _run(work: Path, module: str, *args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    return run_module(module, *args, cwd=work, env=_env(work), timeout=timeout)


def _train(work: Path, model: str, epochs: int) -> Path:
    out = work / f"{model}-run"
    done = _run(work, "pipeline.train", "--model", model, "--data", str(work / "digits"), "--output", str(out),
                "--epochs", str(epochs), "--no-tracking", "--workers", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def trained(work: Path, reference_run: Path) -> Path:
    """The test run's reference training (resnet_mini, 2 epochs), reached under this module's working directory."""
    link = work / "resnet_mini-run"
    link.symlink_to(reference_run / "run", target_is_directory=True)
    return link


@pytest.fixture(scope="module")
def cpu_search(work: Path, trained: Path) -> dict:
    """The demo's search: this CPU's table (cached), the 16 stage masks, tracked in MLflow.

    Paths are relative to the working directory, as `make demo` passes them (Ray trials run elsewhere)."""
    done = _run(work, "search.pareto", "--target", "cpu", "--checkpoint", trained.name, "--data", "digits",
                "--out", "p-cpu", "--max-latency-ms", "1000",
                "--tracking-uri", f"sqlite:///{work / 'mlflow.db'}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "best within 1000 ms" in done.stdout
    return json.loads((work / "p-cpu" / "pareto.json").read_text())


def _dominated(c: dict, others: list[dict]) -> bool:
    return any(o["acc1"] >= c["acc1"] and o["latency_ms"] <= c["latency_ms"]
               and (o["acc1"] > c["acc1"] or o["latency_ms"] < c["latency_ms"]) for o in others)


def test_front_is_non_dominated_and_holds_the_ends(cpu_search: dict) -> None:
    candidates, front = cpu_search["candidates"], cpu_search["front"]
    assert sorted(c["mask"] for c in candidates) == sorted(f"{i:04b}".replace("0", "F").replace("1", "T")
                                                           for i in range(16))
    assert not any(_dominated(f, candidates) for f in front)
    # Every candidate off the front is dominated by a front point or ties with one in both objectives (a table
    # timed under load can give two blocks the same cost; the front keeps one mask per point).
    on_front, points = {f["mask"] for f in front}, {(f["acc1"], f["latency_ms"]) for f in front}
    assert all(_dominated(c, front) or (c["acc1"], c["latency_ms"]) in points
               for c in candidates if c["mask"] not in on_front)
    assert "TTTT" in on_front  # the fastest mask is never dominated
    full = next(c for c in candidates if c["mask"] == "FFFF")
    cheaper_as_good = any(c["acc1"] >= full["acc1"] and c["latency_ms"] < full["latency_ms"] for c in candidates)
    assert ("FFFF" in on_front) != cheaper_as_good
    assert cpu_search["table"]["method"] == "measured" and cpu_search["best_within_budget"]["mask"] == front[-1]["mask"]
    for c in candidates:
        assert c["gflops"] > 0 and c["params_m"] > 0 and 0 <= c["acc1"] <= 1


def _one_by_one(trained: Path, work: Path, split: str, masks: list[str]) -> dict:
    model, meta = load_trained(trained)
    loader = make_loader(work / "digits", split, 100, {"data": meta["recipe"]["data"]}, rank=0, world_size=1,
                         num_workers=0)
    return evaluate(model, loader, masks)  # one full forward per mask and batch


def test_reported_accuracy_equals_one_by_one_evaluation(cpu_search: dict, trained: Path, work: Path) -> None:
    """Check 1: every candidate's accuracy on minival, and the front's on val, are `evaluate`'s, mask by mask;
    check 3: the one pass's segment runs against one by one (2 batches of the 180 minival samples)."""
    assert (cpu_search["search_split"], cpu_search["split"]) == ("minival", "val")
    masks = [c["mask"] for c in cpu_search["candidates"]]
    reference = _one_by_one(trained, work, "minival", masks)
    for c in cpu_search["candidates"]:
        assert c["acc1"] == reference[c["mask"]].acc1, c["mask"]
        assert c["acc5"] == reference[c["mask"]].acc5, c["mask"]
    on_val = _one_by_one(trained, work, "val", [f["mask"] for f in cpu_search["front"]])
    for f in cpu_search["front"]:
        assert (f["val_acc1"], f["val_acc5"]) == (on_val[f["mask"]].acc1, on_val[f["mask"]].acc5), f["mask"]
    assert all(c["val_acc1"] is None for c in cpu_search["candidates"] if c["mask"] not in on_val)
    timing = cpu_search["timing"]
    assert (timing["passes"], timing["masks_per_pass"], timing["trials"]) == (1, [16], 1)
    assert (timing["segment_runs"], timing["segment_runs_one_by_one"]) == (2 * (2 + 4 + 8 + 16), 2 * 16 * 4)
    assert timing["report_pass"]["masks_per_pass"] == [len(cpu_search["front"])]
    assert [w["samples"] for w in timing["eval_workers"]] == [180]


def test_two_workers_streaming_over_http_give_the_same_search(cpu_search: dict, trained: Path, work: Path) -> None:
    """`--data http://...` (python -m http.server on 127.0.0.1) cut over `--eval-workers 2`: each worker streams
    half of every pass, and the candidates and the front's val accuracies equal one worker's from the directory."""
    from ..daemons import http_server, require

    require("curl")
    with http_server(work / "digits") as url:
        done = _run(work, "search.pareto", "--target", "cpu", "--checkpoint", trained.name, "--data", url,
                    "--out", "p-http", "--no-tracking", "--eval-workers", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    over_http = json.loads((work / "p-http" / "pareto.json").read_text())
    assert [(c["mask"], c["acc1"], c["acc5"]) for c in over_http["candidates"]] == [
        (c["mask"], c["acc1"], c["acc5"]) for c in cpu_search["candidates"]]
    assert [(f["mask"], f["val_acc1"]) for f in over_http["front"]] == [(f["mask"], f["val_acc1"])
                                                                       for f in cpu_search["front"]]
    assert [w["samples"] for w in over_http["timing"]["eval_workers"]] == [90, 90]
    assert [w["samples"] for w in over_http["timing"]["report_pass"]["eval_workers"]] == [180, 180]


def test_calibrated_search_scores_each_mask_after_calibrating_it(cpu_search: dict, trained: Path,
                                                                 work: Path) -> None:
    """`--calibrate-norms 200`: every candidate's minival accuracy and the front's val accuracy are
    `evaluate(..., calibration=...)`'s (200 training images, validation transforms), mask by mask."""
    done = _run(work, "search.pareto", "--target", "cpu", "--checkpoint", trained.name, "--data", "digits",
                "--out", "p-calibrated", "--no-tracking", "--calibrate-norms", "200")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((work / "p-calibrated" / "pareto.json").read_text())
    assert report["calibrate_norms"] == 200
    model, meta = load_trained(trained)
    recipe = {"data": meta["recipe"]["data"]}
    train = make_loader(work / "digits", "train", 128, recipe, train=False, rank=0, world_size=1, num_workers=0,
                        max_samples=200)
    loaders = {s: make_loader(work / "digits", s, 100, recipe, rank=0, world_size=1, num_workers=0)
               for s in ("minival", "val")}
    masks = [c["mask"] for c in report["candidates"]]
    reference = evaluate(model, loaders["minival"], masks, calibration=train, calibration_images=200)
    assert [(c["acc1"], c["acc5"]) for c in report["candidates"]] == [
        (reference[m].acc1, reference[m].acc5) for m in masks]
    front = [f["mask"] for f in report["front"]]
    on_val = evaluate(model, loaders["val"], front, calibration=train, calibration_images=200)
    assert [f["val_acc1"] for f in report["front"]] == [on_val[m].acc1 for m in front]
    assert report["timing"]["segment_runs"] == report["timing"]["segment_runs_one_by_one"]
    plain = {c["mask"]: c["acc1"] for c in cpu_search["candidates"]}
    assert any(c["acc1"] != plain[c["mask"]] for c in report["candidates"])


def test_mlflow_holds_the_parent_run_and_one_child_per_candidate(cpu_search: dict, work: Path) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    parent = client.get_run(cpu_search["mlflow_parent"])
    assert parent.data.params["target"] == "cpu" and parent.data.params["space"] == "stages"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"pareto.json", "pareto.png"}
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 16
    by_mask = {c["mask"]: c for c in cpu_search["candidates"]}
    for child in children:
        mask = child.data.params["mask"]
        assert child.data.params["target"] == "cpu"
        assert child.data.metrics["acc1"] == pytest.approx(by_mask[mask]["acc1"])
        assert child.data.metrics["latency_ms"] == pytest.approx(by_mask[mask]["latency_ms"])
        assert child.data.metrics["gflops"] == pytest.approx(by_mask[mask]["gflops"])
        if by_mask[mask]["val_acc1"] is None:
            assert "val_acc1" not in child.data.metrics
        else:  # front members carry the report split's accuracy too
            assert child.data.metrics["val_acc1"] == pytest.approx(by_mask[mask]["val_acc1"])
    assert parent.data.params["search_split"] == "minival" and parent.data.params["split"] == "val"


def test_shipped_a100_estimate_works_with_json(trained: Path, work: Path) -> None:
    done = _run(work, "search.pareto", "--target", "a100", "--checkpoint", str(trained), "--data",
                str(work / "digits"), "--json", "--no-tracking", "--out", str(work / "p-a100"))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert set(report) >= {"front", "candidates"} and len(report["candidates"]) == 16
    for row in report["front"] + report["candidates"]:
        assert set(row) >= {"mask", "acc1", "latency_ms", "gflops", "params_m"}
    pareto = json.loads((work / "p-a100" / "pareto.json").read_text())
    assert pareto["table"]["method"] == "roofline-estimate" and pareto["table"]["source"] == "shipped"
    assert (work / "p-a100" / "pareto.png").stat().st_size > 10_000


def test_nsga2_over_blocks_with_30_percent_budget_nears_the_exhaustive_front(work: Path) -> None:
    """Against a fixed table (the A100 roofline estimate, not one timed during the test run), so that the
    search's second objective, and with it how soon NSGA-II converges, is the same on every run."""
    run = _train(work, "resnet_mini_deep", 3)
    model, meta = load_trained(run)
    masks = list(BlockMask.all(model.block_stages))
    assert len(masks) == 2**7
    budget = int(0.3 * len(masks))
    table = estimate_table("a100", "resnet_mini_deep", num_classes=len(meta["classes"]))
    save_table(table, work / "luts" / "a100" / table_filename(table))
    done = _run(work, "search.pareto", "--target", "a100", "--checkpoint", str(run), "--data", str(work / "digits"),
                "--space", "blocks", "--sampler", "nsga2", "--budget", str(budget), "--no-tracking",
                "--out", str(work / "p-blocks"))
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads((work / "p-blocks" / "pareto.json").read_text())
    assert found["sampler"] == "nsga2" and len(found["candidates"]) == budget  # distinct masks
    timing = found["timing"]  # one pass per generation of 4 (the last one cut to the budget)
    assert sum(timing["masks_per_pass"]) == budget and max(timing["masks_per_pass"]) == 4
    print(f"NSGA-II over blocks: {timing['passes']} passes, {timing['segment_runs']} segment runs against "
          f"{timing['segment_runs_one_by_one']} one by one")
    assert timing["segment_runs"] < timing["segment_runs_one_by_one"]

    # The exhaustive reference: every block mask on the search split, predicted with the search's own table.
    table = load_table(found["table"]["path"])
    loader = make_loader(work / "digits", found["search_split"], 100, {"data": meta["recipe"]["data"]}, rank=0,
                         world_size=1, num_workers=0)
    accuracy = MaskEvaluator(model).evaluate(loader, masks)
    exhaustive = [Candidate(str(m), accuracy[str(m)].acc1, predict(table, m), 0.0, 0.0) for m in masks]
    sampled = [Candidate(c["mask"], c["acc1"], c["latency_ms"], 0.0, 0.0) for c in found["candidates"]]
    for c in sampled:  # the search's numbers are the exhaustive evaluation's
        assert c.acc1 == accuracy[c.mask].acc1 and c.latency_ms == pytest.approx(predict(table, c.mask))
    ref_acc, ref_ms = min(c.acc1 for c in exhaustive), max(c.latency_ms for c in exhaustive)
    ratio = hypervolume(sampled, ref_acc, ref_ms) / hypervolume(exhaustive, ref_acc, ref_ms)
    print(f"hypervolume ratio {ratio:.3f} with {len(sampled)} distinct of {len(masks)} masks")
    assert 0.95 <= ratio <= 1.0 + 1e-9


def test_runtime_helper_picks_the_best_mask_within_a_budget(cpu_search: dict, work: Path) -> None:
    front = cpu_search["front"]
    selector = DepthSelector.from_file(work / "p-cpu")
    assert selector.select(front[-1]["latency_ms"] + 1) == front[-1]["mask"]
    assert selector.select(front[0]["latency_ms"]) == front[0]["mask"]
    assert selector.select(0.0) == front[0]["mask"]  # overload: the fastest sub-network, not an error
    if len(front) > 1:
        between = (front[0]["latency_ms"] + front[1]["latency_ms"]) / 2
        assert select_mask(work / "p-cpu" / "pareto.json", between) == front[0]["mask"]
    assert pareto_front([Candidate("A", 0.9, 2.0, 0, 0), Candidate("B", 0.8, 1.0, 0, 0),
                         Candidate("C", 0.7, 1.5, 0, 0)]) == [Candidate("B", 0.8, 1.0, 0, 0),
                                                               Candidate("A", 0.9, 2.0, 0, 0)]
    tied = [Candidate("A", 0.9, 2.0, 0, 0), Candidate("D", 0.9, 2.0, 0, 0), Candidate("B", 0.8, 1.0, 0, 0)]
    assert [c.mask for c in pareto_front(tied)] == ["B", "A"]  # one mask per point: the first of a tie


@pytest.mark.parametrize(("args", "message"), [
    (["--target", "a200"], "unknown target 'a200'"),
    (["--target", "a100", "--batch-size", "3"], "no table for resnet_mini batch 3"),
    (["--target", "a100", "--data", "WRONG"], "classes"),
    (["--target", "a100", "--data", "NOVAL"], "val.json"),
    (["--target", "a100", "--calibrate-norms", "0"], "--calibrate-norms takes a positive number"),
    (["--target", "a100", "--max-latency-ms", "-1"], "--max-latency-ms must be above 0, got -1"),
    (["--target", "a100", "--checkpoint", "MISFIT"], "do not fit that model: 1 tensors missing (first fc.bias)"),
])
def test_bad_input_fails_before_ray_starts(args: list[str], message: str, trained: Path, work: Path, monkeypatch,
                                          capsys) -> None:
    """The command's own main(), in this process (what is checked is its answer, not its start-up): exit 2 and one
    sentence, and Ray never initialised here."""
    from search.pareto import main

    wrong = work / "wrong"
    if not wrong.exists():  # 10 classes named differently: the checkpoint's classes are "0".."9"
        (wrong).mkdir()
        data = json.loads((work / "digits" / "val.json").read_text())
        data["classes"] = [f"c{i}" for i in range(10)]
        for shard in data["shards"]:
            os.link(work / "digits" / shard["name"], wrong / shard["name"])
        (wrong / "val.json").write_text(json.dumps(data))
    (work / "empty").mkdir(exist_ok=True)
    misfit = work / "misfit.safetensors"
    if not misfit.exists():  # the trained weights less one tensor, under the same metadata
        with safe_open(str(trained / "weights.safetensors"), framework="pt") as f:
            meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys() if k != "fc.bias"}  # noqa: SIM118
        save_file(state, str(misfit), metadata=meta)
    data_dir = {"WRONG": str(wrong), "NOVAL": str(work / "empty"), "MISFIT": str(misfit)}
    argv = ["--checkpoint", str(trained), "--no-tracking", "--data", str(work / "digits"), *args]
    argv = [data_dir.get(a, a) for a in argv]
    monkeypatch.setenv("ADN_LUT_DIR", str(work / "luts"))
    monkeypatch.chdir(work)
    sigterm = signal.getsignal(signal.SIGTERM)  # main() makes SIGTERM an interruption, as a command does
    try:
        code = main(argv)
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert message in err.strip().splitlines()[-1] and "Ray" not in err
    assert len(err.strip().splitlines()) <= 2, err  # one sentence (and at most one note)
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


def test_argument_checks_come_before_the_table_is_measured(trained: Path, work: Path) -> None:
    """A --budget of 1 used to be refused after a 55 s measurement of this CPU's table."""
    env = {**_env(work), "ADN_LUT_DIR": str(work / "luts-unused")}
    done = subprocess.run([sys.executable, "-m", "search.pareto", "--target", "cpu", "--checkpoint", str(trained),
                           "--data", str(work / "digits"), "--budget", "1", "--out", str(work / "p-early"),
                           "--tracking-uri", "http://127.0.0.1:9"], cwd=work, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "--budget must be at least 2" in done.stderr, done.stderr[-2000:]
    assert not (work / "luts-unused").exists(), "nothing was measured"
    # An unreachable tracking server is refused before anything is written: no empty output directory.
    done = subprocess.run([sys.executable, "-m", "search.pareto", "--target", "a100", "--checkpoint", str(trained),
                           "--data", str(work / "digits"), "--out", str(work / "p-early"),
                           "--tracking-uri", "http://127.0.0.1:9"], cwd=work, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "127.0.0.1:9" in done.stderr, done.stderr[-2000:]
    assert not (work / "p-early").exists()


def test_one_search_per_out_and_a_killed_search_is_marked_killed(trained: Path, work: Path) -> None:
    """Two searches on one --out overwrote each other's files; a killed search left its MLflow run RUNNING."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{work / 'mlflow-kill.db'}"
    first = subprocess.Popen([sys.executable, "-m", "search.pareto", "--target", "a100", "--checkpoint",
                              str(trained), "--data", str(work / "digits"), "--out", str(work / "p-once"),
                              "--tracking-uri", uri, "--experiment", "kill"], cwd=work, env=_env(work),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        client, runs = MlflowClient(uri), []
        deadline = time.monotonic() + 600
        while not runs and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
            with contextlib.suppress(Exception):  # the store is created by the search
                runs = client.search_runs([client.get_experiment_by_name("kill").experiment_id])
        assert runs and first.poll() is None, "the search never started its MLflow run"
        second = _run(work, "search.pareto", "--target", "a100", "--checkpoint", str(trained), "--data",
                      str(work / "digits"), "--out", str(work / "p-once"), "--no-tracking", timeout=120)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"is in use by PID {first.pid} on " in second.stderr.strip().splitlines()[-1]
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=120)
    finally:
        stop(first)
    assert first.returncode == 130 and "marked KILLED" in err, err[-2000:]
    assert client.get_run(runs[0].info.run_id).info.status == "KILLED"

