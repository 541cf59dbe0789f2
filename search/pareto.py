"""Pareto search of skip masks: ``python -m search.pareto --target a100 --checkpoint runs/demo --data data/digits``.

Each candidate mask is a Ray Tune trial with two objectives, top-1 on the validation shards and
latency from the target's lookup table. Optuna picks the candidates through Ray Tune's
``OptunaSearch``: the exhaustive grid when the space fits the budget, NSGA-II otherwise (or TPE).
Trials evaluate with ``search.accuracy.MaskEvaluator``, whose stage-state cache lets a worker
process share prefixes between trials. The front (non-dominated in accuracy vs latency) is
printed and written to ``pareto.json`` and ``pareto.png``, and logged to MLflow as a parent run
with one child run per candidate.

Spaces: ``stages`` (default) is the trained per-stage space, 2^S masks. ``blocks`` lets each
skippable block be dropped on its own (2^7 for resnet50); a stage's switchable norms then take
their skipped half only when its whole sub-path is dropped (``adn.BlockMask``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from adn.checkpoint import load_trained, read_metadata, resolve_weights
from adn.complexity import count_flops, count_params
from pipeline.data import DataError, make_loader, read_manifest
from pipeline.data.storage import parse_location
from pipeline.tracking import UI_MODEL_TRAINING, Tracker, TrackingError, check_reachable, resolve_tracking_uri

from .latency import TableError, check_table_for, predict, resolve
from .parts import skeleton
from .profile import LOCAL_TARGETS, local_table

#: Each trial worker holds the validation samples in memory (every trial reads the same ones).
MAX_IN_MEMORY_GIB = 8.0


@dataclass
class Candidate:
    mask: str
    acc1: float
    latency_ms: float
    gflops: float
    params_m: float
    acc5: float = 0.0
    node: str = ""  # the Ray node that evaluated it


def pareto_front(candidates: list[Candidate]) -> list[Candidate]:
    """The non-dominated candidates (higher top-1, lower latency), by latency; one per distinct mask."""
    unique = {c.mask: c for c in candidates}.values()
    ordered = sorted(unique, key=lambda c: (c.latency_ms, -c.acc1))
    front: list[Candidate] = []
    for c in ordered:
        if not front or c.acc1 > front[-1].acc1:
            front.append(c)
    return front


def hypervolume(points: list[Candidate], ref_acc: float, ref_latency: float) -> float:
    """Area dominated by ``points`` above ``ref_acc`` and below ``ref_latency`` (accuracy x ms)."""
    area, best = 0.0, ref_acc
    for c in sorted(pareto_front(points), key=lambda c: c.latency_ms):
        if c.latency_ms >= ref_latency or c.acc1 <= best:
            continue
        area += (c.acc1 - best) * (ref_latency - c.latency_ms)
        best = c.acc1
    return area


def best_within(front: list[Candidate], max_latency_ms: float) -> Candidate | None:
    fits = [c for c in front if c.latency_ms <= max_latency_ms]
    return max(fits, key=lambda c: (c.acc1, -c.latency_ms)) if fits else None


# -- inputs ---------------------------------------------------------------------------------------

def training_experiment(run_id: str, tracking_uri: str | None) -> str:
    """The experiment of the training run, so a search sits beside the run it searched."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))
    return client.get_experiment(client.get_run(run_id).info.experiment_id).name


def resolve_checkpoint(checkpoint: str | None, mlflow_run: str | None, tracking_uri: str | None) -> Path:
    """The weights file of ``--checkpoint`` (file or training directory) or of an MLflow run's artifacts."""
    if checkpoint:
        return resolve_weights(checkpoint)
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    check_reachable(uri)
    client = MlflowClient(tracking_uri=uri)
    try:
        local = client.download_artifacts(mlflow_run, "weights.safetensors")
    except Exception as err:  # MLflow raises its own exception types for a missing run or artifact
        raise FileNotFoundError(f"MLflow run {mlflow_run!r} has no weights.safetensors artifact ({err}).") from err
    return Path(local)


