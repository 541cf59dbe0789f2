"""Data: WebDataset shards (writer, manifest) and the streaming loader every rank reads."""

from .loader import Batch, ShardLoader, make_loader
from .manifest import DataError, Manifest, has_split, read_manifest

__all__ = ["Batch", "DataError", "Manifest", "ShardLoader", "has_split", "make_loader", "read_manifest"]
