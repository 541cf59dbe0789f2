"""How well a measured CPU latency table predicts whole networks: its MAPE over every mask, per model.

Repeat with:  .venv/bin/python benchmarks/latency_tables.py [--models resnet50 resnet_mini vit_mini] [--threads 1]

Each model's table is measured as ``python -m search.profile --validate`` measures it: the parts
and every mask's whole network timed in the same interleaved rounds, the table's predictions
compared with those timings. A table within 5 % is the target; a refused one (the machine was busy)
is reported as such, with the reason, not as a figure.
"""

from __future__ import annotations

import argparse
import sys

import torch
from tqdm import tqdm

from search.profile import BusyMachineError, measure_checked


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet50", "resnet_mini", "vit_mini"])
    p.add_argument("--threads", type=int, default=1, help="CPU threads of the forward (1: steadiest on 2 cores)")
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error(f"--threads must be at least 1, got {args.threads}.")
    torch.set_num_threads(args.threads)
    rows = []
    for model in tqdm(args.models, desc="models", unit="model"):
        try:
            table, report = measure_checked(model, "cpu", 1, None, "fp32", args.rounds, tolerance=0.05)
            rows.append((model, f"{report['mape']:.2%}", f"{report['max_error']:.2%}",
                         f"attempt {table['self_validation']['attempt']}"))
        except BusyMachineError as err:
            rows.append((model, "-", "-", f"refused: {err}"))
    print(f"\n{'model':<14}{'MAPE':>8}{'worst':>8}  table (target: MAPE <= 5 %, {args.threads} thread(s))")
    for model, mape, worst, note in rows:
        print(f"{model:<14}{mape:>8}{worst:>8}  {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
