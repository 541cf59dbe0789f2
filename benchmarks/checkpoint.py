"""What the safe-checkpoint machinery costs beside a DeepSpeed save: the completion marker, the output lock,
the resume scan and the weights_only load.

Repeat with:  .venv/bin/python benchmarks/checkpoint.py [--models resnet_mini resnet50] [--rounds 7]

One DeepSpeed engine per model (CPU, gloo, AdamW with its moments filled by one step, 1000
classes), in one process. Each round times, in a fresh random order: DeepSpeed's
``save_checkpoint`` of a new tag (with ``save_latest=False``, as training now calls it), the
marker and atomic ``latest`` that ``pipeline.checkpoint.mark_complete`` writes after it (two
fsync'd files), taking and releasing the output lock (``pipeline.lock.output_lock``), and the
scan ``--resume`` does (``find_checkpoint``: the newest tag whose files have the sizes its marker
lists). Loading is timed both ways on the same file: ``torch.load(weights_only=False)`` as
DeepSpeed loads, and ``pipeline.checkpoint.safe_load`` (``weights_only=True`` with the
allow-list). Prints medians, and each extra cost as a fraction of the save or load it sits beside.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adn import create_model  # noqa: E402
from pipeline.checkpoint import find_checkpoint, guard_loads, mark_complete, safe_load, step_tag  # noqa: E402
from pipeline.distributed import free_port, setup_distributed  # noqa: E402
from pipeline.lock import output_lock  # noqa: E402


def _engine(name: str):  # noqa: ANN202 - DeepSpeed's engine type
    import deepspeed

    model = create_model(name, num_classes=1000)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config={
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 0}})
    x = torch.randn(2, 3, 64, 64)  # two images: batch norm needs more than one value per channel
    loss = engine(x).logsumexp(dim=1).mean()
    engine.backward(loss)
    engine.step()  # the optimizer moments exist: a checkpoint as large as a training's
    guard_loads(engine)
    return engine


def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def measure(name: str, rounds: int, work: Path) -> dict[str, float]:
    engine = _engine(name)
    ckpts = work / name / "checkpoints"
    ckpts.mkdir(parents=True)
    samples: dict[str, list[float]] = {k: [] for k in ("save", "marker", "lock", "scan", "load_pickle", "load_safe")}
    order = random.Random(0)
    step = 0
    for _ in tqdm(range(rounds), desc=name, file=sys.stderr):
        step += 1
        tag = step_tag(step)
        samples["save"].append(_time(lambda tag=tag: engine.save_checkpoint(str(ckpts), tag=tag, save_latest=False)))
        samples["marker"].append(_time(lambda tag=tag, step=step: mark_complete(ckpts, tag, step)))
        path = str(ckpts / tag / "mp_rank_00_model_states.pt")
        items = {"lock": lambda: _lock_once(work / "locked"),
                 "scan": lambda: find_checkpoint(ckpts),
                 "load_pickle": lambda path=path: torch.load(path, weights_only=False),
                 "load_safe": lambda path=path: safe_load(path)}
        names = list(items)
        order.shuffle(names)
        for k in names:
            samples[k].append(_time(items[k]))
        for old in sorted(ckpts.glob("step*"))[:-2]:  # keep two, as --keep-checkpoints does
            shutil.rmtree(old)
    size = sum(p.stat().st_size for p in (ckpts / step_tag(step)).iterdir())
    return {**{k: statistics.median(v) for k, v in samples.items()}, "mib": size / 2**20}


def _lock_once(directory: Path) -> None:
    with output_lock(directory, "the benchmark output"):
        pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet_mini", "resnet50"])
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
    setup_distributed(False, 60)
    import logging

    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="adn-ckpt-", dir=os.environ.get("BENCH_DIR")))
    rows = []
    try:
        for name in args.models:
            rows.append((name, measure(name, args.rounds, work)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nmedians of {args.rounds} rounds, ms (checkpoints in {work.parent}, the same filesystem for all)")
    print(f"{'model':<13}{'MiB':>7}{'save':>9}{'marker':>9}{'/save':>8}{'lock':>8}{'/save':>8}{'scan':>8}"
          f"{'load':>9}{'safe load':>11}{'/load':>8}")
    for name, r in rows:
        print(f"{name:<13}{r['mib']:>7.1f}{r['save']:>9.1f}{r['marker']:>9.2f}{r['marker'] / r['save']:>8.2%}"
              f"{r['lock']:>8.2f}{r['lock'] / r['save']:>8.2%}{r['scan']:>8.2f}{r['load_pickle']:>9.1f}"
              f"{r['load_safe']:>11.1f}{r['load_safe'] / r['load_pickle']:>8.2f}x")


if __name__ == "__main__":
    main()
