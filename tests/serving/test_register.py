"""The ADN in the MLflow Model Registry: versions, links and fronts, and ``mlflow models serve`` answering with a
mask as the model does under it."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import requests
import torch

from adn.checkpoint import load_trained
from pipeline.data.loader import decode_image
from pipeline.data.transforms import Normalize, val_transform
from pipeline.distributed import free_port
from serving.model import locate
from serving.register import main as register_main

from ..conftest import ROOT, train_env
from .conftest import encoded_images, make_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    work = tmp_path_factory.mktemp("registry")
    checkpoint = make_checkpoint(work / "run", "resnet_mini")
    (checkpoint / "run.json").write_text(json.dumps({"mlflow_run_id": "0123abcd"}))
    uri = f"sqlite:///{work / 'mlflow.db'}"
    for _ in range(2):
        assert register_main(["--checkpoint", str(checkpoint), "--tracking-uri", uri]) == 0
    return checkpoint, uri


def test_each_call_registers_a_new_version_linked_to_its_training(registered: tuple[Path, str]) -> None:
    checkpoint, uri = registered
    client = mlflow.MlflowClient(uri)
    versions = sorted(int(v.version) for v in client.search_model_versions("name='adn-resnet_mini'"))
    assert versions == [1, 2]
    tags = client.get_model_version("adn-resnet_mini", "2").tags
    assert tags["adn.training_run"] == "0123abcd" and tags["adn.targets"] == "cpu"
    weights, front = locate(None, None, "models:/adn-resnet_mini/2", "cpu", uri)
    assert weights.read_bytes() == (checkpoint / "weights.safetensors").read_bytes()
    assert json.loads(front.read_text())["front"] == json.loads(
        (checkpoint / "pareto-cpu" / "pareto.json").read_text())["front"]


def test_mlflow_models_serve_answers_with_a_mask_as_the_model_does(registered: tuple[Path, str],
                                                                   tmp_path: Path) -> None:
    checkpoint, uri = registered
    port = free_port()
    log = tmp_path / "serve.log"
    bin_dir = str(Path(sys.executable).parent)  # mlflow runs uvicorn from PATH, as in an activated environment
    with open(log, "w") as f:
        proc = subprocess.Popen([os.path.join(bin_dir, "mlflow"), "models", "serve", "-m",
                                 "models:/adn-resnet_mini/1", "--env-manager", "local", "-h", "127.0.0.1",
                                 "-p", str(port), "--workers", "1"], cwd=ROOT,
                                env=train_env(MLFLOW_TRACKING_URI=uri, PATH=bin_dir + os.pathsep + os.environ["PATH"]),
                                stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.5)
        else:
            raise AssertionError(f"mlflow models serve did not answer within 120 s:\n{log.read_text()[-3000:]}")
        bodies = encoded_images(3, seed=5)
        payload = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(b).decode()] for b in bodies]},
                   "params": {"mask": "TTTT"}}
        answer = requests.post(f"http://127.0.0.1:{port}/invocations", json=payload, timeout=60)
        assert answer.status_code == 200, answer.text
        rows = answer.json()["predictions"]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    model, meta = load_trained(checkpoint)
    data = meta["recipe"]["data"]
    for body, row in zip(bodies, rows, strict=True):
        x = Normalize(data, train=False)(val_transform(data)(decode_image(body)).unsqueeze(0))
        with torch.inference_mode():
            values, indices = torch.softmax(model(x, skip="TTTT"), dim=1)[0].topk(5)
        assert row["mask"] == "TTTT" and row["classes"] == indices.tolist()
        np.testing.assert_allclose(row["probs"], values.numpy(), atol=1e-5)
