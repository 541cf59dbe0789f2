"""The shipped Ray Serve config, for real: ``serve run cluster/ray/serve.yaml`` (its checkpoint, front and port
pointed at the test's) starts the application, which answers with a mask of the front; Ctrl-C stops it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from cluster.state import wait_until
from pipeline.distributed import free_port

from ..conftest import ROOT, train_env
from .conftest import FRONT, encoded_images, make_checkpoint

pytestmark = pytest.mark.slow


def in_session(sid: int) -> list[int]:
    """The live processes of session ``sid`` (``serve run`` and what it started: Ray's GCS, raylet, workers). Not
    ``cluster.state.group_members``: Ray's actors lead process groups of their own within the session."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid and fields[0] != "Z":
                found.append(int(stat.parent.name))
    return found


def test_serve_run_of_the_shipped_config_answers_with_a_front_mask(tmp_path: Path) -> None:
    checkpoint = make_checkpoint(tmp_path / "ckpt")
    config = yaml.safe_load((ROOT / "cluster" / "ray" / "serve.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    config["applications"][0]["args"].update(checkpoint=str(checkpoint), pareto=str(checkpoint / "pareto-cpu"),
                                             slo_ms=5000, latency_budget_s=5)
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    log = (tmp_path / "serve-run.log").open("w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "serve"), "run", str(path)], cwd=ROOT,
                            env=train_env(RAY_DISABLE_USAGE_STATS="1"), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        body, deadline, answer = encoded_images(1)[0], time.monotonic() + 240, None
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(requests.RequestException):
                answer = requests.post(f"http://127.0.0.1:{port}/v1/classify", data=body, timeout=10)
                if answer.status_code == 200:
                    break
            time.sleep(1)
        output = (tmp_path / "serve-run.log").read_text()[-3000:]
        assert answer is not None and answer.status_code == 200, output
        assert answer.json()["mask"] in {mask for mask, _, _ in FRONT} and len(answer.json()["top5"]) == 5
        assert requests.get(f"http://127.0.0.1:{port}/-/healthz", timeout=10).status_code == 200
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()
    wait_until(lambda: not in_session(proc.pid), 30, interval_s=0.5)  # Ray's own processes go down after the driver
    left = in_session(proc.pid)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"processes of serve run outlived its Ctrl-C: {left}"
