"""Pareto search of skip masks: ``python -m search.pareto --target a100 --checkpoint runs/demo --data data/digits``.

Each candidate mask has two objectives, top-1 on the search split and latency from the
target's lookup table. Optuna picks the candidates through Ray Tune's
``OptunaSearch``: the exhaustive grid when the space fits the budget, NSGA-II otherwise (or TPE).
A trial is one streaming pass over the split for a batch of Optuna's proposals (the grid, or one
NSGA-II generation: ``search.batching``), cut over evaluation workers (``search.evaluation``) and
sharing stage prefixes between the batch's masks (``search.accuracy``). Masks are chosen on the
``minival`` split held out of training when the data has one, and the front is then evaluated
on the validation split in one more pass: both accuracies are reported. The front
(non-dominated in accuracy vs latency) is printed and written to ``pareto.json`` and
``pareto.png``, and logged to MLflow as a parent run with one child run per candidate.

Spaces: ``stages`` (default) is the trained per-stage space, 2^S masks. ``blocks`` lets each
skippable block be dropped on its own (2^7 for resnet50); a stage's switchable norms then take
their skipped half only when its whole sub-path is dropped (``adn.BlockMask``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adn.checkpoint import load_trained, read_metadata, resolve_weights
from adn.complexity import count_flops, count_params
from pipeline.data import DataError, has_split, read_manifest
from pipeline.data.shard import HOLDOUT_SPLIT
from pipeline.data.storage import parse_location
from pipeline.lock import LockHeld, output_lock
from pipeline.signals import Terminated, raise_on_sigterm
from pipeline.tracking import UI_MODEL_TRAINING, Tracker, TrackingError, check_reachable, resolve_tracking_uri

from .latency import TableError, check_table_for, predict, resolve
from .parts import skeleton
from .profile import LOCAL_TARGETS, local_table

if TYPE_CHECKING:
    import torch

#: What a trial's process holds (Ray and Tune, no torch: the workers hold the model), as Ray's logical memory.
TRIAL_MEMORY = 256 * 2**20


@dataclass
class Candidate:
    mask: str
    acc1: float
    latency_ms: float
    gflops: float
    params_m: float
    acc5: float = 0.0
    node: str = ""  # the Ray node that ran its trial
    val_acc1: float | None = None  # on the report split (front members only)
    val_acc5: float | None = None


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


# -- the search -----------------------------------------------------------------------------------

def _seeds(num_bits: int) -> list[dict[str, bool]]:
    """First points for NSGA-II / TPE: the super-net and the base-net, the two ends every front spans.

    (Seeding all stage masks into a block-space search was tried and found worse: on a 30 %
    budget it takes half the trials away from the sampler's own exploration.)
    """
    return [{f"b{i}": v for i in range(num_bits)} for v in (False, True)]


class _Progress:
    """A progress bar over distinct masks (a Ray Tune callback), since Tune's own output is turned off."""

    def __init__(self, total: int) -> None:
        from ray.tune import Callback
        from tqdm import tqdm

        bar = tqdm(total=total, desc="masks", unit="mask", file=sys.stderr)
        passes = [0]

        class _Callback(Callback):
            def on_trial_result(self, iteration, trials, trial, result, **info):  # noqa: ANN001
                if "masks" in result:
                    passes[0] += 1
                    bar.update(result["masks"])
                    best = max(json.loads(result["accuracy"]).values())[0]
                    bar.set_postfix(passes=passes[0], best_acc1=f"{best:.3f}", refresh=False)

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


@contextlib.contextmanager
def _sigterm_during_init() -> Iterator[None]:
    """A SIGTERM while ``ray.init`` runs meets Ray's own handler, ``sys.exit(15)``: made an interruption too."""
    try:
        yield
    except SystemExit as err:
        if err.code != signal.SIGTERM:
            raise
        raise Terminated("stopped by SIGTERM") from None


def connect_ray(address: str | None) -> None:
    """Join the cluster at ``address`` (with the token of ``make ray-head``), or start a local Ray.

    Ray's core worker replaces the SIGTERM handler with one that aborts the driver; ours goes back, so a
    terminated search still marks its MLflow runs KILLED and shuts Ray down on the way out.
    """
    import ray

    if not address:
        with _sigterm_during_init():
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False,
                     num_cpus=os.cpu_count() or 1)
        raise_on_sigterm()
        return
    probe_ray(address)
    try:
        with _sigterm_during_init():
            ray.init(address=address, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot join the Ray cluster at {address} ({reason.rstrip('.')}); start one "
                         "(make ray-head) or check its token (RAY_AUTH_TOKEN_PATH).") from err
    raise_on_sigterm()


