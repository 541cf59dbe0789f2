"""The Ray Tune + Optuna driver: Optuna proposes masks, each Tune trial evaluates a batch of them in one pass.

The grid when the space fits the budget, else NSGA-II (or TPE); ``search.batching`` hands a trial a
whole batch of proposals and ``search.evaluation`` cuts each pass over the evaluation workers.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.data.storage import parse_location

from .evaluation import shard_error
from .front import Candidate, pareto_front
from .ray_client import connect
from .tables import predict

#: What a trial's process holds (Ray and Tune, no torch: the workers hold the model), as Ray's logical memory.
TRIAL_MEMORY = 256 * 2**20


def _seeds(num_bits: int) -> list[dict[str, bool]]:
    """First points for NSGA-II / TPE: the super-net and the base-net, the two ends every front spans."""
    return [{f"b{i}": v for i in range(num_bits)} for v in (False, True)]


def _progress(total: int) -> tuple[Any, Any]:
    """A progress bar over distinct masks and the Ray Tune callback that moves it (Tune's output is off)."""
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

    return _Callback(), bar


def batch_size(sampler: str, budget: int, population: int) -> int:
    """Masks per trial (one pass): a grid's whole budget, NSGA-II's generation, a few for TPE."""
    if sampler == "grid":
        return budget
    if sampler == "nsga2":
        return population
    return min(4, budget)  # TPE learns from finished trials (the constant liar covers the rest of a batch)


def make_searcher(sampler: str, num_bits: int, budget: int, seed: int, latency: Callable[[str], float]) -> Any:
    """Ray Tune's ``OptunaSearch`` over one boolean per bit, two objectives, wrapped to batch its proposals."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from .batching import BatchingSearcher

    names = [f"b{i}" for i in range(num_bits)]
    population = max(4, budget // 8)
    if sampler == "grid":
        optuna_sampler = optuna.samplers.GridSampler({n: [False, True] for n in names}, seed=seed)
    elif sampler == "nsga2":
        optuna_sampler = optuna.samplers.NSGAIISampler(population_size=population, seed=seed)
    else:
        optuna_sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, budget // 4),
                                                    constant_liar=True)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    optuna_search = OptunaSearch(metric=["acc1", "latency_ms"], mode=["max", "min"], sampler=optuna_sampler,
                                 points_to_evaluate=None if sampler == "grid" else _seeds(num_bits), seed=seed)
    return BatchingSearcher(optuna_search, num_bits, batch_size(sampler, budget, population), budget, latency)


def _collect(grid: Any, table: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]],
                                                        dict[str, int]]:
    """Each distinct mask's result, each pass's statistics, and trials per Ray node, from Tune's results."""
    errors = [r.error for r in grid if r.error]
    if errors:
        raise shard_error(errors[0]) or RuntimeError(f"{len(errors)} trials failed; the first with: {errors[0]}")
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
    return results, passes, nodes


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
    import ray
    from ray import tune

    from .counts import summarize
    from .evaluation import run_pass, start_eval_workers
    from .trial import batch_trial

    searcher = make_searcher(sampler, num_bits, budget, seed, lambda mask: predict(table, mask))
    if not ray.is_initialized():
        connect(ray_address)
    workers = start_eval_workers(weights, parse_location(data).absolute(), batch_size_eval, max_samples,
                                 eval_workers, loader_workers, calibrate_images)
    # A trial only hands its masks to the workers and waits: no CPU, only a light process's memory (Tune
    # refuses a trial without any resource).
    trainable = tune.with_resources(tune.with_parameters(batch_trial, workers=workers, split=split),
                                    {"cpu": 0, "memory": TRIAL_MEMORY})
    callback, bar = _progress(budget)
    tuner = tune.Tuner(
        trainable,
        param_space={f"b{i}": tune.choice([False, True]) for i in range(num_bits)},
        tune_config=tune.TuneConfig(search_alg=searcher, reuse_actors=True, num_samples=budget),
        run_config=tune.RunConfig(name="pareto", storage_path=str((out / "ray").resolve()), verbose=0,
                                  callbacks=[callback], failure_config=tune.FailureConfig(fail_fast=True)),
    )
    start = time.perf_counter()
    try:
        grid = tuner.fit()
    except Exception as err:  # fail_fast: Tune raises on the first failed trial
        raise shard_error(err) or RuntimeError(f"the Ray Tune search stopped: {err}") from err
    wall = time.perf_counter() - start
    bar.close()
    results, passes, nodes = _collect(grid, table)
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