def load_batches(data: str, split: str, recipe: dict[str, Any], batch_size: int, max_samples: int | None,
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The validation set in memory (normalized), cut to ``max_samples``: every trial reads the same samples."""
    loader = make_loader(data, split, batch_size, recipe, train=False, rank=0, world_size=1, num_workers=0)
    batches, seen = [], 0
    for images, labels, _ in loader:
        if max_samples is not None and seen + len(labels) > max_samples:
            keep = max_samples - seen
            images, labels = images[:keep], labels[:keep]
        if len(labels):
            batches.append((images, labels))
        seen += len(labels)
        if max_samples is not None and seen >= max_samples:
            break
    return batches


_EVALUATORS: dict[tuple, Any] = {}


def _local_weights(blob: bytes) -> Path:
    """The weights the driver shipped through Ray's object store, as a file on this node (once per content)."""
    import hashlib
    import tempfile

    path = Path(tempfile.gettempdir()) / f"adn-weights-{hashlib.sha256(blob).hexdigest()[:16]}.safetensors"
    if not path.exists():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(blob)
        tmp.replace(path)
    return path


def _evaluator(weights: bytes, data: str, split: str, batch_size: int, max_samples: int | None, device: str) -> Any:
    """One evaluator per worker process and input: trials in a reused Ray worker share its caches."""
    from .accuracy import MaskEvaluator

    key = (len(weights), hash(weights), data, split, batch_size, max_samples, device)
    if key not in _EVALUATORS:
        model, meta = load_trained(_local_weights(weights), map_location=device)
        batches = load_batches(data, split, {"data": meta["recipe"]["data"]}, batch_size, max_samples)
        batches = [(x.to(device), y.to(device)) for x, y in batches]
        _EVALUATORS[key] = MaskEvaluator(model, batches)
    return _EVALUATORS[key]


def _trial(config: dict[str, Any], weights: bytes, data: str, split: str, batch_size: int,
           max_samples: int | None, table: dict[str, Any], num_bits: int) -> None:
    import socket

    import ray
    from ray import tune

    mask = "".join("T" if config[f"b{i}"] else "F" for i in range(num_bits))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    acc = _evaluator(weights, data, split, batch_size, max_samples, device).evaluate([mask])[mask]
    tune.report({"acc1": acc.acc1, "acc5": acc.acc5, "latency_ms": predict(table, mask), "mask": mask,
                 "eval_s": time.perf_counter() - start, "node": ray.util.get_node_ip_address(),
                 "host": socket.gethostname(), "device": device})


# -- the search -----------------------------------------------------------------------------------

def _seeds(num_bits: int) -> list[dict[str, bool]]:
    """First points for NSGA-II / TPE: the super-net and the base-net, the two ends every front spans.

    (Seeding all stage masks into a block-space search was tried and found worse: on a 30 %
    budget it takes half the trials away from the sampler's own exploration.)
    """
    return [{f"b{i}": v for i in range(num_bits)} for v in (False, True)]


class _DistinctBudget:
    """A Ray Tune stopper that ends the search once ``budget`` distinct masks have been evaluated."""

    def __new__(cls, budget: int):  # noqa: ANN204
        from ray.tune import Stopper

        class Stop(Stopper):
            def __init__(self) -> None:
                self.seen: set[str] = set()

            def __call__(self, trial_id: str, result: dict) -> bool:
                if "mask" in result:
                    self.seen.add(result["mask"])
                return False

            def stop_all(self) -> bool:
                return len(self.seen) >= budget

        return Stop()


class _Progress:
    """A progress bar over trials (a Ray Tune callback), since Tune's own output is turned off."""

    def __init__(self, total: int) -> None:
        from ray.tune import Callback
        from tqdm import tqdm

        bar = tqdm(total=total, desc="trials", unit="trial", file=sys.stderr)

        class _Callback(Callback):
            def on_trial_result(self, iteration, trials, trial, result, **info):  # noqa: ANN001
                if "mask" in result:
                    bar.update(1)
                    bar.set_postfix(mask=result["mask"], acc1=f"{result['acc1']:.3f}", refresh=False)

        self.callback, self.bar = _Callback(), bar


def probe_ray(address: str) -> None:
    """One sentence at once when nothing listens at ``--ray-address`` (before any table is measured)."""
    from cluster.ray_node import parse_head
    from cluster.state import ServiceError, accepts

    if address == "auto":
        return
    try:
        host, port = parse_head(address)
    except ServiceError as err:
        raise ValueError(f"--ray-address {address!r} is not HOST:PORT or auto.") from err
    if not accepts(host, port, timeout=5):
        raise ValueError(f"no Ray cluster answers at {address}; start one (make ray-head) or fix --ray-address.")


def connect_ray(address: str | None) -> None:
    """Join the cluster at ``address`` (with the token of ``make ray-head``), or start a local Ray."""
    import ray

    if not address:
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False, num_cpus=os.cpu_count() or 1)
        return
    probe_ray(address)
    try:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot join the Ray cluster at {address} ({reason.rstrip('.')}); start one "
                         "(make ray-head) or check its token (RAY_AUTH_TOKEN_PATH).") from err