def batch_size(sampler: str, budget: int, population: int) -> int:
    """Masks per trial (one pass): a grid's whole budget, NSGA-II's generation, a few for TPE."""
    if sampler == "grid":
        return budget
    if sampler == "nsga2":
        return population
    return min(4, budget)  # TPE learns from finished trials (the constant liar covers the rest of a batch)


def run_search(weights: Path, data: str, table: dict[str, Any], num_bits: int, sampler: str, budget: int,
               *, batch_size_eval: int = 100, max_samples: int | None = None, ray_address: str | None = None,
               seed: int = 0, out: Path, split: str = "val", report_split: str | None = None,
               eval_workers: int | None = None, loader_workers: int | None = None,
               calibrate_images: int | None = None,
               ) -> tuple[dict[str, dict[str, Any]], dict[str, Any], dict[str, tuple[float, float, int]]]:
    """Run the Ray Tune + Optuna search on ``split``, then evaluate its front on ``report_split`` in one pass.

    Returns each distinct mask's result (accuracy, latency, the node of the trial that ran it), timing
    figures, and the front's accuracy on the report split.
    """
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's console tables off; our progress bar instead
    import optuna
    import ray
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from .batching import BatchingSearcher
    from .counts import summarize
    from .evaluation import run_pass, start_eval_workers
    from .trial import batch_trial

    names = [f"b{i}" for i in range(num_bits)]
    population = max(4, budget // 8)
    if sampler == "grid":
        optuna_sampler = optuna.samplers.GridSampler({n: [False, True] for n in names}, seed=seed)
    elif sampler == "nsga2":
        optuna_sampler = optuna.samplers.NSGAIISampler(population_size=population, seed=seed)
    else:
        optuna_sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, budget // 4),
                                                    constant_liar=True)
    optuna_search = OptunaSearch(metric=["acc1", "latency_ms"], mode=["max", "min"], sampler=optuna_sampler,
                                 points_to_evaluate=None if sampler == "grid" else _seeds(num_bits), seed=seed)
    searcher = BatchingSearcher(optuna_search, num_bits, batch_size(sampler, budget, population), budget,
                                lambda mask: predict(table, mask))
    if not ray.is_initialized():
        connect_ray(ray_address)
    data = parse_location(data).absolute()
    workers = start_eval_workers(weights, data, batch_size_eval, max_samples, eval_workers, loader_workers,
                                 calibrate_images)
    # A trial only hands its masks to the workers and waits: no CPU, only a light process's memory (Tune
    # refuses a trial without any resource).
    trainable = tune.with_resources(tune.with_parameters(batch_trial, workers=workers, split=split),
                                    {"cpu": 0, "memory": TRIAL_MEMORY})
    progress = _Progress(budget)
    tuner = tune.Tuner(
        trainable,
        param_space={n: tune.choice([False, True]) for n in names},
        tune_config=tune.TuneConfig(search_alg=searcher, reuse_actors=True, num_samples=budget),
        run_config=tune.RunConfig(name="pareto", storage_path=str((out / "ray").resolve()), verbose=0,
                                  callbacks=[progress.callback], failure_config=tune.FailureConfig(fail_fast=True)),
    )
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    start = time.perf_counter()
    try:
        grid = tuner.fit()
    except Exception as err:  # fail_fast: Tune raises on the first failed trial
        raise RuntimeError(f"the Ray Tune search stopped: {err}") from err
    wall = time.perf_counter() - start
    progress.bar.close()
    errors = [r.error for r in grid if r.error]
    if errors:
        raise RuntimeError(f"{len(errors)} trials failed; the first with: {errors[0]}")
    results: dict[str, dict[str, Any]] = {}
    passes, nodes = [], {}
    for r in grid:
        if not r.metrics or "accuracy" not in r.metrics:
            continue
        passes.append(json.loads(r.metrics["pass"]))
        nodes[r.metrics["node"]] = nodes.get(r.metrics["node"], 0) + 1
        for mask, (acc1, acc5, samples) in json.loads(r.metrics["accuracy"]).items():
            results[mask] = {"acc1": acc1, "acc5": acc5, "samples": samples, "latency_ms": predict(table, mask),
                             "node": r.metrics["node"]}
    searched = summarize(passes)
    reported: dict[str, tuple[float, float, int]] = {}
    report: dict[str, Any] | None = None
    if report_split and report_split != split:
        front = pareto_front([Candidate(m, r["acc1"], r["latency_ms"], 0.0, 0.0) for m, r in results.items()])
        counts, stats = run_pass(workers, report_split, [c.mask for c in front])
        reported, report = counts.rates(), summarize([stats])
    timing = {"wall_s": wall, "trials": len(passes), "masks": len(results),
              "ray_overhead_s_per_trial": max(wall - searched["pass_wall_s"], 0.0) / max(len(passes), 1),
              "trials_per_node": nodes, **searched, "report_pass": report}
    return results, timing, reported


