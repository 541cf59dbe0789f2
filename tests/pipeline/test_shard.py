"""Shard writing: digits, ImageNet folders vs the original tars, restart after an interruption."""

import io
import json
import random
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits, load_sample_image
from sklearn.model_selection import train_test_split

from pipeline.data import shard as shard_module
from pipeline.data.manifest import DataError, read_manifest
from pipeline.data.shard import write_shards
from pipeline.data.sources import digits_samples, imagenet_samples


def _tar_samples(path):
    """key -> {ext: bytes} of one shard, read with the standard library (not WebDataset)."""
    out = {}
    with tarfile.open(path) as tar:
        for m in tar:
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def _all_samples(directory, split):
    manifest = json.loads((directory / f"{split}.json").read_text())
    samples = {}
    for s in manifest["shards"]:
        got = _tar_samples(directory / s["name"])
        assert len(got) == s["num_samples"]
        samples.update(got)
    return manifest, samples


def test_digits_shards_hold_exactly_the_stratified_split(tmp_path):
    subprocess.run([sys.executable, "-m", "pipeline.data.shard", "digits", "--out", str(tmp_path)], check=True,
                   capture_output=True)
    digits = load_digits()
    train_idx, val_idx = train_test_split(np.arange(1797), test_size=0.2, stratify=digits.target, random_state=0)
    for split, idx, n in (("train", train_idx, 1437), ("val", val_idx, 360)):
        manifest, samples = _all_samples(tmp_path, split)
        assert manifest["num_samples"] == n and len(samples) == n
        assert manifest["classes"] == [str(d) for d in range(10)] and manifest["num_classes"] == 10
        assert set(samples) == {f"digit_{i:04d}" for i in idx}
        for key, fields in samples.items():
            i = int(key.split("_")[1])
            assert int(fields["cls"]) == digits.target[i]
            image = Image.open(io.BytesIO(fields["png"]))
            assert image.size == (32, 32) and image.mode == "RGB"
            small = np.asarray(image.convert("L").resize((8, 8), Image.BOX), dtype=float)
            assert np.corrcoef(small.ravel(), digits.images[i].ravel())[0, 1] > 0.9
        read_manifest(tmp_path, split, verify="sha256")


def _imagenet_tree(root, classes=("n01440764", "n01443537", "n09999999"), per_class=5):
    """Real photographs (scikit-learn's samples), cropped, as an ImageNet-layout tree of JPEGs."""
    rng = random.Random(0)
    photos = [load_sample_image(n) for n in ("china.jpg", "flower.jpg")]
    val_labels = []
    for split in ("train", "val"):
        for c, wnid in enumerate(classes):
            (root / split / wnid).mkdir(parents=True)
            for k in range(per_class):
                photo = photos[(c + k) % 2]
                y, x = rng.randrange(0, 200), rng.randrange(0, 300)
                crop = Image.fromarray(photo[y : y + 120, x : x + 160]).resize((80, 60))
                name = f"{wnid}_{k}.JPEG" if split == "train" else f"ILSVRC2012_val_{c * per_class + k + 1:08d}.JPEG"
                crop.save(root / split / wnid / name, quality=90)
                if split == "val":
                    val_labels.append((name, wnid))
    return val_labels


def _archive(root, val_labels):
    """The original layout: a tar of per-class tars for train, a flat val tar and a labels file."""
    archive = root.parent / "archive"
    archive.mkdir()
    with tarfile.open(archive / "ILSVRC2012_img_train.tar", "w") as outer:
        for class_dir in sorted((root / "train").iterdir()):
            inner = root.parent / f"{class_dir.name}.tar"
            with tarfile.open(inner, "w") as tar:
                for f in sorted(class_dir.iterdir()):
                    tar.add(f, arcname=f.name)
            outer.add(inner, arcname=inner.name)
    with tarfile.open(archive / "ILSVRC2012_img_val.tar", "w") as tar:
        for name, wnid in sorted(val_labels):
            tar.add(root / "val" / wnid / name, arcname=name)
    (archive / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\n" + "".join(f"{n.split('.')[0]},{w} 1 2 3 4\n" for n, w in val_labels))
    return archive


def test_folder_tree_and_original_tars_give_identical_shards(tmp_path):
    val_labels = _imagenet_tree(tmp_path / "tree")
    archive = _archive(tmp_path / "tree", val_labels)
    for src, out in ((tmp_path / "tree", tmp_path / "a"), (archive, tmp_path / "b")):
        subprocess.run([sys.executable, "-m", "pipeline.data.shard", "imagenet", "--src", str(src), "--out", str(out),
                        "--shard-size", "4", "--workers", "2"], check=True, capture_output=True)
    for split in ("train", "val"):
        a, samples_a = _all_samples(tmp_path / "a", split)
        b, samples_b = _all_samples(tmp_path / "b", split)
        assert a["shards"] == b["shards"] and a["classes"] == b["classes"] and a["num_samples"] == 15
        assert samples_a == samples_b
    # the JPEG bytes are the original files, and labels index the sorted class list
    _, samples = _all_samples(tmp_path / "a", "train")
    original = (tmp_path / "tree" / "train" / "n01443537" / "n01443537_2.JPEG").read_bytes()
    assert samples["n01443537_2"] == {"jpg": original, "cls": b"1"}
    # train shards mix classes (shuffled with a seed), so a shuffle buffer sees every class early
    first = _tar_samples(tmp_path / "a" / "train-000000.tar")
    assert len({v["cls"] for v in first.values()}) > 1


def test_an_interrupted_write_restarted_gives_the_same_shards(tmp_path, monkeypatch):
    classes, splits = digits_samples()
    reference = write_shards(splits["val"], classes, tmp_path / "ref", "val", shard_size=50)

    real = shard_module._write_shard
    calls = {"n": 0}

    def crash_on_third(path, refs):
        calls["n"] += 1
        if calls["n"] == 3:
            with open(path + ".tmp", "wb") as f:
                f.write(b"half a shard")
            raise KeyboardInterrupt
        real(path, refs)

    monkeypatch.setattr(shard_module, "_write_shard", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        write_shards(splits["val"], classes, tmp_path / "run", "val", shard_size=50)
    assert not (tmp_path / "run" / "val.json").exists()
    assert len(list((tmp_path / "run").glob("val-*.tar"))) == 2
    monkeypatch.setattr(shard_module, "_write_shard", real)
    again = write_shards(splits["val"], classes, tmp_path / "run", "val", shard_size=50)
    assert again.shards == reference.shards
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_writing_other_samples_into_a_used_directory_is_refused(tmp_path):
    classes, splits = digits_samples()
    write_shards(splits["val"], classes, tmp_path, "val", shard_size=100)
    with pytest.raises(DataError, match="already holds val shards"):
        write_shards(splits["val"], classes, tmp_path, "val", shard_size=50)


def test_cli_errors_are_one_sentence(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pipeline.data.shard", "imagenet", "--src", str(tmp_path),
                             "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert result.returncode == 2 and "has no train/ or val/ folders" in result.stderr
    with pytest.raises(DataError, match="needs a labels file"):
        (tmp_path / "ILSVRC2012_img_val.tar").write_bytes(b"")
        imagenet_samples(tmp_path, "val")
