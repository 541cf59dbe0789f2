"""What every study shares: its trainings as ``pipeline.train`` processes, reused when run again, and its report.

A study's trainings live under ``--out/seed<S>/<name>``, each a child MLflow run of the study's
parent run; the study's own files (``<stem>.md``, ``.json``, ``.png``) go to ``--out`` and the parent run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from adn.checkpoint import WEIGHTS_NAME
from pipeline.checkpoint import CHECKPOINTS
from pipeline.data import DataError, read_manifest
from pipeline.data.storage import parse_location
from pipeline.recipes import load_recipe
from pipeline.tracking import Tracker, TrackingError, check_reachable, resolve_tracking_uri

#: A base-net "keeps its accuracy" when it keeps at least this share of its super-net's top-1 above chance
#: (the paper's third claim as the paper study decides it; the fine-tune study's bar for a whole ADN).
KEEP = 0.9


def _get(cfg: dict[str, Any], key: str) -> Any:
    """``cfg[a][b]`` for the key ``a.b`` (None where missing)."""
    for part in key.split("."):
        cfg = cfg.get(part) if isinstance(cfg, dict) else None
    return cfg


def spread(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one seed), min and max of per-seed top-1s, in percent."""
    pct = [100 * v for v in values]
    return {"mean": statistics.fmean(pct), "std": statistics.stdev(pct) if len(pct) > 1 else 0.0,
            "min": min(pct), "max": max(pct), "seeds": len(pct)}


def check_common(args: argparse.Namespace) -> None:
    """The flags every study has, and its data, as one sentence each before anything trains."""
    if args.epochs is not None and args.epochs < 1:
        raise ValueError(f"--epochs must be at least 1, got {args.epochs}.")
    if args.jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {args.jobs}.")
    if len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seeds repeats a seed: {args.seeds}.")
    read_manifest(args.data, "train")
    read_manifest(args.data, "val")