def run_search(weights: Path, data: str, table: dict[str, Any], num_bits: int, sampler: str, budget: int,
               *, batch_size: int = 64, max_samples: int | None = None, ray_address: str | None = None,
               seed: int = 0, out: Path, split: str = "val") -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Run the Ray Tune + Optuna search; returns one result dict per trial and timing figures."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's console tables off; our progress bar instead
    import optuna
    import ray
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    names = [f"b{i}" for i in range(num_bits)]
    if sampler == "grid":
        optuna_sampler = optuna.samplers.GridSampler({n: [False, True] for n in names}, seed=seed)
    elif sampler == "nsga2":
        optuna_sampler = optuna.samplers.NSGAIISampler(population_size=max(4, budget // 8), seed=seed)
    else:
        optuna_sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, budget // 4))
    searcher = OptunaSearch(metric=["acc1", "latency_ms"], mode=["max", "min"], sampler=optuna_sampler,
                            points_to_evaluate=None if sampler == "grid" else _seeds(num_bits),
                            seed=seed)
    if not ray.is_initialized():
        connect_ray(ray_address)
    resources = ray.cluster_resources()
    gpus = 1 if resources.get("GPU", 0) >= 1 else 0  # one GPU per trial where the nodes have GPUs
    if gpus:
        concurrency = int(resources["GPU"])
    elif ray_address:
        concurrency = max(1, int(resources.get("CPU", 1)))  # one CPU per trial over the whole cluster
    else:
        concurrency = max(1, min(2, os.cpu_count() or 1))
    searcher = ConcurrencyLimiter(searcher, max_concurrent=concurrency)
    trainable = tune.with_resources(
        tune.with_parameters(_trial, weights=Path(weights).read_bytes(), data=parse_location(data).absolute(),
                             split=split, batch_size=batch_size, max_samples=max_samples, table=table,
                             num_bits=num_bits),
        {"cpu": 1, "gpu": gpus})
    progress = _Progress(budget)
    # The budget counts distinct masks: a sampler proposing a mask again costs a cached lookup, not a trial.
    tuner = tune.Tuner(
        trainable,
        param_space={n: tune.choice([False, True]) for n in names},
        tune_config=tune.TuneConfig(search_alg=searcher, reuse_actors=True,
                                    num_samples=budget if sampler == "grid" else 10 * budget),
        run_config=tune.RunConfig(name="pareto", storage_path=str((out / "ray").resolve()), verbose=0,
                                  callbacks=[progress.callback], stop=_DistinctBudget(budget),
                                  failure_config=tune.FailureConfig(fail_fast=True)),
    )
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Study.stop.*")
        try:
            grid = tuner.fit()
        except Exception as err:  # fail_fast: Tune raises on the first failed trial
            raise RuntimeError(f"the Ray Tune search stopped: {err}") from err
    wall = time.perf_counter() - start
    progress.bar.close()
    errors = [r.error for r in grid if r.error]
    if errors:
        raise RuntimeError(f"{len(errors)} trials failed; the first with: {errors[0]}")
    # Trials still pending when the distinct budget was reached end without a result.
    results = [r.metrics for r in grid if r.metrics and "acc1" in r.metrics]
    eval_s = sum(r["eval_s"] for r in results)
    nodes: dict[str, int] = {}
    for r in results:
        nodes[r["node"]] = nodes.get(r["node"], 0) + 1
    timing = {"wall_s": wall, "trials": len(results), "eval_s": eval_s, "concurrency": concurrency,
              "ray_overhead_s_per_trial": max(wall * concurrency - eval_s, 0.0) / max(len(results), 1),
              "trials_per_node": nodes}
    return results, timing


def plot(candidates: list[Candidate], front: list[Candidate], path: Path, title: str,
         max_latency_ms: float | None, super_mask: str, base_mask: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([c.latency_ms for c in candidates], [100 * c.acc1 for c in candidates], s=14, color="0.65",
               label="candidates")
    ax.plot([c.latency_ms for c in front], [100 * c.acc1 for c in front], "-o", color="C0", ms=7, mfc="none",
            zorder=4, label="Pareto front")
    for c in candidates:
        if c.mask in (super_mask, base_mask):
            name = "super-net" if c.mask == super_mask else "base-net"
            ax.scatter([c.latency_ms], [100 * c.acc1], s=80, marker="*", zorder=3,
                       color="C3" if c.mask == super_mask else "C2", label=f"{name} {c.mask}")
    if max_latency_ms is not None:
        ax.axvline(max_latency_ms, color="C1", ls="--", label=f"budget {max_latency_ms:g} ms")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def log_to_mlflow(tracker: Tracker, inputs: dict[str, Any], candidates: list[Candidate], front: list[Candidate],
                  target: str, out: Path) -> str | None:
    """Parent run (inputs, artifacts) and one child run per candidate, linked by ``mlflow.parentRunId``.

    Returns the address of a chart view of the children, top-1 against latency, on a tracking server.
    """
    from mlflow.entities import Metric, Param, RunTag

    tracker.log_params(inputs)
    tracker.log_metrics({"front_size": len(front), "candidates": len(candidates)}, step=0)
    for name in ("pareto.json", "pareto.png"):
        tracker.log_artifact(out / name)
    on_front = {c.mask for c in front}
    now = int(time.time() * 1000)
    for c in candidates:
        run = tracker.client.create_run(tracker.experiment_id, run_name=c.mask,
                                        tags={"mlflow.parentRunId": tracker.run_id, "adn.mask": c.mask})
        metrics = {"acc1": c.acc1, "acc5": c.acc5, "latency_ms": c.latency_ms, "gflops": c.gflops,
                   "params_m": c.params_m, "on_front": float(c.mask in on_front)}
        tracker.client.log_batch(run.info.run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
                                 params=[Param("mask", c.mask), Param("target", target), Param("node", c.node)],
                                 tags=[RunTag("adn.on_front", str(c.mask in on_front).lower())])
        tracker.client.set_terminated(run.info.run_id)
    view = chart_view(tracker, target, len(candidates))
    tracker.finish()
    return view


def chart_view(tracker: Tracker, target: str, runs: int) -> str | None:
    """A saved view of the experiment: the search's child runs as a scatter chart, top-1 against latency.

    It is stored the way the UI's own "Share" button stores a view (an experiment tag
    ``mlflow.sharedViewState.<key>``), so the link opens the chart with no clicking.
    """
    if not tracker.uri.startswith(("http://", "https://")):
        return None
    key = f"pareto-{tracker.run_id}"
    section = f"pareto-section-{tracker.run_id[:8]}"
    state = {
        "searchFilter": f"tags.mlflow.parentRunId = '{tracker.run_id}'",
        "orderByKey": "metrics.`latency_ms`", "orderByAsc": True,
        "runsHiddenMode": "SHOW_ALL", "isAccordionReordered": True, "hideEmptyCharts": True,
        "compareRunSections": [{"uuid": section, "name": f"Pareto front on {target}", "display": True,
                                "isReordered": False}],
        "compareRunCharts": [{"uuid": f"pareto-chart-{tracker.run_id[:8]}", "type": "SCATTER",
                              "metricSectionId": section, "runsCountToCompare": max(runs, 10), "deleted": False,
                              "isGenerated": False, "displayName": f"top-1 against latency (ms) on {target}",
                              "xaxis": {"key": "latency_ms", "type": "METRIC"},
                              "yaxis": {"key": "acc1", "type": "METRIC"}}],
    }
    try:
        tracker.client.set_experiment_tag(tracker.experiment_id, f"mlflow.sharedViewState.{key}", json.dumps(state))
    except Exception as err:  # the view is a convenience: the runs are logged either way
        print(f"warning: could not save the chart view in MLflow ({err})", file=sys.stderr)
        return None
    return (f"{tracker.uri.rstrip('/')}/#/experiments/{tracker.experiment_id}/runs?viewStateShareKey={key}"
            f"&compareRunsMode=CHART&{UI_MODEL_TRAINING}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m search.pareto", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, help="latency table target (a100, h100, ...), or cpu to measure here")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="weights.safetensors or a training output directory")
    src.add_argument("--mlflow-run", metavar="ID", help="a training run whose weights artifact to use")
    p.add_argument("--data", required=True, help="WebDataset shards with the validation split: a directory, "
                                                 "http(s)://HOST/PREFIX, s3://BUCKET/PREFIX or 'pipe:CMD {}'")
    p.add_argument("--split", default="val")
    p.add_argument("--batch-size", type=int, default=1, help="batch of the latency table (deployment batch)")
    p.add_argument("--eval-batch-size", type=int, default=100, help="batch for the accuracy evaluation")
    p.add_argument("--max-samples", type=int, help="evaluate on the first N validation samples only")
    p.add_argument("--dtype", help="latency table dtype (default: the target's)")
    p.add_argument("--space", choices=("stages", "blocks"), default="stages")
    p.add_argument("--sampler", choices=("auto", "grid", "nsga2", "tpe"), default="auto",
                   help="auto: grid when the space fits the budget, else NSGA-II")
    p.add_argument("--budget", type=int, help="number of trials (default: the whole space, at most 256)")
    p.add_argument("--max-latency-ms", type=float, help="latency budget: print the best mask within it")
    p.add_argument("--ray-address", help="join a Ray cluster, HOST:PORT or auto (make ray-head; its token from "
                                         "RAY_AUTH_TOKEN_PATH or the state dir); default: start a local Ray")
    p.add_argument("--out", help="output directory (default: <checkpoint dir>/pareto-<target>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print {front, candidates} as JSON")
    p.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    p.add_argument("--experiment", help="MLflow experiment (default: the training run's with --mlflow-run, "
                                        "else adn-pareto)")
    p.add_argument("--no-tracking", action="store_true")
    args = p.parse_args(argv)
    try:
        report = search(args)
    except (ValueError, FileNotFoundError, DataError, TableError, TrackingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({k: report[k] for k in ("front", "candidates", "best_within_budget")}, indent=1))
    return 0


def search(args: argparse.Namespace) -> dict[str, Any]:
    """Validate every input before Ray starts, run the search, write and log the results."""
    weights = resolve_checkpoint(args.checkpoint, args.mlflow_run, args.tracking_uri)
    meta = read_metadata(weights)
    model_name, classes, resolution = meta["model"], meta["classes"], meta["resolution"]
    manifest = read_manifest(args.data, args.split)
    if manifest.classes != classes:
        raise ValueError(f"the checkpoint was trained on {len(classes)} classes, the data in {args.data!r} has "
                         f"{len(manifest.classes)}" + (" (same count, other names)" if len(classes) ==
                                                       len(manifest.classes) else "") + "; pass matching data.")
    if args.batch_size < 1 or args.eval_batch_size < 1:
        raise ValueError("--batch-size and --eval-batch-size must be at least 1.")
    samples = manifest.num_samples if args.max_samples is None else min(args.max_samples, manifest.num_samples)
    gib = samples * 3 * resolution**2 * 4 / 2**30
    if gib > MAX_IN_MEMORY_GIB:
        raise ValueError(f"the {args.split} split holds {samples} samples, {gib:.0f} GiB as float32 in each trial "
                         f"worker; pass --max-samples (at most {int(samples * MAX_IN_MEMORY_GIB / gib)} here).")
    if args.ray_address:
        from cluster.ray_node import auth_env

        probe_ray(args.ray_address)
        os.environ.update(auth_env())  # before Ray is imported: its token loader reads the environment once
    if parse_location(args.data).is_local and args.ray_address and args.ray_address != "auto":
        print(f"note: every Ray node reads {args.data} at this path: it must be on a shared filesystem "
              "(or serve the shards over http(s):// or s3://).", file=sys.stderr)
    if args.target in LOCAL_TARGETS:
        table = local_table(model_name, args.batch_size, resolution, args.dtype or "fp32",
                            num_classes=len(classes))
    else:
        table = resolve(args.target, model_name, args.batch_size, resolution, args.dtype)
    check_table_for(table, model_name, args.batch_size, resolution)
    shape = skeleton(model_name)
    num_bits = shape.num_stages if args.space == "stages" else len(shape.block_stages)
    size = 2**num_bits
    budget = args.budget or min(size, 256)
    if budget < 2:
        raise ValueError(f"--budget must be at least 2, got {budget}.")
    sampler = args.sampler if args.sampler != "auto" else ("grid" if size <= budget else "nsga2")
    if sampler == "grid" and budget < size:
        raise ValueError(f"a grid over {size} masks needs --budget {size}; use --sampler nsga2 for fewer trials.")
    budget = min(budget, size) if sampler == "grid" else budget
    if args.out:
        out = Path(args.out)
    elif args.checkpoint:
        out = weights.parent / f"pareto-{args.target}"
    else:  # weights downloaded from MLflow sit in a temporary directory
        out = Path("runs") / f"pareto-{args.mlflow_run}-{args.target}"
    out.mkdir(parents=True, exist_ok=True)
    tracker = None
    if not args.no_tracking:
        check_reachable(resolve_tracking_uri(args.tracking_uri))
        experiment = args.experiment or (training_experiment(args.mlflow_run, args.tracking_uri) if args.mlflow_run
                                         else "adn-pareto")
        tags = {"adn.model": model_name, "adn.target": args.target, "adn.space": args.space,
                "mlflow.note.content": f"Pareto search of {model_name}'s skip masks, top-1 on {args.data} "
                                       f"({args.split}) against {args.target} latency"}
        if args.mlflow_run:
            tags["adn.training_run"] = args.mlflow_run
        tracker = Tracker(args.tracking_uri, experiment, f"{model_name}-pareto-{args.target}-{args.space}", tags=tags)

    results, timing = run_search(weights, args.data, table, num_bits, sampler, budget,
                                 batch_size=args.eval_batch_size, max_samples=args.max_samples,
                                 ray_address=args.ray_address, seed=args.seed, out=out, split=args.split)
    model, _ = load_trained(weights)
    by_mask: dict[str, Candidate] = {}
    for r in results:
        if r["mask"] not in by_mask:
            by_mask[r["mask"]] = Candidate(r["mask"], r["acc1"], r["latency_ms"],
                                           count_flops(model, r["mask"], resolution) / 1e9,
                                           count_params(model, r["mask"]) / 1e6, r["acc5"], r["node"])
    candidates = sorted(by_mask.values(), key=lambda c: c.latency_ms)
    front = pareto_front(candidates)
    super_mask, base_mask = "F" * num_bits, "T" * num_bits
    super_ms = predict(table, super_mask)
    best = best_within(front, args.max_latency_ms) if args.max_latency_ms is not None else None
    report = {
        "model": model_name, "target": args.target, "table": {k: table.get(k) for k in (
            "method", "device", "dtype", "batch_size", "resolution", "source", "path")},
        "space": args.space, "sampler": sampler, "budget": budget, "weights": str(weights),
        "timing": timing, "front": [asdict(c) for c in front], "candidates": [asdict(c) for c in candidates],
        "best_within_budget": asdict(best) if best else None, "max_latency_ms": args.max_latency_ms,
        "mlflow_parent": tracker.run_id if tracker is not None else None,
    }
    (out / "pareto.json").write_text(json.dumps(report, indent=1))
    plot(candidates, front, out / "pareto.png", f"{model_name} on {args.target} ({table['method']})",
         args.max_latency_ms, super_mask, base_mask)
    if tracker is not None:
        inputs = {"model": model_name, "target": args.target, "weights": str(weights), "data": args.data,
                  "space": args.space, "sampler": sampler, "budget": budget, "batch_size": args.batch_size,
                  "table_method": table["method"], "max_latency_ms": args.max_latency_ms}
        try:
            view = log_to_mlflow(tracker, inputs, candidates, front, args.target, out)
        except Exception as err:  # the search's results are on disk already; MLflow only mirrors them
            print(f"warning: could not log the candidates to MLflow ({err}); the results are in "
                  f"{out / 'pareto.json'}.", file=sys.stderr)
            tracker.finish("FAILED", timeout_s=10)
            view = None
    if not args.json:
        print(f"{model_name} on {args.target} ({table['method']} table, batch {args.batch_size}), "
              f"{args.space} space, {sampler}, {len(candidates)} masks evaluated on the {args.split} split")
        print(f"{'mask':<10}{'top-1':>8}{'latency ms':>12}{'GFLOPs':>9}{'params M':>10}{'speed-up':>10}")
        for c in front:
            print(f"{c.mask:<10}{c.acc1:>8.2%}{c.latency_ms:>12.3f}{c.gflops:>9.4f}{c.params_m:>10.3f}"
                  f"{super_ms / c.latency_ms:>9.2f}x")
        if args.max_latency_ms is not None:
            print(f"best within {args.max_latency_ms:g} ms: " + (
                f"{best.mask} ({best.acc1:.2%}, {best.latency_ms:.3f} ms)" if best else "none; the fastest mask is "
                f"{front[0].mask} at {front[0].latency_ms:.3f} ms"))
        spread = ", ".join(f"{n} {k}" for k, n in sorted(timing["trials_per_node"].items()))
        print(f"Ray: {timing['trials']} trials in {timing['wall_s']:.1f} s ({spread}), overhead "
              f"{timing['ray_overhead_s_per_trial']:.3f} s per trial")
        print(f"wrote {out / 'pareto.json'} and {out / 'pareto.png'}")
        if tracker is not None:
            print(f"MLflow parent run {tracker.run_id}: {tracker.where()}")
            if view:
                print(f"chart of top-1 against latency: {view}")
    return report


if __name__ == "__main__":
    sys.exit(main())
