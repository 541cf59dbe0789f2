"""What a search reports: the figure, the console table, and the MLflow parent run with a child per candidate."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pipeline.tracking import UI_MODEL_TRAINING, Tracker

from .front import Candidate


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
    tracker.log_params(inputs)
    tracker.log_metrics({"front_size": len(front), "candidates": len(candidates)}, step=0)
    for name in ("pareto.json", "pareto.png"):
        tracker.log_artifact(out / name)
    on_front = {c.mask for c in front}
    for c in candidates:
        metrics = {"acc1": c.acc1, "acc5": c.acc5, "latency_ms": c.latency_ms, "gflops": c.gflops,
                   "params_m": c.params_m, "on_front": float(c.mask in on_front)}
        if c.val_acc1 is not None:  # front members: top-1 on the report split too
            metrics.update(val_acc1=c.val_acc1, val_acc5=c.val_acc5)
        tracker.log_child(c.mask, metrics, {"mask": c.mask, "target": target, "node": c.node},
                          tags={"adn.mask": c.mask, "adn.on_front": str(c.mask in on_front).lower()})
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


def print_report(report: dict[str, Any], front: list[Candidate], candidates: list[Candidate], super_ms: float,
                 out: Path) -> None:
    """The front as a table, the best mask within the budget, and where the evaluation and Ray spent their time."""
    search_split, split, timing = report["search_split"], report["split"], report["timing"]
    print(f"{report['model']} on {report['target']} ({report['table']['method']} table, batch "
          f"{report['table']['batch_size']}), {report['space']} space, {report['sampler']}, {len(candidates)} masks "
          f"chosen on {search_split}, front reported on {split}")
    head = [f"top-1 {search_split}"] + ([f"top-1 {split}"] if split != search_split else [])
    print(f"{'mask':<10}" + "".join(f"{h:>{len(h) + 2}}" for h in head)
          + f"{'latency ms':>12}{'GFLOPs':>9}{'params M':>10}{'speed-up':>10}")
    for c in front:
        accs = [c.acc1] + ([c.val_acc1] if split != search_split else [])
        print(f"{c.mask:<10}" + "".join(f"{a:>{len(h) + 2}.2%}" for a, h in zip(accs, head, strict=True))
              + f"{c.latency_ms:>12.3f}{c.gflops:>9.4f}{c.params_m:>10.3f}{super_ms / c.latency_ms:>9.2f}x")
    if report["max_latency_ms"] is not None:
        best = report["best_within_budget"]
        print(f"best within {report['max_latency_ms']:g} ms: " + (
            f"{best['mask']} ({best['val_acc1']:.2%} on {split}, {best['latency_ms']:.3f} ms)" if best else
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
