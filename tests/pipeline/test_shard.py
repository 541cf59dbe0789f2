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
    keys = {}
    for split, n in (("train", 1437 - 180), ("minival", 180), ("val", 360)):
        manifest, samples = _all_samples(tmp_path, split)
        assert manifest["num_samples"] == n and len(samples) == n
        assert manifest["classes"] == [str(d) for d in range(10)] and manifest["num_classes"] == 10
        keys[split] = set(samples)
        for key, fields in samples.items():
            i = int(key.split("_")[1])
            assert int(fields["cls"]) == digits.target[i]
            image = Image.open(io.BytesIO(fields["png"]))
            assert image.size == (32, 32) and image.mode == "RGB"
            small = np.asarray(image.convert("L").resize((8, 8), Image.BOX), dtype=float)
            assert np.corrcoef(small.ravel(), digits.images[i].ravel())[0, 1] > 0.9
        read_manifest(tmp_path, split, verify="sha256")
    assert keys["val"] == {f"digit_{i:04d}" for i in val_idx}
    assert keys["train"] | keys["minival"] == {f"digit_{i:04d}" for i in train_idx}
    assert not keys["train"] & keys["minival"]


def test_holdout_is_disjoint_stratified_and_the_same_after_a_restart(tmp_path):
    """Check 4 of the search issue: minival is held out of train (by key, never in val), each class gets its
    share (largest remainder), and an interrupted writer started again holds out the same samples."""
    labels = [0] * 50 + [1] * 30 + [2] * 20  # 100 train samples, uneven classes
    refs = [shard_module.SampleRef(f"s{i:03d}", c, "png", data=b"x") for i, c in enumerate(labels)]
    kept, held = shard_module.holdout(refs, 10, seed=0)
    assert len(held) == 10 and len(kept) == 90 and not {r.key for r in kept} & {r.key for r in held}
    assert [sum(r.label == c for r in held) for c in range(3)] == [5, 3, 2]
    kept_again, held_again = shard_module.holdout(list(reversed(refs)), 10, seed=0)  # input order is irrelevant
    assert [r.key for r in held_again] == [r.key for r in held]
    assert [r.key for r in shard_module.holdout(refs, 10, seed=1)[1]] != [r.key for r in held]
    assert [sum(r.label == c for r in shard_module.holdout(refs, 7, seed=0)[1]) for c in range(3)] == [4, 2, 1]
    with pytest.raises(DataError, match="--holdout must be between 0 and 99"):
        shard_module.holdout(refs, 100, seed=0)

    first, second = tmp_path / "first", tmp_path / "second"
    cmd = ["digits", "--shard-size", "64", "--workers", "1"]  # the CLI's main, in this process
    assert shard_module.main([*cmd, "--out", str(first)]) == 0
    minival = json.loads((first / "minival.json").read_text())
    assert minival["holdout"] == 180 and minival["holdout_of"] == "train"
    (first / minival["shards"][1]["name"]).unlink()  # an interrupted writer: one shard missing
    (first / "minival.json").unlink()
    assert shard_module.main([*cmd, "--out", str(first)]) == 0
    assert shard_module.main([*cmd, "--out", str(second)]) == 0
    for split in ("train", "minival", "val"):
        assert json.loads((first / f"{split}.json").read_text()) == json.loads((second / f"{split}.json").read_text())
    _, held_samples = _all_samples(first, "minival")
    digits = load_digits()
    assert [sum(digits.target[int(k.split("_")[1])] == d for k in held_samples) for d in range(10)] == [18] * 10


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
                        "--shard-size", "4", "--workers", "2", "--holdout", "3"], check=True, capture_output=True)
    for split, n in (("train", 12), ("minival", 3), ("val", 15)):
        a, samples_a = _all_samples(tmp_path / "a", split)
        b, samples_b = _all_samples(tmp_path / "b", split)
        assert a["shards"] == b["shards"] and a["classes"] == b["classes"] and a["num_samples"] == n
        assert samples_a == samples_b
    assert sorted(v["cls"] for v in _all_samples(tmp_path / "a", "minival")[1].values()) == [b"0", b"1", b"2"]
    # the JPEG bytes are the original files, and labels index the sorted class list
    samples = {**_all_samples(tmp_path / "a", "train")[1], **_all_samples(tmp_path / "a", "minival")[1]}
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


def test_a_holdout_larger_than_the_train_split_is_one_sentence(tmp_path, capsys):
    _imagenet_tree(tmp_path / "small", per_class=2)
    with pytest.raises(SystemExit) as exit_info:
        shard_module.main(["imagenet", "--src", str(tmp_path / "small"), "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().endswith(
        "--holdout must be between 0 and 5 (the train split has 6 samples), got 10000.")
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())  # refused before writing


def test_hard_digits_are_the_same_bytes_on_a_second_run_and_really_distorted(tmp_path):
    """`digits-hard`: manifests and shard files identical across two runs (and worker counts); the images
    are the digits' split and labels, but no longer the plain upsampled digits."""
    for run, workers in (("a", "1"), ("b", "2")):
        assert shard_module.main(["digits-hard", "--out", str(tmp_path / run), "--workers", workers]) == 0
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir()) and "minival.json" in names
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    _, plain = digits_samples(0)
    _, hard = digits_samples(0, hard=True)
    assert [(r.key, r.label) for r in hard["val"]] == [(r.key, r.label) for r in plain["val"]]
    first_plain = np.asarray(Image.open(io.BytesIO(plain["val"][0].data)), dtype=np.float64)
    first_hard = np.asarray(Image.open(io.BytesIO(hard["val"][0].data)), dtype=np.float64)
    assert first_hard.shape == first_plain.shape == (32, 32, 3)
    assert np.abs(first_hard - first_plain).mean() > 40  # colour, clutter, warps: far from the plain image
    assert len({r.data for r in hard["train"]}) == len(hard["train"])
