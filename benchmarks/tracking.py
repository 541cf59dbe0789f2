"""Does tracking to the MLflow server slow training? Steps/s logging over HTTP against --no-tracking.

Repeat with:  .venv/bin/python benchmarks/tracking.py [--steps 150] [--repeats 3] [--log-every 20 1]

Starts the team's server as ``make mlflow-server`` does (PostgreSQL + ``mlflow server``, in a
temporary state directory), then trains the demo (resnet_mini on the embedded digits, its recipe)
alternately without tracking and tracked to the server, ABBA-ordered so drift on this shared
machine falls on both. Steps/s is the training loop's own clock (``summary.json``: the steps and
their logging, not start-up or validation). Prints the median ratio tracked / untracked per
logging interval: the demo's (every 20 steps) and every step, the worst case.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]


def _train(data: Path, out: Path, steps: int, epochs: int, log_every: int, tracking: list[str],
           env: dict[str, str]) -> float:
    done = subprocess.run([sys.executable, "-m", "pipeline.train", "--model", "resnet_mini", "--data", str(data),
                           "--output", str(out), "--epochs", str(epochs), "--max-steps", str(steps), "--workers", "1",
                           "--log-every", str(log_every), *tracking], env=env, capture_output=True, text=True,
                          cwd=out.parent)
    if done.returncode:
        raise SystemExit(f"training failed:\n{done.stderr[-3000:]}")
    return json.loads((out / "summary.json").read_text())["timing"]["steps_per_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--repeats", type=int, default=3, help="ABBA pairs per logging interval")
    p.add_argument("--log-every", type=int, nargs="+", default=[20, 1])
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="adn-tracking-"))
    work.chmod(0o711)  # the local PostgreSQL runs as the postgres user: it must enter the state directory
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT), "CLUSTER_STATE": str(work / "state")}
    env.pop("MLFLOW_TRACKING_URI", None)
    from pipeline.data.shard import main as shard

    shard(["digits", "--out", str(work / "digits")])
    import yaml

    from pipeline.data import read_manifest

    batch = yaml.safe_load((ROOT / "pipeline" / "recipes" / "resnet_mini.yaml").read_text())["batch_size"]
    epochs = -(-args.steps // (read_manifest(str(work / "digits"), "train").num_samples // batch))
    from pipeline.distributed import free_port

    port = free_port()
    subprocess.run([sys.executable, "-m", "cluster.mlflow_server", "start", "--port", str(port)], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    try:
        rows = []
        bar = tqdm(total=len(args.log_every) * args.repeats * 4, desc="trainings", unit="run")
        for every in args.log_every:
            ratios, rates = [], {"off": [], "http": []}
            for r in range(args.repeats):
                pair = {}
                for k, mode in enumerate(("off", "http", "http", "off")):
                    tracking = ["--no-tracking"] if mode == "off" else ["--tracking-uri", uri]
                    rate = _train(work / "digits", work / f"run-{every}-{r}-{k}", args.steps, epochs, every, tracking,
                                  env)
                    pair.setdefault(mode, []).append(rate)
                    rates[mode].append(rate)
                    bar.update(1)
                ratios.append(statistics.mean(pair["http"]) / statistics.mean(pair["off"]))
            rows.append((every, statistics.median(rates["off"]), statistics.median(rates["http"]),
                         statistics.median(ratios), min(ratios), max(ratios)))
            tqdm.write(f"log every {every}: steps/s off {[round(x, 2) for x in rates['off']]}, "
                       f"http {[round(x, 2) for x in rates['http']]}")
        bar.close()
    finally:
        subprocess.run([sys.executable, "-m", "cluster.mlflow_server", "stop"], env=env, stdout=subprocess.DEVNULL)
    print(f"\nresnet_mini demo training, {args.steps} steps per run, {args.repeats} ABBA pairs, server {uri} "
          "(PostgreSQL)")
    print(f"{'log every':>10}{'no tracking':>14}{'HTTP server':>14}{'ratio':>8}{'range':>16}")
    for every, off, http, ratio, lo, hi in rows:
        print(f"{every:>10}{off:>11.2f} /s{http:>11.2f} /s{ratio:>8.3f}{f'{lo:.3f}-{hi:.3f}':>16}")


if __name__ == "__main__":
    main()
