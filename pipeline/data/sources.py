"""Where samples come from: an ImageNet folder tree, the original ImageNet tars, or scikit-learn's digits.

Every source yields ``SampleRef``s: a key, a label, and how to get the encoded image bytes. The
original archives are read in place: ImageNet's tars are uncompressed, so each JPEG of the
train tar-of-tars is one contiguous byte range of the outer file, read with a seek.
"""

from __future__ import annotations

import csv
import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .manifest import DataError

IMAGE_EXTS = {".jpeg": "jpg", ".jpg": "jpg", ".png": "png"}
TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
VAL_LABEL_FILES = ("LOC_val_solution.csv", "ILSVRC2012_val_labels.txt", "imagenet_2012_validation_synset_labels.txt")


@dataclass(frozen=True)
class SampleRef:
    """One sample: its key, label, file extension, and where its bytes are (a file, a byte range, or inline)."""

    key: str
    label: int
    ext: str
    path: str = ""
    offset: int = -1
    size: int = -1
    data: bytes | None = None

    def read(self, handle: io.BufferedReader | None = None) -> bytes:
        if self.data is not None:
            return self.data
        if self.offset < 0:
            return Path(self.path).read_bytes()
        if handle is None:
            with open(self.path, "rb") as f:
                return self.read(f)
        handle.seek(self.offset)
        return handle.read(self.size)


def imagenet_samples(src: str | os.PathLike[str], split: str,
                     val_labels: str | os.PathLike[str] | None = None) -> tuple[list[str], list[SampleRef]]:
    """Classes (sorted WordNet ids) and samples of one ImageNet split, from folders or the original tars."""
    src = Path(src)
    if (src / split).is_dir():
        return _folder_samples(src / split)
    if split == "train" and (src / TRAIN_TAR).is_file():
        return _train_tar_samples(src / TRAIN_TAR)
    if split == "val" and (src / VAL_TAR).is_file():
        return _val_tar_samples(src / VAL_TAR, _find_val_labels(src, val_labels))
    archive = TRAIN_TAR if split == "train" else VAL_TAR
    raise DataError(f"{str(src)!r} has neither a {split}/<wnid>/ folder tree nor {archive}; "
                    "point --src at an ImageNet root.")


def imagenet_splits(src: str | os.PathLike[str]) -> list[str]:
    """The splits an ImageNet root holds, as folders or original archives."""
    src = Path(src)
    archives = {"train": TRAIN_TAR, "val": VAL_TAR}
    return [s for s in ("train", "val") if (src / s).is_dir() or (src / archives[s]).is_file()]


def _image_ext(name: str) -> str | None:
    return IMAGE_EXTS.get(os.path.splitext(name)[1].lower())


def _stem(name: str) -> str:
    return os.path.basename(name).split(".")[0]


def _folder_samples(root: Path) -> tuple[list[str], list[SampleRef]]:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"{str(root)!r} holds no class folders; expected {root}/<wnid>/*.JPEG.")
    refs = [
        SampleRef(_stem(f.name), label, _image_ext(f.name), str(f))
        for label, wnid in enumerate(classes)
        for f in sorted((root / wnid).iterdir())
        if f.is_file() and _image_ext(f.name)
    ]
    return classes, refs


def _train_tar_samples(path: Path) -> tuple[list[str], list[SampleRef]]:
    inner: list[tuple[str, list[tuple[str, int, int]]]] = []
    with tarfile.open(path, "r:") as outer:
        for member in outer:
            if not (member.isfile() and member.name.endswith(".tar")):
                continue
            with tarfile.open(fileobj=outer.extractfile(member), mode="r:") as class_tar:
                files = [(m.name, member.offset_data + m.offset_data, m.size)
                         for m in class_tar if m.isfile() and _image_ext(m.name)]
            inner.append((_stem(member.name), files))
    if not inner:
        raise DataError(f"{str(path)!r} holds no per-class tars; expected the original {TRAIN_TAR}.")
    classes = sorted(wnid for wnid, _ in inner)
    label_of = {wnid: i for i, wnid in enumerate(classes)}
    refs = [SampleRef(_stem(name), label_of[wnid], _image_ext(name), str(path), offset, size)
            for wnid, files in inner for name, offset, size in files]
    return classes, refs


def _find_val_labels(src: Path, given: str | os.PathLike[str] | None) -> Path:
    if given is not None:
        if not Path(given).is_file():
            raise DataError(f"--val-labels {str(given)!r} does not exist.")
        return Path(given)
    for name in VAL_LABEL_FILES:
        if (src / name).is_file():
            return src / name
    raise DataError(f"{VAL_TAR} needs a labels file: put one of {', '.join(VAL_LABEL_FILES)} in {str(src)!r} "
                    "or pass --val-labels FILE.")


