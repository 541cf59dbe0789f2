"""The manifest of one split: ``DIR/<split>.json`` lists its shards, their sample counts and checksums."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "adn-webdataset/1"


class DataError(ValueError):
    """Shards or manifest are missing or disagree; raised before any training or search starts."""


@dataclass
class ShardInfo:
    name: str
    num_samples: int
    sha256: str
    bytes: int


@dataclass
class Manifest:
    split: str
    num_samples: int
    classes: list[str]
    shards: list[ShardInfo]
    extra: dict[str, Any] = field(default_factory=dict)

    def write(self, directory: str | os.PathLike[str]) -> Path:
        path = Path(directory) / f"{self.split}.json"
        payload = {"format": FORMAT, "split": self.split, "num_samples": self.num_samples,
                   "num_classes": len(self.classes), "classes": self.classes,
                   "shards": [asdict(s) for s in self.shards], **self.extra}
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(payload, indent=1) + "\n")
        os.replace(tmp, path)
        return path

    def offsets(self) -> list[int]:
        """Global index of each shard's first sample (shards in manifest order)."""
        out, total = [], 0
        for s in self.shards:
            out.append(total)
            total += s.num_samples
        return out


def sha256_of(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(directory: str | os.PathLike[str], split: str, verify: str = "size") -> Manifest:
    """Load and check ``DIR/<split>.json`` against the shard files (``verify``: "size" or "sha256")."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"shard directory {str(directory)!r} does not exist; write shards with "
                        "`python -m pipeline.data.shard` first.")
    path = directory / f"{split}.json"
    if not path.is_file():
        found = sorted(p.name for p in directory.glob("*.json"))
        raise DataError(f"no manifest {str(path)!r} for split {split!r} (found: {', '.join(found) or 'none'}); "
                        "write shards with `python -m pipeline.data.shard`.")
    try:
        raw = json.loads(path.read_text())
        shards = [ShardInfo(**s) for s in raw["shards"]]
        manifest = Manifest(split, int(raw["num_samples"]), list(raw["classes"]), shards,
                            {k: v for k, v in raw.items() if k not in
                             {"format", "split", "num_samples", "num_classes", "classes", "shards"}})
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"manifest {str(path)!r} is not a valid shard manifest: {err}.") from err
    if not shards:
        raise DataError(f"manifest {str(path)!r} lists no shards.")
    if sum(s.num_samples for s in shards) != manifest.num_samples:
        raise DataError(f"manifest {str(path)!r} says {manifest.num_samples} samples but its shards add up to "
                        f"{sum(s.num_samples for s in shards)}; rewrite the shards.")
    for s in shards:
        shard_path = directory / s.name
        if not shard_path.is_file():
            raise DataError(f"shard {str(shard_path)!r} listed in {path.name} is missing; rewrite or copy it.")
        size = shard_path.stat().st_size
        if size != s.bytes:
            raise DataError(f"shard {str(shard_path)!r} has {size} bytes, the manifest says {s.bytes}; "
                            "the shards and the manifest disagree.")
        if verify == "sha256" and sha256_of(shard_path) != s.sha256:
            raise DataError(f"shard {str(shard_path)!r} does not match its sha256 in {path.name}.")
    return manifest