class Study:
    """The trainings of one study directory: launched ``--jobs`` at a time, reused or resumed when run again."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        self.recipe_name = args.recipe or args.model
        self.recipe = load_recipe(self.recipe_name)
        self.epochs = args.epochs or self.recipe["epochs"]
        self.data = str(args.data)
        self.tracker: Tracker | None = None
        # each training's wall time, kept across invocations that reuse it (trainings.json)
        saved = self.out / "trainings.json"
        self.timing: dict[str, float] = json.loads(saved.read_text()) if saved.is_file() else {}
        self.reused = set(self.timing)
        self.threads = max(1, len(os.sched_getaffinity(0)) // args.jobs)  # per training, when running --jobs at once
        self.lock = threading.Lock()
        self.procs: set[subprocess.Popen] = set()
        self.stopping = False

    def run_all(self, jobs: list[tuple[int, str, Callable[[], dict[str, Any]]]]) -> None:
        """Run ``(seed, name, train)`` jobs ``--jobs`` at a time in the order given; the first failure stops the
        others."""
        bar = tqdm(total=len(jobs), desc="study", unit="training", dynamic_ncols=True)
        with ThreadPoolExecutor(self.args.jobs) as pool:
            futures = {pool.submit(train): (seed, mode) for seed, mode, train in jobs}
            try:
                for future in as_completed(futures):
                    seed, mode = futures[future]
                    summary = future.result()
                    line = ", ".join(f"{r['mask']} {r['acc1']:.2%}" for r in summary["masks"] if r["acc1"] is not None)
                    tqdm.write(f"seed {seed} {mode}: {line}")
                    bar.update(1)
            except BaseException:
                with self.lock:
                    self.stopping = True
                    for proc in self.procs:
                        proc.terminate()
                for future in futures:
                    future.cancel()
                raise
            finally:
                bar.close()

    def wanted(self, seed: int, mode: str) -> dict[str, Any]:
        """The settings of one from-scratch training, as its config.yaml records them."""
        return {"model": self.args.model, "recipe": str(self.recipe_name), "mode": mode, "epochs": self.epochs,
                "seed": seed, "data_dir": parse_location(self.data).absolute(), "max_steps": self.args.max_steps,
                "init_from": None}

    def train(self, seed: int, mode: str) -> dict[str, Any]:
        """Run (or resume, or reuse) one from-scratch training; returns its summary.json."""
        flags = ["--recipe", str(self.recipe_name), "--mode", mode, "--epochs", str(self.epochs)]
        if self.args.max_steps:
            flags += ["--max-steps", str(self.args.max_steps)]
        return self.launch(seed, mode, flags, self.wanted(seed, mode))

    def run_dir(self, seed: int, name: str) -> Path:
        return self.out / f"seed{seed}" / name

    def state(self, seed: int, name: str, want: dict[str, Any]) -> str:
        """'done', 'resume' or 'new'; a directory trained with other settings than ``want`` is an error."""
        run = self.run_dir(seed, name)
        if not (run / "config.yaml").is_file():
            return "new"
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        differ = [k for k in want if _get(cfg, k) != want[k]]
        if differ:
            raise ValueError(f"{str(run)!r} holds a training with other settings ({', '.join(differ)}); "
                             "choose another --out or remove it.")
        if (run / "summary.json").is_file() and (run / WEIGHTS_NAME).is_file():
            return "done"
        return "resume" if (run / CHECKPOINTS / "latest").exists() else "new"

    def launch(self, seed: int, name: str, flags: list[str], want: dict[str, Any]) -> dict[str, Any]:
        """Run (or resume, or reuse) the training ``seed<S>/<name>`` with these ``pipeline.train`` flags;
        ``want`` is what its config.yaml must hold to be reused. Returns its summary.json."""
        run, state = self.run_dir(seed, name), self.state(seed, name, want)
        if state != "done":
            cmd = [sys.executable, "-m", "pipeline.train", "--model", self.args.model, "--data", self.data, *flags,
                   "--seed", str(seed), "--output", str(run), "--workers", str(self.args.workers),
                   "--run-name", f"{name}-seed{seed}", "--experiment", self.args.experiment]
            if self.tracker is not None and self.tracker.enabled:
                cmd += ["--tracking-uri", self.tracker.uri, "--parent-run-id", str(self.tracker.run_id)]
            else:
                cmd += ["--no-tracking"]
            if state == "resume":
                cmd += ["--resume"]
            code, log = self._run(seed, name, cmd)
            if code != 0:
                tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
                raise RuntimeError(f"the {name} training of seed {seed} failed (exit {code}): {tail[0]}; "
                                   f"its log is {log}.")
        return json.loads((run / "summary.json").read_text())

    def _run(self, seed: int, name: str, cmd: list[str]) -> tuple[int, Path]:
        """One training process, its output appended to ``seed<S>/<name>.log``; its exit code and log."""
        import torch

        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.setdefault("OMP_NUM_THREADS", str(self.threads))
        if not torch.cuda.is_available():
            env.setdefault("DS_ACCELERATOR", "cpu")
        run = self.run_dir(seed, name)
        run.parent.mkdir(parents=True, exist_ok=True)
        log = run.parent / f"{name}.log"
        start = time.perf_counter()
        with open(log, "a") as out:
            with self.lock:
                if self.stopping:
                    raise RuntimeError("stopped")
                proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
                self.procs.add(proc)
            code = proc.wait()
            with self.lock:
                self.procs.discard(proc)
        with self.lock:
            self.timing[f"seed{seed}/{name}"] = time.perf_counter() - start
            self.reused.discard(f"seed{seed}/{name}")
            (self.out / "trainings.json").write_text(json.dumps(self.timing, indent=1))
        return code, log

    def start(self, modes: tuple[str, ...], record: str, name: str, tags: dict[str, str],
              params: dict[str, Any]) -> None:
        """Refuse a directory of ``modes`` trained with other settings before anything starts, then create
        ``--out`` and the parent run (unless ``--no-tracking``)."""
        for seed in self.args.seeds:
            for mode in modes:
                self.state(seed, mode, self.wanted(seed, mode))
        self.out.mkdir(parents=True, exist_ok=True)
        if not self.args.no_tracking:
            self.tracker = self.parent_run(record, name, tags, params)

    def parent_run(self, record: str, name: str, tags: dict[str, str], params: dict[str, Any]) -> Tracker:
        """The study's MLflow run, its id kept in ``--out``/``record``: a study run again there continues that run."""
        args = self.args
        uri = resolve_tracking_uri(args.tracking_uri)
        check_reachable(uri)
        saved = self.out / record
        previous = json.loads(saved.read_text()) if saved.is_file() else {}
        run_id = previous.get("mlflow_run_id") if previous.get("tracking_uri") == uri else None
        tracker = Tracker(uri, args.experiment, name, run_id=run_id, tags=tags)
        if run_id is None:
            tracker.log_params(params)
            saved.write_text(json.dumps({"mlflow_run_id": tracker.run_id, "tracking_uri": uri,
                                         "experiment": args.experiment}, indent=1))
        return tracker

    def publish(self, stem: str, result: dict[str, Any], markdown: str, plot: Callable[[dict[str, Any], Path], None],
                metrics: dict[str, float]) -> None:
        """Write ``<stem>.json``, ``.md`` and ``.png``, log them and ``metrics`` to the parent run, print the table."""
        files = [self.out / f"{stem}.{ext}" for ext in ("md", "json", "png")]
        files[1].write_text(json.dumps(result, indent=1))
        files[0].write_text(markdown)
        plot(result, files[2])
        if self.tracker is not None:
            self.tracker.log_metrics(metrics, step=0)
            for path in files:
                self.tracker.log_artifact(path)
            self.tracker.finish()
        print()
        print(markdown)
        print(f"table: {files[0]} and {files[1]}; figure: {files[2]}")
        if self.tracker is not None:
            print(f"MLflow parent run {self.tracker.run_id}: {self.tracker.where()}")


def conduct(make: Callable[[], Study], run: Callable[[Study], None]) -> int:
    """A study's exit code: ``run(make())``, with one sentence and exit 2 on bad input or a failed training, and
    its parent run marked FAILED, or KILLED on Ctrl-C."""
    study: Study | None = None
    try:
        study = make()
        run(study)
    except (ValueError, FileNotFoundError, DataError, TrackingError, RuntimeError) as err:
        if study is not None and study.tracker is not None:
            study.tracker.finish("FAILED")
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if study is not None and study.tracker is not None:
            study.tracker.finish("KILLED")
        raise
    return 0
