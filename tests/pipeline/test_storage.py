"""Shards over the network: http(s) through WebDataset's curl, pipe: commands, retries, and clear errors."""

from __future__ import annotations

import http.server
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.data import DataError, make_loader
from pipeline.data.storage import Location, ShardReadError, parse_location, shard_samples

from ..conftest import FAST, train_env
from ..daemons import free_port, http_server, require, s3_server, stop, wait_for

STEPS = ["--model", "resnet_mini", "--epochs", "1", "--max-steps", "3", "--batch-size", "16", "--workers", "1",
         "--no-tracking"]


def _keys_and_pixels(location: str | Path, split: str, workers: int = 2) -> tuple[list[str], torch.Tensor]:
    loader = make_loader(location, split, 32, "resnet_mini", rank=0, world_size=1, num_workers=workers)
    loader.set_epoch(0)  # the same augmentation streams for every location
    batches = list(loader)
    return [k for b in batches for k in b.keys], torch.cat([b.images for b in batches])


def test_location_kinds() -> None:
    assert parse_location("/data/shards") == Location("local", "/data/shards")
    assert parse_location("https://host/prefix/").url("train-000001.tar") == "https://host/prefix/train-000001.tar"
    assert Location("s3", "s3://bucket/imagenet").url("val.json") == "s3://bucket/imagenet/val.json"
    assert parse_location("pipe:gsutil cat gs://b/x/{}").url("a b.tar") == "pipe:gsutil cat gs://b/x/'a b.tar'"
    with pytest.raises(DataError, match="no '\\{\\}'"):
        parse_location("pipe:cat /data/shards")
    with pytest.raises(DataError, match="unsupported scheme 'ftp'"):
        parse_location("ftp://host/shards")


def test_http_and_pipe_stream_the_same_samples_as_the_directory(digits: Path) -> None:
    require("curl")
    local = {split: _keys_and_pixels(digits, split) for split in ("val", "train")}
    with http_server(digits) as url:
        for location in (url, f"pipe:cat {digits}/{{}}"):
            for split, (keys, pixels) in local.items():
                got_keys, got_pixels = _keys_and_pixels(location, split)
                assert got_keys == keys, (location, split)
                assert torch.equal(got_pixels, pixels)


@pytest.mark.slow
def test_shards_uploaded_with_the_aws_cli_stream_from_an_s3_server(digits: Path, monkeypatch) -> None:
    """The README's upload commands against moto's S3 server, then s3:// reads what the directory holds."""
    local = {split: _keys_and_pixels(digits, split) for split in ("val", "train")}
    with s3_server() as env:
        run = partial(subprocess.run, env=env, check=True, capture_output=True, timeout=120)
        run(["aws", "s3", "mb", "s3://adn-shards"])
        run(["aws", "s3", "cp", "--recursive", "--only-show-errors", "--exclude", "*.json", "--exclude", ".*",
             str(digits), "s3://adn-shards/digits/"])
        run(["aws", "s3", "cp", "--recursive", "--only-show-errors", "--exclude", "*", "--include", "*.json",
             str(digits), "s3://adn-shards/digits/"])
        for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
            monkeypatch.setenv(key, env[key])
        for split, (keys, pixels) in local.items():
            got_keys, got_pixels = _keys_and_pixels("s3://adn-shards/digits", split)
            assert got_keys == keys and torch.equal(got_pixels, pixels), split
        with pytest.raises(DataError, match="no manifest s3://adn-shards/other/val.json .*NoSuchKey"):
            make_loader("s3://adn-shards/other", "val", 32, "resnet_mini")


@pytest.mark.slow
def test_training_from_http_shards_ends_with_the_same_weights(digits: Path, tmp_path: Path) -> None:
    """Check 3: `python -m http.server --bind 127.0.0.1` serving the shards, against the same seeded local run."""
    require("curl")
    runs = {}
    with http_server(digits) as url:
        for name, data in (("local", str(digits)), ("http", url)):
            runs[name] = tmp_path / name
            done = subprocess.run([sys.executable, "-m", "pipeline.train", *STEPS, "--data", data, "--output",
                                   str(runs[name])], env=train_env(), capture_output=True, text=True, timeout=900)
            assert done.returncode == 0, done.stderr[-3000:]
    a, b = load_file(runs["local"] / "weights.safetensors"), load_file(runs["http"] / "weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_verify_streams_every_shard_and_names_the_ones_that_differ(digits: Path, tmp_path: Path) -> None:
    """Nothing checked a shard's sha256: a shard changed in place (same size) streamed and trained silently."""
    require("curl")
    from pipeline.data.verify import main as verify_main

    assert verify_main([str(digits)]) == 0
    copy = tmp_path / "copy"
    shutil.copytree(digits, copy)
    shard = sorted(copy.glob("val-*.tar"))[0]
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF  # one byte inside the first member: same size, so reading the manifest notices nothing
    shard.write_bytes(bytes(data))
    with http_server(copy) as url:
        done = subprocess.run([sys.executable, "-m", "pipeline.data.verify", url, "--split", "val", "--split",
                               "train"], capture_output=True, text=True, timeout=120, env=train_env())
    assert done.returncode == 1, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: 1 of {len(list(copy.glob('[tv]*.tar')))} shards differ from their manifests: "
                           f"{url}/{shard.name}: sha256 ")
    assert last.endswith("..., the val manifest says " + json.loads((copy / "val.json").read_text())["shards"][0][
        "sha256"][:12] + "....")


