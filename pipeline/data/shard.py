"""Write WebDataset shards: ``python -m pipeline.data.shard imagenet|digits|digits-hard --out DIR``.

Samples keep their original encoded bytes (``<key>.jpg`` or ``<key>.png``, and ``<key>.cls``).
The plan (which sample goes to which shard) is fixed before anything is written: train samples
are shuffled with a seed so every shard mixes classes; shard i holds samples i*N .. (i+1)*N-1.
Each shard is written to a temporary file and renamed when complete, so a run that was
interrupted is started again with the same command and writes only the shards still missing.

``--holdout N`` moves N training samples, stratified by class, into a ``minival`` split: the
search chooses masks on it and reports the validation split, which it never chose on (as
OFA, NAT and AutoFormer search on a held-out part of the training set).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

from .manifest import HOLDOUT_SPLIT, DataError, Manifest, ShardInfo, sha256_of
from .sources import SampleRef, digits_samples, imagenet_samples, imagenet_splits

# Fixed member times, so the same samples always give byte-identical shards. An int: a float mtime
# makes tarfile add a PAX header to every member, which doubles the header parsing when streaming.
TAR_MTIME = 0


def plan_shards(refs: Sequence[SampleRef], shard_size: int, shuffle_seed: int | None) -> list[list[SampleRef]]:
    """Fix the order (sorted by key, then shuffled with ``shuffle_seed`` if given) and cut it into shards."""
    if shard_size < 1:
        raise ValueError(f"--shard-size must be at least 1, got {shard_size}.")
    ordered = sorted(refs, key=lambda r: r.key)
    keys = [r.key for r in ordered]
    if len(set(keys)) != len(keys):
        dup = next(k for k, n in zip(keys, keys[1:], strict=False) if k == n)
        raise DataError(f"two samples share the key {dup!r}; keys (file names without extension) must be unique.")
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(ordered)
    return [ordered[i : i + shard_size] for i in range(0, len(ordered), shard_size)]



def holdout(refs: Sequence[SampleRef], n: int, seed: int) -> tuple[list[SampleRef], list[SampleRef]]:
    """(kept, held out): ``n`` samples stratified by class, each class's share by largest remainder.

    Deterministic in the keys and ``seed`` alone, so a restarted writer holds out the same samples.
    """
    if n < 0 or n >= len(refs):
        raise DataError(f"--holdout must be between 0 and {len(refs) - 1} (the train split has {len(refs)} "
                        f"samples), got {n}.")
    by_class: dict[int, list[SampleRef]] = {}
    for ref in sorted(refs, key=lambda r: r.key):
        by_class.setdefault(ref.label, []).append(ref)
    quota = {c: n * len(members) / len(refs) for c, members in by_class.items()}
    take = {c: int(q) for c, q in quota.items()}
    for c in sorted(quota, key=lambda c: (take[c] - quota[c], c))[: n - sum(take.values())]:
        take[c] += 1
    held: list[SampleRef] = []
    for c, members in sorted(by_class.items()):
        members = list(members)
        random.Random(f"holdout/{seed}/{c}").shuffle(members)
        held += members[: take[c]]
    chosen = {r.key for r in held}
    return [r for r in refs if r.key not in chosen], sorted(held, key=lambda r: r.key)


def _plan_digest(shards: list[list[SampleRef]]) -> str:
    digest = hashlib.sha256()
    for shard in shards:
        digest.update(json.dumps([(r.key, r.label, r.ext) for r in shard]).encode())
        digest.update(b"|")
    return digest.hexdigest()


class _HashingFile:
    """A write-only file that hashes and counts what passes through, so a shard is never read back."""

    def __init__(self, raw: io.BufferedWriter) -> None:
        self.raw, self.sha256, self.bytes = raw, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        return self.raw.write(data)


def _write_shard(path: str, refs: list[SampleRef]) -> ShardInfo:
    tmp = path + ".tmp"
    handles: dict[str, io.BufferedReader] = {}
    try:
        with open(tmp, "wb") as raw:
            stream = _HashingFile(raw)
            with wds.TarWriter(stream, encoder=False, mtime=TAR_MTIME) as writer:
                for ref in refs:
                    handle = None
                    if ref.offset >= 0:
                        if ref.path not in handles:
                            handles[ref.path] = open(ref.path, "rb")  # noqa: SIM115 - closed below
                        handle = handles[ref.path]
                    writer.write({"__key__": ref.key, ref.ext: ref.read(handle), "cls": str(ref.label).encode()})
    finally:
        for handle in handles.values():
            handle.close()
    os.replace(tmp, path)
    return ShardInfo(os.path.basename(path), len(refs), stream.sha256.hexdigest(), stream.bytes)


def write_shards(
    refs: Sequence[SampleRef],
    classes: list[str],
    out: str | os.PathLike[str],
    split: str,
    shard_size: int,
    workers: int = 1,
    shuffle_seed: int | None = 0,
    extra: dict | None = None,
    progress: bool = False,
) -> Manifest:
    """Write (or finish writing) the shards of one split and its manifest ``out/<split>.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not refs:
        raise DataError(f"split {split!r} has no samples to write.")
    shards = plan_shards(refs, shard_size, shuffle_seed)
    digest = _plan_digest(shards)
    plan_file = out / f".{split}.plan"
    names = [f"{split}-{i:06d}.tar" for i in range(len(shards))]
    existing = sorted(p.name for p in out.glob(f"{split}-*.tar"))
    if existing and (not plan_file.is_file() or plan_file.read_text().strip() != digest):
        raise DataError(f"{str(out)!r} already holds {split} shards of other samples or another --shard-size; "
                        "write to an empty --out directory.")
    plan_file.write_text(digest + "\n")
    for stale in out.glob(f"{split}-*.tar.tmp"):
        stale.unlink()
    # Shards finished by an earlier, interrupted run are hashed from disk; new ones while they are written.
    infos: dict[int, ShardInfo] = {
        i: ShardInfo(name, len(shards[i]), sha256_of(out / name), (out / name).stat().st_size)
        for i, name in enumerate(names) if (out / name).is_file()
    }
    todo = [i for i in range(len(names)) if i not in infos]
    bar = tqdm(total=len(names), initial=len(infos), desc=f"{split} shards", unit="shard",
               disable=None if progress else True, file=sys.stderr)
    if workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = {i: pool.submit(_write_shard, str(out / names[i]), shards[i]) for i in todo}
            for i, future in futures.items():
                infos[i] = future.result()
                bar.update()
    else:
        for i in todo:
            infos[i] = _write_shard(str(out / names[i]), shards[i])
            bar.update()
    bar.close()
    manifest = Manifest(split, len(refs), classes, [infos[i] for i in range(len(names))],
                        {"shard_size": shard_size, "shuffle_seed": shuffle_seed, **(extra or {})})
    manifest.write(out)
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.data.shard",
                                     description="Write WebDataset shards and a manifest per split.")
    sub = parser.add_subparsers(dest="source", required=True)
    imagenet = sub.add_parser("imagenet", help="ImageNet from train/<wnid>/*.JPEG folders or the original tars")
    imagenet.add_argument("--src", required=True, help="ImageNet root: folders train/, val/ or ILSVRC2012_img_*.tar")
    imagenet.add_argument("--split", choices=["train", "val"], help="one split (default: every split found)")
    imagenet.add_argument("--val-labels", help="labels for ILSVRC2012_img_val.tar (LOC_val_solution.csv, "
                          "'file wnid' lines, or one wnid per line in file order)")
    imagenet.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    imagenet.add_argument("--holdout", type=int, default=10_000, help="training images held out as the minival "
                          "split the search chooses on, stratified by class (default 10000; 0: none)")
    digits = sub.add_parser("digits", help="the embedded default: scikit-learn's digits at 32x32 RGB")
    digits.add_argument("--shard-size", type=int, default=256, help="samples per shard (default 256)")
    digits.add_argument("--holdout", type=int, default=180, help="training images held out as the minival split, "
                        "stratified by class (default 180: 18 per digit; 0: none)")
    hard = sub.add_parser("digits-hard", help="the digits distorted (warps, elastic, clutter, occlusion, noise), "
                          "fixed bytes: a task the small models do not saturate")
    hard.add_argument("--shard-size", type=int, default=256, help="samples per shard (default 256)")
    hard.add_argument("--holdout", type=int, default=180, help="training images held out as the minival split, "
                      "stratified by class (default 180: 18 per digit; 0: none)")
    for p in (imagenet, digits, hard):
        p.add_argument("--out", required=True, help="output directory for the shards and manifests")
        p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel shard writers")
        p.add_argument("--seed", type=int, default=0, help="seed of the train shuffle (and of the digits split)")
    args = parser.parse_args(argv)
    if args.shard_size < 1 or args.workers < 1:
        parser.error(f"--shard-size and --workers must be positive, got {args.shard_size} and {args.workers}.")
    try:
        if args.source in ("digits", "digits-hard"):
            classes, splits = digits_samples(args.seed, hard=args.source == "digits-hard")
            jobs = [(split, classes, refs) for split, refs in splits.items()]
        else:
            wanted = [args.split] if args.split else imagenet_splits(args.src)
            if not wanted:
                raise DataError(f"{args.src!r} has no train/ or val/ folders and no ILSVRC2012_img_*.tar archives.")
            jobs = [(s, *imagenet_samples(args.src, s, args.val_labels)) for s in wanted]
        jobs = [job for split, classes, refs in jobs for job in _with_holdout(split, classes, refs, args)]
        for split, classes, refs in jobs:
            manifest = write_shards(refs, classes, args.out, split, args.shard_size, args.workers,
                                    shuffle_seed=args.seed if split == "train" else None,
                                    extra={"source": args.source, **_holdout_note(split, args)}, progress=True)
            print(f"{split}: {manifest.num_samples} samples, {len(classes)} classes, "
                  f"{len(manifest.shards)} shards -> {Path(args.out) / (split + '.json')}")
    except DataError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    return 0


def _with_holdout(split: str, classes: list[str], refs: list[SampleRef],
                  args: argparse.Namespace) -> list[tuple[str, list[str], list[SampleRef]]]:
    if split != "train" or not args.holdout:
        return [(split, classes, refs)]
    kept, held = holdout(refs, args.holdout, args.seed)
    return [(split, classes, kept), (HOLDOUT_SPLIT, classes, held)]


def _holdout_note(split: str, args: argparse.Namespace) -> dict:
    if not args.holdout or split not in ("train", HOLDOUT_SPLIT):
        return {}
    return {"holdout": args.holdout, "holdout_seed": args.seed, "holdout_of": "train"}


if __name__ == "__main__":
    sys.exit(main())
