"""The Ray Serve application on 127.0.0.1, for real: answers equal direct calls of the model under the mask they
report, bad input gets one clear answer while the server keeps serving, a killed replica is replaced, and under a
burst the deadline policy runs shallower masks and meets more deadlines than the fixed super-net; the shipped
``cluster/ray/serve.yaml`` runs with ``serve run`` (in this file, so that its Ray start-up never overlaps the burst
test on another pytest worker)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
import yaml

from adn.checkpoint import load_trained
from cluster.state import wait_until
from pipeline.data.loader import decode_image
from pipeline.data.transforms import Normalize, val_transform
from pipeline.distributed import free_port
from serving import loadgen
from serving.__main__ import main as serving_main

from ..conftest import ROOT, train_env
from ..daemons import listening_on
from .conftest import FRONT, Server, encoded_images, make_checkpoint, start_server, stop_server

pytestmark = pytest.mark.slow


def direct_top5(model: torch.nn.Module, data: dict, body: bytes, mask: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-5 probabilities and classes of a direct ``model(x, skip=mask)`` call on one encoded image, with the
    loader's validation transforms."""
    x = Normalize(data, train=False)(val_transform(data)(decode_image(body)).unsqueeze(0))
    with torch.inference_mode():
        return torch.softmax(model(x, skip=mask), dim=1)[0].topk(5)


def test_every_answer_equals_a_direct_call_under_the_mask_it_reports(server: Server, checkpoint: Path) -> None:
    model, meta = load_trained(checkpoint)
    data = meta["recipe"]["data"]
    table = server.model()["latency_model"]["ms_per_batch"]
    # Rounds of 8 requests at once (they share batches): a loose deadline runs the super-net; deadlines that fit
    # a batch of each shallower mask but not of the super-net make the policy pick shallower ones.
    deadlines = [2000.0] + [12 + 1.15 * table[mask]["4"] for mask in ("TTTT", "TTFF", "TFFF")]
    checked, masks, sizes = 0, set(), set()
    for round_, deadline in enumerate(deadlines * 2):
        bodies = encoded_images(8, seed=round_)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda body, d=deadline: server.post(body, d), bodies))
        for body, answer in zip(bodies, answers, strict=True):
            assert answer.status_code in (200, 503), answer.text
            if answer.status_code == 503:
                assert answer.json()["reason"] == "deadline unreachable"
                continue
            got = answer.json()
            values, indices = direct_top5(model, data, body, got["mask"])
            assert [c["class"] for c in got["top5"]] == indices.tolist()
            assert [c["name"] for c in got["top5"]] == [meta["classes"][i] for i in indices.tolist()]
            np.testing.assert_allclose([c["prob"] for c in got["top5"]], values.numpy(), atol=1e-5)
            checked += 1
            masks.add(got["mask"])
            sizes.add(got["batch_size"])
        if len(masks) >= 3 and len(sizes) >= 2 and checked >= 24:
            break
    assert len(masks) >= 2 and len(sizes) >= 2, (masks, sizes, checked)


def test_the_model_endpoint_shows_the_front_the_latency_model_and_the_policy(server: Server) -> None:
    info = server.model()
    assert info["model"] == "resnet50" and len(info["classes"]) == 10 and info["target"] == "cpu"
    assert [p["mask"] for p in info["front"]] == ["TTTT", "TTFF", "TFFF", "FFFF"]
    table = info["latency_model"]["ms_per_batch"]
    assert set(table) == {"TTTT", "TTFF", "TFFF", "FFFF"} and set(table["FFFF"]) == {"1", "2", "4"}
    assert table["TTTT"]["1"] < table["FFFF"]["1"] and table["FFFF"]["1"] < table["FFFF"]["4"]
    assert info["policy"]["name"] == "deadline" and info["policy"]["max_batch"] == 4


