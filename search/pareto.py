"""Pareto search of skip masks: ``python -m search.pareto --target a100 --checkpoint runs/demo --data data/digits``.

Each candidate mask has two objectives, top-1 on the search split and latency from the target's
lookup table; Ray Tune's ``OptunaSearch`` picks the candidates (``search.tune``). Masks are chosen on
the ``minival`` split held out of training when the data has one, and the front is then evaluated on
the validation split in one more pass: both accuracies are reported. The front is printed, written to
``pareto.json`` and ``pareto.png``, and logged to MLflow as a parent run with one child run per candidate.

Spaces: ``stages`` (default) is the trained per-stage space, 2^S masks. ``blocks`` lets each
skippable block be dropped on its own (2^7 for resnet50); a stage's switchable norms then take
their skipped half only when its whole sub-path is dropped (``adn.BlockMask``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.data import DataError, has_split, read_manifest
from pipeline.data.manifest import HOLDOUT_SPLIT
from pipeline.data.storage import parse_location
from pipeline.lock import LockHeld, output_lock
from pipeline.signals import raise_on_sigterm
from pipeline.tracking import Tracker, TrackingError, check_reachable, resolve_tracking_uri

from .front import Candidate, best_within, pareto_front
from .latency import table_for
from .ray_client import leave
from .tables import TableError, check_table_for, predict


def training_experiment(run_id: str, tracking_uri: str | None) -> str:
    """The experiment of the training run, so a search sits beside the run it searched."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))
    return client.get_experiment(client.get_run(run_id).info.experiment_id).name


def resolve_checkpoint(checkpoint: str | None, mlflow_run: str | None, tracking_uri: str | None) -> Path:
    """The weights file of ``--checkpoint`` (file or training directory) or of an MLflow run's artifacts."""
    from adn.checkpoint import resolve_weights

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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
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
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_on_sigterm()
    try:
        report = search(args)
    except (ValueError, FileNotFoundError, DataError, TableError, TrackingError, LockHeld) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        reason = f" ({err})" if str(err) else ""
        print(f"interrupted{reason}; the MLflow runs of this search are marked KILLED.", file=sys.stderr)
        leave(130)
    if args.json:
        print(json.dumps({k: report[k] for k in ("front", "candidates", "best_within_budget")}, indent=1))
    return 0


@dataclass
class Plan:
    """What the checked flags and inputs resolve to, before Ray starts."""

    weights: Path
    meta: dict[str, Any]
    search_split: str
    sampler: str
    budget: int
    num_bits: int
    out: Path


def check_flags(args: argparse.Namespace) -> None:
    """One sentence for a flag out of its range, before anything is read."""
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


def check_data(args: argparse.Namespace, classes: list[str]) -> str:
    """The split the masks are chosen on, once every split read holds the checkpoint's classes."""
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
    return search_split


def plan(args: argparse.Namespace) -> Plan:
    """Check every flag and input (weights, data, Ray, MLflow) and settle the sampler, budget and output."""
    from adn.checkpoint import read_metadata

    from .parts import skeleton
    from .ray_client import auth_env, probe

    check_flags(args)
    weights = resolve_checkpoint(args.checkpoint, args.mlflow_run, args.tracking_uri)
    meta = read_metadata(weights)
    shape = skeleton(meta["model"])
    num_bits = shape.num_stages if args.space == "stages" else len(shape.block_stages)
    size = 2**num_bits
    budget = args.budget or min(size, 256)
    if budget < 2:
        raise ValueError(f"--budget must be at least 2, got {budget}.")
    sampler = args.sampler if args.sampler != "auto" else ("grid" if size <= budget else "nsga2")
    if sampler == "grid" and budget < size:
        raise ValueError(f"a grid over {size} masks needs --budget {size}; use --sampler nsga2 for fewer trials.")
    search_split = check_data(args, meta["classes"])
    if args.ray_address:
        probe(args.ray_address)
        os.environ.update(auth_env())  # before Ray is imported: its token loader reads the environment once
        if parse_location(args.data).is_local and args.ray_address != "auto":
            print(f"note: every Ray node reads {args.data} at this path: it must be on a shared filesystem "
                  "(or serve the shards over http(s):// or s3://).", file=sys.stderr)
    if not args.no_tracking:
        check_reachable(resolve_tracking_uri(args.tracking_uri))
    if args.out:
        out = Path(args.out)
    elif args.checkpoint:
        out = weights.parent / f"pareto-{args.target}"
    else:  # weights downloaded from MLflow sit in a temporary directory
        out = Path("runs") / f"pareto-{args.mlflow_run}-{args.target}"
    budget = min(budget, size) if sampler == "grid" else budget
    return Plan(weights, meta, search_split, sampler, budget, num_bits, out)


def search(args: argparse.Namespace) -> dict[str, Any]:
    """Validate every input before Ray starts, run the search, write and log the results."""
    from adn.checkpoint import load_trained

    found = plan(args)
    model, _ = load_trained(found.weights)  # tensors against metadata, here rather than inside every Ray trial
    with output_lock(found.out, "the search output"):
        return _search_locked(args, found, model)


