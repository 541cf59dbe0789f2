"""Resumable training state around DeepSpeed checkpoints.

DeepSpeed saves model, optimizer (ZeRO partitions included), LR scheduler, loss scaler and its
step counters under ``<output>/checkpoints/<tag>/``. The client state added here holds what
DeepSpeed does not know: the data position, every random state, the EMA weights and the MLflow
run, so ``--resume`` continues the same run at the same step.

A save is complete when every rank has written its files: then rank 0 writes ``complete.json``
in the tag (every file and its size) and only then points ``latest`` at the tag, atomically
(DeepSpeed's own ``latest`` is a plain overwrite: a crash there left it empty). ``--resume``
takes the newest tag whose marker holds and whose files have the sizes it lists, and says which
newer tag it skipped and why (a missing or truncated file, no marker).

Loading never runs pickled code: DeepSpeed reads its files with ``torch.load(weights_only=False)``,
so a crafted ``mp_rank_00_model_states.pt`` ran its ``__reduce__`` on ``--resume``. ``guard_loads``
gives the engine a loader with ``weights_only=True`` and an allow-list of the few types DeepSpeed
and this module store.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import pickle
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHECKPOINTS = "checkpoints"
MARKER = "complete.json"


class CheckpointError(ValueError):
    """A checkpoint cannot be used: unsafe, damaged, or none complete."""


class NeverSaved(CheckpointError):
    """The run's first save was interrupted: its tags hold partial files and no checkpoint was ever complete."""


def step_tag(step: int) -> str:
    return f"step{step:09d}"


def rng_state() -> dict[str, Any]:
    """The random states of this process (Python, NumPy, torch CPU and the current CUDA device)."""
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _files(tag_dir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(tag_dir.iterdir()) if p.is_file() and p.name != MARKER}


