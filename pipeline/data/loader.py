"""Stream WebDataset shards to every rank: ``make_loader(data_dir, split, batch_size, recipe)``.

Training splits an epoch-seeded shard permutation across ranks and DataLoader workers, shuffles
samples in a buffer, and ends each epoch after exactly ``num_samples // (world_size * batch_size)``
batches on every rank, however uneven the shards (a part that runs dry goes round its shards
again): distributed training cannot hang on a short rank.
Validation never resamples: the samples, in manifest order, are cut into one contiguous range
per (rank, worker), so every sample is seen exactly once across all ranks.
Shards stream from wherever ``pipeline.data.storage`` can reach: a directory, http(s), s3, or a pipe.
Workers decode and transform the images; with ``decode="device"`` they ship the JPEG bytes and the
device decodes them (``pipeline.data.device_decode``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import logging
import multiprocessing
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import simplejpeg
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info
from torchvision.transforms.v2.functional import pil_to_tensor

from ..recipes import load_recipe
from .device_decode import DeviceDecoder, Encoded, EncodedBatch, check_recipe, draw_crop, jpeg_size
from .manifest import Manifest, read_manifest
from .storage import Location, ShardReadError, parse_location, shard_samples, stream_samples
from .transforms import Normalize, batch_transform, train_transform, val_transform

log = logging.getLogger(__name__)
IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")
#: Where images are decoded: in the DataLoader workers, or on the training device.
DECODE = ("workers", "device")


class Batch(NamedTuple):
    images: torch.Tensor
    labels: torch.Tensor  # class indices, or (B, C) soft targets after mixup/cutmix
    keys: list[str]


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class BadSamples:
    """Counts samples that could not be read or decoded, across DataLoader workers, and logs each once."""

    def __init__(self) -> None:
        self._count = multiprocessing.get_context("fork").Value("i", 0)
        self._seen: set[str] = set()

    @property
    def count(self) -> int:
        return self._count.value

    def report(self, key: str, err: BaseException) -> None:
        with self._count.get_lock():
            self._count.value += 1
        self._warn_once(f"skipping bad sample {key}: {type(err).__name__}: {err}")

    def _warn_once(self, message: str) -> None:
        if message not in self._seen:
            self._seen.add(message)
            log.warning("%s", message)

    def tar_handler(self, err: Exception) -> bool:
        """WebDataset exception handler: a broken tar member is reported and streaming goes on.

        The sample it belonged to arrives incomplete and is counted when it fails to decode.
        """
        shard = next((Path(a).name for a in err.args[1:] if isinstance(a, str)), "a shard")
        self._warn_once(f"unreadable tar member in {shard}: {type(err).__name__}: {err.args[0] if err.args else err}")
        return True


class _Seeds:
    """Random streams per (purpose, seed, epoch, rank, DataLoader worker): a resumed epoch replays the same stream."""

    def __init__(self, seed: int, rank: int) -> None:
        self.seed, self.rank, self.epoch = seed, rank, 0

    def rng(self, purpose: str) -> random.Random:
        return random.Random(f"{purpose}/{self.seed}/{self.epoch}/{self.rank}/{_worker()[0]}")


class _EpochShards(IterableDataset):
    """Shard URLs for this (rank, worker): its share of an epoch-wide shard permutation, then round again.

    The permutation is the same on every rank, and part p of P takes shards p, p + P, ... of it, so
    one pass covers each shard once across all ranks and workers. A part that runs out before its
    batch count starts another pass over its own shards, so no rank waits on another.
    """

    def __init__(self, urls: list[str], seeds: _Seeds, world_size: int) -> None:
        self.urls, self.seeds, self.world_size = urls, seeds, world_size

    def __iter__(self) -> Iterator[dict[str, str]]:
        worker, workers = _worker()
        part, parts = self.seeds.rank * workers + worker, self.world_size * workers
        order = list(range(len(self.urls)))
        random.Random(f"shards/{self.seeds.seed}/{self.seeds.epoch}").shuffle(order)
        mine = order[part % len(order) :: parts]
        rng = self.seeds.rng("repeat")
        while True:
            for index in mine:
                yield {"url": self.urls[index]}
            rng.shuffle(mine)


def _seeded_shuffle(seeds: _Seeds, bufsize: int) -> Callable[[Iterator[Any]], Iterator[Any]]:
    def stage(src: Iterator[Any]) -> Iterator[Any]:
        return wds.shuffle(bufsize, initial=min(bufsize, 500), rng=seeds.rng("samples"))(src)

    return stage


class _ExactSamples(IterableDataset):
    """Samples ``[start, stop)`` of the split, in manifest order, for this (rank, worker): no resampling.

    ``limit`` keeps the first ``limit`` samples of the split only (still cut exactly across parts).
    """

    def __init__(self, manifest: Manifest, location: Location, rank: int, world_size: int, bad: BadSamples,
                 limit: int | None = None) -> None:
        self.manifest, self.location, self.rank, self.world_size, self.bad = manifest, location, rank, world_size, bad
        self.num_samples = manifest.num_samples if limit is None else min(limit, manifest.num_samples)

    def part_range(self, part: int, parts: int) -> tuple[int, int]:
        n = self.num_samples
        return part * n // parts, (part + 1) * n // parts

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, workers = _worker()
        start, stop = self.part_range(self.rank * workers + worker, self.world_size * workers)
        for shard, offset in zip(self.manifest.shards, self.manifest.offsets(), strict=True):
            lo, hi = max(start - offset, 0), min(stop - offset, shard.num_samples)
            if lo >= hi:
                continue
            samples = shard_samples(self.location.url(shard.name), self.bad.tar_handler)
            try:
                for position, sample in enumerate(samples):
                    if position >= hi:
                        break
                    if position >= lo:
                        yield sample
            finally:
                samples.close()  # stops the shard's stream (and its download) at the range's end


def _image_and_label(sample: dict[str, Any]) -> tuple[bytes, int]:
    """A sample's encoded image and class index; ValueError names what is missing."""
    field = next((f for f in IMAGE_FIELDS if f in sample), None)
    if field is None:
        raise ValueError("the sample has no image (a truncated or missing member)")
    if "cls" not in sample:
        raise ValueError("the sample has no .cls label")
    return sample[field], int(sample["cls"])


