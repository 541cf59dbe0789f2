"""The paper's claims, reproduced: ``python -m studies.paper`` (``make reproduce``).

For each seed it trains, with one recipe and one budget, the vanilla network (the super-net
alone), the base-net alone and the ADN super-net: three ``pipeline.train`` processes, each a
child MLflow run of the study's parent run. It then evaluates on the validation split every
mask of the ADN super-net; every mask of the vanilla network with naive skipping (the blocks
dropped, the one set of norms it was trained with); the base-net alone; and, with
``--calibrate-norms N``, every ADN mask again after ``adn.calibrate_norms`` re-estimated its
batch-norm statistics from N training images. It writes the paper's table (``study.md``,
``study.json``: rows ADN FF..F, ADN TT..T, vanilla, base alone; mean and spread over seeds) and
its Figure (b) (``study.png``: top-1 against GFLOPs), and states which of the paper's three
claims hold. A study interrupted and run again with the same flags reuses finished trainings
and resumes an unfinished one from its checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from adn.checkpoint import load_trained
from adn.complexity import mask_costs
from adn.norms import copy_kept_norms as naive_skipping  # a vanilla network cut as a plain one would be
from pipeline.data import read_manifest
from pipeline.recipes import list_recipes
from search.accuracy import evaluate_split  # shares the stage prefixes of masks: the search's evaluator

from .driver import KEEP, Study, check_common, conduct, spread
from .stats import paired, verdict

MODES = ("vanilla", "base", "adn")
ROW_NAMES = {"adn_super": "ADN super-net", "adn_base": "ADN base-net", "vanilla": "vanilla (super-net alone)",
             "base_alone": "base-net alone"}
#: Which training and which of its masks each row's learning curve follows (False: the super-net's mask).
CURVES = {"adn_super": ("adn", False), "adn_base": ("adn", True), "vanilla": ("vanilla", False),
          "base_alone": ("base", True)}
#: Claim 1 is "at least as good": it holds when the interval of ADN minus vanilla lies above -NON_INFERIORITY
#: points, and does not when it lies below.
NON_INFERIORITY = 1.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m studies.paper", description=__doc__.split("\n\n")[1],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="data/digits-hard",
                   help="shards with train.json and val.json (make reproduce writes the digits-hard task there)")
    p.add_argument("--model", default="resnet_mini", help="ADN model; the recipe named after it is used")
    p.add_argument("--recipe", help=f"shipped recipe ({', '.join(list_recipes())}) or a YAML file")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one training of each kind per seed")
    p.add_argument("--epochs", type=int, help="the budget of every training (default: the recipe's)")
    p.add_argument("--max-steps", type=int, help="stop every training after this many steps (smoke runs)")
    p.add_argument("--calibrate-norms", type=int, default=512, metavar="N",
                   help="also evaluate every ADN mask after re-estimating its norm statistics from N training "
                        "images (0: off)")
    p.add_argument("--out", default="runs/study", help="directory for the trainings, table and figure")
    p.add_argument("--jobs", type=int, default=1,
                   help="trainings run at once, each with OMP_NUM_THREADS = cores / jobs unless that is set (on a "
                        "2-core CPU 2 jobs of 1 thread finish sooner than 1 of 2: the per-step Python is serial)")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers of each training")
    p.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    p.add_argument("--experiment", default="adn-study", help="MLflow experiment of the parent and child runs")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    return p.parse_args(argv)


class PaperStudy(Study):
    """Per seed, the vanilla network, the base-net alone and the ADN, then every mask of each evaluated."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        self.costs: dict[str, dict[str, float]] = {}  # GFLOPs and params of each mask, from the first ADN evaluated
        self.curves: dict[int, dict[str, dict[int, float]]] = {}  # seed -> row -> epoch -> top-1 on val

    def train_all(self, jobs: list[tuple[int, str]]) -> None:
        """Run the trainings ``--jobs`` at a time, longest first; the first failure stops the others."""
        cost = {"adn": 0, "vanilla": 1, "base": 2}  # an ADN step runs both passes
        order = sorted(jobs, key=lambda job: (cost[job[1]], job[0]))
        self.run_all([(seed, mode, lambda seed=seed, mode=mode: self.train(seed, mode)) for seed, mode in order])

    # -- evaluation -----------------------------------------------------------------------------
    def evaluate_seed(self, seed: int, device: torch.device) -> dict[str, dict[str, float]]:
        """Top-1 of every mask: ADN, ADN calibrated, vanilla naively skipped, base alone (fractions)."""
        found: dict[str, dict[str, float]] = {}
        self.curves[seed] = self.curves_of(seed)
        for mode in MODES:
            model, meta = load_trained(self.run_dir(seed, mode), map_location=device)
            recipe = meta["recipe"]
            masks = [model.masks()[-1]] if mode == "base" else model.masks()
            if mode == "vanilla":
                naive_skipping(model)
            rates = evaluate_split(model, self.data, "val", recipe, masks, device=device).rates()
            found[mode] = {m: r[0] for m, r in rates.items()}
            if mode == "adn" and self.args.calibrate_norms:
                rates = evaluate_split(model, self.data, "val", recipe, masks, device=device,
                                       calibrate_images=self.args.calibrate_norms).rates()
                found["adn_calibrated"] = {m: r[0] for m, r in rates.items()}
            if mode == "adn" and not self.costs:  # the same for every seed: counted once
                resolution = int(recipe["data"]["val_crop"])
                self.costs = {str(c.mask): {"gflops": c.gflops, "params_m": c.params_m}
                              for c in mask_costs(model, resolution)}
                self.super_mask, self.base_mask = str(masks[0]), str(masks[-1])
        return found

    def curves_of(self, seed: int) -> dict[str, dict[int, float]]:
        """Top-1 on val after every epoch of each row's training (the trainings evaluate at each epoch's end)."""
        out: dict[str, dict[int, float]] = {}
        for row, (mode, base) in CURVES.items():
            log = json.loads((self.run_dir(seed, mode) / "summary.json").read_text())["evaluations"]
            for entry in log:
                masks = list(entry["acc1"])
                mask = min(masks, key=lambda m: m.count("F")) if base else max(masks, key=lambda m: m.count("F"))
                out.setdefault(row, {})[int(entry["epoch"])] = float(entry["acc1"][mask])
        return out

    # -- report ---------------------------------------------------------------------------------
    def report(self, per_seed: dict[int, dict[str, dict[str, float]]]) -> dict[str, Any]:
        seeds = sorted(per_seed)
        sup, base = self.super_mask, self.base_mask

        def over_seeds(kind: str, mask: str) -> dict[str, float]:
            return spread([per_seed[s][kind][mask] for s in seeds])

        rows = {
            "adn_super": {"mask": sup, **self.costs[sup], "top1": over_seeds("adn", sup)},
            "adn_base": {"mask": base, **self.costs[base], "top1": over_seeds("adn", base)},
            "vanilla": {"mask": sup, **self.costs[sup], "top1": over_seeds("vanilla", sup)},
            "base_alone": {"mask": base, **self.costs[base], "top1": over_seeds("base", base)},
        }
        masks = {}
        for mask, cost in self.costs.items():
            entry: dict[str, Any] = {**cost, "adn": over_seeds("adn", mask), "naive": over_seeds("vanilla", mask)}
            if "adn_calibrated" in per_seed[seeds[0]]:
                entry["adn_calibrated"] = over_seeds("adn_calibrated", mask)
            masks[mask] = entry
        classes = len(read_manifest(self.data, "val").classes)
        return {"model": self.args.model, "recipe": str(self.recipe_name), "data": self.data, "epochs": self.epochs,
                "max_steps": self.args.max_steps, "seeds": seeds, "calibrate_norms": self.args.calibrate_norms,
                "super_mask": sup, "base_mask": base, "rows": rows, "masks": masks,
                "claims": claims(per_seed, seeds, sup, base, 100 / classes),
                "curves": curves(self.curves, seeds),
                "calibration": calibration_effect(masks, sup, base) if self.args.calibrate_norms else None,
                "per_seed": {str(s): per_seed[s] for s in seeds}}


