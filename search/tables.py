"""Latency lookup tables: the milliseconds of every part of a model on one target, and predictions per mask.

A table is JSON (``format: adn-latency/1``) with metadata (model, target, device, dtype, batch,
resolution, torch version, date, ``method``: ``measured`` or ``roofline-estimate``) and one row
per part (``search.parts``): ``ms``, ``ms_norm_skipped`` for parts whose switchable norms follow a
stage bit, ``skip_bit`` for parts a mask can drop; ``remainder_ms`` is what runs between parts.
``predict(table, mask)`` adds the rows the mask runs. Where the sum of parts does not hold (on a
GPU, kernels overlap and launches dominate small batches), a measured table also carries
``mask_ms``, every stage mask's whole-network time, and stage masks are looked up there.

Named targets resolve to tables: first the user's directory (``$ADN_LUT_DIR``, default
``~/.cache/adn/luts``, written by ``python -m search.profile --save-as NAME``), then the estimates
shipped in ``search/luts/``. A measured table therefore overrides a shipped estimate of the same name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adn import BlockMask, SkipMask
from adn.masks import MaskLike, parse_any, stage_view

FORMAT = "adn-latency/1"
SHIPPED_DIR = Path(__file__).parent / "luts"
METHODS = ("measured", "roofline-estimate")
#: Target names that mean this machine: its table is measured here (``search.profile``), not looked up.
LOCAL_TARGETS = ("cpu", "local")


class TableError(ValueError):
    """A table cannot be found, read, or used for what was asked."""


def user_dir() -> Path:
    """Where measured tables go: ``$ADN_LUT_DIR`` or ``~/.cache/adn/luts``."""
    return Path(os.environ.get("ADN_LUT_DIR") or Path.home() / ".cache" / "adn" / "luts")


def parse_table_mask(table: dict[str, Any], mask: MaskLike) -> SkipMask | BlockMask:
    """A stage mask, or a block mask (one letter per skippable part of the table, in forward order)."""
    stages = tuple(p["skip_bit"] for p in table["parts"] if p["skip_bit"] is not None)
    return parse_any(mask, table["num_stages"], stages, table["model"])


def predict(table: dict[str, Any], mask: MaskLike = None) -> float:
    """Predicted milliseconds of the sub-network ``mask`` (default: the super-net); stage or block mask."""
    m = parse_table_mask(table, mask)
    if isinstance(m, SkipMask) and str(m) in table.get("mask_ms", {}):
        return float(table["mask_ms"][str(m)])
    blocks = m if isinstance(m, BlockMask) else None
    stages = stage_view(m)
    total = table["remainder_ms"]
    block = 0
    for part in table["parts"]:
        if part["skip_bit"] is not None:
            dropped = blocks[block] if blocks is not None else stages[part["skip_bit"]]
            block += 1
            if dropped:
                continue
        if part["norm_bit"] is not None and stages[part["norm_bit"]]:
            total += part["ms_norm_skipped"]
        else:
            total += part["ms"]
    return total


def predict_all(table: dict[str, Any], masks: Iterable[MaskLike] | None = None) -> dict[str, float]:
    """Predicted milliseconds of every mask (default: all 2^S), keyed by mask string."""
    masks = SkipMask.all(table["num_stages"]) if masks is None else masks
    return {str(parse_table_mask(table, m)): predict(table, m) for m in masks}


def validate_table(table: Any, source: str = "table") -> dict[str, Any]:
    """Check the structure of a loaded table; raise ``TableError`` naming the file and the problem."""
    required = ("format", "model", "target", "method", "dtype", "batch_size", "resolution", "num_stages",
                "remainder_ms", "parts")
    if not isinstance(table, dict) or table.get("format") != FORMAT:
        raise TableError(f"{source} is not a latency table (expected format {FORMAT!r}).")
    missing = [k for k in required if k not in table]
    if missing:
        raise TableError(f"{source} lacks {', '.join(missing)}.")
    if table["method"] not in METHODS:
        raise TableError(f"{source} has method {table['method']!r}; expected one of {', '.join(METHODS)}.")
    for part in table["parts"]:
        if not {"name", "ms", "skip_bit", "norm_bit"} <= set(part) or (
                part["norm_bit"] is not None and "ms_norm_skipped" not in part):
            raise TableError(f"{source}: part {part.get('name', part)!r} is incomplete.")
    return table


def load_table(path: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(path)
    try:
        table = json.loads(path.read_text())
    except FileNotFoundError:
        raise TableError(f"latency table {str(path)!r} does not exist.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TableError(f"latency table {str(path)!r} is corrupt ({err}); measure it again with "
                         "python -m search.profile.") from err
    return validate_table(table, repr(str(path)))


def table_filename(table: dict[str, Any]) -> str:
    return f"{table['model']}_b{table['batch_size']}_r{table['resolution']}_{table['dtype']}.json"


def save_table(table: dict[str, Any], path: str | os.PathLike[str] | None = None, target: str | None = None) -> Path:
    """Write to ``path``, or as target ``target`` in the user directory (``<dir>/<target>/<model>_b..json``)."""
    if target is not None:
        table = {**table, "target": target}
        path = user_dir() / target / table_filename(table)
    if path is None:
        raise ValueError("pass a path or a target name.")
    validate_table(table)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(table, indent=1) + "\n")
    os.replace(tmp, path)
    return path


@dataclass(frozen=True)
class Entry:
    target: str
    path: Path
    source: str  # "user" or "shipped"


def entries() -> list[Entry]:
    out = []
    for source, root in (("user", user_dir()), ("shipped", SHIPPED_DIR)):
        if root.is_dir():
            for path in sorted(root.glob("*/*.json")):
                out.append(Entry(path.parent.name, path, source))
    return out


def available_targets() -> list[str]:
    return sorted({e.target for e in entries()})


def resolve(target: str, model: str, batch_size: int, resolution: int, dtype: str | None = None) -> dict[str, Any]:
    """The table of ``target`` for this model, batch, resolution (and dtype): user tables first, then shipped."""
    named = [e for e in entries() if e.target == target]
    if not named:
        raise TableError(f"unknown target {target!r}; available: {', '.join(available_targets()) or 'none'} "
                         "(or measure this machine with --target cpu).")
    found = []
    for entry in named:  # user entries come first
        table = load_table(entry.path)
        found.append(table)
        if (table["model"], table["batch_size"], table["resolution"]) == (model, batch_size, resolution) and (
                dtype is None or table["dtype"] == dtype):
            return {**table, "source": entry.source, "path": str(entry.path)}
    have = sorted({f"{t['model']} batch {t['batch_size']} at {t['resolution']} {t['dtype']}" for t in found})
    want = f"{model} batch {batch_size} at {resolution}" + (f" {dtype}" if dtype else "")
    raise TableError(f"target {target!r} has no table for {want}; it has: {'; '.join(have)}.")


def check_table_for(table: dict[str, Any], model: str, batch_size: int, resolution: int) -> None:
    """A table given explicitly must be for the model, batch and resolution asked."""
    got = (table["model"], table["batch_size"], table["resolution"])
    if got != (model, batch_size, resolution):
        raise TableError(f"the latency table is for {got[0]} batch {got[1]} at {got[2]}, not {model} batch "
                         f"{batch_size} at {resolution}.")