def test_bad_input_gets_one_clear_answer_and_the_server_keeps_serving(server: Server) -> None:
    good = encoded_images(1)[0]
    cases = [(b"this is not an image", None, 400, "not a JPEG or PNG"),
             (b"", None, 400, "empty"),
             (b"\xff\xd8" + bytes(300_000), None, 413, "more than this server takes"),
             (good, "-5", 400, "positive number"),
             (good, "soon", 400, "number of milliseconds")]
    for body, deadline, status, words in cases:
        answer = server.post(body, deadline)
        assert answer.status_code == status and words in answer.json()["error"], answer.text
        assert server.post(good).status_code == 200


@pytest.mark.parametrize("case", ["no checkpoint", "other model", "other target", "no such registered model",
                                  "unknown mask", "metrics port of a cluster", "negative speed tolerance",
                                  "ingress of a cluster"])
def test_bad_start_is_one_sentence_and_exit_2(case: str, checkpoint: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "pareto.json"
    front = json.loads((checkpoint / "pareto-cpu" / "pareto.json").read_text())
    other.write_text(json.dumps({**front, "model": "resnet_mini"}))
    args = {"no checkpoint": ["--checkpoint", str(tmp_path / "nothing")],
            "other model": ["--checkpoint", str(checkpoint), "--pareto", str(other)],
            "other target": ["--checkpoint", str(checkpoint), "--target", "a100"],
            "no such registered model": ["--model-uri", "models:/adn-nothing/1",
                                         "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"],
            "unknown mask": ["--checkpoint", str(checkpoint), "--policy", "fixed", "--mask", "TXFF"],
            "metrics port of a cluster": ["--checkpoint", str(checkpoint), "--ray-address", "127.0.0.1:6379",
                                          "--metrics-port", "9100"],
            "negative speed tolerance": ["--checkpoint", str(checkpoint), "--speed-tolerance", "-0.1"],
            "ingress of a cluster": ["--checkpoint", str(checkpoint), "--ray-address", "127.0.0.1:6379",
                                     "--ingress", "haproxy"]}[case]
    assert serving_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert {"no checkpoint": "no trained weights", "other model": "searched for resnet_mini",
            "other target": "target 'cpu'", "no such registered model": "adn-nothing",
            "unknown mask": "TXFF", "metrics port of a cluster": "applies to a local Ray",
            "negative speed tolerance": "--speed-tolerance must be a positive number",
            "ingress of a cluster": "--ingress applies to a local Ray"}[case] in err


def test_a_replica_killed_with_sigkill_is_replaced(server: Server) -> None:
    body = encoded_images(1)[0]
    pid = server.model()["pid"]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if server.post(body, timeout=5).status_code == 200 and server.model()["pid"] != pid:
                break
        except Exception:  # noqa: BLE001 - the proxy may refuse or time out while the replica restarts
            pass
        time.sleep(0.5)
    else:
        raise AssertionError(f"no new replica answered within 90 s:\n{server.log.read_text()[-2000:]}")
    assert all(server.post(body).status_code == 200 for _ in range(5))


def test_prometheus_metrics_count_requests_per_mask_and_outcome(server: Server) -> None:
    for body in encoded_images(3, seed=7):
        assert server.post(body, 2000).status_code == 200
    def printed() -> re.Match[str] | None:
        return re.search(r"Prometheus metrics .*: (http://127\.0\.0\.1:(\d+)/metrics)", server.log.read_text())

    wait_until(lambda: printed() is not None, 30, interval_s=0.5)  # printed once serve.run returns
    found = printed()
    assert found and int(found.group(2)) == server.metrics_port, server.log.read_text()[-2000:]
    deadline = time.monotonic() + 90  # Ray's metrics agent exports every few seconds, what it has by then
    while True:
        text = requests.get(found.group(1), timeout=10).text
        served = sum(float(v) for v in re.findall(r'^\w*adn_requests\w*\{[^}]*mask="[TF]{4}"[^}]*\} (\S+)$', text,
                                                  re.M))
        met = sum(float(v) for v in re.findall(r'^\w*adn_deadlines\w*\{[^}]*outcome="met"[^}]*\} (\S+)$', text,
                                               re.M))
        if served >= 3 and met >= 3 and "adn_batch_size" in text and "adn_queue_ms" in text:
            break
        assert time.monotonic() < deadline, f"the 3 requests are not all in the metrics within 90 s:\n{text[-3000:]}"
        time.sleep(2)


def depth(mask: str) -> float:
    """The share of stages run in full (F: kept, T: skipped)."""
    return mask.count("F") / len(mask)


def test_under_a_burst_the_deadline_policy_runs_shallower_and_meets_more_deadlines(
        server: Server, checkpoint: Path) -> None:
    rng = np.random.default_rng(0)
    quiet, burst = 2.0, 4.0
    arrivals = loadgen.phases([(3.0, quiet), (42.0, burst)], rng)  # here the super-net serves ~30 an s, TTTT ~50
    bodies, labels = encoded_images(32, seed=2), [0] * 32
    fixed_server = start_server(checkpoint, "--policy", "fixed", "--mask", "FFFF", "--max-batch", "4",
                                "--batch-wait-ms", "10", state=checkpoint / "fixed")
    urls = {"adaptive": f"{server.url}/v1/classify", "fixed": f"{fixed_server.url}/v1/classify"}
    runs: dict[str, list[list[loadgen.Answer]]] = {"adaptive": [], "fixed": []}
    try:
        # Paired in time (adaptive, fixed, fixed, adaptive): CPU that another process takes for a while falls on
        # both policies alike.
        for name in ("adaptive", "fixed", "fixed", "adaptive"):
            runs[name].append(loadgen.replay(urls[name], arrivals, bodies, labels, deadline_ms=600, timeout_s=20))
    finally:
        stop_server(fixed_server)
    adaptive = [a for run in runs["adaptive"] for a in run]
    before = [depth(a.mask) for a in adaptive if a.status == 200 and a.at_s < quiet]
    during = [depth(a.mask) for a in adaptive if a.status == 200 and a.at_s >= quiet + 0.5]
    assert before and during
    assert all(0 <= a.send_late_ms <= a.latency_ms for a in adaptive)  # the client's own delay is part of latency
    assert np.mean(during) < np.mean(before), (np.mean(before), np.mean(during))
    got = loadgen.summarize(adaptive)
    base = loadgen.summarize([a for run in runs["fixed"] for a in run])
    assert got["attainment"] > base["attainment"], (got, base)


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


def test_the_haproxy_ingress_answers_as_a_direct_call_on_127_0_0_1_and_leaves_no_process(checkpoint: Path) -> None:
    model, meta = load_trained(checkpoint)
    data = meta["recipe"]["data"]
    served = start_server(checkpoint, "--ingress", "haproxy", "--policy", "fixed", "--mask", "TTFF", "--slo-ms",
                          "5000", state=checkpoint / "haproxy")
    try:
        assert listening_on(int(served.url.rsplit(":", 1)[1])) == ["0100007F"]  # 127.0.0.1 only
        assert requests.get(f"{served.url}/-/healthz", timeout=10).status_code == 200
        for body in encoded_images(3, seed=7):
            answer = served.post(body)
            assert answer.status_code == 200, answer.text
            got = answer.json()
            values, indices = direct_top5(model, data, body, "TTFF")
            assert got["mask"] == "TTFF" and [c["class"] for c in got["top5"]] == indices.tolist()
            np.testing.assert_allclose([c["prob"] for c in got["top5"]], values.numpy(), atol=1e-5)
    finally:
        stop_server(served)
    wait_until(lambda: not in_session(served.pid), 30, interval_s=0.5)  # HAProxy and Ray go down after the driver
    assert not in_session(served.pid)


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