def _report(bad: BadSamples, sample: dict[str, Any], err: BaseException) -> None:
    bad.report(f"{sample.get('__key__', '?')} ({Path(str(sample.get('__url__', '?'))).name})", err)


def _decoder(transform: Callable[[Image.Image], torch.Tensor], bad: BadSamples) -> Callable[[dict], Any]:
    def decode(sample: dict[str, Any]) -> tuple[torch.Tensor, int, str] | None:
        try:
            raw, label = _image_and_label(sample)
            return transform(decode_image(raw)), label, sample.get("__key__", "?")
        except Exception as err:  # noqa: BLE001 - any undecodable sample is skipped, counted and reported
            _report(bad, sample, err)
            return None

    return decode


def decode_image(data: bytes) -> Image.Image:
    """Encoded bytes -> RGB PIL image, decoded now so a corrupt file fails here, with its key.

    JPEGs go through libjpeg-turbo via simplejpeg (same slow-but-exact DCT and fancy upsampling as
    Pillow, so the pixels are identical, about 5 % faster); PNG, CMYK and whatever it declines go to Pillow.
    """
    if data[:2] == b"\xff\xd8":
        try:
            if simplejpeg.decode_jpeg_header(data)[2] in ("YCbCr", "Gray"):  # CMYK converts differently
                return Image.fromarray(simplejpeg.decode_jpeg(data, colorspace="RGB"))
        except Exception:  # noqa: BLE001, S110 - Pillow decides, and reports what it cannot read
            pass
    image = Image.open(io.BytesIO(data))
    if image.mode != "RGB":
        return image.convert("RGB")
    image.load()
    return image


def _encoder(data: dict[str, Any], train: bool, bad: BadSamples) -> Callable[[dict], Encoded | None]:
    """For decoding on the device: the JPEG bytes as they are (anything else decoded here) and the drawn crop."""
    def encode(sample: dict[str, Any]) -> Encoded | None:
        try:
            raw, label = _image_and_label(sample)
            size = jpeg_size(raw)
            if size is None:
                payload = pil_to_tensor(decode_image(raw))
                size = (payload.shape[1], payload.shape[2])
            else:
                payload = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
            crop = draw_crop(size, data) if train else None
            return Encoded(payload, payload.dim() == 1, crop, label, sample.get("__key__", "?"))
        except Exception as err:  # noqa: BLE001 - any unreadable sample is skipped, counted and reported
            _report(bad, sample, err)
            return None

    return encode


def _collate_encoded(samples: list[Encoded]) -> EncodedBatch:
    return EncodedBatch(samples, torch.tensor([s.label for s in samples]), [s.key for s in samples])


