"""Does tracking to the MLflow server slow training? Steps/s logging over HTTP against --no-tracking.

Repeat with:  .venv/bin/python benchmarks/tracking.py [--steps 150] [--repeats 5] [--log-every 20 [1]]
              [--threads 1] [--hang-s 30]

Starts the team's server as ``make mlflow-server`` does (PostgreSQL + ``mlflow server``, in a
temporary state directory), then trains the demo (resnet_mini on the embedded digits, its recipe)
alternately without tracking and tracked to the server, ABBA-ordered so drift on this shared
machine falls on both. Steps/s is the training loop's own clock (``summary.json``: the steps and
their logging, not start-up or validation). Training runs one compute thread (``--threads``) so
that the loader worker, the tracker's sender and the server on this 2-core machine do not
oversubscribe it, as on a GPU node, where the CPU is not what a step waits for; with 2 threads the
run-to-run spread here was +-20 %, far wider than the effect measured. A second witness with
little noise: the trainer's CPU seconds per step (all its threads, the tracker's sender included).
Prints, per logging interval, the median ratios tracked / untracked (wall) and untracked / tracked
(CPU), with their ranges over the pairs, and the CPU time the tracker's sender thread used (a bound
on what it can take from the loop, free of the wall clock's noise).

``--hang-s N``: in every tracked run the server is frozen (SIGSTOP to its process group, as a hung
host or a stalled database would leave it: connections accepted, nothing answered) for N seconds
once the run has started, then thawed; the run must be longer than N seconds (``--steps``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from cluster.state import read_record

ROOT = Path(__file__).resolve().parents[1]


def _train(data: Path, out: Path, steps: int, epochs: int, log_every: int, tracking: list[str],
           env: dict[str, str], hang_s: float = 0.0) -> tuple[float, float, float]:
    """(steps/s, CPU s per step, the tracker's sender CPU as a fraction of the loop's time) of one run."""
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.train", "--model", "resnet_mini", "--data", str(data),
                             "--output", str(out), "--epochs", str(epochs), "--max-steps", str(steps), "--workers",
                             "1", "--log-every", str(log_every), *tracking], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, cwd=out.parent)
    if hang_s and "--no-tracking" not in tracking:
        while not (out / "run.json").exists() and proc.poll() is None:
            time.sleep(0.05)
        server = read_record(Path(env["CLUSTER_STATE"]) / "mlflow" / "server.json")["pid"]
        os.killpg(server, signal.SIGSTOP)
        try:
            time.sleep(hang_s)
        finally:
            os.killpg(server, signal.SIGCONT)
        if proc.poll() is not None:
            raise SystemExit(f"the run ended during the {hang_s:g} s hang; pass more --steps")
    _, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"training failed:\n{err[-3000:]}")
    timing = json.loads((out / "summary.json").read_text())["timing"]
    return (timing["steps_per_s"], timing["step_cpu_s"] / timing["steps_run"],
            timing["tracking_sender_cpu_s"] / timing["step_s"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--repeats", type=int, default=5, help="ABBA pairs per logging interval")
    p.add_argument("--log-every", type=int, nargs="+", default=[20], help="the demo's 20; add 1 for the worst case")
    p.add_argument("--threads", type=int, default=1, help="compute threads of the training (OMP_NUM_THREADS)")
    p.add_argument("--hang-s", type=float, default=0.0,
                   help="freeze the server (SIGSTOP) this long in every tracked run, once it has started")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="adn-tracking-"))
    work.chmod(0o711)  # the local PostgreSQL runs as the postgres user: it must enter the state directory
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT), "CLUSTER_STATE": str(work / "state"),
           "OMP_NUM_THREADS": str(args.threads)}
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
            walls, cpus, senders, rates = [], [], [], {"off": [], "http": []}
            for r in range(args.repeats):
                pair: dict[str, list[tuple[float, float, float]]] = {}
                for k, mode in enumerate(("off", "http", "http", "off")):
                    tracking = ["--no-tracking"] if mode == "off" else ["--tracking-uri", uri]
                    got = _train(work / "digits", work / f"run-{every}-{r}-{k}", args.steps, epochs, every, tracking,
                                 env, args.hang_s)
                    pair.setdefault(mode, []).append(got)
                    rates[mode].append(got[0])
                    bar.update(1)
                mean = {m: [statistics.mean(v[i] for v in pair[m]) for i in (0, 1)] for m in pair}
                walls.append(mean["http"][0] / mean["off"][0])
                cpus.append(mean["off"][1] / mean["http"][1])
                senders += [v[2] for v in pair["http"]]
            rows.append((every, statistics.median(rates["off"]), statistics.median(rates["http"]), walls, cpus,
                         max(senders)))
            tqdm.write(f"log every {every}: steps/s off {[round(x, 2) for x in rates['off']]}, "
                       f"http {[round(x, 2) for x in rates['http']]}")
        bar.close()
    finally:
        subprocess.run([sys.executable, "-m", "cluster.mlflow_server", "stop"], env=env, stdout=subprocess.DEVNULL)
    print(f"\nresnet_mini demo training, {args.steps} steps per run, {args.threads} compute thread(s), "
          f"{args.repeats} ABBA pairs, server {uri} (PostgreSQL)"
          + (f", frozen {args.hang_s:g} s in every tracked run" if args.hang_s else ""))
    print(f"{'log every':>10}{'no tracking':>14}{'HTTP server':>14}{'wall ratio':>12}{'range':>14}"
          f"{'CPU ratio':>11}{'range':>14}{'sender CPU':>12}")
    for every, off, http, walls, cpus, sender in rows:
        print(f"{every:>10}{off:>11.2f} /s{http:>11.2f} /s{statistics.median(walls):>12.3f}"
              f"{f'{min(walls):.3f}-{max(walls):.3f}':>14}{statistics.median(cpus):>11.3f}"
              f"{f'{min(cpus):.3f}-{max(cpus):.3f}':>14}{sender:>11.2%}")
    print("sender CPU: the most CPU time the tracker's background sender took in a tracked run, as a share of the "
          "loop's time: the most it can take from the loop (the GIL), whatever the noise of the wall clock")


if __name__ == "__main__":
    main()
