"""Serving under load: the adaptive deadline policy against fixed masks, with Ray Serve on local Ray.

Repeat with:  .venv/bin/python benchmarks/serving.py --checkpoint runs/bench/resnet50-hard-ft --data data/digits-hard
(the checkpoint and its front: docs/serving/README.md)

Open-loop traffic (arrival times fixed in advance) from an asynchronous HTTP client on 127.0.0.1, with the
validation images and their labels. One local Ray Serve holds one application per policy (fixed FF..F, fixed TT..T,
the best fixed middle mask of the front, the adaptive deadline policy), each under its own route. First the capacity
of fixed FF..F and of fixed TT..T (the highest rate at which 99 % of at least 200 requests meet the deadline, by
bisection after a warm-up); then, in each of --repeats rounds, steady Poisson load at 0.5, 1, 1.5, 2 and 3 x the
capacity of FF..F, and in each of --burst-repeats rounds a bursty trace (phases alternating between 0.5 x and 2.5 x
that capacity), every policy replaying the same arrivals in turns; the bursty trace is also scored apart over the
requests sent in its calm phases and over those sent in its bursts. Figures per run: deadline attainment (answered
within the deadline / sent), effective accuracy (answered correctly within the deadline / sent), its expected value
(each answer in time scores its mask's top-1 over the image pool: the same choices without the noise of which images
a short run sent), p50/p99 latency, goodput and the mix of masks, as medians over the repeats with their range, and
the paired difference of the adaptive policy against the best fixed one. At 0.1 x capacity, the server's own cost
over the model's time, counted from the moment the client sent each request (its event loop sends about a
millisecond after the scheduled time, which latencies and deadlines count but the server did not cause), split into
the client and HTTP (a bare uvicorn server), Ray Serve's routing (an application that only answers) and this
application. Writes serving.json, serving.md and serving.png to --out and logs them as an MLflow run linked to the
registered model version it served (the checkpoint is registered first unless --model-uri says).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import requests
from tqdm import tqdm

# Run as a script, this file's directory is first on sys.path, and this file's name would hide the package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from cluster.state import wait_until  # noqa: E402
from pipeline.data.loader import IMAGE_FIELDS  # noqa: E402
from pipeline.data.manifest import read_manifest  # noqa: E402
from pipeline.distributed import accepts, free_port  # noqa: E402
from search.ray_client import SERVE_INGRESSES, serve_ingress_env  # noqa: E402
from serving import loadgen  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LOADS = (0.5, 1.0, 1.5, 2.0, 3.0)
CALM_X, BURST_X = 0.5, 2.5  # the bursty trace's phases, x the capacity of FF..F
BURSTY = ("bursty", "bursty/calm", "bursty/burst")  # the whole trace, and its calm phases and bursts apart
SCORES = {"attainment": "Deadline attainment (%)", "effective_accuracy": "Effective accuracy (%)",
          "expected_accuracy": "Expected effective accuracy (%, each answer in time scores its mask's top-1 on the "
                               "pool)"}


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
            image = next((sample[e] for e in IMAGE_FIELDS if e in sample), None)
            if image is not None and "cls" in sample:
                bodies.append(image)
                labels.append(int(sample["cls"]))
    return bodies[:limit], labels[:limit]


class Host:
    """Local Ray with Ray Serve on 127.0.0.1, holding one application per policy, each under its own route, so that
    the policies are measured in turns on one machine instead of one after another."""

    def __init__(self, model_uri: str, tracking_uri: str) -> None:
        import ray
        from ray import serve

        self.model_uri, self.tracking_uri = model_uri, tracking_uri
        # Logical CPUs: one per replica, though only the replica under load computes at a time.
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False, num_cpus=16)
        self.port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": self.port})

    def add(self, name: str, **settings: Any) -> str:
        """Start the application ``name`` with these ``ServeSettings``; return its URL once it answers."""
        from serving.app import deployment
        from serving.settings import ServeSettings

        return self.run(name, deployment(ServeSettings(model_uri=self.model_uri, tracking_uri=self.tracking_uri,
                                                       **settings)))

    def run(self, name: str, app: Any) -> str:
        from ray import serve

        route = "/" + name.replace(" ", "-").lower()
        serve.run(app, name=name, route_prefix=route)
        return f"http://127.0.0.1:{self.port}{route}"

    def info(self, url: str) -> dict[str, Any]:
        return requests.get(f"{url}/v1/model", timeout=30).json()

    def remove(self, name: str) -> None:
        from ray import serve

        serve.delete(name)

    def close(self) -> None:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()


ECHO_ANSWER = {"mask": "", "batch_size": 1, "queue_ms": 0.0, "service_ms": 0.0, "top5": [{"class": -1}]}


def echo() -> Any:
    """A Ray Serve application that reads the body and answers a JSON of the ADN's shape, and does nothing else:
    what Ray Serve's own path (HTTP proxy, the hop to a replica and back) costs on this machine."""
    from ray import serve

    @serve.deployment(name="echo")
    class Echo:
        async def __call__(self, request: Any) -> dict[str, Any]:
            await request.body()
            return ECHO_ANSWER

    return Echo.bind()


