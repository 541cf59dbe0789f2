"""Converting a trained network into an ADN, against training the ADN from scratch: ``python -m
studies.finetune`` (``make reproduce-finetune``).

For each seed it trains the vanilla network and the ADN super-net from scratch with one recipe
and budget (as ``make reproduce`` does), then fine-tunes the vanilla network's weights into an ADN
(``pipeline.train --init-from``) with the fine-tune recipe for each budget (a fraction of the
from-scratch epochs; 0: the conversion alone, no step) and each learning rate. Every training is
a child MLflow run of one parent run. It writes ``finetune.md`` and ``finetune.json`` (the
super-net's and base-net's top-1 per budget, mean and spread over seeds, with the images each
training processed and its time) and ``finetune.png`` (top-1 against images processed), states
the smallest budget whose base-net matches the from-scratch base-net, and logs them to the parent
run. Run again with the same flags, it reuses finished trainings.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from pipeline.data import read_manifest
from pipeline.data.storage import parse_location
from pipeline.recipes import list_recipes, load_recipe

from .driver import KEEP, Study, check_common, conduct, spread


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m studies.finetune", description=__doc__.split("\n\n")[1],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="data/digits-hard", help="shards with train.json and val.json")
    p.add_argument("--model", default="resnet_mini", help="ADN model; the recipe named after it trains from scratch")
    p.add_argument("--recipe", help=f"from-scratch recipe ({', '.join(list_recipes())}) or a YAML file")
    p.add_argument("--finetune-recipe", help="fine-tune recipe (default: MODEL_finetune)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one training of each kind per seed")
    p.add_argument("--epochs", type=int, help="the from-scratch budget (default: the recipe's)")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.25, 0.5],
                   help="fine-tune budgets as fractions of --epochs (rounded to whole epochs, at least 1; 0: convert "
                        "only)")
    p.add_argument("--lrs", type=float, nargs="+", help="fine-tune learning rates (default: the fine-tune recipe's)")
    p.add_argument("--out", default="runs/finetune", help="directory for the trainings, table and figure")
    p.add_argument("--jobs", type=int, default=2, help="trainings run at once (see studies.paper --help)")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers of each training")
    p.add_argument("--max-steps", type=int, help="stop every from-scratch training after this many steps (smoke runs)")
    p.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    p.add_argument("--experiment", default="adn-finetune", help="MLflow experiment of the parent and child runs")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    return p.parse_args(argv)


def budget_epochs(budget: float, epochs: int) -> int:
    """Whole epochs of a budget (0 stays 0: the conversion alone)."""
    return 0 if budget == 0 else max(1, round(budget * epochs))


class FinetuneStudy(Study):
    """The from-scratch trainings of ``studies.paper`` plus the fine-tunes from each seed's vanilla network."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        self.ft_recipe = args.finetune_recipe or f"{args.model}_finetune"
        recipe = load_recipe(self.ft_recipe)
        self.lrs = args.lrs or [float(recipe["optimizer"]["lr"])]
        self.budgets = sorted({budget_epochs(b, self.epochs) for b in args.budgets})
        self.seed_locks: dict[int, threading.Lock] = {s: threading.Lock() for s in args.seeds}

    def finetune_name(self, epochs: int, lr: float) -> str:
        return "convert" if epochs == 0 else f"finetune-{epochs}ep-lr{lr:g}"

    def finetunes(self) -> list[tuple[int, float]]:
        """(epochs, lr) of every fine-tune; the conversion alone once, whatever the learning rate."""
        return [(e, lr) for e in self.budgets for lr in (self.lrs if e else self.lrs[:1])]

    def vanilla(self, seed: int) -> dict[str, Any]:
        with self.seed_locks[seed]:  # a fine-tune waits for its seed's vanilla network
            return self.train(seed, "vanilla")

    def finetune(self, seed: int, epochs: int, lr: float) -> dict[str, Any]:
        self.vanilla(seed)
        source = str(self.run_dir(seed, "vanilla").resolve())
        flags = ["--recipe", self.ft_recipe, "--mode", "adn", "--init-from", source]
        flags += ["--epochs", str(epochs), "--lr", str(lr)] if epochs else ["--max-steps", "0"]
        want = {"model": self.args.model, "recipe": self.ft_recipe, "mode": "adn", "seed": seed,
                "data_dir": parse_location(self.data).absolute(), "init_from": source,
                "max_steps": None if epochs else 0, **({"epochs": epochs, "optimizer.lr": lr} if epochs else {})}
        return self.launch(seed, self.finetune_name(epochs, lr), flags, want)

    def jobs(self) -> list[tuple[int, str, Any]]:
        """Vanilla networks first (the fine-tunes start from them), then the longest trainings first."""
        seeds = self.args.seeds
        jobs: list[tuple[int, str, Any]] = [(s, "vanilla", lambda s=s: self.vanilla(s)) for s in seeds]
        jobs += [(s, "adn", lambda s=s: self.train(s, "adn")) for s in seeds]
        jobs += [(s, self.finetune_name(e, lr), lambda s=s, e=e, lr=lr: self.finetune(s, e, lr))
                 for s in seeds for e, lr in sorted(self.finetunes(), key=lambda f: -f[0])]
        return jobs

    # -- report ---------------------------------------------------------------------------------
    def summary(self, seed: int, name: str) -> dict[str, Any]:
        return json.loads((self.run_dir(seed, name) / "summary.json").read_text())

    def images(self, seed: int, name: str) -> float:
        """Training images a run processed: its steps times its global batch."""
        cfg = yaml.safe_load((self.run_dir(seed, name) / "config.yaml").read_text())
        return float(self.summary(seed, name)["steps"] * cfg["batch_size"] * cfg["world_size"])

    def report(self) -> dict[str, Any]:
        seeds = self.args.seeds
        train_size = read_manifest(self.data, "train").num_samples
        sample = self.summary(seeds[0], "adn")
        sup, base = sample["masks"][0]["mask"], sample["masks"][-1]["mask"]

        def row(name: str, label: str, epochs: int, lr: float | None) -> dict[str, Any]:
            runs = [self.summary(s, name) for s in seeds]
            acc = [{r["mask"]: r["acc1"] for r in run["masks"]} for run in runs]
            images = [self.images(s, name) for s in seeds]
            return {"name": name, "label": label, "epochs": epochs, "lr": lr,
                    "super": spread([a[sup] for a in acc]),
                    "base": spread([a[base] for a in acc]) if all(base in a for a in acc) else None,
                    "images": statistics.fmean(images),
                    "step_s": statistics.fmean(run["timing"]["step_s"] for run in runs),
                    "wall_s": statistics.fmean(self.timing.get(f"seed{s}/{name}", float("nan")) for s in seeds),
                    "curve": _curve(runs, sup, base)}

        vanilla = row("vanilla", f"vanilla from scratch ({self.epochs} epochs)", self.epochs, None)
        scratch = row("adn", f"ADN from scratch ({self.epochs} epochs)", self.epochs, None)
        target = scratch["base"]["mean"]
        finetunes = []
        for epochs, lr in self.finetunes():
            name = self.finetune_name(epochs, lr)
            label = "conversion only (no step)" if epochs == 0 else \
                f"fine-tune {epochs} epoch{'s' if epochs > 1 else ''} ({epochs / self.epochs:.0%}), lr {lr:g}"
            entry = row(name, label, epochs, lr if epochs else None)
            entry["budget"] = epochs / self.epochs
            entry["matches"] = entry["base"]["mean"] >= target
            entry["reached"] = _reached(entry["curve"], target)
            finetunes.append(entry)
        matching = [f for f in finetunes if f["matches"]]
        smallest = min(matching, key=lambda f: (f["epochs"], -f["base"]["mean"])) if matching else None
        chance = 100 / len(read_manifest(self.data, "val").classes)
        for f in finetunes:  # the recipe's criterion: a whole ADN, not only a base-net better than from scratch
            f["keeps"] = (f["base"]["mean"] - chance) / max(f["super"]["mean"] - chance, 1e-9)
            f["complete"] = f["super"]["mean"] >= vanilla["super"]["mean"] and f["keeps"] >= KEEP
        complete = [f for f in finetunes if f["complete"]]
        recommended = min(complete, key=lambda f: (f["epochs"], -f["base"]["mean"])) if complete else None
        return {"model": self.args.model, "data": self.data, "recipe": str(self.recipe_name),
                "finetune_recipe": self.ft_recipe, "epochs": self.epochs, "seeds": seeds, "train_images": train_size,
                "super_mask": sup, "base_mask": base, "vanilla": vanilla, "scratch": scratch, "finetunes": finetunes,
                "target_base_top1": target, "smallest_matching": smallest and smallest["name"], "chance": chance,
                "recommended": recommended and recommended["name"],
                "scratch_reached": _reached(scratch["curve"], target)}


