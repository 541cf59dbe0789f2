"""Check shards against their manifests byte for byte: ``python -m pipeline.data.verify DATA [--split S]``.

Reading a manifest checks local shards' sizes only, and streaming checks nothing: a shard changed
in place, or a server handing out stale copies, goes unnoticed while its samples decode. This
command streams every shard of the chosen splits (a local directory, ``http(s)://``, ``s3://`` or a
``pipe:`` command, as training reads them) and compares its sha256 and length with the manifest,
naming each shard that differs.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Sequence

from tqdm import tqdm

from .manifest import DataError, read_manifest
from .storage import Location, open_url, parse_location

CHUNK = 1 << 20


def verify(data: str | Location, splits: Sequence[str]) -> tuple[int, list[str]]:
    """(shards checked, one line per shard that differs from its manifest)."""
    location = parse_location(data)
    manifests = [read_manifest(location, split) for split in splits]
    total = sum(s.bytes for m in manifests for s in m.shards)
    checked, bad = 0, []
    with tqdm(total=total, unit="B", unit_scale=True, desc="sha256", file=sys.stderr) as bar:
        for manifest in manifests:
            for shard in manifest.shards:
                digest, size = hashlib.sha256(), 0
                try:
                    stream = open_url(location.url(shard.name))
                    try:
                        while chunk := stream.read(CHUNK):
                            digest.update(chunk)
                            size += len(chunk)
                            bar.update(len(chunk))
                    finally:
                        stream.close()
                except OSError as err:
                    bad.append(f"{location.display(shard.name)}: unreadable ({err})")
                    continue
                checked += 1
                if size != shard.bytes:
                    bad.append(f"{location.display(shard.name)}: {size} bytes, the {manifest.split} manifest says "
                               f"{shard.bytes}")
                elif digest.hexdigest() != shard.sha256:
                    bad.append(f"{location.display(shard.name)}: sha256 {digest.hexdigest()[:12]}..., the "
                               f"{manifest.split} manifest says {shard.sha256[:12]}...")
    return checked, bad


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.data.verify", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="shard directory or URL (as --data of training)")
    p.add_argument("--split", action="append", dest="splits",
                   help="a split to check (repeatable; default: every split with a manifest)")
    args = p.parse_args(argv)
    try:
        location = parse_location(args.data)
        splits = args.splits or _splits(location)
        checked, bad = verify(location, splits)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if bad:
        print(f"error: {len(bad)} of {checked + sum('unreadable' in b for b in bad)} shards differ from their "
              f"manifests: " + "; ".join(bad) + ".", file=sys.stderr)
        return 1
    print(f"{checked} shards of {', '.join(splits)} match their manifests (sha256 and size).")
    return 0


def _splits(location: Location) -> list[str]:
    """Every split with a manifest; a URL has no listing, so there the usual three are tried."""
    if location.is_local:
        found = sorted(p.stem for p in location.path("").glob("*.json"))
        if not found:
            raise DataError(f"{str(location.path(''))!r} holds no manifests; write shards with "
                            "`python -m pipeline.data.shard`.")
        return found
    names = []
    for split in ("train", "minival", "val"):
        try:
            read_manifest(location, split)
            names.append(split)
        except DataError:
            continue
    if not names:
        raise DataError(f"no train, minival or val manifest at {location}; name the split with --split.")
    return names


if __name__ == "__main__":
    sys.exit(main())