BARE_SERVER = """
import sys, uvicorn
ANSWER = sys.argv[2].encode()
async def app(scope, receive, send):
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": ANSWER})
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), lifespan="off", log_level="warning")
"""


def http_floor(arrivals: list[float], images: tuple[list[bytes], list[int]], slo_ms: float) -> float:
    """Median latency of ``arrivals`` to a bare ASGI server (uvicorn, as Serve's replicas run, in its own process)
    that reads the body and answers: the cost of this client and of HTTP alone, below which no server answers it."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", BARE_SERVER, str(port), json.dumps(ECHO_ANSWER)])
    try:
        if not wait_until(lambda: accepts("127.0.0.1", port), 30, 0.1, alive=lambda: server.poll() is None):
            raise RuntimeError("the bare HTTP server did not start within 30 s.")
        return from_send(loadgen.replay(f"http://127.0.0.1:{port}/", arrivals, *images, slo_ms, timeout_s=30))
    finally:
        server.terminate()
        server.wait(timeout=30)


def pool_accuracy(weights: Path, front: Path, images: tuple[list[bytes], list[int]],
                  masks: list[str]) -> dict[str, float]:
    """Top-1 of each mask over the image pool, computed in this process as the replicas compute it."""
    import torch

    from serving.model import ServedModel

    model = ServedModel(weights, front, "cpu")
    batch = torch.stack([model.preprocess(body) for body in images[0]])
    labels = torch.tensor(images[1])
    return {m: float((model.probabilities(batch, m).argmax(1) == labels).float().mean()) for m in masks}


def shuffled(images: tuple[list[bytes], list[int]], seed: int) -> tuple[list[bytes], list[int]]:
    """The images in a random order (the client cycles through them), so that a short run does not always send
    the first few; every policy of a repeat gets the same order."""
    order = np.random.default_rng(seed).permutation(len(images[0]))
    return [images[0][i] for i in order], [images[1][i] for i in order]


def replay(url: str, arrivals: list[float], images: tuple[list[bytes], list[int]], slo_ms: float,
           ) -> list[loadgen.Answer]:
    return loadgen.replay(f"{url}/v1/classify", arrivals, *images, slo_ms, timeout_s=30)


def capacity(url: str, images: tuple[list[bytes], list[int]], slo_ms: float, seconds: float, start_rate: float,
             steps: int, min_requests: int = 200) -> float:
    """The highest Poisson rate at which 99 % of requests meet the deadline: double until it fails, then bisect.

    Each rate runs for ``seconds`` or until it has sent ``min_requests``, whichever is longer, so that one late
    answer cannot fail a low rate alone; a short warm-up at ``start_rate`` comes first and is not judged."""
    rng = np.random.default_rng(0)
    replay(url, loadgen.poisson(start_rate, 2.0, rng), images, slo_ms)

    def meets(rate: float) -> bool:
        answers = replay(url, loadgen.poisson(rate, max(seconds, min_requests / rate), rng), images, slo_ms)
        return loadgen.summarize(answers)["attainment"] >= 0.99

    lo, hi = 0.0, start_rate
    while meets(hi) and hi < 5000:
        lo, hi = hi, hi * 2
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if meets(mid) else (lo, mid)
    return lo


def bursty(base: float, seconds: float, period_s: float) -> list[tuple[float, float]]:
    """Phases alternating between ``CALM_X`` and ``BURST_X`` x ``base`` (a quiet phase first)."""
    phases, t, high = [], 0.0, False
    while t < seconds:
        phases.append((base * (BURST_X if high else CALM_X), min(period_s, seconds - t)))
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
    """Medians of what the server adds to the model's own time, counted from the moment the client sent each
    request: in all, from the send to the batch's start, and the way back; and how late after its scheduled time
    the client's event loop sent it (its timer's, not the server's)."""
    ok = [a for a in answers if a.status == 200]
    return {"total_ms": statistics.median(a.latency_ms - a.send_late_ms - a.service_ms for a in ok),
            "queue_ms": statistics.median(a.queue_ms - a.send_late_ms for a in ok),
            "hops_ms": statistics.median(a.latency_ms - a.service_ms - a.queue_ms for a in ok),
            "service_ms": statistics.median(a.service_ms for a in ok),
            "send_late_ms": statistics.median(a.send_late_ms for a in ok)}


