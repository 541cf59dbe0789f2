"""A served ADN made in the test (resnet_mini with seeded weights, the shipped recipe, a front of four masks) and
one real Ray Serve application on 127.0.0.1 started from it, shared by the serving tests of one file."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from pipeline.distributed import free_port

from ..conftest import ROOT, train_env

# A front as search.pareto writes it (the accuracies are the test's: the policy only reads their order).
FRONT = [("TTTT", 0.70, 1.0), ("TTFF", 0.80, 1.5), ("TFFF", 0.85, 1.8), ("FFFF", 0.90, 2.2)]


def make_checkpoint(out: Path, model_name: str = "resnet_mini", target: str = "cpu", seed: int = 0,
                    crop: int | None = None) -> Path:
    """``out/weights.safetensors`` (seeded weights, the shipped recipe with validation crop ``crop``, 10 classes)
    and ``out/pareto-cpu/``."""
    import torch

    from adn import create_model
    from adn.checkpoint import save_weights
    from pipeline.recipes import load_recipe

    torch.manual_seed(seed)
    model = create_model(model_name, num_classes=10).eval()
    with torch.no_grad():  # non-trivial norm statistics, so each mask's answers differ
        for name, buf in model.named_buffers():
            if name.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
            elif name.endswith("running_mean"):
                buf.uniform_(-0.2, 0.2)
    recipe = load_recipe(model_name)
    if crop:
        recipe["data"].update(val_resize=crop, val_crop=crop)
    save_weights(model, out / "weights.safetensors", model_name=model_name, classes=[f"digit {d}" for d in range(10)],
                 resolution=recipe["data"]["val_crop"], recipe=recipe)
    (out / f"pareto-{target}").mkdir(parents=True, exist_ok=True)
    front = [{"mask": m, "acc1": a, "latency_ms": ms} for m, a, ms in FRONT]
    (out / f"pareto-{target}" / "pareto.json").write_text(json.dumps(
        {"model": model_name, "target": target, "front": front, "candidates": front}))
    return out


def encoded_images(count: int, seed: int = 0) -> list[bytes]:
    """Random RGB images of several sizes, every other one JPEG, the others PNG."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        h, w = (int(v) for v in rng.integers(20, 90, size=2))
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(
            buffer, format="JPEG" if i % 2 else "PNG")
        out.append(buffer.getvalue())
    return out


@dataclass
class Server:
    url: str
    pid: int
    state: Path
    metrics_port: int | None = None

    @property
    def log(self) -> Path:
        return self.state / "serving.log"

    def post(self, body: bytes, deadline_ms: float | str | None = None, timeout: float = 30) -> requests.Response:
        headers = {"X-Deadline-Ms": str(deadline_ms)} if deadline_ms is not None else {}
        return requests.post(f"{self.url}/v1/classify", data=body, headers=headers, timeout=timeout)

    def model(self) -> dict:
        return requests.get(f"{self.url}/v1/model", timeout=30).json()


def start_server(checkpoint: Path, *flags: str, state: Path) -> Server:
    """``python -m cluster.serving start`` (what ``make serve`` runs) on a free port of 127.0.0.1: it returns once
    the application answers; ``stop_server`` stops it."""
    port = free_port()
    done = subprocess.run([sys.executable, "-m", "cluster.serving", "--state-dir", str(state), "start", "--port",
                           str(port), "--", "--checkpoint", str(checkpoint), *flags], cwd=ROOT,
                          env=train_env(RAY_DISABLE_USAGE_STATS="1"), capture_output=True, text=True, timeout=360)
    record = json.loads((state / "serving.json").read_text()) if (state / "serving.json").is_file() else {}
    metrics = flags[flags.index("--metrics-port") + 1] if "--metrics-port" in flags else None
    server = Server(f"http://127.0.0.1:{port}", record.get("pid", 0), state, int(metrics) if metrics else None)
    assert done.returncode == 0, done.stdout + done.stderr + (server.log.read_text()[-3000:] if record else "")
    return server


def stop_server(server: Server) -> None:
    """``python -m cluster.serving stop`` (``make serve-stop``); the process group must be gone after it."""
    done = subprocess.run([sys.executable, "-m", "cluster.serving", "--state-dir", str(server.state), "stop"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    alive = Path(f"/proc/{server.pid}").exists() and "serving" in Path(f"/proc/{server.pid}/cmdline").read_text()
    if alive:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
    assert done.returncode == 0 and f"stopped the ADN server (pid {server.pid})" in done.stdout, done.stdout
    assert not alive, f"the server {server.pid} outlived make serve-stop"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """resnet50 at 96 px: slow enough on a CPU (about 50 ms an image) that a burst overloads the model, not HTTP."""
    return make_checkpoint(tmp_path_factory.mktemp("served"), "resnet50", crop=96)


@pytest.fixture(scope="module")
def server(checkpoint: Path) -> Iterator[Server]:
    """The deadline policy, batches of up to 4 gathered for up to 10 ms (so concurrent requests share batches), its
    Prometheus metrics on a port of its own."""
    running = start_server(checkpoint, "--max-batch", "4", "--batch-wait-ms", "10", "--slo-ms", "2000",
                           "--max-body-bytes", "200000", "--metrics-port", str(free_port()),
                           state=checkpoint / "adaptive")
    yield running
    stop_server(running)
