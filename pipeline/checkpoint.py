"""Resumable training state around DeepSpeed checkpoints.

DeepSpeed saves model, optimizer (ZeRO partitions included), LR scheduler, loss scaler and its
step counters under ``<output>/checkpoints/<tag>/`` and then points ``latest`` at the tag, so a
kill during a save leaves the previous checkpoint in charge. The client state added here holds
what DeepSpeed does not know: the data position, every random state, the EMA weights and the
MLflow run, so ``--resume`` continues the same run at the same step.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINTS = "checkpoints"


def step_tag(step: int) -> str:
    return f"step{step:09d}"


def rng_state() -> dict[str, Any]:
    """The random states of this process (Python, NumPy, torch CPU and the current CUDA device)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def find_checkpoint(path: str | Path) -> tuple[Path, str]:
    """(checkpoint directory, tag) to resume from: an output dir, its ``checkpoints`` dir, or a tag dir."""
    path = Path(path)
    candidates = [path / CHECKPOINTS, path]
    for directory in candidates:
        latest = directory / "latest"
        if latest.is_file():
            tag = latest.read_text().strip()
            if (directory / tag).is_dir():
                return directory, tag
    if path.is_dir() and (path.parent / "latest").is_file():
        return path.parent, path.name
    raise FileNotFoundError(f"no DeepSpeed checkpoint to resume in {str(path)!r}; pass a training output "
                            "directory (it holds checkpoints/latest) or a checkpoint tag directory.")


def prune(directory: Path, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` step tags (never the one ``latest`` names); returns what went."""
    latest = (directory / "latest").read_text().strip() if (directory / "latest").is_file() else None
    tags = sorted(p.name for p in directory.glob("step*") if p.is_dir())
    removed = [t for t in tags[: max(len(tags) - keep, 0)] if t != latest]
    for tag in removed:
        shutil.rmtree(directory / tag, ignore_errors=True)
    return removed
