"""Serving under load: the adaptive deadline policy against fixed masks, with Ray Serve on local Ray.

Repeat with:  .venv/bin/python benchmarks/serving.py --checkpoint runs/bench/resnet50-64 --data data/digits-hard

Open-loop traffic (arrival times fixed in advance) from an asynchronous HTTP client on 127.0.0.1, with the
validation images and their labels. First the capacity of fixed FF..F and of fixed TT..T (the highest rate at
which 99 % meet the deadline, by bisection); then, per policy (fixed FF..F, fixed TT..T, the best fixed middle
mask of the front, the adaptive deadline policy), steady Poisson load at 0.5, 1, 1.5, 2 and 3 x the capacity of
FF..F and a bursty trace (phases alternating between 0.5 x and 2.5 x that capacity). Each policy is a server of
its own, one after the other, on the same machine. Figures per run: deadline attainment (answered within the
deadline / sent), effective accuracy (answered correctly within the deadline / sent), p50/p99 latency, goodput
and the mix of masks. Writes serving.json, serving.md and serving.png to --out and logs them as an MLflow run
linked to the registered model version it served (the checkpoint is registered first unless --model-uri says).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import requests
from tqdm import tqdm

# Run as a script, this file's directory is first on sys.path, and this file's name would hide the package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from pipeline.data.manifest import read_manifest  # noqa: E402
from pipeline.distributed import free_port  # noqa: E402
from serving import loadgen  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LOADS = (0.5, 1.0, 1.5, 2.0, 3.0)


def validation_images(data: str, limit: int) -> tuple[list[bytes], list[int]]:
    """Encoded images and labels of the validation shards of a local dataset."""
    manifest = read_manifest(data, "val")
    bodies, labels = [], []
    for shard in manifest.shards:
        with tarfile.open(Path(data) / shard.name) as tar:
            members: dict[str, dict[str, bytes]] = {}
            for m in tar.getmembers():
                key, _, ext = m.name.partition(".")
                members.setdefault(key, {})[ext] = tar.extractfile(m).read()
        for sample in members.values():
            image = next((sample[e] for e in ("png", "jpg", "jpeg") if e in sample), None)
            if image is not None and "cls" in sample:
                bodies.append(image)
                labels.append(int(sample["cls"]))
    return bodies[:limit], labels[:limit]


class Served:
    """One ``python -m cluster.serving`` server (what ``make serve`` runs), started and stopped by its PID."""

    def __init__(self, name: str, model_uri: str, tracking_uri: str, flags: list[str]) -> None:
        self.state = Path(tempfile.mkdtemp(prefix=f"adn-serving-{name.replace(' ', '-')}-"))  # PID and log
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "cluster.serving", "--state-dir", str(self.state), "start", "--port", str(port),
               "--", "--model-uri", model_uri, "--tracking-uri", tracking_uri, *flags]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"the {name} server did not start (log: {self.state / 'serving.log'}): "
                               f"{done.stderr.strip()[-2000:]}")
        self.info = requests.get(f"{self.url}/v1/model", timeout=30).json()

    def stop(self) -> None:
        subprocess.run([sys.executable, "-m", "cluster.serving", "--state-dir", str(self.state), "stop"], cwd=ROOT,
                       capture_output=True, timeout=180, check=True)

    def replay(self, arrivals: list[float], bodies: list[bytes], labels: list[int], slo_ms: float,
               ) -> list[loadgen.Answer]:
        return loadgen.replay(f"{self.url}/v1/classify", arrivals, bodies, labels, slo_ms, timeout_s=30)


def capacity(server: Served, bodies: list[bytes], labels: list[int], slo_ms: float, seconds: float,
             start_rate: float, steps: int) -> float:
    """The highest Poisson rate at which 99 % of requests meet the deadline: double until it fails, then bisect."""
    rng = np.random.default_rng(0)

    def meets(rate: float) -> bool:
        answers = server.replay(loadgen.poisson(rate, seconds, rng), bodies, labels, slo_ms)
        return loadgen.summarize(answers)["attainment"] >= 0.99

    lo, hi = 0.0, start_rate
    while meets(hi) and hi < 5000:
        lo, hi = hi, hi * 2
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if meets(mid) else (lo, mid)
    return lo


def bursty(base: float, seconds: float, period_s: float) -> list[tuple[float, float]]:
    """Phases alternating between 0.5 x and 2.5 x ``base`` (a quiet phase first)."""
    phases, t, high = [], 0.0, False
    while t < seconds:
        phases.append((base * (2.5 if high else 0.5), min(period_s, seconds - t)))
        t += period_s
        high = not high
    return phases


def trace_bins(answers: list[loadgen.Answer], width_s: float) -> list[dict[str, float]]:
    """Per time bin: arrivals per second, attainment, and the mean share of stages run in full."""
    end = max(a.at_s for a in answers)
    bins = []
    for k in range(int(end / width_s) + 1):
        inside = [a for a in answers if k * width_s <= a.at_s < (k + 1) * width_s]
        if not inside:
            continue
        ran = [a.mask.count("F") / len(a.mask) for a in inside if a.status == 200 and a.mask]
        bins.append({"t": k * width_s, "rate": len(inside) / width_s,
                     "attainment": sum(a.in_time for a in inside) / len(inside),
                     "depth": statistics.fmean(ran) if ran else float("nan")})
    return bins


def overhead(answers: list[loadgen.Answer]) -> dict[str, float]:
    """Medians of what the server adds to the model's own time: total, from the send to the batch's start, and the
    way back."""
    ok = [a for a in answers if a.status == 200]
    return {"total_ms": statistics.median(a.latency_ms - a.service_ms for a in ok),
            "queue_ms": statistics.median(a.queue_ms for a in ok),
            "hops_ms": statistics.median(a.latency_ms - a.service_ms - a.queue_ms for a in ok),
            "service_ms": statistics.median(a.service_ms for a in ok)}


def register(checkpoint: str, tracking_uri: str) -> str:
    """Register the checkpoint (``python -m serving.register``) and return its new version's URI."""
    from serving.register import parser
    from serving.register import register as register_version

    name, version = register_version(parser().parse_args(["--checkpoint", checkpoint, "--tracking-uri", tracking_uri]))
    return f"models:/{name}/{version}"


