"""Data: WebDataset shards (writer, manifest) and the streaming loader every rank reads.

The loader (torch, WebDataset) loads on first use, so reading a manifest imports neither.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .manifest import DataError, Manifest, has_split, read_manifest

_LOADER = ("Batch", "ShardLoader", "make_loader")
__all__ = ["Batch", "DataError", "Manifest", "ShardLoader", "has_split", "make_loader", "read_manifest"]

if TYPE_CHECKING:
    from .loader import Batch, ShardLoader, make_loader


def __getattr__(name: str) -> Any:
    if name not in _LOADER:
        raise AttributeError(f"module 'pipeline.data' has no attribute {name!r}")
    return getattr(importlib.import_module(".loader", __name__), name)
