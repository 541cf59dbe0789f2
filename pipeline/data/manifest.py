"""The manifest of one split: ``<location>/<split>.json`` lists its shards, their sample counts and checksums."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import DataError
from .storage import Location, parse_location

FORMAT = "adn-webdataset/1"
#: The split ``pipeline.data.shard --holdout`` keeps out of training, on which the search chooses masks.
HOLDOUT_SPLIT = "minival"
__all__ = ["DataError", "Manifest", "ShardInfo", "read_manifest", "sha256_of"]


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


#: The least a tar'd sample takes: two members (image and label), each a 512-byte header and one block.
MIN_SAMPLE_BYTES = 2 * (512 + 512)


def _shard_problem(s: ShardInfo) -> str | None:
    """What makes a manifest's shard entry unusable: a name that leaves the location, or impossible counts."""
    path = PurePosixPath(s.name) if isinstance(s.name, str) else None
    if path is None or not s.name or path.is_absolute() or ".." in path.parts or "\\" in s.name:
        return "a name that is not a plain relative path under the location"
    if not isinstance(s.num_samples, int) or not isinstance(s.bytes, int) or s.num_samples < 1 or s.bytes < 1:
        return f"{s.num_samples} samples in {s.bytes} bytes (both must be whole numbers above 0)"
    if s.num_samples * MIN_SAMPLE_BYTES > s.bytes:
        return (f"{s.num_samples} samples in {s.bytes} bytes (a sample takes at least {MIN_SAMPLE_BYTES} bytes of "
                "tar)")
    return None


def sha256_of(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def has_split(location: str | os.PathLike[str] | Location, split: str) -> bool:
    """Whether ``location`` holds a manifest for ``split`` (the optional ``minival``); a missing one is no error."""
    location = location if isinstance(location, Location) else parse_location(location)
    if location.is_local:
        return location.path(f"{split}.json").is_file()
    try:
        location.read(f"{split}.json")
    except OSError:
        return False
    return True


def read_manifest(location: str | os.PathLike[str] | Location, split: str, verify: str = "size") -> Manifest:
    """Load ``<location>/<split>.json`` and check it; local shards are checked against it too.

    ``verify`` is "size" or "sha256" for local shards. Remote shards (http, s3, pipe) are not
    touched here: reading the manifest is what proves the location, and each shard is checked
    when it streams.
    """
    location = location if isinstance(location, Location) else parse_location(location)
    name = f"{split}.json"
    if location.is_local:
        directory = location.path("")
        if not directory.is_dir():
            raise DataError(f"shard directory {str(directory)!r} does not exist; write shards with "
                            "`python -m pipeline.data.shard` first.")
        path = location.path(name)
        if not path.is_file():
            found = sorted(p.name for p in directory.glob("*.json"))
            raise DataError(f"no manifest {str(path)!r} for split {split!r} (found: {', '.join(found) or 'none'}); "
                            "write shards with `python -m pipeline.data.shard`.")
    where = location.display(name)
    try:
        text = location.read(name)
    except OSError as err:
        raise DataError(f"no manifest {where} for split {split!r} ({err}); write shards with "
                        "`python -m pipeline.data.shard` and upload them with their manifests.") from None
    try:
        raw = json.loads(text)
        shards = [ShardInfo(**s) for s in raw["shards"]]
        manifest = Manifest(split, int(raw["num_samples"]), list(raw["classes"]), shards,
                            {k: v for k, v in raw.items() if k not in
                             {"format", "split", "num_samples", "num_classes", "classes", "shards"}})
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"manifest {where!r} is not a valid shard manifest: {err}.") from err
    if not shards:
        raise DataError(f"manifest {where!r} lists no shards.")
    for s in shards:
        if problem := _shard_problem(s):
            raise DataError(f"manifest {where!r} lists shard {s.name!r} with {problem}; rewrite the shards.")
    if sum(s.num_samples for s in shards) != manifest.num_samples:
        raise DataError(f"manifest {where!r} says {manifest.num_samples} samples but its shards add up to "
                        f"{sum(s.num_samples for s in shards)}; rewrite the shards.")
    if location.is_local:
        for s in shards:
            shard_path = location.path(s.name)
            if not shard_path.is_file():
                raise DataError(f"shard {str(shard_path)!r} listed in {name} is missing; rewrite or copy it.")
            size = shard_path.stat().st_size
            if size != s.bytes:
                raise DataError(f"shard {str(shard_path)!r} has {size} bytes, the manifest says {s.bytes}; "
                                "the shards and the manifest disagree.")
            if verify == "sha256" and sha256_of(shard_path) != s.sha256:
                raise DataError(f"shard {str(shard_path)!r} does not match its sha256 in {name}.")
    return manifest