def from_send(answers: list[loadgen.Answer]) -> float:
    """Median latency of the answered requests from the moment the client sent them."""
    return statistics.median(a.latency_ms - a.send_late_ms for a in answers if a.status == 200)


def register(checkpoint: str, tracking_uri: str) -> str:
    """Register the checkpoint (``python -m serving.register``) and return its new version's URI."""
    from serving.register import parser
    from serving.register import register as register_version

    name, version = register_version(parser().parse_args(["--checkpoint", checkpoint, "--tracking-uri", tracking_uri]))
    return f"models:/{name}/{version}"


def combine(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """The repeats of one run: medians, and the range of each score (the noise)."""
    out: dict[str, Any] = {"repeats": len(summaries), "sent": sum(x["sent"] for x in summaries)}
    for key in ("attainment", "effective_accuracy", "expected_accuracy", "p50_ms", "p99_ms", "throughput",
                "mean_batch"):
        out[key] = statistics.median(x[key] for x in summaries)
    for key in SCORES:
        out[f"{key}_range"] = [min(x[key] for x in summaries), max(x[key] for x in summaries)]
    answered: dict[str, float] = {}
    for x in summaries:
        for mask, share in x["masks"].items():
            answered[mask] = answered.get(mask, 0.0) + share * x["answered"]
    total = sum(answered.values()) or 1.0
    out["masks"] = {m: n / total for m, n in sorted(answered.items())}
    return out


def paired(results: dict[str, Any], run: str, key: str) -> dict[str, float]:
    """Adaptive minus the best fixed policy (by median) on the same arrivals, per repeat: median, min and max."""
    fixed = [p for p in results["policies"] if p != "adaptive"]
    best = max(fixed, key=lambda p: results["policies"][p]["median"][run][key])
    diffs = [a[key] - b[key] for a, b in zip(results["policies"]["adaptive"]["runs"][run],
                                             results["policies"][best]["runs"][run], strict=True)]
    return {"against": best, "median": statistics.median(diffs), "min": min(diffs), "max": max(diffs)}


def runs_of(results: dict[str, Any]) -> list[str]:
    present = results["policies"]["adaptive"]["runs"]
    return [run for run in (*(f"{x:g}x" for x in LOADS), *BURSTY) if run in present]


def table(results: dict[str, Any]) -> str:
    policies = list(results["policies"])
    cap = results["capacity"]
    reps = f"{results['repeats']} repeats ({results['burst_repeats']} for the bursty trace)"
    scores = ", ".join(f"{m} {100 * v:.1f} %" for m, v in results["middle"]["scores"].items())
    lines = [f"Ray Serve ingress: {results['ingress']}.",
             f"Capacity (99 % within {results['slo_ms']:g} ms): FF..F {cap['super']:.1f}/s, "
             f"TT..T {cap['base']:.1f}/s ({cap['base'] / cap['super']:.2f} x). Loads are multiples of FF..F's.",
             f"Top-1 of each mask over the {results['images']} pool images: "
             + ", ".join(f"{m} {100 * a:.1f} %" for m, a in results["pool_accuracy"].items()) + ".",
             f"Each cell: median over {reps} [lowest, highest]; every policy replays the same arrivals in a "
             "repeat, the policies in turns.",
             f"The fixed middle mask was chosen by {results['middle']['chosen_by']}"
             + (f" ({scores})." if scores else "."),
             f"{BURSTY[1]} and {BURSTY[2]} score the bursty trace's requests sent in its calm phases ({CALM_X:g} x) "
             f"and in its bursts ({BURST_X:g} x) apart.", ""]
    for key, title in SCORES.items():
        lines += [f"{title}:", "", "| load | " + " | ".join(policies) + " | adaptive - best fixed (paired) |",
                  "|---|" + "---|" * (len(policies) + 1)]
        for run in runs_of(results):
            cells = []
            for p in policies:
                m = results["policies"][p]["median"][run]
                lo, hi = m[f"{key}_range"]
                cells.append(f"{100 * m[key]:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]")
            d = paired(results, run, key)
            cells.append(f"{100 * d['median']:+.1f} [{100 * d['min']:+.1f}, {100 * d['max']:+.1f}] vs {d['against']}")
            lines.append(f"| {run} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["p50 / p99 latency (ms, medians):", "", "| load | " + " | ".join(policies) + " |",
              "|---|" + "---|" * len(policies)]
    for run in runs_of(results):
        cells = [f"{results['policies'][p]['median'][run]['p50_ms']:.0f} / "
                 f"{results['policies'][p]['median'][run]['p99_ms']:.0f}" for p in policies]
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    lines += ["", "Masks the adaptive policy ran (share of answered requests):", ""]
    for run in runs_of(results):
        mix = results["policies"]["adaptive"]["median"][run]["masks"]
        lines.append(f"- {run}: " + ", ".join(f"{m} {100 * v:.0f} %" for m, v in mix.items()))
    o = results["overhead"]
    lines += ["", f"Server cost at 0.1 x capacity (fixed FF..F, medians over {o['requests']} requests, from the "
              f"moment the client sent each request): {o['total_ms']:.2f} ms over the model's "
              f"{o['service_ms']:.2f} ms: to the batch's start {o['queue_ms']:.2f} ms (HTTP to the ingress, Ray "
              f"Serve to the replica, decode, batch formation, policy), the answer's way back {o['hops_ms']:.2f} ms. "
              f"The same arrivals to an application that only reads the body and answers (Ray Serve's own path): "
              f"{o['engine_ms']:.2f} ms; so this application adds {o['total_ms'] - o['engine_ms']:.2f} ms to Ray "
              f"Serve's. To a bare uvicorn server that does the same in its own process (the client's and HTTP's "
              f"cost): {o['floor_ms']:.2f} ms; so Ray Serve's routing adds {o['engine_ms'] - o['floor_ms']:.2f} ms "
              f"to it. The client's event loop sent each request {o['send_late_ms']:.2f} ms after its scheduled "
              f"time (its timer); the deadlines and latencies above count that time, the server cost does not."]
    return "\n".join(lines) + "\n"


def figure(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, grid = plt.subplots(2, 2, figsize=(13, 9))
    axes = grid.ravel()
    xs = list(LOADS)
    for p, r in results["policies"].items():
        for ax, key in zip(axes[:3], SCORES, strict=True):
            med = [100 * r["median"][f"{x:g}x"][key] for x in xs]
            lo = [m - 100 * r["median"][f"{x:g}x"][f"{key}_range"][0] for m, x in zip(med, xs, strict=True)]
            hi = [100 * r["median"][f"{x:g}x"][f"{key}_range"][1] - m for m, x in zip(med, xs, strict=True)]
            ax.errorbar(xs, med, yerr=[lo, hi], marker="o", capsize=3, label=p)
    for ax, name in zip(axes[:3], ("deadline attainment (%)", "effective accuracy (%)",
                                   "expected effective accuracy (%)"), strict=True):
        ax.set_xlabel("load (x capacity of FF..F)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    bins = results["policies"]["adaptive"]["trace"]
    t = [b["t"] for b in bins]
    axes[3].plot(t, [b["rate"] for b in bins], color="gray", label="arrivals / s")
    axes[3].set_xlabel("time (s)")
    axes[3].set_ylabel("arrivals per second")
    twin = axes[3].twinx()
    twin.plot(t, [b["depth"] for b in bins], color="tab:red", label="adaptive: share of stages run")
    twin.plot(t, [b["attainment"] for b in bins], color="tab:green", label="adaptive: attainment")
    twin.set_ylim(0, 1.05)
    twin.legend(fontsize=8, loc="lower right")
    axes[3].set_title("bursty trace (first repeat), adaptive policy")
    fig.suptitle(f"{results['model']} on this CPU, deadline {results['slo_ms']:g} ms, open-loop traffic "
                 f"(medians of {results['repeats']} repeats, bars: range)")
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
        for run_name, s in r["median"].items():
            key = f"{p.replace(' ', '_')}.{run_name.replace('.', '_')}"
            for score in SCORES:
                client.log_metric(run.info.run_id, f"{key}.{score}", s[score])
    client.log_param(run.info.run_id, "slo_ms", results["slo_ms"])
    client.log_param(run.info.run_id, "repeats", results["repeats"])
    for f in ("serving.json", "serving.md", "serving.png"):
        client.log_artifact(run.info.run_id, str(out / f))
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="training directory with a pareto-cpu/ front (registered first)")
    src.add_argument("--model-uri", help="a registered version, models:/NAME/VERSION")
    p.add_argument("--data", required=True, help="local shards whose val split gives the images and labels")
    p.add_argument("--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)")
    p.add_argument("--slo-ms", type=float, help="deadline (default: 5 x the super-net's time for one image)")
    p.add_argument("--seconds", type=float, default=10.0, help="length of each steady run")
    p.add_argument("--burst-seconds", type=float, default=60.0, help="length of the bursty trace")
    p.add_argument("--period-s", type=float, default=10.0, help="length of each phase of the bursty trace")
    p.add_argument("--repeats", type=int, default=3,
                   help="repeats of every steady run (medians and ranges are reported)")
    p.add_argument("--burst-repeats", type=int, default=5,
                   help="repeats of the bursty trace (its run-to-run noise is the largest)")
    p.add_argument("--images", type=int, default=360, help="validation images to cycle through")
    p.add_argument("--middle", help="the fixed middle mask to compare (default: the best of up to three front masks "
                                    "on a short bursty trace)")
    p.add_argument("--ingress", default="haproxy", choices=SERVE_INGRESSES,
                   help="Ray Serve's HTTP ingress: HAProxy straight to the replicas (its stats and metrics "
                        "listeners bind every interface, on free ports), or Serve's Python proxy actor")
    p.add_argument("--out", default="docs/serving", help="where serving.json, .md and .png go")
    args = p.parse_args(argv)
    if min(args.repeats, args.burst_repeats) < 1 or args.seconds <= 0 or args.burst_seconds <= 0:
        p.error("--repeats, --burst-repeats, --seconds and --burst-seconds must be positive.")
    from pipeline.tracking import TrackingError, resolve_tracking_uri
    from serving.model import locate

    try:  # the images first: a bad --data must not leave a new registered version behind
        images = validation_images(args.data, args.images)
        tracking_uri = resolve_tracking_uri(args.tracking_uri)
        model_uri = args.model_uri or register(args.checkpoint, tracking_uri)
        weights, front = locate(None, None, model_uri, "cpu", tracking_uri)
    except (ValueError, FileNotFoundError, TrackingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    os.environ.update(serve_ingress_env(args.ingress, free_ports=True))  # before the local Ray starts
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    masks = [m["mask"] for m in json.loads(front.read_text())["front"]]
    if args.middle and args.middle not in masks:
        p.error(f"--middle {args.middle} is not on the front ({', '.join(masks)}).")
    n = len(masks[0])
    super_mask, base_mask = "F" * n, "T" * n
    accuracy = pool_accuracy(weights, front, images, list(dict.fromkeys([super_mask, *masks, base_mask])))
    started = time.time()
    steps = 2 + 1 + args.repeats * len(LOADS) + args.burst_repeats
    bar = tqdm(total=steps, desc="serving bench", unit="step")

    def progress(what: str) -> None:
        bar.set_postfix_str(what)
        bar.update(1)

    host = Host(model_uri, tracking_uri)
    try:
        urls = {f"fixed {m}": host.add(f"fixed {m}", policy="fixed", mask=m) for m in (super_mask, base_mask)}
        info = host.info(urls[f"fixed {super_mask}"])
        slo = args.slo_ms or round(5 * info["latency_model"]["ms_per_batch"][super_mask]["1"])
        caps = {}
        for key, mask in (("super", super_mask), ("base", base_mask)):
            caps[key] = capacity(urls[f"fixed {mask}"], images, slo, seconds=8.0, start_rate=8.0, steps=4)
            progress(f"capacity of {mask}: {caps[key]:.1f}/s")
        calm = loadgen.poisson(0.1 * caps["super"], 20.0, np.random.default_rng(3))  # one set of arrivals for all
        answers = replay(urls[f"fixed {super_mask}"], calm, images, slo)
        cost = {**overhead(answers), "requests": len(answers)}
        # The same arrivals to an application that only reads the body and answers: Ray Serve's own cost.
        url = host.run("echo", echo())
        answers = replay(url, calm, images, slo)
        cost["engine_ms"] = from_send(answers)
        host.remove("echo")
        cost["floor_ms"] = http_floor(calm, images, slo)
        # The best fixed middle mask: --middle, else of up to three middle masks of the front, the best expected
        # effective accuracy on a short bursty trace.
        middle = [m for m in masks if m not in (super_mask, base_mask)]
        middle = [middle[round(i)] for i in np.linspace(0, len(middle) - 1, min(3, len(middle)))] if middle else []
        scores = {}
        if args.middle:
            urls[f"fixed {args.middle}"] = host.add(f"fixed {args.middle}", policy="fixed", mask=args.middle)
        else:
            for mask in dict.fromkeys(middle):
                url = host.add(f"fixed {mask}", policy="fixed", mask=mask)
                arrivals = loadgen.phases(bursty(caps["super"], 40.0, args.period_s), np.random.default_rng(4))
                scores[mask] = loadgen.summarize(replay(url, arrivals, shuffled(images, 4), slo),
                                                 mask_accuracy=accuracy)["expected_accuracy"]
                urls[f"fixed {mask}"] = url
            for mask in sorted(scores, key=scores.get)[:-1]:  # all but the best
                host.remove(f"fixed {mask}")
                del urls[f"fixed {mask}"]
        urls["adaptive"] = host.add("adaptive", policy="deadline")
        progress("applications up")
        runs: dict[str, dict[str, list[dict[str, Any]]]] = {name: {} for name in urls}
        traces: dict[str, list[dict[str, float]]] = {}
        names = list(urls)
        trace = bursty(caps["super"], args.burst_seconds, args.period_s)
        for r in range(max(args.repeats, args.burst_repeats)):
            for k, x in enumerate(LOADS if r < args.repeats else ()):
                arrivals = loadgen.poisson(x * caps["super"], args.seconds, np.random.default_rng(100 * r + k))
                order = shuffled(images, 100 * r + k)
                for name in names[r % len(names):] + names[:r % len(names)]:  # a different policy first each repeat
                    summary = loadgen.summarize(replay(urls[name], arrivals, order, slo), args.seconds, accuracy)
                    runs[name].setdefault(f"{x:g}x", []).append(summary)
                progress(f"repeat {r + 1}, {x:g} x")
            if r >= args.burst_repeats:
                continue
            arrivals = loadgen.phases(trace, np.random.default_rng(1000 + r))
            order = shuffled(images, 1000 + r)
            for name in names[r % len(names):] + names[:r % len(names)]:
                answers = replay(urls[name], arrivals, order, slo)
                runs[name].setdefault(BURSTY[0], []).append(loadgen.summarize(answers, args.burst_seconds, accuracy))
                for rate, (sent, seconds) in loadgen.by_rate(answers, trace).items():
                    if sent:
                        part = BURSTY[1] if rate < caps["super"] else BURSTY[2]
                        runs[name].setdefault(part, []).append(loadgen.summarize(sent, seconds, accuracy))
                if r == 0:
                    traces[name] = trace_bins(answers, 1.0)
            progress(f"repeat {r + 1}, bursty")
        settings = {name: host.info(url)["policy"] for name, url in urls.items()}
    finally:
        host.close()
    bar.close()
    results: dict[str, Any] = {
        "model": info["model"], "model_uri": model_uri, "slo_ms": slo, "front": info["front"], "capacity": caps,
        "pool_accuracy": accuracy,
        "overhead": cost, "latency_model": info["latency_model"], "repeats": args.repeats,
        "burst_repeats": args.burst_repeats, "ingress": args.ingress,
        "middle": {"chosen_by": "--middle" if args.middle else "a 40 s bursty trace, expected effective accuracy",
                   "scores": scores},
        "images": len(images[0]),
        "policies": {name: {"policy": settings[name], "runs": runs[name], "trace": traces[name],
                            "median": {run: combine(s) for run, s in runs[name].items()}} for name in urls}}
    results["paired"] = {run: {key: paired(results, run, key) for key in SCORES}
                         for run in runs_of(results)}
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