def mark_complete(directory: Path, tag: str, step: int) -> None:
    """After every rank's files are written: the marker in the tag, then ``latest`` (both atomic renames)."""
    tag_dir = directory / tag
    marker = {"tag": tag, "step": step, "files": _files(tag_dir),
              "written": datetime.datetime.now().isoformat(timespec="seconds")}
    write_atomic(tag_dir / MARKER, json.dumps(marker, indent=1) + "\n")
    write_atomic(directory / "latest", tag)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` so that a reader sees the old file or the whole new one, never a part (fsync, rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def damage(tag_dir: Path) -> str | None:
    """Why the checkpoint in ``tag_dir`` cannot be resumed (None when its marker holds)."""
    try:
        marker = json.loads((tag_dir / MARKER).read_text())
    except FileNotFoundError:
        return f"it has no {MARKER} (the save did not finish)"
    except (OSError, ValueError) as err:
        return f"its {MARKER} is unreadable ({err})"
    for name, size in marker.get("files", {}).items():
        path = tag_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} is {path.stat().st_size} bytes, {size} when it was saved"
    return None


@dataclass(frozen=True)
class Found:
    directory: Path
    tag: str
    skipped: tuple[tuple[str, str], ...] = ()  # newer tags passed over, and why

    def describe(self) -> str:
        """What ``--resume`` says it took, and why not a newer one."""
        text = f"resuming from {self.directory / self.tag}"
        if self.skipped:
            text += "; skipped the newer " + "; ".join(f"{t} ({why})" for t, why in self.skipped)
        return text


def _step_tags(directory: Path) -> list[str]:
    """Tags newest first (by step number, as ``step_tag`` writes them)."""
    return sorted((p.name for p in directory.glob("step*") if p.is_dir() and re.fullmatch(r"step\d+", p.name)),
                  reverse=True)


def find_checkpoint(path: str | Path) -> Found:
    """The checkpoint to resume from: the newest complete one in an output dir or its ``checkpoints`` dir, or
    the tag directory given (which must be complete).

    Checkpoints from before the completion marker (no tag has one) resume from ``latest`` as they did.
    """
    path = Path(path)
    if (path / MARKER).is_file() or (path.is_dir() and (path.parent / "latest").is_file()
                                     and re.fullmatch(r"step\d+", path.name)):
        why = damage(path) if (path / MARKER).is_file() or _has_markers(path.parent) else None
        if why:
            raise CheckpointError(f"checkpoint {str(path)!r} cannot be resumed: {why}.")
        return Found(path.parent, path.name)
    for directory in (path / CHECKPOINTS, path):
        tags = _step_tags(directory) if directory.is_dir() else []
        if not tags:
            continue
        if not _has_markers(directory):  # written before markers existed (those always have 'latest')
            latest = (directory / "latest").read_text().strip() if (directory / "latest").is_file() else ""
            if latest and (directory / latest).is_dir():
                return Found(directory, latest)
            if not (directory / "latest").exists():
                raise NeverSaved(f"{str(directory)!r} holds only the partial files of an interrupted first save "
                                 f"({', '.join(tags)}): no checkpoint of this run was ever complete")
            raise CheckpointError(f"{str(directory)!r} holds checkpoints but no readable 'latest' and no "
                                  f"{MARKER}; pass the tag directory to resume from.")
        skipped = []
        for tag in tags:
            why = damage(directory / tag)
            if why is None:
                return Found(directory, tag, tuple(skipped))
            skipped.append((tag, why))
        raise CheckpointError(f"no complete checkpoint in {str(directory)!r}: "
                              + "; ".join(f"{t} ({why})" for t, why in skipped) + ".")
    raise FileNotFoundError(f"no DeepSpeed checkpoint to resume in {str(path)!r}; pass a training output "
                            "directory (it holds checkpoints/) or a checkpoint tag directory.")


def _has_markers(directory: Path) -> bool:
    return any((directory / t / MARKER).is_file() for t in _step_tags(directory))


def prune(directory: Path, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` step tags, never the one ``latest`` names; returns what went."""
    latest = (directory / "latest").read_text().strip() if (directory / "latest").is_file() else None
    tags = _step_tags(directory)[::-1]
    removed = [t for t in tags[: max(len(tags) - keep, 0)] if t != latest]
    for tag in removed:
        shutil.rmtree(directory / tag, ignore_errors=True)
    return removed


def disk_full(err: BaseException | None, directory: Path | None = None, need: int = 0) -> bool:
    """Whether a failed save ran out of space: ``ENOSPC`` itself, how torch's zip writer ("file write failed")
    and safetensors ("os error 28") word it, or, since the zip writer can also fail on a short write with only
    "unexpected pos", less room left in ``directory`` than the ``need`` bytes of what was being written."""
    if directory is not None and shutil.disk_usage(directory).free < need:
        return True
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(s in str(err) for s in ("write failed", "No space left on device", "os error 28")):
            return True
        err = err.__cause__ or err.__context__
    return False


def size_of(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


# -- loading without pickled code ------------------------------------------------------------------
def _allowed_globals() -> list[Any]:
    """What DeepSpeed's checkpoint files hold besides tensors and builtins: the NumPy random state of the
    client state, and DeepSpeed's loss scaler, ZeRO stage and tensor-fragment records (ZeRO optimizer files)."""
    import numpy as np
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    core = getattr(np, "_core", None) or np.core
    dtypes = {type(np.dtype(code)) for code in "?bBhHiIlLqQefd"}  # NumPy 2 builds e.g. UInt32DType (the RNG key)
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, *dtypes,
            LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_load(path: str, map_location: Any = None) -> Any:
    """``torch.load`` with ``weights_only=True`` and the allow-list; anything else is refused, never run."""
    import torch

    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)|but got <class '([\w.]+)'>", str(err))  # torch words it both ways
        what = f"a reference to {found.group(1) or found.group(2)}" if found else "objects other than tensors"
        raise CheckpointError(f"refusing to load {path}: it holds {what}, which a checkpoint of this training "
                              "never does and which unpickling would run; it was altered or written by other "
                              "code.") from None


def guard_loads(engine: Any) -> Callable[..., Any]:
    """Make the DeepSpeed engine read every checkpoint file through ``safe_load``."""
    engine.checkpoint_engine.load = safe_load
    return safe_load


class DiskFull(OSError):
    """The disk filled while a checkpoint or the weights were written; the partial files are gone, the last
    complete checkpoint stays."""

    def __init__(self, directory: Path, what: str, need: int, estimated: bool) -> None:
        try:
            kept: str | None = find_checkpoint(directory).tag  # the output or its checkpoints directory
        except (CheckpointError, FileNotFoundError):
            kept = None
        free = shutil.disk_usage(directory).free
        super().__init__(errno.ENOSPC, (
            f"no space left on the device of {str(directory)!r} while writing {what}: it needs "
            f"{'about ' if estimated else ''}{need / 2**20:.1f} MiB and {free / 2**20:.1f} MiB are free. The partial "
            "files were removed; " + (f"checkpoint {kept} is intact: free space, then --resume." if kept
                                      else "free space and start again.")))
