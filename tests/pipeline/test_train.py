"""`python -m pipeline.train` end to end on the digits shards: DeepSpeed on CPU, checkpoints, MLflow."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from adn.checkpoint import load_trained, read_metadata
from pipeline.data import make_loader
from pipeline.data.shard import write_shards
from pipeline.data.sources import digits_samples
from pipeline.evaluate import evaluate

from ..conftest import FAST, train, train_env
from ..daemons import free_port, stop, wait_for


@pytest.mark.slow
def test_run_writes_weights_that_load_without_deepspeed(reference_run: Path, digits: Path) -> None:
    run = reference_run / "run"
    meta = read_metadata(run)
    assert meta["model"] == "resnet_mini" and meta["num_classes"] == 10 and meta["resolution"] == 32
    assert meta["classes"] == [str(i) for i in range(10)]
    model, _ = load_trained(run)
    summary = json.loads((run / "summary.json").read_text())
    rows = {r["mask"]: r for r in summary["masks"]}
    assert set(rows) == {"FFFF", "TTTT"} and summary["steps"] == 78
    # The accuracy the run reports is what the saved weights give on the validation shards.
    loader = make_loader(digits, "val", 100, "resnet_mini", rank=0, world_size=1, num_workers=0)
    again = evaluate(model, loader, ["FFFF", "TTTT"])
    for mask in ("FFFF", "TTTT"):
        assert again[mask].acc1 == pytest.approx(rows[mask]["acc1"]) and again[mask].samples == 360
    kept = sorted(p.name for p in (run / "checkpoints").glob("step*"))
    assert kept == ["step000000070", "step000000078"]  # --keep-checkpoints 2


@pytest.mark.slow
def test_mlflow_store_holds_params_metrics_and_artifacts(reference_run: Path) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{reference_run / 'mlflow.db'}"
    run_id = json.loads((reference_run / "run" / "run.json").read_text())["mlflow_run_id"]
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["model"] == "resnet_mini" and params["mode"] == "adn" and params["world_size"] == "1"
    assert params["adn.alpha"] == "0.5" and params["batch_size"] == "32" and params["versions.torch"]
    for key in ("loss_ce", "loss_kd", "lr", "images_per_s"):
        history = client.get_metric_history(run_id, key)
        assert len(history) >= 15, key  # every 5 steps over 78 steps
    assert all(m.value > 0 for m in client.get_metric_history(run_id, "images_per_s"))
    for mask in ("FFFF", "TTTT"):
        for k in ("acc1", "acc5"):
            values = client.get_metric_history(run_id, f"val_{k}_{mask}")
            assert [m.step for m in values] == [39, 78]
            assert all(0.0 <= m.value <= 1.0 for m in values)
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "weights.safetensors", "summary.json"} <= artifacts


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_kill_9_then_resume_is_bit_identical_with_and_without_loader_workers(digits: Path, tmp_path: Path,
                                                                             workers: int) -> None:
    """kill -9 right after a mid-epoch checkpoint, then --resume: the same weights as the run never interrupted.
    Without workers the loader augments in the training process, from the RNG the checkpoint restores: the
    replay of the epoch's first batches must come before that restore, or it consumes the restored state."""
    short = [*FAST, "--data", str(digits), "--workers", str(workers), "--max-steps", "8", "--save-every-steps",
             "4", "--no-tracking"]
    whole = train(*short, "--output", str(tmp_path / "whole"), cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.train", *short, "--output", str(out)], cwd=tmp_path,
                            env=train_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = out / "checkpoints" / "latest"
    deadline = time.monotonic() + 600
    while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training ended before it could be killed"
    assert latest.read_text().strip() == "step000000004"  # killed mid-epoch, right after the first step checkpoint
    assert json.loads((out / ".lock").read_text())["pid"] == proc.pid  # the dead process's lock stays behind
    resumed = train(*short, "--output", str(out), "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"took over the lock of {str(out)!r} from PID {proc.pid} on " in resumed.stderr
    assert (out / ".lock").read_text() == "", "released on exit"
    expected, got = load_file(tmp_path / "whole" / "weights.safetensors"), load_file(out / "weights.safetensors")
    assert expected.keys() == got.keys()
    assert [k for k in expected if not torch.equal(expected[k], got[k])] == []


@pytest.mark.slow
def test_sigusr1_checkpoints_at_the_next_step_and_the_resumed_run_is_bit_identical(
        reference_run: Path, digits: Path, tmp_path: Path) -> None:
    """SLURM's warning before a time limit (``sbatch --signal=USR1@120``): the step finishes, a checkpoint is
    written, the process leaves with 128 + SIGUSR1; --resume then ends where an uninterrupted run ends."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.train", *FAST, "--data", str(digits), "--output",
                             str(out), "--no-tracking"], cwd=tmp_path, env=train_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600
        while not (out / "config.yaml").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(2.0)  # into the first epoch
        proc.send_signal(signal.SIGUSR1)
        _, err = proc.communicate(timeout=900)
    finally:
        stop(proc)
    assert proc.returncode == 128 + signal.SIGUSR1, err[-3000:]
    last = err.strip().splitlines()[-1]
    step = int(last.split("at step ")[1].split(";")[0])
    assert last == (f"stopped by SIGUSR1 at step {step}; checkpoint step{step:09d} is complete; continue with "
                    "--resume.")
    assert 0 < step < 78 and (out / "checkpoints" / "latest").read_text() == f"step{step:09d}"
    resumed = train(*FAST, "--data", str(digits), "--output", str(out), "--no-tracking", "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {out / 'checkpoints' / f'step{step:09d}'}" in resumed.stderr
    expected = load_file(reference_run / "run" / "weights.safetensors")
    got = load_file(out / "weights.safetensors")
    assert all(torch.equal(expected[k], got[k]) for k in expected)


@pytest.mark.slow
def test_resume_from_an_epoch_end_checkpoint_ends_with_the_same_weights(reference_run: Path, first_epoch: Path,
                                                                      digits: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(first_epoch, out)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step000000039"
    resumed = train(*FAST, "--data", str(digits), "--output", str(out), "--no-tracking", "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = load_file(reference_run / "run" / "weights.safetensors")
    got = load_file(out / "weights.safetensors")
    assert all(torch.equal(expected[k], got[k]) for k in expected)


@pytest.mark.slow
def test_two_ranks_over_loopback_hold_identical_weights_after_every_step(digits: Path, tmp_path: Path) -> None:
    """Two gloo ranks on CPU, started by the real `deepspeed` launcher as a user would."""
    out = tmp_path / "run"
    launcher = Path(sys.executable).parent / "deepspeed"
    done = subprocess.run(
        [str(launcher), "--num_accelerators", "2", "--master_port", str(free_port()), "--module", "pipeline.train",
         "--model", "resnet_mini", "--epochs", "1", "--batch-size", "16", "--workers", "1", "--max-steps", "6",
         "--data", str(digits), "--output", str(out), "--no-tracking", "--verify-replicas"],
        cwd=tmp_path, env=train_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    hashes = [[json.loads(line) for line in (out / "replicas" / f"rank{r}.jsonl").read_text().splitlines()]
              for r in range(2)]
    assert [h["step"] for h in hashes[0]] == [1, 2, 3, 4, 5, 6]
    assert hashes[0] == hashes[1]
    assert len({h["sha256"] for h in hashes[0]}) == 6  # the weights change every step
    assert read_metadata(out)["recipe"]["world_size"] == 2


@pytest.mark.slow
def test_a_second_training_on_one_output_is_refused(digits: Path, tmp_path: Path) -> None:
    """Two runs on one --output (seeds 0 and 1) both exited 0 and left a directory mixing their files."""
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "pipeline.train", *FAST, "--data", str(digits), "--output",
                              str(out), "--max-steps", "20", "--no-tracking"], cwd=tmp_path, env=train_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600
        while not ((out / ".lock").exists() and (out / ".lock").read_text()) and time.monotonic() < deadline:
            assert first.poll() is None, first.stderr.read()[-3000:]
            time.sleep(0.05)
        second = train(*FAST, "--data", str(digits), "--output", str(out), "--seed", "1", "--no-tracking",
                        cwd=tmp_path, timeout=120)
        _, err = first.communicate(timeout=900)
    finally:
        stop(first)
    assert second.returncode == 2, second.stderr[-2000:]
    last = second.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: the training output {str(out)!r} is in use by PID {first.pid} on "
                           f"{socket.gethostname()} (since ")
    assert "-m pipeline.train --model resnet_mini" in last
    assert last.endswith("); wait for it to finish or choose another one.")
    assert first.returncode == 0, err[-3000:]
    assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 20


@pytest.mark.slow
def test_unreadable_val_images_are_counted_beside_the_accuracy(digits: Path, tmp_path: Path) -> None:
    """Validation scored 356 of 360 samples and said nothing; now every accuracy says how many it covers."""
    data = tmp_path / "data"
    data.mkdir()
    for path in digits.iterdir():
        if not path.name.startswith("val"):
            os.link(path, data / path.name)
    classes, splits = digits_samples()
    refs = list(splits["val"])
    refs[5] = dataclasses.replace(refs[5], path="", offset=-1, size=-1, data=b"not an image" * 20)
    write_shards(refs, classes, data, "val", shard_size=400)
    done = train("--model", "resnet_mini", "--epochs", "1", "--max-steps", "3", "--batch-size", "32", "--workers",
                  "1", "--data", str(data), "--output", str(tmp_path / "run"), "--no-tracking", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "on 359 of 360 val images (1 unreadable, skipped)" in done.stdout
    report = json.loads((tmp_path / "run" / "summary.json").read_text())["data"]
    assert report == {"val_samples": 359, "val_manifest_samples": 360, "bad_samples_train": 0, "bad_samples_val": 1}


@pytest.mark.slow
def test_resume_with_other_settings_is_refused(reference_run: Path, digits: Path) -> None:
    done = train("--model", "resnet_mini", "--epochs", "2", "--batch-size", "16", "--data", str(digits),
                  "--output", str(reference_run / "run"), "--no-tracking", "--resume", cwd=reference_run)
    assert done.returncode == 2
    assert "batch_size=32" in done.stderr and "resume with the same settings" in done.stderr


@pytest.mark.slow
def test_existing_run_needs_resume(reference_run: Path, digits: Path) -> None:
    done = train(*FAST, "--data", str(digits), "--output", str(reference_run / "run"), "--no-tracking",
                  cwd=reference_run)
    assert done.returncode == 2 and "pass --resume" in done.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "resnet_mini", "--data", "/nonexistent"], "/nonexistent"),
    (["--model", "no_such_model", "--data", "."], "no_such_model"),
    (["--model", "resnet_mini", "--data", ".", "--tracking-uri", "http://127.0.0.1:9"], "unreachable"),
    # Numbers out of range: each one sentence, before anything is written.
    (["--model", "resnet_mini", "--data", ".", "--epochs", "0"], "--epochs must be at least 1, got 0."),
    (["--model", "resnet_mini", "--data", ".", "--batch-size", "0"], "--batch-size must be at least 1, got 0."),
    (["--model", "resnet_mini", "--data", ".", "--log-every", "0"], "--log-every must be at least 1, got 0."),
    (["--model", "resnet_mini", "--data", ".", "--workers", "-1"], "--workers must be 0 or more, got -1."),
    (["--model", "resnet_mini", "--data", ".", "--alpha", "1.5"], "must be within 0 and 1, got 1.5."),
    (["--model", "resnet_mini", "--data", ".", "--lr", "0"], "--lr must be above 0, got 0.0."),
    # A bad --resume PATH is found before the engine starts, not after it.
    (["--model", "resnet_mini", "--data", ".", "--resume", "/nonexistent"], "no DeepSpeed checkpoint to resume in"),
])
def test_bad_input_is_one_clear_error(args: list[str], message: str, digits: Path, tmp_path: Path) -> None:
    args = [str(digits) if a == "." else a for a in args]
    began = time.monotonic()
    done = train(*args, "--output", str(tmp_path / "run"), cwd=tmp_path, timeout=120)
    assert time.monotonic() - began < 5 or "unreachable" in message
    assert not (tmp_path / "run").exists()
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last
    if "unreachable" in message:  # the hint names what the user did: the flag, not the environment variable
        assert "leave out --tracking-uri" in last and "MLFLOW_TRACKING_URI" not in last


def test_a_crafted_manifest_is_one_sentence_from_the_command_within_5_s(digits: Path, tmp_path: Path) -> None:
    crafted = tmp_path / "shards"
    shutil.copytree(digits, crafted)
    manifest = json.loads((crafted / "train.json").read_text())
    manifest["shards"][0]["name"] = "../../etc/passwd"
    (crafted / "train.json").write_text(json.dumps(manifest))
    began = time.monotonic()
    done = train("--model", "resnet_mini", "--data", str(crafted), "--output", str(tmp_path / "run"), cwd=tmp_path,
                 timeout=120)
    assert done.returncode == 2 and time.monotonic() - began < 5, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: manifest {str(crafted / 'train.json')!r} lists shard '../../etc/passwd' with a name that is not a "
        "plain relative path under the location; rewrite the shards.")


@pytest.mark.parametrize(("raised", "status"), [(ValueError("bad weights"), "FAILED"),
                                                (KeyboardInterrupt(), "KILLED"), (None, "RUNNING")])
def test_a_block_that_raises_leaves_its_run_failed_or_killed(raised: BaseException | None, status: str,
                                                             tmp_path: Path) -> None:
    """A search that failed or was killed left its MLflow parent run RUNNING for ever."""
    from mlflow import MlflowClient

    from pipeline.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "exit", "run")
    with contextlib.suppress(ValueError, KeyboardInterrupt), tracker:
        if raised is not None:
            raise raised
    tracker.flush(timeout_s=30)
    assert MlflowClient(uri).get_run(tracker.run_id).info.status == status  # a clean exit leaves it to finish()


def _flaky_store(tmp_path: Path, **kwargs):
    """A real SQLite-backed tracker whose transport fails while ``down`` is set (a unit test's stand-in for an
    outage; tests/cluster/test_services.py kills a real server)."""
    from pipeline.tracking import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "outage", "run", backoff_s=0.01, max_backoff_s=0.05,
                      **kwargs)
    real, state = tracker.client.log_batch, {"down": False, "calls": 0}

    def log_batch(*args, **kw):
        state["calls"] += 1
        if state["down"]:
            raise ConnectionError("server went away")
        return real(*args, **kw)

    tracker.client.log_batch = log_batch
    return tracker, state


def _steps(tracker) -> list[int]:
    return [m.step for m in tracker.client.get_metric_history(tracker.run_id, "loss_ce")]


def test_a_sqlite_store_keeps_its_artifacts_beside_the_database(tmp_path: Path, monkeypatch) -> None:
    """With --tracking-uri sqlite:///... artifacts went to ./mlruns of whatever directory the command ran in."""
    from pipeline.tracking import Tracker

    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    (tmp_path / "note.txt").write_text("x")
    tracker = Tracker(f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}", "adn-artifacts", "run")
    tracker.log_artifact(tmp_path / "note.txt")
    tracker.finish()
    assert list((tmp_path / "store" / "mlruns").rglob("note.txt"))
    assert not (tmp_path / "elsewhere" / "mlruns").exists()


def test_tracking_outage_is_bridged_and_reported(tmp_path: Path, caplog) -> None:
    """Metrics logged while the store is down are queued, never block the caller, and arrive when it is back."""
    tracker, state = _flaky_store(tmp_path)
    for step in range(1, 4):
        tracker.log_metrics({"loss_ce": float(step)}, step)
    assert tracker.flush(10)
    state["down"] = True
    started = time.perf_counter()
    for step in range(4, 9):
        tracker.log_metrics({"loss_ce": float(step)}, step)
    assert time.perf_counter() - started < 0.05  # the caller never waits for the network
    wait_for(lambda: state["calls"] > 6, 10, "retries")
    state["down"] = False
    tracker.finish(timeout_s=20)
    assert _steps(tracker) == list(range(1, 9)) and tracker.dropped == 0
    assert "unreachable (ConnectionError: server went away)" in caplog.text
    assert "from step 4; sent 5 queued metric values late, nothing was dropped" in caplog.text
    assert tracker.client.get_run(tracker.run_id).info.status == "FINISHED"


def test_tracking_outage_beyond_the_buffer_says_what_was_dropped(tmp_path: Path, caplog) -> None:
    tracker, state = _flaky_store(tmp_path, max_buffered=2)
    state["down"] = True
    for step in range(1, 6):
        tracker.log_metrics({"loss_ce": float(step)}, step)
    wait_for(lambda: state["calls"] > 3, 10, "retries")
    state["down"] = False
    tracker.finish(timeout_s=20)
    assert _steps(tracker) == [4, 5] and tracker.dropped == 3
    assert "dropped metrics of 3 logging steps (1-3)" in caplog.text


def test_zero1_overlap_comm_is_refused_for_adn() -> None:
    """benchmarks/comms.py: with overlap_comm, ZeRO-1 reduces only what the boundary (base-net) backward touched."""
    from dataclasses import replace

    from pipeline.config import parse_args, resolve_config
    from pipeline.trainer import deepspeed_config

    cfg = resolve_config(parse_args(["--model", "resnet_mini", "--data", ".", "--batch-size", "8",
                                     "--zero-stage", "1", "--clip-grad", "0"]))
    with pytest.raises(ValueError, match="overlap_comm with ZeRO stage 1"):
        deepspeed_config(cfg, "fp32", {"zero_optimization": {"overlap_comm": True}})
    assert deepspeed_config(replace(cfg, mode="vanilla"), "fp32", {"zero_optimization": {"overlap_comm": True}})
    assert deepspeed_config(replace(cfg, zero_stage=2), "fp32", {"zero_optimization": {"overlap_comm": True}})
    assert deepspeed_config(cfg, "fp32")["zero_optimization"] == {"stage": 1}


@pytest.mark.parametrize(("script", "said"), [
    ("kill -TERM $$", "SLURM job 7 requeued: it resumes from that checkpoint."),  # stopped by the requeue itself
    ("echo 'scontrol: error: Job is not requeueable' >&2; exit 1",
     "SLURM did not requeue job 7 (scontrol: error: Job is not requeueable); submit it again with --resume."),
])
def test_requeue_reads_scontrol_killed_by_its_own_requeue_as_done(script: str, said: str, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """`scontrol requeue` runs inside the job it requeues, so SLURM may stop it before it exits 0."""
    from pipeline.train import requeue

    (tmp_path / "scontrol").write_text(f"#!/bin/sh\n{script}\n")
    (tmp_path / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    assert requeue() == said