def read_val_labels(path: Path, file_names: list[str]) -> dict[str, str]:
    """Key -> WordNet id from Kaggle's LOC_val_solution.csv, 'file wnid' lines, or one wnid per line in file order."""
    text = path.read_text().strip()
    if path.suffix == ".csv":
        rows = list(csv.reader(io.StringIO(text)))[1:]
        return {_stem(r[0]): r[1].split()[0] for r in rows}
    lines = [line.split() for line in text.splitlines() if line.strip()]
    if all(len(parts) >= 2 for parts in lines):
        return {_stem(parts[0]): parts[1] for parts in lines}
    ordered = sorted(file_names)
    if len(lines) != len(ordered):
        raise DataError(f"{str(path)!r} has {len(lines)} labels for {len(ordered)} validation images.")
    return {_stem(name): parts[0] for name, parts in zip(ordered, lines, strict=True)}


def _val_tar_samples(path: Path, labels_path: Path) -> tuple[list[str], list[SampleRef]]:
    with tarfile.open(path, "r:") as tar:
        files = [(m.name, m.offset_data, m.size) for m in tar if m.isfile() and _image_ext(m.name)]
    labels = read_val_labels(labels_path, [name for name, _, _ in files])
    missing = [name for name, _, _ in files if _stem(name) not in labels]
    if missing:
        raise DataError(f"{str(labels_path)!r} has no label for {len(missing)} images, e.g. {missing[0]!r}.")
    classes = sorted(set(labels.values()))
    label_of = {wnid: i for i, wnid in enumerate(classes)}
    refs = [SampleRef(_stem(name), label_of[labels[_stem(name)]], _image_ext(name), str(path), offset, size)
            for name, offset, size in files]
    return classes, refs


def _png(pixels: Any) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def digits_samples(seed: int = 0, hard: bool = False) -> tuple[list[str], dict[str, list[SampleRef]]]:
    """scikit-learn's 1,797 handwritten 8x8 digits as 32x32 RGB PNGs, split 80/20 stratified with ``seed``.

    ``hard``: each image distorted once, with a generator seeded by its index (so the same bytes on
    every run and machine): ``hard_digit`` below. The digits themselves saturate a small CNN
    (every mask of the demo lands at 90-99 %), which hides every difference the paper claims.
    """
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    index = np.arange(len(digits.target))
    train_idx, val_idx = train_test_split(index, test_size=0.2, stratify=digits.target, random_state=seed)

    def encode(i: int) -> bytes:
        pixels = (digits.images[i] * (255.0 / 16.0)).round().astype(np.uint8)
        if hard:
            return _png(hard_digit(digits.images[i] / 16.0, np.random.default_rng([seed, int(i)])))
        return _png(np.asarray(Image.fromarray(pixels, mode="L").resize((32, 32), Image.BICUBIC).convert("RGB")))

    def refs(indices: np.ndarray) -> list[SampleRef]:
        return [SampleRef(f"digit_{i:04d}", int(digits.target[i]), "png", data=encode(i)) for i in sorted(indices)]

    return [str(d) for d in range(10)], {"train": refs(train_idx), "val": refs(val_idx)}


def hard_digit(glyph: Any, rng: Any) -> Any:
    """One 8x8 digit (values 0..1) as a distorted 32x32 RGB uint8 image.

    Upsampled to 32x32, then: a random affine warp (rotation up to 30 degrees, scale 0.75 to 1.15,
    shear up to 0.3, shift up to 4 px), an elastic distortion (a smoothed random displacement
    field, up to about 2 px), a coloured stroke on a coloured background of smooth clutter,
    one or two occluding rectangles, and Gaussian noise. Only numpy and scipy, all from ``rng``.
    """
    import numpy as np
    from scipy import ndimage

    size = 32
    img = ndimage.zoom(glyph.astype(np.float64), size / glyph.shape[0], order=3).clip(0, 1)
    angle = np.deg2rad(rng.uniform(-30, 30))
    scale = rng.uniform(0.75, 1.15)
    shear = rng.uniform(-0.3, 0.3)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    matrix = rot @ np.array([[1.0, shear], [0.0, 1.0]]) * scale
    inverse = np.linalg.inv(matrix)
    centre = np.array([size / 2 - 0.5, size / 2 - 0.5])
    shift = rng.uniform(-4, 4, size=2)
    img = ndimage.affine_transform(img, inverse, offset=centre - inverse @ (centre + shift), order=1, cval=0.0)
    dy, dx = (ndimage.gaussian_filter(rng.uniform(-1, 1, (size, size)), 3.0) * 12 for _ in range(2))
    yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    img = ndimage.map_coordinates(img, [yy + dy, xx + dx], order=1, cval=0.0).clip(0, 1)
    clutter = ndimage.gaussian_filter(rng.uniform(0, 1, (size, size, 3)), (2.0, 2.0, 0))
    clutter = (clutter - clutter.min()) / max(np.ptp(clutter), 1e-6)
    background = rng.uniform(0.0, 0.6, 3) * 0.6 + clutter * 0.4
    stroke = rng.uniform(0.4, 1.0, 3)
    out = background * (1 - img[..., None]) + stroke * img[..., None]
    for _ in range(rng.integers(1, 3)):
        h, w = rng.integers(4, 11, size=2)
        y, x = rng.integers(0, size - h), rng.integers(0, size - w)
        out[y:y + h, x:x + w] = rng.uniform(0, 1, 3)
    out = out + rng.normal(0, 0.08, out.shape)
    return (out.clip(0, 1) * 255).round().astype(np.uint8)