def curves(per_seed: dict[int, dict[str, dict[int, float]]], seeds: list[int]) -> dict[str, Any]:
    """Per row: the epochs every seed evaluated, each seed's top-1 there and their mean and spread (percent)."""
    out = {}
    for row in CURVES:
        epochs = sorted(set.intersection(*(set(per_seed[s][row]) for s in seeds)))
        cells = [spread([per_seed[s][row][e] for s in seeds]) for e in epochs]
        mean, std = [c["mean"] for c in cells], [c["std"] for c in cells]
        out[row] = {"epochs": epochs, "mean": mean, "std": std, "plateau": plateau(epochs, mean, std),
                    "per_seed": {str(s): [100 * per_seed[s][row][e] for e in epochs] for s in seeds}}
    return out


def plateau(epochs: list[int], mean: list[float], std: list[float]) -> dict[str, Any]:
    """Whether a curve has stopped improving: its mean gain over the last quarter of the epochs against the
    seed-to-seed standard deviation at the end (flat when the gain is not larger)."""
    back = max(1, len(epochs) // 4)
    if len(epochs) <= back:
        return {"from_epoch": None, "to_epoch": epochs[-1] if epochs else None, "gain": None, "spread": None,
                "flat": False}
    gain = mean[-1] - mean[-1 - back]
    return {"from_epoch": epochs[-1 - back], "to_epoch": epochs[-1], "gain": gain, "spread": std[-1],
            "flat": gain <= std[-1]}


def claims(per_seed: dict[int, dict[str, dict[str, float]]], seeds: list[int], sup: str, base: str,
           chance: float) -> list[dict[str, Any]]:
    """The paper's three claims. The first two compare trainings that share a seed (the same data order and
    initialisation): the mean paired difference in points with its 95 % t-interval over seeds, and a verdict
    (holds, does not hold, undecided at this number of seeds). The third is decided by its thresholds on means."""
    def top1(kind: str, mask: str) -> list[float]:
        return [100 * per_seed[s][kind][mask] for s in seeds]

    adn_sup, adn_base, vanilla, alone = top1("adn", sup), top1("adn", base), top1("vanilla", sup), top1("base", base)
    one = paired(adn_sup, vanilla)
    two = paired(adn_base, alone)
    first, second = verdict(one, "non-inferior", NON_INFERIORITY), verdict(two, "superior")
    m_sup, m_base, m_vanilla, m_alone = (statistics.fmean(v) for v in (adn_sup, adn_base, vanilla, alone))
    naive = statistics.fmean(top1("vanilla", base))
    # "collapses": the naively skipped base-net loses at least half of the vanilla network's accuracy above chance;
    # "does not": ADN's base-net keeps at least KEEP of its super-net's accuracy above chance.
    naive_kept = (naive - chance) / max(m_vanilla - chance, 1e-9)
    adn_kept = (m_base - chance) / max(m_sup - chance, 1e-9)
    third = "holds" if naive_kept <= 0.5 and adn_kept >= KEEP else "does not hold"

    def interval(p: Any) -> str:
        return (f"paired difference {p.mean:+.2f} points, 95 % interval [{p.low:+.2f}, {p.high:+.2f}] over "
                f"{len(p.differences)} seed(s)")

    return [
        {"claim": "ADN super-net >= vanilla", "verdict": first, "holds": first == "holds", "paired": one.as_json(),
         "rule": f"holds when the interval lies above -{NON_INFERIORITY:g} point, does not when below",
         "evidence": f"ADN {sup} {m_sup:.2f} vs vanilla {m_vanilla:.2f}; {interval(one)}"},
        {"claim": "ADN base-net > base-net alone", "verdict": second, "holds": second == "holds",
         "paired": two.as_json(), "rule": "holds when the interval lies above 0, does not when below",
         "evidence": f"ADN {base} {m_base:.2f} vs base alone {m_alone:.2f}; {interval(two)}"},
        {"claim": "naive skipping of the vanilla network collapses, ADN's base-net does not", "verdict": third,
         "holds": third == "holds", "rule": "decided on the means over seeds",
         "evidence": f"vanilla skipped to {base}: {naive:.2f} (keeps {naive_kept:.0%} of its accuracy above chance "
                     f"{chance:.0f}; collapse: <= 50 %); ADN {base} keeps {adn_kept:.0%} of the super-net's "
                     f"(holds: >= {KEEP:.0%})"},
    ]


def calibration_effect(masks: dict[str, Any], sup: str, base: str) -> dict[str, Any]:
    """Mean top-1 change from calibrating norms: over the masks in between super and base, and at both ends."""
    def gain(mask: str) -> float:
        return masks[mask]["adn_calibrated"]["mean"] - masks[mask]["adn"]["mean"]

    between = [m for m in masks if m not in (sup, base)]
    gains = sorted(gain(m) for m in between)
    return {"between_median_gain": statistics.median(gains) if gains else 0.0,
            "between_improved": sum(g > 0 for g in gains), "between_masks": len(gains),
            "super_gain": gain(sup), "base_gain": gain(base)}


def _pm(cell: dict[str, float]) -> str:
    return f"{cell['mean']:.2f} ± {cell['std']:.2f}"


def markdown(result: dict[str, Any]) -> str:
    """The paper's table, every mask, and the claims, as Markdown."""
    seeds = len(result["seeds"])
    lines = [f"# ADN study: {result['model']} on {result['data']}", "",
             f"{seeds} seed(s) ({', '.join(map(str, result['seeds']))}), recipe {result['recipe']}, "
             f"{result['epochs']} epochs each; top-1 on the validation split as mean ± standard deviation over "
             "seeds.", "",
             "| network | mask | params (M) | GFLOPs | top-1 (%) |", "|---|---|---:|---:|---:|"]
    for key, row in result["rows"].items():
        lines.append(f"| {ROW_NAMES[key]} | {row['mask']} | {row['params_m']:.3f} | {row['gflops']:.4f} | "
                     f"{_pm(row['top1'])} |")
    calibrated = result["calibrate_norms"] and "adn_calibrated" in next(iter(result["masks"].values()))
    head = "| mask | params (M) | GFLOPs | ADN | vanilla, naive skipping |"
    rule = "|---|---:|---:|---:|---:|"
    if calibrated:
        head += f" ADN, norms calibrated ({result['calibrate_norms']} images) |"
        rule += "---:|"
    lines += ["", "## Every mask (top-1 %)", "", head, rule]
    for mask, m in sorted(result["masks"].items(), key=lambda kv: -kv[1]["gflops"]):
        line = f"| {mask} | {m['params_m']:.3f} | {m['gflops']:.4f} | {_pm(m['adn'])} | {_pm(m['naive'])} |"
        if calibrated:
            line += f" {_pm(m['adn_calibrated'])} |"
        lines.append(line)
    lines += curve_table(result)
    lines += ["", "## The paper's claims", ""]
    for c in result["claims"]:
        lines.append(f"- **{c['verdict']}**: {c['claim']}. {c['evidence']} ({c['rule']}).")
    if result.get("calibration"):
        cal = result["calibration"]
        lines += ["", "## Norm calibration", "",
                  f"Over the {cal['between_masks']} masks between super-net and base-net, calibration changed top-1 "
                  f"by a median {cal['between_median_gain']:+.2f} points and improved {cal['between_improved']} of "
                  f"them; super-net {cal['super_gain']:+.2f}, base-net {cal['base_gain']:+.2f}."]
    if result.get("timing"):
        timing = result["timing"]
        reused = len(timing["reused_from_an_earlier_invocation"])
        lines += ["", f"Wall time of this invocation: {timing['total_s'] / 60:.1f} min (trainings "
                      f"{timing['train_s'] / 60:.1f} min, {timing['jobs']} at once"
                      + (f"; {reused} trainings reused from an earlier invocation" if reused else "") + ")."]
    return "\n".join(lines) + "\n"


def curve_table(result: dict[str, Any], rows: int = 12) -> list[str]:
    """Top-1 on val against epochs, mean ± standard deviation over seeds, at up to ``rows`` epochs (the last one
    always)."""
    curves = result.get("curves")
    if not curves:
        return []
    epochs = curves["adn_super"]["epochs"]
    step = max(1, -(-len(epochs) // rows))
    shown = sorted({*range(len(epochs) - 1, -1, -step)})
    lines = ["", "## Learning curves (top-1 % on val after each epoch)", "",
             "| epoch | " + " | ".join(ROW_NAMES[k] for k in CURVES) + " |", "|---:|" + "---:|" * len(CURVES)]
    for i in shown:
        cells = []
        for k in CURVES:
            c = curves[k]
            j = c["epochs"].index(epochs[i]) if epochs[i] in c["epochs"] else None
            cells.append("" if j is None else f"{c['mean'][j]:.2f} ± {c['std'][j]:.2f}")
        lines.append(f"| {epochs[i]} | " + " | ".join(cells) + " |")
    lines.append("")
    for k in CURVES:
        p = curves[k]["plateau"]
        if p["gain"] is None:
            continue
        lines.append(f"- {ROW_NAMES[k]}: {p['gain']:+.2f} points from epoch {p['from_epoch']} to {p['to_epoch']}, "
                     f"seed-to-seed spread {p['spread']:.2f}: " + ("flat" if p["flat"] else "still rising") + ".")
    return lines


def plot(result: dict[str, Any], path: Path) -> None:
    """Figure (b): top-1 against GFLOPs, ADN's masks, the naive-skipping curve and the two baselines; beside it the
    learning curves of the four rows (mean over seeds, shaded: ± one standard deviation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    masks = sorted(result["masks"].items(), key=lambda kv: kv[1]["gflops"])
    gflops = [m["gflops"] for _, m in masks]
    fig, (ax, cx) = plt.subplots(1, 2, figsize=(13, 4.8))
    colors = {"adn_super": "C0", "adn_base": "C9", "vanilla": "C3", "base_alone": "C2"}
    for key, c in result.get("curves", {}).items():
        lo = [m - s for m, s in zip(c["mean"], c["std"], strict=True)]
        hi = [m + s for m, s in zip(c["mean"], c["std"], strict=True)]
        cx.plot(c["epochs"], c["mean"], color=colors[key], label=ROW_NAMES[key])
        cx.fill_between(c["epochs"], lo, hi, color=colors[key], alpha=0.2)
    cx.set_xlabel("epoch")
    cx.set_ylabel("top-1 on val (%)")
    cx.set_title("learning curves: mean over seeds, shaded ± std", fontsize=10)
    cx.grid(alpha=0.3)
    cx.legend(fontsize=8, loc="lower right")
    series = [("naive", "^", "0.5", "vanilla, naive skipping"), ("adn", "o", "C0", "ADN")]
    if "adn_calibrated" in masks[0][1]:
        series.append(("adn_calibrated", "s", "C1", f"ADN, norms calibrated ({result['calibrate_norms']} images)"))
    for kind, marker, color, label in series:
        top1 = [m[kind]["mean"] for _, m in masks]
        ax.errorbar(gflops, top1, yerr=[m[kind]["std"] for _, m in masks], fmt=marker, color=color, ms=5,
                    capsize=2, alpha=0.6, mfc="none" if kind == "adn_calibrated" else None)
        front = [(g, t) for i, (g, t) in enumerate(zip(gflops, top1, strict=True)) if t > max(top1[:i], default=-1)]
        ax.plot(*zip(*front, strict=True), marker=marker, color=color, ls="--" if kind == "naive" else "-", ms=6,
                mfc="none" if kind == "adn_calibrated" else None, label=label)
    for key, color, marker in (("vanilla", "C3", "*"), ("base_alone", "C2", "*")):
        row = result["rows"][key]
        ax.errorbar([row["gflops"]], [row["top1"]["mean"]], yerr=[row["top1"]["std"]], fmt=marker, color=color,
                    ms=14, capsize=3, label=ROW_NAMES[key])
    for key in ("adn_super", "adn_base"):
        row = result["rows"][key]
        ax.annotate(row["mask"], (row["gflops"], row["top1"]["mean"]), textcoords="offset points", xytext=(6, -10),
                    fontsize=8, color="C0")
    ax.set_xlabel("GFLOPs")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"{result['model']}: {len(result['seeds'])} seed(s), {result['epochs']} epochs\n"
                 "markers: every mask (mean ± std over seeds); lines: the best mask per GFLOPs", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def check_args(args: argparse.Namespace) -> None:
    """Every bad input as one sentence before anything trains."""
    if args.max_steps is not None and args.max_steps < 1:
        raise ValueError(f"--max-steps must be at least 1, got {args.max_steps}.")
    if args.calibrate_norms < 0:
        raise ValueError(f"--calibrate-norms takes a number of images (0: off), got {args.calibrate_norms}.")
    check_common(args)


def metrics_of(result: dict[str, Any]) -> dict[str, float]:
    """The parent run's metrics: each row's mean and spread, each mask's top-1, each claim's verdict, the wall."""
    metrics = {f"{key}_top1_mean": row["top1"]["mean"] for key, row in result["rows"].items()}
    metrics.update({f"{key}_top1_std": row["top1"]["std"] for key, row in result["rows"].items()})
    for mask, m in result["masks"].items():
        metrics[f"adn_top1_{mask}"] = m["adn"]["mean"]
        metrics[f"naive_top1_{mask}"] = m["naive"]["mean"]
        if "adn_calibrated" in m:
            metrics[f"adn_calibrated_top1_{mask}"] = m["adn_calibrated"]["mean"]
    metrics.update({f"claim{i + 1}_holds": float(c["holds"]) for i, c in enumerate(result["claims"])})
    for i, c in enumerate(result["claims"][:2]):
        metrics[f"claim{i + 1}_paired_mean"] = c["paired"]["mean"]
    metrics["wall_s"] = result["timing"]["total_s"]
    return metrics


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()

    def make() -> PaperStudy:
        check_args(args)
        return PaperStudy(args)

    def run(study: PaperStudy) -> None:
        study.start(MODES, "run.json", f"study-{args.model}-{study.epochs}ep",
                    tags={"adn.model": args.model, "adn.study": "paper-claims",
                          "mlflow.note.content": f"ADN study: {args.model}, seeds {args.seeds}, {study.epochs} "
                                                 "epochs; child runs are its trainings"},
                    params={"model": args.model, "recipe": str(study.recipe_name), "data": args.data,
                            "epochs": study.epochs, "seeds": args.seeds, "max_steps": args.max_steps,
                            "calibrate_norms": args.calibrate_norms})
        jobs = [(seed, mode) for seed in args.seeds for mode in MODES]
        study.train_all(jobs)
        train_s = time.perf_counter() - start
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        per_seed = {seed: study.evaluate_seed(seed, device)
                    for seed in tqdm(args.seeds, desc="evaluate", unit="seed", dynamic_ncols=True)}
        result = study.report(per_seed)
        result["timing"] = {"total_s": time.perf_counter() - start, "train_s": train_s,
                            "trainings_s": study.timing,
                            "reused_from_an_earlier_invocation": sorted(study.reused), "jobs": args.jobs,
                            "threads_per_training": int(os.environ.get("OMP_NUM_THREADS", study.threads))}
        study.publish("study", result, markdown(result), plot, metrics_of(result))

    return conduct(make, run)


if __name__ == "__main__":
    sys.exit(main())