def _tracker(args: argparse.Namespace, model_name: str) -> Tracker | None:
    """The search's MLflow parent run, beside the training run it searched when it came from one."""
    if args.no_tracking:
        return None
    experiment = args.experiment or (training_experiment(args.mlflow_run, args.tracking_uri) if args.mlflow_run
                                     else "adn-pareto")
    tags = {"adn.model": model_name, "adn.target": args.target, "adn.space": args.space,
            "mlflow.note.content": f"Pareto search of {model_name}'s skip masks, top-1 on {args.data} "
                                   f"({args.split}) against {args.target} latency"}
    if args.mlflow_run:
        tags["adn.training_run"] = args.mlflow_run
    return Tracker(args.tracking_uri, experiment, f"{model_name}-pareto-{args.target}-{args.space}", tags=tags)


def _candidates(model: Any, results: dict[str, dict[str, Any]], resolution: int) -> list[Candidate]:
    """Every evaluated mask with its GFLOPs and parameters, by latency."""
    from adn.complexity import count_flops, count_params

    return sorted((Candidate(mask, r["acc1"], r["latency_ms"], count_flops(model, mask, resolution) / 1e9,
                             count_params(model, mask) / 1e6, r["acc5"], r["node"])
                   for mask, r in results.items()), key=lambda c: c.latency_ms)


def _search_locked(args: argparse.Namespace, found: Plan, model: Any) -> dict[str, Any]:
    """The search once its inputs are checked and the output directory is this process's alone."""
    from .report import log_to_mlflow, plot, print_report
    from .tune import run_search

    model_name, resolution = found.meta["model"], found.meta["resolution"]
    table = table_for(args.target, model_name, args.batch_size, resolution, args.dtype,
                      num_classes=len(found.meta["classes"]))
    check_table_for(table, model_name, args.batch_size, resolution)
    tracker = _tracker(args, model_name)
    with tracker or contextlib.nullcontext():
        results, timing, reported = run_search(
            found.weights, args.data, table, found.num_bits, found.sampler, found.budget,
            batch_size_eval=args.eval_batch_size, max_samples=args.max_samples, ray_address=args.ray_address,
            seed=args.seed, out=found.out, split=found.search_split, report_split=args.split,
            eval_workers=args.eval_workers, loader_workers=args.loader_workers, calibrate_images=args.calibrate_norms)
        candidates = _candidates(model, results, resolution)
        front = pareto_front(candidates)
        for c in front:  # the report split's accuracy, from one pass over the front (the same split: the same numbers)
            c.val_acc1, c.val_acc5, _ = reported.get(c.mask, (c.acc1, c.acc5, 0))
        super_mask, base_mask = "F" * found.num_bits, "T" * found.num_bits
        best = best_within(front, args.max_latency_ms) if args.max_latency_ms is not None else None
        inputs = {"model": model_name, "target": args.target, "weights": str(found.weights), "data": args.data,
                  "space": args.space, "sampler": found.sampler, "budget": found.budget,
                  "batch_size": args.batch_size, "table_method": table["method"],
                  "max_latency_ms": args.max_latency_ms, "search_split": found.search_split, "split": args.split,
                  "calibrate_norms": args.calibrate_norms}
        report = {
            "model": model_name, "target": args.target, "table": {k: table.get(k) for k in (
                "method", "device", "dtype", "batch_size", "resolution", "source", "path")},
            "space": args.space, "sampler": found.sampler, "budget": found.budget, "weights": str(found.weights),
            "search_split": found.search_split, "split": args.split, "calibrate_norms": args.calibrate_norms,
            "timing": timing, "front": [asdict(c) for c in front], "candidates": [asdict(c) for c in candidates],
            "best_within_budget": asdict(best) if best else None, "max_latency_ms": args.max_latency_ms,
            "mlflow_parent": tracker.run_id if tracker is not None else None,
        }
        (found.out / "pareto.json").write_text(json.dumps(report, indent=1))
        plot(candidates, front, found.out / "pareto.png", f"{model_name} on {args.target} ({table['method']})",
             args.max_latency_ms, super_mask, base_mask, (found.search_split, args.split))
        view = None
        if tracker is not None:
            try:
                view = log_to_mlflow(tracker, inputs, candidates, front, args.target, found.out)
            except Exception as err:  # the search's results are on disk already; MLflow only mirrors them
                print(f"warning: could not log the candidates to MLflow ({err}); the results are in "
                      f"{found.out / 'pareto.json'}.", file=sys.stderr)
                tracker.finish("FAILED", timeout_s=10)
        if not args.json:
            print_report(report, front, candidates, predict(table, super_mask), found.out)
            if tracker is not None:
                print(f"MLflow parent run {tracker.run_id}: {tracker.where()}")
                if view:
                    print(f"chart of top-1 against latency: {view}")
    return report


if __name__ == "__main__":
    sys.exit(main())