def plot(candidates: list[Candidate], front: list[Candidate], path: Path, title: str,
         max_latency_ms: float | None, super_mask: str, base_mask: str, splits: tuple[str, str] = ("val", "val"),
         ) -> None:
    """Every candidate and the front on the search split; the front on the report split too when it differs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([c.latency_ms for c in candidates], [100 * c.acc1 for c in candidates], s=14, color="0.65",
               label=f"candidates ({splits[0]})")
    ax.plot([c.latency_ms for c in front], [100 * c.acc1 for c in front], "-o", color="C0", ms=7, mfc="none",
            zorder=4, label=f"Pareto front ({splits[0]})")
    if splits[1] != splits[0]:
        ax.plot([c.latency_ms for c in front], [100 * c.val_acc1 for c in front], "--s", color="C4", ms=5,
                zorder=4, label=f"the front on {splits[1]}")
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
        if c.val_acc1 is not None:  # front members: top-1 on the report split too
            metrics.update(val_acc1=c.val_acc1, val_acc5=c.val_acc5)
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
    p.add_argument("--search-split", help="split the masks are chosen on (default: minival when the data has one, "
                                          "made by pipeline.data.shard --holdout; else --split)")
    p.add_argument("--split", default="val", help="split the front is reported on (default: val)")
    p.add_argument("--batch-size", type=int, default=1, help="batch of the latency table (deployment batch)")
    p.add_argument("--eval-batch-size", type=int, default=100, help="batch for the accuracy evaluation")
    p.add_argument("--max-samples", type=int, help="evaluate on the first N samples of each split only")
    p.add_argument("--eval-workers", type=int, help="workers each pass is cut over (default: one per GPU of the "
                                                    "cluster, else one per node)")
    p.add_argument("--loader-workers", type=int, help="decoding processes per evaluation worker (default: 0 on "
                                                      "CPU, up to 8 per GPU)")
    p.add_argument("--calibrate-norms", type=int, metavar="N",
                   help="re-estimate each mask's batch-norm statistics from the first N training images of --data "
                        "before evaluating it (adn.calibrate_norms); each mask then takes its own pass")
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
    raise_on_sigterm()
    try:
        report = search(args)
    except (ValueError, FileNotFoundError, DataError, TableError, TrackingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except LockHeld as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        print(f"interrupted ({err or 'Ctrl-C'}); the MLflow runs of this search are marked KILLED.", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps({k: report[k] for k in ("front", "candidates", "best_within_budget")}, indent=1))
    return 0


def search(args: argparse.Namespace) -> dict[str, Any]:
    """Validate every input before Ray starts, run the search, write and log the results."""
    weights = resolve_checkpoint(args.checkpoint, args.mlflow_run, args.tracking_uri)
    meta = read_metadata(weights)
    model_name, classes = meta["model"], meta["classes"]
    if args.batch_size < 1 or args.eval_batch_size < 1:
        raise ValueError("--batch-size and --eval-batch-size must be at least 1.")
    if args.max_samples is not None and args.max_samples < 1:
        raise ValueError(f"--max-samples must be at least 1, got {args.max_samples}.")
    if args.eval_workers is not None and args.eval_workers < 1:
        raise ValueError(f"--eval-workers must be at least 1, got {args.eval_workers}.")
    if args.loader_workers is not None and args.loader_workers < 0:
        raise ValueError(f"--loader-workers must be 0 or more, got {args.loader_workers}.")
    if args.calibrate_norms is not None and args.calibrate_norms < 1:
        raise ValueError(f"--calibrate-norms takes a positive number of training images, got {args.calibrate_norms}.")
    if args.max_latency_ms is not None and args.max_latency_ms <= 0:
        raise ValueError(f"--max-latency-ms must be above 0, got {args.max_latency_ms:g}.")
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
    search_split = args.search_split or (HOLDOUT_SPLIT if has_split(args.data, HOLDOUT_SPLIT) else args.split)
    if args.calibrate_norms and not has_split(args.data, "train"):
        raise ValueError(f"--calibrate-norms reads the train split, and {args.data!r} has no train.json.")
    for split in dict.fromkeys((search_split, args.split)):
        manifest = read_manifest(args.data, split)
        if manifest.classes != classes:
            raise ValueError(f"the checkpoint was trained on {len(classes)} classes, the {split} split in "
                             f"{args.data!r} has {len(manifest.classes)}" + (
                                 " (same count, other names)" if len(classes) == len(manifest.classes) else "")
                             + "; pass matching data.")
    if search_split == args.split:
        print(f"note: masks are chosen and reported on the same split ({args.split}), so the front's accuracies "
              "are optimistic; write a minival split with `pipeline.data.shard ... --holdout N`.", file=sys.stderr)
    if args.ray_address:
        from cluster.ray_node import auth_env

        probe_ray(args.ray_address)
        os.environ.update(auth_env())  # before Ray is imported: its token loader reads the environment once
    if parse_location(args.data).is_local and args.ray_address and args.ray_address != "auto":
        print(f"note: every Ray node reads {args.data} at this path: it must be on a shared filesystem "
              "(or serve the shards over http(s):// or s3://).", file=sys.stderr)
    if not args.no_tracking:
        check_reachable(resolve_tracking_uri(args.tracking_uri))
    model, _ = load_trained(weights)  # tensors against metadata, here rather than inside every Ray trial
    if args.out:
        out = Path(args.out)
    elif args.checkpoint:
        out = weights.parent / f"pareto-{args.target}"
    else:  # weights downloaded from MLflow sit in a temporary directory
        out = Path("runs") / f"pareto-{args.mlflow_run}-{args.target}"
    with output_lock(out, "the search output"):
        return _search_locked(args, weights, model, meta, search_split, sampler, budget, num_bits, out)


def _search_locked(args: argparse.Namespace, weights: Path, model: torch.nn.Module, meta: dict[str, Any],
                   search_split: str, sampler: str, budget: int, num_bits: int, out: Path) -> dict[str, Any]:
    """The search once its inputs are checked and ``out`` is this process's alone."""
    model_name, classes, resolution = meta["model"], meta["classes"], meta["resolution"]
    if args.target in LOCAL_TARGETS:
        table = local_table(model_name, args.batch_size, resolution, args.dtype or "fp32",
                            num_classes=len(classes))
    else:
        table = resolve(args.target, model_name, args.batch_size, resolution, args.dtype)
    check_table_for(table, model_name, args.batch_size, resolution)
    tracker = None
    if not args.no_tracking:
        experiment = args.experiment or (training_experiment(args.mlflow_run, args.tracking_uri) if args.mlflow_run
                                         else "adn-pareto")
        tags = {"adn.model": model_name, "adn.target": args.target, "adn.space": args.space,
                "mlflow.note.content": f"Pareto search of {model_name}'s skip masks, top-1 on {args.data} "
                                       f"({args.split}) against {args.target} latency"}
        if args.mlflow_run:
            tags["adn.training_run"] = args.mlflow_run
        tracker = Tracker(args.tracking_uri, experiment, f"{model_name}-pareto-{args.target}-{args.space}", tags=tags)

    with tracker or contextlib.nullcontext():
        results, timing, reported = run_search(
            weights, args.data, table, num_bits, sampler, budget, batch_size_eval=args.eval_batch_size,
            max_samples=args.max_samples, ray_address=args.ray_address, seed=args.seed, out=out, split=search_split,
            report_split=args.split, eval_workers=args.eval_workers, loader_workers=args.loader_workers,
            calibrate_images=args.calibrate_norms)
        candidates = sorted((Candidate(mask, r["acc1"], r["latency_ms"], count_flops(model, mask, resolution) / 1e9,
                                       count_params(model, mask) / 1e6, r["acc5"], r["node"])
                             for mask, r in results.items()), key=lambda c: c.latency_ms)
        front = pareto_front(candidates)
        for c in front:  # the report split's accuracy, from one pass over the front (the same split: the same numbers)
            c.val_acc1, c.val_acc5, _ = reported.get(c.mask, (c.acc1, c.acc5, 0))
        super_mask, base_mask = "F" * num_bits, "T" * num_bits
        super_ms = predict(table, super_mask)
        best = best_within(front, args.max_latency_ms) if args.max_latency_ms is not None else None
        report = {
            "model": model_name, "target": args.target, "table": {k: table.get(k) for k in (
                "method", "device", "dtype", "batch_size", "resolution", "source", "path")},
            "space": args.space, "sampler": sampler, "budget": budget, "weights": str(weights),
            "search_split": search_split, "split": args.split, "calibrate_norms": args.calibrate_norms,
            "timing": timing, "front": [asdict(c) for c in front], "candidates": [asdict(c) for c in candidates],
            "best_within_budget": asdict(best) if best else None, "max_latency_ms": args.max_latency_ms,
            "mlflow_parent": tracker.run_id if tracker is not None else None,
        }
        (out / "pareto.json").write_text(json.dumps(report, indent=1))
        plot(candidates, front, out / "pareto.png", f"{model_name} on {args.target} ({table['method']})",
             args.max_latency_ms, super_mask, base_mask, (search_split, args.split))
        if tracker is not None:
            inputs = {"model": model_name, "target": args.target, "weights": str(weights), "data": args.data,
                      "space": args.space, "sampler": sampler, "budget": budget, "batch_size": args.batch_size,
                      "table_method": table["method"], "max_latency_ms": args.max_latency_ms,
                      "search_split": search_split, "split": args.split, "calibrate_norms": args.calibrate_norms}
            try:
                view = log_to_mlflow(tracker, inputs, candidates, front, args.target, out)
            except Exception as err:  # the search's results are on disk already; MLflow only mirrors them
                print(f"warning: could not log the candidates to MLflow ({err}); the results are in "
                      f"{out / 'pareto.json'}.", file=sys.stderr)
                tracker.finish("FAILED", timeout_s=10)
                view = None
        if not args.json:
            print(f"{model_name} on {args.target} ({table['method']} table, batch {args.batch_size}), "
                  f"{args.space} space, {sampler}, {len(candidates)} masks chosen on {search_split}, front reported "
                  f"on {args.split}")
            head = [f"top-1 {search_split}"] + ([f"top-1 {args.split}"] if args.split != search_split else [])
            print(f"{'mask':<10}" + "".join(f"{h:>{len(h) + 2}}" for h in head)
                  + f"{'latency ms':>12}{'GFLOPs':>9}{'params M':>10}{'speed-up':>10}")
            for c in front:
                accs = [c.acc1] + ([c.val_acc1] if args.split != search_split else [])
                print(f"{c.mask:<10}" + "".join(f"{a:>{len(h) + 2}.2%}" for a, h in zip(accs, head, strict=True))
                      + f"{c.latency_ms:>12.3f}{c.gflops:>9.4f}{c.params_m:>10.3f}{super_ms / c.latency_ms:>9.2f}x")
            if args.max_latency_ms is not None:
                print(f"best within {args.max_latency_ms:g} ms: " + (
                    f"{best.mask} ({best.val_acc1:.2%} on {args.split}, {best.latency_ms:.3f} ms)" if best else
                    f"none; the fastest mask is {front[0].mask} at {front[0].latency_ms:.3f} ms"))
            workers = ", ".join(f"{w['node']} {w['samples']}" for w in timing["eval_workers"])
            print(f"evaluation: {timing['passes']} passes over {search_split} ({timing['masks_per_pass']} masks), "
                  f"{timing['segment_runs']} stage segments run against {timing['segment_runs_one_by_one']} one by one "
                  f"({timing['segment_runs'] / max(timing['segment_runs_one_by_one'], 1):.2f}); samples per worker: "
                  f"{workers}")
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