def _curve(runs: list[dict[str, Any]], sup: str, base: str) -> list[dict[str, float]]:
    """Mean top-1 (percent) and cumulative images and step time at each evaluation, over seeds."""
    logs = [run.get("evaluations") or [] for run in runs]
    if not all(logs) or len({len(log) for log in logs}) != 1:
        return []
    points = []
    for i, at in enumerate(zip(*logs, strict=True)):
        points.append({"epoch": at[0]["epoch"], "images": float(at[0]["images"]),
                       "step_s": statistics.fmean(sum(e["step_s"] for e in log[: i + 1]) for log in logs),
                       "super": 100 * statistics.fmean(e["acc1"][sup] for e in at),
                       "base": 100 * statistics.fmean(e["acc1"][base] for e in at)
                       if all(base in e["acc1"] for e in at) else None})
    return points


def _reached(curve: list[dict[str, float]], target: float) -> dict[str, float] | None:
    """The first evaluation whose mean base-net top-1 reaches ``target``: its epoch, images and step time."""
    for point in curve:
        if point["base"] is not None and point["base"] >= target - 1e-9:  # means taken in another order
            return {"epoch": point["epoch"], "images": point["images"], "step_s": point["step_s"]}
    return None


def _pm(cell: dict[str, float] | None) -> str:
    return "-" if cell is None else f"{cell['mean']:.2f} ± {cell['std']:.2f}"


