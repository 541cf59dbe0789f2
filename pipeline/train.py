"""Train an ADN super-net with DeepSpeed: ``python -m pipeline.train --model resnet50 --data DIR``.

The same command runs as one plain process, under ``deepspeed`` on one node, or on many nodes
through ``pipeline.launch`` (``make train-cluster``). Every step is the two-pass self-distillation
of ``pipeline.step`` (or a one-pass baseline with ``--mode``); after each epoch the super-net and
base-net (every mask with ``--eval-all-masks``) are evaluated, a DeepSpeed checkpoint and a
portable ``weights.safetensors`` are written, and rank 0 tracks the run in MLflow. ``--resume``
continues at the same step with the same LR. The flags are checked (``pipeline.config``) before
torch or DeepSpeed is imported.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from pathlib import Path

from .checkpoint import CHECKPOINTS, DiskFull
from .config import parse_args, preflight, resolve_config
from .data import DataError
from .distributed import ClusterError, teardown
from .lock import LockHeld, output_lock
from .signals import Preempted
from .tracking import TrackingError

log = logging.getLogger("pipeline.train")


def requeue() -> str:
    """Under SLURM, put this job back in the queue (its batch script adds --resume on a restart); what to do next."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return "continue with --resume."
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        return f"SLURM did not requeue job {job} ({err}); submit it again with --resume."
    if done.returncode > 0:  # < 0: SLURM, requeueing, stopped this job's processes, scontrol among them
        reason = (done.stderr.strip().splitlines() or ["no reason"])[-1]
        return f"SLURM did not requeue job {job} ({reason}); submit it again with --resume."
    return f"SLURM job {job} requeued: it resumes from that checkpoint."


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", os.environ.get("OMPI_COMM_WORLD_RANK", 0)))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    init = None
    try:
        config = resolve_config(args)
        init = preflight(config, check_tracking=rank == 0).init
        if init is not None and rank == 0:
            for note in init.notes:
                log.warning("%s", note)
        # One writer per output: global rank 0 holds its lock for the whole run (the other ranks write
        # only their own replica logs into it). Both refusals come before torch and DeepSpeed load.
        with output_lock(config.output, "the training output") if rank == 0 else contextlib.nullcontext():
            if config.resume is None and (Path(config.output) / CHECKPOINTS / "latest").exists():
                raise ValueError(f"{config.output!r} already holds a checkpoint; pass --resume to continue it "
                                 "or choose another --output.")
            from .trainer import Trainer

            Trainer(config, init).run()
    except Preempted as stop:
        if rank == 0:
            print(f"{stop}; " + requeue(), file=sys.stderr)
        return 128 + stop.signum
    except (ValueError, FileNotFoundError, DataError, TrackingError, ClusterError, LockHeld, DiskFull) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if init is not None:
            init.cleanup()
        teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
