"""JPEG decoding on the training device: the workers read shards and draw each crop, the device decodes.

With ``make_loader(..., decode="device")`` a worker ships each sample's encoded bytes with the
crop and flip it drew (``torchvision``'s ``RandomResizedCrop`` parameters, from the worker's
seeded stream, so a resumed epoch draws the same ones); the main process decodes the batch with
``torchvision.io.decode_jpeg`` on the device (nvJPEG on a GPU) and crops, resizes and flips there.
Validation resizes the short side and center-crops, as ``val_transform``. Per-image policies
(RandAugment and the like) stay on the workers: ``check_recipe`` refuses them here.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import simplejpeg
import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms.v2 import functional as F

#: A crop in the decoded image: top, left, height, width, and whether to flip it.
Crop = tuple[int, int, int, int, bool]


class Encoded(NamedTuple):
    """One sample as a worker ships it: JPEG bytes (or an already decoded uint8 CHW image), and its crop."""

    data: torch.Tensor
    jpeg: bool
    crop: Crop | None
    label: int
    key: str


class EncodedBatch(NamedTuple):
    items: list[Encoded]
    labels: torch.Tensor
    keys: list[str]


def check_recipe(data: dict[str, Any]) -> None:
    """Device decoding does the crop and the flip; a per-image augmentation policy needs the workers."""
    if data.get("auto_augment"):
        raise ValueError(f"decoding on the device applies the crop and the flip only; this recipe's auto_augment "
                         f"{data['auto_augment']!r} runs per image on the loader workers: decode there.")


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) of a baseline or progressive YCbCr/gray JPEG the device can decode; None for anything else."""
    if data[:2] != b"\xff\xd8":
        return None
    height, width, _, colorspace = simplejpeg.decode_jpeg_header(data)  # raises on a corrupt header
    return (height, width) if colorspace in ("YCbCr", "Gray") else None


def draw_crop(size: tuple[int, int], data: dict[str, Any]) -> Crop:
    """The training crop and flip of an image of ``size``, drawn as ``train_transform`` draws them."""
    scale = list(data.get("scale", (0.08, 1.0)))
    top, left, h, w = RandomResizedCrop.get_params(torch.empty(1, 1, 1).expand(1, *size), scale, [3 / 4, 4 / 3])
    flip = data.get("hflip", 0.5) > 0 and bool(torch.rand(1) < data.get("hflip", 0.5))
    return top, left, h, w, flip


class DeviceDecoder:
    """``EncodedBatch`` -> uint8 NCHW batch on ``device``: decode, crop or resize, flip, stack."""

    def __init__(self, data: dict[str, Any], train: bool, device: torch.device, bad: Any) -> None:
        self.data, self.train, self.device, self.bad = data, train, device, bad
        self.interpolation = InterpolationMode(data.get("interpolation", "bilinear"))

    def __call__(self, batch: EncodedBatch) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """An image the device cannot decode is dropped from a validation batch (it is counted, as in the
        workers); in training another image of the batch stands in, so every rank steps on a full batch."""
        images = self._decode(batch.items)
        good = [i for i, image in enumerate(images) if image is not None]
        if not good:
            raise ValueError(f"no image of the batch starting at {batch.keys[0]} could be decoded on {self.device}.")
        rows = [i if images[i] is not None else good[0] for i in range(len(images))] if self.train else good
        out = torch.stack([self._finish(images[i], batch.items[i].crop) for i in rows])
        return out, batch.labels[rows], [batch.keys[i] for i in rows]

    def _decode(self, items: list[Encoded]) -> list[torch.Tensor | None]:
        jpegs = [i for i, item in enumerate(items) if item.jpeg]
        out: list[torch.Tensor | None] = [None if item.jpeg else item.data.to(self.device) for item in items]
        if not jpegs:
            return out
        try:
            decoded = decode_jpeg([items[i].data for i in jpegs], mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:  # one corrupt image fails the batch call: decode one by one, skip the bad ones
            decoded = []
            for i in jpegs:
                try:
                    decoded.append(decode_jpeg(items[i].data, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError as err:
                    self.bad.report(items[i].key, err)
                    decoded.append(None)
        for i, image in zip(jpegs, decoded, strict=True):
            out[i] = image
        return out

    def _finish(self, image: torch.Tensor, crop: Crop | None) -> torch.Tensor:
        if self.train:
            assert crop is not None
            top, left, h, w, flip = crop
            size = self.data["train_crop"]
            image = F.resized_crop(image, top, left, h, w, [size, size], self.interpolation, antialias=True)
            return image.flip(-1) if flip else image
        image = F.resize(image, self.data["val_resize"], self.interpolation, antialias=True)
        return F.center_crop(image, self.data["val_crop"])