@pytest.mark.slow
def test_a_shard_that_answers_404_is_one_error_naming_it(digits: Path, tmp_path: Path) -> None:
    require("curl")
    served = tmp_path / "served"
    shutil.copytree(digits, served)
    (served / "val-000000.tar").unlink()  # listed in val.json, gone from the server
    with http_server(served) as url:
        done = subprocess.run([sys.executable, "-m", "pipeline.train", *STEPS, "--data", url, "--output",
                               str(tmp_path / "run")], env=train_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: shard {url}/val-000000.tar could not be read (4 attempts"), last
    assert "HTTP error such as 404" in last


class _Flaky(http.server.SimpleHTTPRequestHandler):
    """Serves files, but the first request of each shard is cut off after 3 KB, as a dropped connection."""

    cut: set[str] = set()
    lock = threading.Lock()

    def copyfile(self, source, outputfile) -> None:  # noqa: ANN001 - the base class's signature
        with self.lock:
            first = self.path.endswith(".tar") and self.path not in self.cut
            self.cut.add(self.path)
        if first:
            outputfile.write(source.read(3072))
            outputfile.flush()
            self.close_connection = True
            return
        super().copyfile(source, outputfile)

    def log_message(self, *args) -> None:  # noqa: ANN002
        pass


@pytest.fixture
def flaky_server(digits: Path) -> Iterator[str]:
    _Flaky.cut = set()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_Flaky, directory=str(digits)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_a_connection_dropped_mid_shard_is_retried_without_losing_or_repeating_samples(
        digits: Path, flaky_server: str, caplog: pytest.LogCaptureFixture) -> None:
    require("curl")
    keys, pixels = _keys_and_pixels(digits, "val", workers=0)
    got_keys, got_pixels = _keys_and_pixels(flaky_server, "val", workers=0)
    assert got_keys == keys and torch.equal(got_pixels, pixels)
    assert "retrying" in caplog.text and "curl exited with status 18" in caplog.text  # the transfer ended early


def test_a_shard_that_keeps_failing_names_its_url(tmp_path: Path) -> None:
    def never(_: Exception) -> bool:
        raise AssertionError("no member was read")

    with pytest.raises(ShardReadError, match=r"shard false /x.tar could not be read \(3 attempts, last: false exited"):
        list(shard_samples("pipe:false /x.tar", never, retries=2, backoff_s=0.01))


@pytest.mark.slow
def test_a_stalled_server_ends_training_with_a_checkpoint_and_sigterm_stops_the_wait(digits: Path,
                                                                                     tmp_path: Path) -> None:
    """A SIGSTOPped http.server (alive, silent) hung training for ever and SIGTERM did nothing: a stalled
    transfer now fails its attempt after ADN_SHARD_STALL_S, the retries follow, and the run ends with one
    sentence and a complete checkpoint; a stop signal during the wait stops the run at once, with a checkpoint."""
    require("curl")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port), "--directory",
                               str(digits)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: subprocess.run(["curl", "-sf", f"http://127.0.0.1:{port}/train.json"],
                                        capture_output=True).returncode == 0, 20, "http.server")

        def stalled_run(name: str, stall_s: int) -> tuple[subprocess.Popen, Path]:
            out = tmp_path / name
            proc = subprocess.Popen([sys.executable, "-m", "pipeline.train", *FAST, "--data",
                                     f"http://127.0.0.1:{port}", "--output", str(out), "--save-every-steps", "2",
                                     "--no-tracking"], env=train_env(ADN_SHARD_STALL_S=str(stall_s)),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            wait_for(lambda: (out / "checkpoints" / "latest").exists() or proc.poll() is not None, 300, "a checkpoint")
            server.send_signal(signal.SIGSTOP)
            return proc, out

        proc, out = stalled_run("failed", 1)
        began = time.monotonic()
        _, err = proc.communicate(timeout=300)
        server.send_signal(signal.SIGCONT)
        # 4 attempts of 1 s without a byte and 1 + 2 + 4 s of backoff, once the buffered batches are used up.
        assert proc.returncode == 2 and time.monotonic() - began < 120, err[-3000:]
        line = err.strip().splitlines()[-1]
        tag = (out / "checkpoints" / "latest").read_text().strip()
        assert line.startswith(f"error: shard http://127.0.0.1:{port}/train-") and "(4 attempts, last: curl exited " \
            "with status 28: the transfer stalled or timed out)" in line, line
        assert line.endswith(f"Checkpoint {tag} is complete: resume with --resume once the storage answers."), line

        proc, out = stalled_run("stopped", 600)
        steps = out / "checkpoints"
        seen, quiet_since = set(), time.monotonic()
        while time.monotonic() - quiet_since < 3:  # no new checkpoint for 3 s: it waits on the stalled server
            now = {p.name for p in steps.glob("step*")}
            if now - seen:
                seen, quiet_since = now, time.monotonic()
            assert proc.poll() is None
            time.sleep(0.2)
        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 128 + signal.SIGTERM and time.monotonic() - began < 15, err[-3000:]
        tag = (steps / "latest").read_text().strip()
        assert f"stopped by SIGTERM at step {int(tag.removeprefix('step'))}; checkpoint {tag} is complete" in err
    finally:
        server.send_signal(signal.SIGCONT)
        stop(server)
