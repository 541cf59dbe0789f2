"""Data: WebDataset shards (writer, manifest) and the streaming loader every rank reads."""

from .loader import Batch, ShardLoader, make_loader
from .manifest import DataError, Manifest, read_manifest

__all__ = ["Batch", "DataError", "Manifest", "ShardLoader", "make_loader", "read_manifest"]