def table(results: dict[str, Any]) -> str:
    policies = list(results["policies"])
    cap = results["capacity"]
    lines = [f"Capacity (99 % within {results['slo_ms']:g} ms): FF..F {cap['super']:.1f}/s, "
             f"TT..T {cap['base']:.1f}/s ({cap['base'] / cap['super']:.2f} x)",
             "", "| load | " + " | ".join(f"{p} attain / eff. acc / p99 ms" for p in policies) + " |",
             "|---|" + "---|" * len(policies)]
    for run in [*(f"{x:g}x" for x in LOADS), "bursty"]:
        cells = []
        for p in policies:
            s = results["policies"][p]["runs"][run]
            cells.append(f"{100 * s['attainment']:.1f} % / {100 * s['effective_accuracy']:.1f} % / {s['p99_ms']:.0f}")
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    lines += ["", "Masks run on the bursty trace (share of answered requests):", ""]
    for p in policies:
        mix = results["policies"][p]["runs"]["bursty"]["masks"]
        lines.append(f"- {p}: " + ", ".join(f"{m} {100 * v:.0f} %" for m, v in mix.items()))
    o = results["overhead"]
    lines += ["", f"Server cost at 0.1 x capacity (fixed FF..F, medians over {o['requests']} requests): "
              f"{o['total_ms']:.2f} ms over the model's {o['service_ms']:.2f} ms: from the client's send to the "
              f"batch's start {o['queue_ms']:.2f} ms (HTTP to the proxy, Ray Serve to the replica, decode, batch "
              f"formation, policy), the answer's way back {o['hops_ms']:.2f} ms."]
    return "\n".join(lines) + "\n"


