"""Checkpoints that resume safely: a completion marker, fallback past a damaged newest checkpoint, loading without
pickled code, and a full disk while saving."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.checkpoint import MARKER, CheckpointError, find_checkpoint, mark_complete, safe_load

from ..conftest import FAST as REFERENCE
from ..conftest import train

FAST = [*REFERENCE, "--no-tracking"]
MODEL_FILE = "mp_rank_00_model_states.pt"


def _fake(directory: Path, *tags: str, marked: bool = True) -> None:
    for tag in tags:
        (directory / tag).mkdir(parents=True)
        (directory / tag / MODEL_FILE).write_bytes(b"x" * 100)
        if marked:
            mark_complete(directory, tag, int(tag[4:]))


def test_the_newest_complete_checkpoint_is_chosen_and_the_skipped_ones_named(tmp_path: Path) -> None:
    ckpts = tmp_path / "run" / "checkpoints"
    _fake(ckpts, "step000000010", "step000000020", "step000000030")
    assert (ckpts / "latest").read_text() == "step000000030"
    assert find_checkpoint(tmp_path / "run").tag == "step000000030"

    (ckpts / "step000000030" / MODEL_FILE).write_bytes(b"x" * 60)  # truncated
    (ckpts / "step000000020" / MODEL_FILE).unlink()  # missing
    (ckpts / "latest").write_text("")  # emptied by a crash inside DeepSpeed's own write
    found = find_checkpoint(tmp_path / "run")
    assert (found.directory, found.tag) == (ckpts, "step000000010")
    assert found.describe() == (
        f"resuming from {ckpts / 'step000000010'}; skipped the newer step000000030 ({MODEL_FILE} is 60 bytes, "
        f"100 when it was saved); step000000020 ({MODEL_FILE} is missing)")

    _fake(ckpts, "step000000040", marked=False)  # killed before every rank had written
    assert find_checkpoint(ckpts).skipped[0] == ("step000000040", f"it has no {MARKER} (the save did not finish)")
    with pytest.raises(CheckpointError, match="step000000030' cannot be resumed: .* is 60 bytes"):
        find_checkpoint(ckpts / "step000000030")
    shutil.rmtree(ckpts / "step000000010")
    with pytest.raises(CheckpointError, match="no complete checkpoint in .*step000000040 .*step000000020"):
        find_checkpoint(tmp_path / "run")


def test_checkpoints_from_before_the_marker_resume_from_latest(tmp_path: Path) -> None:
    ckpts = tmp_path / "checkpoints"
    _fake(ckpts, "step000000010", "step000000020", marked=False)
    (ckpts / "latest").write_text("step000000010")
    assert find_checkpoint(tmp_path).tag == "step000000010"


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(first_epoch: Path, reference_run: Path,
                                                                  digits: Path, tmp_path: Path) -> None:
    """A truncated file in the newest checkpoint and an empty ``latest`` were a DeepSpeed traceback; now the
    run resumes from the one before, says so, and ends with the weights of a run never interrupted."""
    out = tmp_path / "run"
    shutil.copytree(first_epoch, out)
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step*")) == ["step000000030", "step000000039"]
    with open(ckpts / "step000000039" / MODEL_FILE, "r+b") as f:
        f.truncate(1000)
    (ckpts / "latest").write_text("")
    resumed = train(*FAST, "--data", str(digits), "--output", str(out), "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (f"resuming from {ckpts / 'step000000030'}; skipped the newer step000000039 ({MODEL_FILE} is 1000 "
            "bytes, ") in resumed.stderr
    expected = load_file(reference_run / "run" / "weights.safetensors")  # the run never interrupted
    got = load_file(out / "weights.safetensors")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


class _Payload:
    """What an attacker puts in a checkpoint: unpickling it runs a command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
def test_a_crafted_checkpoint_is_refused_and_runs_nothing(first_epoch: Path, digits: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(first_epoch, out)
    tag = out / "checkpoints" / "step000000039"
    state = safe_load(str(tag / MODEL_FILE))
    marker = tmp_path / "pwned"
    state["client_note"] = _Payload(marker)
    torch.save(state, tag / MODEL_FILE)
    mark_complete(out / "checkpoints", tag.name, 39)  # the marker cannot tell: it is rewritten to match
    done = train(*FAST, "--data", str(digits), "--output", str(out), "--resume", cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: refusing to load {tag / MODEL_FILE}: it holds a reference to posix.system, which a checkpoint of "
        "this training never does and which unpickling would run; it was altered or written by other code.")
    assert not marker.exists(), "the payload ran"
    # The same file, loaded as DeepSpeed would have loaded it: the payload runs (so the check above can fail).
    torch.load(tag / MODEL_FILE, weights_only=False)
    assert marker.exists()


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 9 MiB tmpfs: one resnet_mini checkpoint (5.5 MiB) fits, a second one does not."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=9m", "tmpfs", str(mnt)], capture_output=True,
                          text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


@pytest.mark.slow
def test_a_full_disk_while_saving_removes_the_partial_files_and_keeps_the_last_checkpoint(
        small_disk: Path, digits: Path, tmp_path: Path) -> None:
    out = small_disk / "run"
    done = train(*FAST, "--data", str(digits), "--output", str(out), "--save-every-steps", "10", "--max-steps", "20",
                  cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: [Errno 28] no space left on the device of {str(out / 'checkpoints')!r} while "
                           "writing checkpoint step000000020: it needs ")
    assert last.endswith("The partial files were removed; checkpoint step000000010 is intact: free space, "
                         "then --resume.")
    need = float(last.split("it needs ")[1].split(" MiB")[0])
    assert need == pytest.approx(sum(p.stat().st_size for p in (out / "checkpoints" / "step000000010").iterdir())
                                 / 2**20, abs=0.05)
    assert sorted(p.name for p in (out / "checkpoints").glob("step*")) == ["step000000010"]
    assert (out / "checkpoints" / "latest").read_text() == "step000000010"
    assert shutil.disk_usage(small_disk).free > 3 * 2**20, "the partial files are gone"
    # What it said was free is what the disk has (it said 0.0 MiB while the failed writer held the removed files).
    said = float(last.split(" MiB and ")[1].split(" MiB are free")[0])
    assert said == pytest.approx(shutil.disk_usage(small_disk).free / 2**20, abs=0.5), last
    # Space freed (the tmpfs grown): the run resumes from the intact checkpoint and finishes.
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    resumed = train(*FAST, "--data", str(digits), "--output", str(out), "--save-every-steps", "10",
                     "--max-steps", "20", "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["steps"] == 20


@pytest.mark.slow
def test_resume_after_a_kill_in_the_first_save_starts_from_scratch(digits: Path, tmp_path: Path) -> None:
    """SLURM's requeue adds --resume; a job killed in its first save had no way forward."""
    out = tmp_path / "run"
    partial = out / "checkpoints" / "step000000010"
    partial.mkdir(parents=True)
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"\0" * 100)  # what the kill left: no marker, no latest
    done = train(*FAST, "--data", str(digits), "--output", str(out), "--max-steps", "2", "--resume",
                 cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (f"{str(out / 'checkpoints')!r} holds only the partial files of an interrupted first save "
            "(step000000010): no checkpoint of this run was ever complete; starting from scratch.") in done.stderr
    assert (out / "weights.safetensors").is_file()
