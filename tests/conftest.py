"""Fixtures every test package shares: the digits shards, the environment a launched training gets, the
uninterrupted reference run that every resume test compares its weights with (and the search tests search), and
the test run's latency tables; each made once per run, also across pytest-xdist workers (``once``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock

from pipeline.data.shard import main as shard_main

ROOT = Path(__file__).resolve().parents[1]

# Small and fast: 2 epochs of 39 steps at batch 32 (1,257 training digits), 1 loader worker.
FAST = ["--model", "resnet_mini", "--epochs", "2", "--batch-size", "32", "--workers", "1", "--log-every", "5"]


# The longest files first: pytest-xdist's workers take one file at a time, so they then finish close together.
LONGEST_FIRST = ("search/test_pareto.py", "cluster/test_services.py", "pipeline/test_launch.py", "serving/test_app.py",
                 "pipeline/test_train.py", "pipeline/test_demo.py", "studies/test_finetune.py", "studies/test_paper.py",
                 "pipeline/test_checkpoints.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Order whole files as ``LONGEST_FIRST`` says, the others after them as collected."""
    def rank(item: pytest.Item) -> int:
        path = item.nodeid.split("::")[0].removeprefix("tests/")
        return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)


def pytest_configure() -> None:
    """Under pytest-xdist, each worker's share of the cores: torch in the worker and the commands it starts use
    that many threads, so that two workers do not run four spinning OpenMP threads on two cores."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def train_env(**extra: str) -> dict[str, str]:
    """This environment minus any launcher's rank variables: DeepSpeed on CPU, one thread per rank."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT",
                                                            "MASTER_ADDR", "MLFLOW_TRACKING_URI")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)
    return env


def run_module(module: str, *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: int = 900,
               ) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS`` in ``cwd``, as a user types it: the trainings' environment, output captured."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env or train_env(), capture_output=True,
                          text=True, timeout=timeout)


def train(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """``python -m pipeline.train ARGS`` in ``cwd`` (``run_module``)."""
    return run_module("pipeline.train", *args, cwd=cwd, env=env, timeout=timeout)


def once(factory: pytest.TempPathFactory, name: str, make: Callable[[Path], None]) -> Path:
    """A directory ``make`` fills once per test run, shared by the pytest-xdist workers: the first to need it
    makes it under the run's common temporary directory while the others wait on its lock."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        out = factory.mktemp(name)
        make(out)
        return out
    out = factory.getbasetemp().parent / name
    with FileLock(str(out) + ".lock"):
        if not (out / ".made").is_file():
            shutil.rmtree(out, ignore_errors=True)  # what a failed attempt of another worker left
            out.mkdir()
            make(out)
            (out / ".made").touch()
    return out


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded digits as shards of 400 (4 train shards, 1 val shard)."""
    def make(out: Path) -> None:
        assert shard_main(["digits", "--out", str(out), "--shard-size", "400"]) == 0

    return once(tmp_path_factory, "digits", make)


@pytest.fixture(scope="session")
def measured_tables(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """resnet_mini's and resnet_mini_deep's CPU latency tables, timed once per test run (``tests.luts``)."""
    from .luts import measure

    def make(out: Path) -> None:
        (out / "tables.json").write_text(json.dumps(measure(["resnet_mini", "resnet_mini_deep"])))

    return once(tmp_path_factory, "luts", make) / "tables.json"


def _train_fast(out: Path, *args: str) -> None:
    done = train(*FAST, "--output", str(out), *args, cwd=out.parent, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="session")
def reference_run(digits: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The FAST run uninterrupted, tracked in a SQLite MLflow store, checkpointing every 10 steps (once per test
    run: its weights are what every interrupted and resumed FAST run must end with)."""
    def make(work: Path) -> None:
        _train_fast(work / "run", "--data", str(digits), "--save-every-steps", "10", "--tracking-uri",
                    f"sqlite:///{work / 'mlflow.db'}")

    return once(tmp_path_factory, "reference", make)


@pytest.fixture(scope="session")
def first_epoch(digits: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The FAST run stopped at the end of its first epoch (``--max-steps 39``), checkpointing every 10 steps: the
    checkpoints step000000030 and step000000039 (the epoch end) are kept. Tests copy it before changing it."""
    def make(work: Path) -> None:
        _train_fast(work / "run", "--data", str(digits), "--save-every-steps", "10", "--max-steps", "39",
                    "--no-tracking")

    return once(tmp_path_factory, "first-epoch", make) / "run"


@pytest.fixture(scope="session")
def deepspeed_world():
    """A one-rank gloo world for in-process DeepSpeed engines (DS_ACCELERATOR=cpu), once per test process:
    DeepSpeed keeps the first process group it saw, so a second world in one process fails."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.pop(k, None) for k in names}
    import torch

    from pipeline.distributed import setup_distributed

    setup_distributed()  # what a plain `python -m pipeline.train` does: one rank on a free loopback port
    for k, v in saved.items():  # the group stays; of the variables it set only LOCAL_RANK, which DeepSpeed
        if k == "LOCAL_RANK":    # reads at every initialize, stays for later tests
            continue
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    import deepspeed

    yield deepspeed
    torch.distributed.destroy_process_group()