def figure(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for p, r in results["policies"].items():
        xs = list(LOADS)
        axes[0].plot(xs, [100 * r["runs"][f"{x:g}x"]["attainment"] for x in xs], marker="o", label=p)
        axes[1].plot(xs, [100 * r["runs"][f"{x:g}x"]["effective_accuracy"] for x in xs], marker="o", label=p)
    for ax, name in zip(axes[:2], ("deadline attainment (%)", "effective accuracy (%)"), strict=True):
        ax.set_xlabel("load (x capacity of FF..F)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    bins = results["policies"]["adaptive"]["trace"]
    t = [b["t"] for b in bins]
    axes[2].plot(t, [b["rate"] for b in bins], color="gray", label="arrivals / s")
    axes[2].set_xlabel("time (s)")
    axes[2].set_ylabel("arrivals per second")
    twin = axes[2].twinx()
    twin.plot(t, [b["depth"] for b in bins], color="tab:red", label="adaptive: share of stages run")
    twin.plot(t, [b["attainment"] for b in bins], color="tab:green", label="adaptive: attainment")
    twin.set_ylim(0, 1.05)
    twin.legend(fontsize=8, loc="lower right")
    axes[2].set_title("bursty trace, adaptive policy")
    fig.suptitle(f"{results['model']} on this CPU, deadline {results['slo_ms']:g} ms, open-loop traffic")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def log_run(results: dict[str, Any], out: Path, tracking_uri: str, model_uri: str) -> str:
    import mlflow

    from pipeline.tracking import ensure_experiment

    client = mlflow.MlflowClient(tracking_uri)
    name, version = model_uri.removeprefix("models:/").split("/")
    experiment = ensure_experiment(client, "adn-serving", tracking_uri)
    run = client.create_run(experiment, run_name=f"{results['model']}-serving-bench",
                            tags={"adn.registered_model": name, "adn.registered_version": version,
                                  "adn.model_uri": model_uri})
    for p, r in results["policies"].items():
        for run_name, s in r["runs"].items():
            key = run_name.replace(".", "_")
            client.log_metric(run.info.run_id, f"{p}.{key}.attainment", s["attainment"])
            client.log_metric(run.info.run_id, f"{p}.{key}.effective_accuracy", s["effective_accuracy"])
    client.log_param(run.info.run_id, "slo_ms", results["slo_ms"])
    for f in ("serving.json", "serving.md", "serving.png"):
        client.log_artifact(run.info.run_id, str(out / f))
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def run_policy(name: str, flags: list[str], ctx: dict[str, Any], progress: Callable[[str], None]) -> dict[str, Any]:
    server = Served(name, ctx["model_uri"], ctx["tracking_uri"], flags)
    try:
        rng = np.random.default_rng(1)
        runs = {}
        for x in LOADS:
            progress(f"{name} at {x:g} x")
            answers = server.replay(loadgen.poisson(x * ctx["cap"], ctx["seconds"], rng), *ctx["images"], ctx["slo"])
            runs[f"{x:g}x"] = loadgen.summarize(answers, ctx["seconds"])
        progress(f"{name}, bursty trace")
        arrivals = loadgen.phases(bursty(ctx["cap"], ctx["burst_seconds"], ctx["period"]), np.random.default_rng(2))
        answers = server.replay(arrivals, *ctx["images"], ctx["slo"])
        runs["bursty"] = loadgen.summarize(answers, ctx["burst_seconds"])
        return {"flags": flags, "runs": runs, "trace": trace_bins(answers, 1.0)}
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="training directory with a pareto-cpu/ front (registered first)")
    src.add_argument("--model-uri", help="a registered version, models:/NAME/VERSION")
    p.add_argument("--data", required=True, help="local shards whose val split gives the images and labels")
    p.add_argument("--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)")
    p.add_argument("--slo-ms", type=float, help="deadline (default: 5 x the super-net's time for one image)")
    p.add_argument("--seconds", type=float, default=15.0, help="length of each steady run")
    p.add_argument("--burst-seconds", type=float, default=120.0, help="length of the bursty trace")
    p.add_argument("--period-s", type=float, default=10.0, help="length of each phase of the bursty trace")
    p.add_argument("--images", type=int, default=360, help="validation images to cycle through")
    p.add_argument("--out", default="docs/serving", help="where serving.json, .md and .png go")
    args = p.parse_args(argv)
    from pipeline.tracking import resolve_tracking_uri

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tracking_uri = resolve_tracking_uri(args.tracking_uri)
    model_uri = args.model_uri or register(args.checkpoint, tracking_uri)
    images = validation_images(args.data, args.images)
    started = time.time()
    bar = tqdm(total=4 * (len(LOADS) + 1) + 2, desc="serving bench", unit="run")

    def progress(what: str) -> None:
        bar.set_postfix_str(what)
        bar.update(1)

    # Capacities first, on fixed servers of the two ends of the front.
    from serving.model import locate

    masks = [m["mask"] for m in json.loads(locate(None, None, model_uri, "cpu", tracking_uri)[1].read_text())["front"]]
    n = len(masks[0])
    super_mask, base_mask = "F" * n, "T" * n
    caps, slo, info, cost = {}, args.slo_ms, {}, {}
    for key, mask in (("super", super_mask), ("base", base_mask)):
        server = Served(f"capacity-{mask}", model_uri, tracking_uri, ["--policy", "fixed", "--mask", mask])
        try:
            if key == "super":
                info = server.info
                slo = slo or round(5 * info["latency_model"]["ms_per_batch"][super_mask]["1"])
            caps[key] = capacity(server, *images, slo, seconds=8.0, start_rate=8.0, steps=4)
            progress(f"capacity of {mask}: {caps[key]:.1f}/s")
            if key == "super":  # the server's own cost at 0.1 x capacity, on the same server
                answers = server.replay(loadgen.poisson(0.1 * caps[key], 20.0, np.random.default_rng(3)), *images,
                                        slo)
                cost = {**overhead(answers), "requests": len(answers)}
        finally:
            server.stop()
    ctx = {"model_uri": model_uri, "tracking_uri": tracking_uri, "cap": caps["super"], "slo": slo,
           "images": images, "seconds": args.seconds, "burst_seconds": args.burst_seconds, "period": args.period_s}
    # The best fixed middle mask: of up to three middle masks of the front, the best effective accuracy on a
    # short bursty trace.
    middle = [m for m in masks if m not in (super_mask, base_mask)]
    middle = [middle[round(i)] for i in np.linspace(0, len(middle) - 1, min(3, len(middle)))] if middle else []
    best_middle, best_score = None, -1.0
    for mask in dict.fromkeys(middle):
        server = Served(f"pick-{mask}", model_uri, tracking_uri, ["--policy", "fixed", "--mask", mask])
        try:
            arrivals = loadgen.phases(bursty(caps["super"], 40.0, args.period_s), np.random.default_rng(4))
            score = loadgen.summarize(server.replay(arrivals, *images, slo))["effective_accuracy"]
        finally:
            server.stop()
        if score > best_score:
            best_middle, best_score = mask, score
    policies = {f"fixed {super_mask}": ["--policy", "fixed", "--mask", super_mask],
                f"fixed {base_mask}": ["--policy", "fixed", "--mask", base_mask]}
    if best_middle:
        policies[f"fixed {best_middle}"] = ["--policy", "fixed", "--mask", best_middle]
    policies["adaptive"] = ["--policy", "deadline"]
    results: dict[str, Any] = {"model": info["model"], "model_uri": model_uri, "slo_ms": slo,
                               "front": info["front"], "capacity": caps, "overhead": cost,
                               "latency_model": info["latency_model"], "policies": {}}
    for name, flags in policies.items():
        results["policies"][name] = run_policy(name, flags, ctx, progress)
    bar.close()
    results["wall_s"] = round(time.time() - started, 1)
    (out / "serving.json").write_text(json.dumps(results, indent=1))
    (out / "serving.md").write_text(table(results))
    figure(results, out / "serving.png")
    run_id = log_run(results, out, tracking_uri, model_uri)
    print(table(results))
    print(f"wrote {out}/serving.json, serving.md, serving.png; MLflow run {run_id} ({tracking_uri}); "
          f"{results['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
