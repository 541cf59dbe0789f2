"""Start-up time of the commands: ``--help`` and a rejected flag, this tree against another, side by side.

Repeat with:  .venv/bin/python benchmarks/startup.py [--baseline DIR] [--rounds 5]

``--baseline DIR`` is another checkout of the project (for example ``git worktree add /tmp/base
6de4bfa``), run with the same Python, so the two are timed in the same rounds: every round runs
each (tree, command) once, in a rotating order, and the figures are medians over rounds. The
target is 2 s for each command on a 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
#: (name, argv, the exit code it must give): each CLI's --help, and a bad flag rejected by argparse or our checks.
COMMANDS = [
    ("pipeline.train --help", ["-m", "pipeline.train", "--help"], 0),
    ("pipeline.train bad flag", ["-m", "pipeline.train", "--data", "nowhere", "--epochs", "x"], 2),
    ("pipeline.train bad value", ["-m", "pipeline.train", "--model", "resnet_mini", "--data", "nowhere",
                                  "--batch-size", "0"], 2),
    ("search.pareto --help", ["-m", "search.pareto", "--help"], 0),
    ("search.pareto bad flag", ["-m", "search.pareto", "--target", "a100", "--budget", "x"], 2),
    ("pipeline.launch --help", ["-m", "pipeline.launch", "--help"], 0),
    ("pipeline.launch bad flag", ["-m", "pipeline.launch", "--nodes", "x"], 2),
]


def run_once(tree: Path, argv: list[str], expect: int) -> float:
    """Seconds one command takes in ``tree``; a wrong exit code is an error, not a figure."""
    env = {**os.environ, "PYTHONPATH": str(tree), "DS_ACCELERATOR": "cpu"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *argv], cwd=tree, env=env, capture_output=True, text=True, timeout=300)
    took = time.perf_counter() - start
    if done.returncode != expect:
        raise SystemExit(f"{' '.join(argv)} in {tree} exited {done.returncode}, expected {expect}: "
                         f"{done.stderr.strip().splitlines()[-1:] or ''}")
    return took


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", type=Path, help="another checkout to time beside this one")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}.")
    if args.baseline is not None and not (args.baseline / "pipeline" / "train.py").is_file():
        p.error(f"--baseline {args.baseline} is not a checkout of this project (no pipeline/train.py).")
    trees = {"this tree": ROOT, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    jobs = [(tree, name, cmd, code) for tree in trees for name, cmd, code in COMMANDS]
    samples: dict[tuple[str, str], list[float]] = {(t, n): [] for t, n, _, _ in jobs}
    for r in tqdm(range(args.rounds), desc="rounds", unit="round"):
        for i in range(len(jobs)):
            tree, name, cmd, code = jobs[(i + r) % len(jobs)]
            samples[(tree, name)].append(run_once(trees[tree], cmd, code))
    print(f"\nmedian seconds over {args.rounds} rounds (target: 2 s)")
    head = f"{'command':<28}{'this tree':>11}" + (f"{'baseline':>11}{'ratio':>8}" if args.baseline else "")
    print(head)
    for name, _, _ in COMMANDS:
        now = statistics.median(samples[("this tree", name)])
        line = f"{name:<28}{now:>11.2f}"
        if args.baseline:
            before = statistics.median(samples[("baseline", name)])
            line += f"{before:>11.2f}{now / before:>8.2f}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