def markdown(result: dict[str, Any]) -> str:
    """The table of budgets, the answer, and how each number was measured."""
    n = result["train_images"]
    scratch, vanilla = result["scratch"], result["vanilla"]
    lines = [f"# Converting a trained {result['model']} into an ADN, against ADN from scratch ({result['data']})", "",
             f"{len(result['seeds'])} seed(s) ({', '.join(map(str, result['seeds']))}); from scratch: recipe "
             f"{result['recipe']}, {result['epochs']} epochs; fine-tunes: recipe {result['finetune_recipe']}, starting "
             f"from each seed's vanilla network. Top-1 (%) on the validation split, mean ± standard deviation over "
             f"seeds; images: training images processed ({n} per epoch; an ADN step passes each through the super-net "
             "and the base-net); step time: the training steps alone, one thread per training.", "",
             f"| training | {result['super_mask']} super-net | {result['base_mask']} base-net | images | step time (s) "
             "| wall (s) | base-net first at the target |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in [vanilla, scratch, *result["finetunes"]]:
        mark = " ✓" if r.get("matches") else ""
        at = r.get("reached", result["scratch_reached"] if r is scratch else None)
        first = f"epoch {at['epoch']} ({at['images']:,.0f} images)" if at else "-"
        lines.append(f"| {r['label']} | {_pm(r['super'])} | {_pm(r['base'])}{mark} | {r['images']:,.0f} | "
                     f"{r['step_s']:.0f} | {r['wall_s']:.0f} | {first} |")
    target = result["target_base_top1"]
    lines += ["", f"✓: the fine-tuned base-net's mean top-1 reaches the from-scratch base-net's ({target:.2f}), the "
                  "target. Last column: the first evaluation (after each epoch; epoch 0: before any step) at which the "
                  "mean over seeds reaches it.",
              "The vanilla network has no base-net of its own; the conversion-only row is it cut as a plain network "
              "would be (each norm copied into its skipped mode), before any step."]
    smallest = next((f for f in result["finetunes"] if f["name"] == result["smallest_matching"]), None)
    lines += ["", "## Answer", ""]
    if smallest is None:
        lines.append(f"No fine-tune budget reached the from-scratch base-net's {target:.2f}.")
    else:
        lines.append(
            f"The smallest budget whose base-net matches ADN from scratch is {smallest['label']}: base-net "
            f"{_pm(smallest['base'])} against {_pm(scratch['base'])}, super-net {_pm(smallest['super'])} against "
            f"{_pm(scratch['super'])}, for {smallest['images'] / scratch['images']:.0%} of the from-scratch images "
            f"and {smallest['step_s'] / scratch['step_s']:.0%} of its step time; with the vanilla training counted "
            f"too, {(smallest['images'] + vanilla['images']) / scratch['images']:.0%} of the images and "
            f"{(smallest['step_s'] + vanilla['step_s']) / scratch['step_s']:.0%} of the step time.")
    best = next((f for f in result["finetunes"] if f["name"] == result["recommended"]), None)
    if best is None:
        lines.append(f"No budget gave a super-net at the vanilla network's top-1 ({vanilla['super']['mean']:.2f}) "
                     f"with a base-net keeping {KEEP:.0%} of its accuracy above chance.")
    else:
        lines.append(f"The smallest budget that gives a whole ADN (the super-net at least at the vanilla network's "
                     f"{vanilla['super']['mean']:.2f}, the base-net keeping at least {KEEP:.0%} of the super-net's "
                     f"accuracy above chance) is {best['label']}: super-net {_pm(best['super'])}, base-net "
                     f"{_pm(best['base'])} (keeps {best['keeps']:.0%}), for {best['images'] / scratch['images']:.0%} "
                     f"of the from-scratch images and {best['step_s'] / scratch['step_s']:.0%} of its step time.")
    if result["scratch_reached"]:
        at = result["scratch_reached"]
        lines.append(f"ADN from scratch first reached its final mean base-net top-1 after epoch {at['epoch']} "
                     f"({at['images']:,.0f} images, {at['step_s']:.0f} s of steps).")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """Top-1 against training images: ADN from scratch epoch by epoch, and each fine-tune budget's end point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
    for ax, key, title in ((axes[0], "super", result["super_mask"] + " super-net"),
                           (axes[1], "base", result["base_mask"] + " base-net")):
        curve = result["scratch"]["curve"]
        if curve:
            ax.plot([p["images"] / 1e3 for p in curve], [p[key] for p in curve], "-", color="C0",
                    label="ADN from scratch, per epoch")
        s = result["scratch"]
        ax.errorbar([s["images"] / 1e3], [s[key]["mean"]], yerr=[s[key]["std"]], fmt="o", color="C0", capsize=3)
        for i, lr in enumerate(sorted({f["lr"] for f in result["finetunes"] if f["lr"] is not None})):
            points = [f for f in result["finetunes"] if f["lr"] in (lr, None)]
            ax.errorbar([f["images"] / 1e3 for f in points], [f[key]["mean"] for f in points],
                        yerr=[f[key]["std"] for f in points], fmt="s-", color=f"C{i + 1}", capsize=3, ms=5,
                        label=f"fine-tuned from vanilla, lr {lr:g} (end of each budget)")
        ax.axhline(result["target_base_top1"] if key == "base" else s["super"]["mean"], color="C0", ls=":", lw=1)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training images processed by the ADN training (thousands)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 (%)")
    axes[1].legend(fontsize=8, loc="upper left")
    v = result["vanilla"]
    fig.suptitle(f"{result['model']}: {len(result['seeds'])} seed(s); the vanilla network the fine-tunes start from "
                 f"took {v['images'] / 1e3:,.0f}k images", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def check_args(args: argparse.Namespace) -> None:
    """Every bad input as one sentence before anything trains."""
    if any(b < 0 or b > 1 for b in args.budgets):
        raise ValueError(f"--budgets are fractions of --epochs between 0 and 1, got {args.budgets}.")
    if args.lrs and any(lr <= 0 for lr in args.lrs):
        raise ValueError(f"--lrs must be above 0, got {args.lrs}.")
    check_common(args)


def metrics_of(result: dict[str, Any]) -> dict[str, float]:
    """The parent run's metrics: each training's top-1 of both ends, images and step time, the target, the wall."""
    metrics = {"target_base_top1": result["target_base_top1"], "wall_s": result["timing"]["total_s"]}
    for r in [result["vanilla"], result["scratch"], *result["finetunes"]]:
        metrics[f"{r['name']}_super_top1"] = r["super"]["mean"]
        if r["base"] is not None:
            metrics[f"{r['name']}_base_top1"] = r["base"]["mean"]
        metrics[f"{r['name']}_images"] = r["images"]
        metrics[f"{r['name']}_step_s"] = r["step_s"]
    return metrics


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.calibrate_norms = 0
    start = time.perf_counter()

    def make() -> FinetuneStudy:
        check_args(args)
        return FinetuneStudy(args)

    def run(study: FinetuneStudy) -> None:
        study.start(("vanilla", "adn"), "finetune-run.json", f"finetune-{args.model}-{study.epochs}ep",
                    tags={"adn.model": args.model, "adn.study": "finetune-vs-scratch",
                          "mlflow.note.content": f"{args.model} converted into an ADN by fine-tunes of "
                                                 f"{study.budgets} epochs against {study.epochs} from scratch"},
                    params={"model": args.model, "recipe": str(study.recipe_name),
                            "finetune_recipe": study.ft_recipe, "data": args.data, "epochs": study.epochs,
                            "seeds": args.seeds, "budget_epochs": study.budgets, "lrs": study.lrs})
        study.run_all(study.jobs())
        result = study.report()
        result["timing"] = {"total_s": time.perf_counter() - start, "trainings_s": study.timing,
                            "reused_from_an_earlier_invocation": sorted(study.reused), "jobs": args.jobs}
        study.publish("finetune", result, markdown(result), plot, metrics_of(result))

    return conduct(make, run)


if __name__ == "__main__":
    sys.exit(main())