def _decode_and_batch(transform: Callable[[Image.Image], torch.Tensor], bad: BadSamples, batch_size: int,
                      partial: bool, encode: Callable[[dict], Encoded | None] | None = None) -> list[Any]:
    """Pipeline stages: decode and transform each sample (or only ``encode`` it), drop the bad ones, collate."""
    if encode is not None:
        return [wds.map(encode), wds.select(lambda s: s is not None),
                wds.batched(batch_size, collation_fn=_collate_encoded, partial=partial)]
    return [wds.map(_decoder(transform, bad)), wds.select(lambda s: s is not None),
            wds.batched(batch_size, collation_fn=_collate, partial=partial)]


def _collate(samples: list[tuple[torch.Tensor, int, str]]) -> Batch:
    images, labels, keys = zip(*samples, strict=True)
    # default_collate stacks straight into shared memory inside a DataLoader worker: no copy on the way out.
    return Batch(default_collate(images), torch.tensor(labels), list(keys))


class ShardLoader:
    """A DataLoader over one split's shards with a known number of batches per epoch on this rank.

    Workers ship uint8 batches; each batch is moved to ``device``, normalized there (and mixed
    with mixup/cutmix when the recipe says so) before it is yielded.
    """

    def __init__(self, loader: DataLoader, num_batches: int, manifest: Manifest, bad: BadSamples,
                 seeds: _Seeds, normalize: Normalize, mix: Callable | None, device: torch.device,
                 decoder: DeviceDecoder | None = None) -> None:
        self.loader, self.num_batches, self.manifest, self._bad, self._seeds = (
            loader, num_batches, manifest, bad, seeds)
        self.normalize, self.mix, self.device, self.decoder = normalize, mix, device, decoder
        self._active: Any = None  # the DataLoader iterator of the epoch being read

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[Batch]:
        return self.iterate()

    def iterate(self, start: int = 0) -> Iterator[Batch]:
        """This epoch's batches from index ``start`` on: the first ``start`` are read now, not normalized or mixed.

        Training resumes mid-epoch this way: the stream is replayed to the same position before this
        returns, so the caller restores the main process's random state afterwards; with no loader
        workers the replay's augmentation draws from that state too.
        """
        batches = self._active = iter(self.loader)
        with self._sentences():
            for _ in itertools.islice(batches, start):
                pass
        return self._rest(batches)

    def _rest(self, batches: Iterator[Any]) -> Iterator[Batch]:
        with self._sentences():
            for batch in batches:
                if self.decoder is not None:
                    images, labels, keys = self.decoder(batch)
                else:
                    images, labels, keys = batch.images.to(self.device, non_blocking=True), batch.labels, batch.keys
                images = self.normalize(images)
                labels = labels.to(self.device, non_blocking=True)
                if self.mix is not None:
                    images, labels = self.mix(images, labels)
                yield Batch(images, labels, keys)

    def close(self) -> None:
        """Stop the workers of the epoch being read, and what they started (a stalled transfer's curl), now.

        A worker keeps running through SIGTERM (its inherited handler only sets the stop flag, so that a
        signal to the whole process group cannot end it mid-batch), so a run that stops kills them here.
        """
        import psutil

        active, self._active = self._active, None
        workers = [w for w in getattr(active, "_workers", []) if w.is_alive()]
        if getattr(active, "_worker_pids_set", False):  # else torch's SIGCHLD handler calls the kill a failure
            from torch.utils.data._utils.signal_handling import _remove_worker_pids

            _remove_worker_pids(id(active))
            active._worker_pids_set = False
        for worker in workers:
            with contextlib.suppress(psutil.Error):
                for child in psutil.Process(worker.pid).children(recursive=True):
                    child.kill()
            worker.kill()
        for worker in workers:
            worker.join(timeout=5)

    @staticmethod
    @contextlib.contextmanager
    def _sentences() -> Iterator[None]:
        """A shard read error from a DataLoader worker carries the worker's traceback: keep the sentence."""
        try:
            yield
        except ShardReadError as err:
            raise ShardReadError(str(err).strip().splitlines()[-1].split("ShardReadError: ")[-1]) from None

    @property
    def bad_samples(self) -> int:
        """Samples skipped so far because they could not be read or decoded."""
        return self._bad.count

    @property
    def classes(self) -> list[str]:
        return self.manifest.classes

    def set_epoch(self, epoch: int) -> None:
        """Reseed shard resampling and the workers' augmentation for ``epoch``: a resumed run sees the same stream."""
        self._seeds.epoch = epoch
        # DataLoader seeds its workers from this generator, not from the global RNG the model uses.
        digest = hashlib.sha256(f"workers/{self._seeds.seed}/{self._seeds.rank}/{epoch}".encode()).digest()
        self.loader.generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def make_loader(
    data_dir: str | os.PathLike[str] | Location,
    split: str,
    batch_size: int,
    recipe: str | os.PathLike[str] | dict[str, Any] = "resnet50",
    *,
    train: bool | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    num_workers: int = 2,
    seed: int = 0,
    shuffle_buffer: int = 2000,
    verify: str = "size",
    device: str | torch.device = "cpu",
    max_samples: int | None = None,
    decode: str = "workers",
) -> ShardLoader:
    """Build the loader of ``split`` (``train`` defaults to ``split == "train"``); checks shards before streaming.

    ``data_dir`` is a directory or a remote location (``http(s)://``, ``s3://``, ``pipe:CMD``; see
    ``pipeline.data.storage``). Batches arrive normalized on ``device``; ``rank``/``world_size``
    default to torch.distributed's. ``max_samples`` (validation only) keeps the split's first N samples.
    ``decode="device"`` decodes JPEGs on ``device`` (nvJPEG on a GPU) instead of in the workers.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    if max_samples is not None and (max_samples < 1 or (train if train is not None else split == "train")):
        raise ValueError(f"max_samples cuts validation splits only and must be at least 1, got {max_samples}.")
    if decode not in DECODE:
        raise ValueError(f"decode must be one of {', '.join(DECODE)}, got {decode!r}.")
    location = parse_location(data_dir)
    manifest = read_manifest(location, split, verify=verify)
    data = load_recipe(recipe)["data"]
    bad = BadSamples()
    train = split == "train" if train is None else train
    if decode == "device" and train:
        check_recipe(data)
    encode = _encoder(data, train, bad) if decode == "device" else None
    if rank is None or world_size is None:
        rank, world_size = _dist_rank_world()
    workers = max(num_workers, 1)
    seeds = _Seeds(seed, rank)
    if train:
        num_batches = manifest.num_samples // (world_size * batch_size)
        if num_batches == 0:
            raise ValueError(f"{manifest.num_samples} {split} samples make no full batch of {batch_size} on "
                             f"each of {world_size} ranks; lower the batch size.")
        # A buffer that is a large share of a part mixes in its next pass: cap it at 1/8 of a part.
        buffer = max(1, min(shuffle_buffer, manifest.num_samples // (8 * world_size * workers)))
        stages = [_EpochShards([location.url(s.name) for s in manifest.shards], seeds, world_size),
                  stream_samples(bad.tar_handler),
                  _seeded_shuffle(seeds, buffer),
                  *_decode_and_batch(train_transform(data), bad, batch_size, partial=False, encode=encode)]
        pipeline = wds.DataPipeline(*stages)
        # Each worker stops after its share; together the rank yields exactly num_batches.
        pipeline = _PerWorkerEpoch(pipeline, num_batches)
    else:
        exact = _ExactSamples(manifest, location, rank, world_size, bad, max_samples)
        pipeline = wds.DataPipeline(exact, *_decode_and_batch(val_transform(data), bad, batch_size, partial=True,
                                                              encode=encode))
        num_batches = 0
        for w in range(workers):
            start, stop = exact.part_range(rank * workers + w, world_size * workers)
            num_batches += -(-(stop - start) // batch_size)
    device = torch.device(device)
    loader = DataLoader(pipeline, batch_size=None, num_workers=num_workers, pin_memory=device.type == "cuda",
                        multiprocessing_context="fork" if num_workers > 0 else None)
    mix = batch_transform(data, len(manifest.classes)) if train else None
    decoder = DeviceDecoder(data, train, device, bad) if decode == "device" else None
    return ShardLoader(loader, num_batches, manifest, bad, seeds, Normalize(data, train), mix, device, decoder)


class _PerWorkerEpoch(IterableDataset):
    """Yield this DataLoader worker's share of ``num_batches`` from an endless pipeline."""

    def __init__(self, pipeline: wds.DataPipeline, num_batches: int) -> None:
        self.pipeline, self.num_batches = pipeline, num_batches

    def __iter__(self) -> Iterator[Batch]:
        worker, workers = _worker()
        share = self.num_batches // workers + (1 if worker < self.num_batches % workers else 0)
        # islice stops before pulling (and decoding) a batch past the share.
        yield from itertools.islice(self.pipeline, share)
