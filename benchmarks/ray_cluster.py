"""Per-trial overhead of the search on a two-node Ray cluster against a local Ray, side by side.

Repeat with (root, iproute2):  .venv/bin/python benchmarks/ray_cluster.py [--repeats 2] [--max-samples 200]

The cluster is the one the tests build: ``cluster.ray_node head`` in one network namespace and
``cluster.ray_node worker`` in another, one CPU each, token authentication on; the local Ray gets two
CPUs, so both run two trials at a time. Both search the 16 stage masks of resnet_mini on the
digits with the a100 table, alternating local and cluster runs. Overhead per trial is what the
search reports: (wall x concurrency - evaluation time) / trials, i.e. Ray's scheduling, the
shipping of the weights through the object store, worker start-up and Tune's bookkeeping.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
IPS = ("10.216.3.1", "10.216.3.2")


def _checkpoint(work: Path) -> Path:
    import torch
    import yaml

    from adn.checkpoint import save_weights
    from adn.registry import create_model
    from pipeline.data import read_manifest
    from pipeline.data.shard import main as shard

    shard(["digits", "--out", str(work / "digits")])
    recipe = yaml.safe_load((ROOT / "pipeline" / "recipes" / "resnet_mini.yaml").read_text())
    classes = read_manifest(str(work / "digits"), "val").classes
    torch.manual_seed(0)
    model = create_model("resnet_mini", num_classes=len(classes))
    return save_weights(model, work / "weights.safetensors", model_name="resnet_mini", classes=classes,
                        resolution=32, recipe=recipe)


def _search(work: Path, weights: Path, address: str | None, out: str, args: argparse.Namespace,
            env: dict[str, str]) -> dict:
    cmd = [sys.executable, "-m", "search.pareto", "--target", "a100", "--checkpoint", str(weights), "--data",
           str(work / "digits"), "--max-samples", str(args.max_samples), "--no-tracking", "--out", str(work / out)]
    if address:
        cmd = ["ip", "netns", "exec", "adnbenchh", *cmd, "--ray-address", address]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"search failed:\n{done.stderr[-3000:]}")
    return json.loads((work / out / "pareto.json").read_text())["timing"]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--max-samples", type=int, default=200)
    args = p.parse_args()
    if os.geteuid() != 0 or shutil.which("ip") is None:
        raise SystemExit("this benchmark makes network namespaces: run it as root with iproute2 installed.")
    work = Path(tempfile.mkdtemp(prefix="adn-ray-"))
    weights = _checkpoint(work)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CLUSTER_STATE": str(work / "state")}
    names = ("adnbenchh", "adnbenchw")
    node = [sys.executable, "-m", "cluster.ray_node"]
    try:
        for ns in names:
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("link", "add", "adnb0", "netns", names[0], "type", "veth", "peer", "name", "adnb1", "netns", names[1])
        for ns, end, ip in ((names[0], "adnb0", IPS[0]), (names[1], "adnb1", IPS[1])):
            _ip("-n", ns, "addr", "add", f"{ip}/24", "dev", end)
            _ip("-n", ns, "link", "set", end, "up")
        subprocess.run(["ip", "netns", "exec", names[0], *node, "head", "--port", "6399", "--node-ip", IPS[0],
                        "--num-cpus", "1", "--temp-dir", "/tmp/adnbench-h"], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        subprocess.run(["ip", "netns", "exec", names[1], *node, "--state-dir", str(work / "state-w"), "worker",
                        "--head", f"{IPS[0]}:6399", "--node-ip", IPS[1], "--num-cpus", "1", "--temp-dir",
                        "/tmp/adnbench-w"], env={**env, "RAY_AUTH_TOKEN_PATH": str(work / "state/ray/auth_token")},
                       check=True, stdout=subprocess.DEVNULL)
        results: dict[str, list[dict]] = {"local": [], "cluster": []}
        for r in tqdm(range(args.repeats), desc="search pairs", unit="pair"):
            results["local"].append(_search(work, weights, None, f"local-{r}", args, env))
            results["cluster"].append(_search(work, weights, f"{IPS[0]}:6399", f"cluster-{r}", args, env))
    finally:
        subprocess.run([*node, "--state-dir", str(work / "state-w"), "stop", "worker"], env=env,
                       stdout=subprocess.DEVNULL)
        subprocess.run([*node, "stop", "head"], env=env, stdout=subprocess.DEVNULL)
        for ns in names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        for d in ("/tmp/adnbench-h", "/tmp/adnbench-w"):
            shutil.rmtree(d, ignore_errors=True)
    print(f"\nresnet_mini, 16 stage masks, {args.max_samples} samples, {args.repeats} runs each (alternating)")
    print(f"{'Ray':<22}{'wall s':>8}{'overhead s/trial':>18}{'trials per node':>30}")
    for name, runs in results.items():
        label = "local (2 CPUs)" if name == "local" else "2 nodes (1 CPU each)"
        wall = statistics.median(t["wall_s"] for t in runs)
        over = statistics.median(t["ray_overhead_s_per_trial"] for t in runs)
        print(f"{label:<22}{wall:>8.1f}{over:>18.3f}{json.dumps(runs[-1]['trials_per_node']):>30}")
    ratio = statistics.median(c["ray_overhead_s_per_trial"] / max(loc["ray_overhead_s_per_trial"], 1e-9)
                              for c, loc in zip(results["cluster"], results["local"], strict=True))
    print(f"overhead per trial, cluster / local: {ratio:.2f}x")


if __name__ == "__main__":
    main()
