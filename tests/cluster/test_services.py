"""The team's services with real daemons: `make mlflow-server` (PostgreSQL + MLflow), `make ray-head` /
`make ray-worker` in two network namespaces, and the MLflow UI in headless Chromium.

Every service is started by its make target and stopped by its stop target, which stops the recorded
process group by PID; the tests check that nothing of it is left.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.state import group_members, read_record

from ..conftest import ROOT, train_env
from ..daemons import free_port, require, stop, wait_for

pytestmark = pytest.mark.slow  # trainings, searches or daemons in every test

MAKE = shutil.which("make") or "make"
TRAIN = ["--model", "resnet_mini", "--epochs", "1", "--batch-size", "16", "--workers", "1", "--log-every", "1"]


def _make(target: str, *variables: str, state: Path, env: dict[str, str] | None = None, netns: str | None = None,
          timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [MAKE, "-s", "-C", str(ROOT), target, *variables]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    return subprocess.run(cmd, env={**(env or train_env()), "CLUSTER_STATE": str(state)}, capture_output=True,
                          text=True, timeout=timeout)


def _last_line(done: subprocess.CompletedProcess) -> str:
    """The tool's own last line (make adds its `make: *** ... Error 2` after it)."""
    lines = [line for line in done.stderr.strip().splitlines() if not line.startswith("make")]
    return lines[-1] if lines else ""


def _require_postgres() -> None:
    if not glob.glob("/usr/lib/postgresql/*/bin/initdb") and shutil.which("initdb") is None:
        pytest.skip("PostgreSQL is not installed (make system-deps installs it as root)")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        pytest.skip("runuser is missing: PostgreSQL cannot run as root")


@pytest.fixture(scope="module")
def server() -> Iterator[dict]:
    """`make mlflow-server` on a free port with its own state: a local PostgreSQL cluster and the server."""
    _require_postgres()
    state = Path(tempfile.mkdtemp(prefix="adn-services-"))  # PostgreSQL runs as `postgres`: it must enter it
    state.chmod(0o711)
    port = free_port()
    done = _make("mlflow-server", f"MLFLOW_PORT={port}", state=state, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"export MLFLOW_TRACKING_URI=http://127.0.0.1:{port}" in done.stdout
    record = read_record(state / "mlflow" / "server.json")
    try:
        yield {"uri": f"http://127.0.0.1:{port}", "port": port, "state": state}
    finally:
        record = read_record(state / "mlflow" / "server.json") or record
        done = _make("mlflow-server-stop", state=state)
        assert done.returncode == 0 and "stopped the MLflow server" in done.stdout, done.stdout + done.stderr
        assert not group_members(record["pid"])
        assert not (state / "postgres" / "data" / "postmaster.pid").exists()
        shutil.rmtree(state, ignore_errors=True)


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _postgres_rows(state: Path, sql: str, *params: object) -> list[tuple]:
    import psycopg2

    pg = json.loads((state / "postgres.json").read_text())
    conn = psycopg2.connect(host="127.0.0.1", port=pg["port"], user="mlflow", password=pg["password"], dbname="mlflow",
                            connect_timeout=10)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall()
    finally:
        conn.close()


def _train(digits: Path, out: Path, uri: str, steps: int, **popen: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.train", *TRAIN, "--max-steps", str(steps), "--data",
                             str(digits), "--output", str(out), "--tracking-uri", uri], env=train_env(),
                            cwd=out.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **popen)


@pytest.fixture(scope="module")
def trained(server: dict, digits: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two nodes (`make train-cluster LAUNCHER=local NODES=2`) tracked to the server: rank 0 alone logs."""
    out = tmp_path_factory.mktemp("tracked") / "run"
    done = subprocess.run([MAKE, "-s", "-C", str(ROOT), "train-cluster", "MODEL=resnet_mini", "LAUNCHER=local",
                           "NODES=2", f"DATA={digits}", "ARGS=" + " ".join([*TRAIN[2:], "--max-steps", "6",
                                                                            "--output", str(out), "--tracking-uri",
                                                                            server["uri"]])],
                          env=train_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_id = json.loads((out / "run.json").read_text())["mlflow_run_id"]
    return {"out": out, "run_id": run_id, "stdout": (out / "logs" / "node0.log").read_text()}


@pytest.fixture(scope="module")
def searched(server: dict, trained: dict, digits: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`search.pareto --mlflow-run ID --tracking-uri http://...`: weights downloaded through the server."""
    out = tmp_path_factory.mktemp("searched") / "p"
    done = subprocess.run([sys.executable, "-m", "search.pareto", "--target", "a100", "--mlflow-run", trained["run_id"],
                           "--tracking-uri", server["uri"], "--data", str(digits), "--max-samples", "100",
                           "--out", str(out)], env={**train_env(), "ADN_LUT_DIR": str(out.parent / "luts")},
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "pareto.json").read_text())
    view = re.search(r"chart of top-1 against latency: (\S+)", done.stdout).group(1)
    return {"report": report, "view": view, "stdout": done.stdout}


def test_training_and_search_log_to_the_postgres_backed_server(server: dict, trained: dict, searched: dict) -> None:
    """Check 1: params, per-step metrics and weights reach the server; the rows are in PostgreSQL and the weights
    in the server's artifact destination; the search downloads them through the server and logs beside them."""
    client, run_id = _client(server["uri"]), trained["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "resnet_mini-adn-2x1"
    assert run.data.params["model"] == "resnet_mini" and run.data.params["world_size"] == "2"
    assert run.data.params["nodes"] == "2"
    assert len(client.search_runs([run.info.experiment_id], "tags.`adn.mode` = 'adn'")) == 1  # rank 0's only
    assert [m.step for m in client.get_metric_history(run_id, "loss_ce")] == list(range(1, 7))
    rows = _postgres_rows(server["state"], "SELECT step FROM metrics WHERE run_uuid = %s AND key = 'loss_ce' "
                          "ORDER BY step", run_id)
    assert [r[0] for r in rows] == list(range(1, 7))
    assert _postgres_rows(server["state"], "SELECT value FROM params WHERE run_uuid = %s AND key = 'model'",
                          run_id) == [("resnet_mini",)]
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    stored = (server["state"] / "mlflow" / "artifacts" / run.info.experiment_id / run_id / "artifacts" /
              "weights.safetensors")
    assert stored.read_bytes() == (trained["out"] / "weights.safetensors").read_bytes()
    assert f"/#/experiments/{run.info.experiment_id}/runs/{run_id}?workflowType=machine_learning" in trained["stdout"]

    report = searched["report"]
    assert Path(report["weights"]).read_bytes() == stored.read_bytes()
    assert not Path(report["weights"]).is_relative_to(trained["out"])
    parent = client.get_run(report["mlflow_parent"])
    assert parent.info.experiment_id == run.info.experiment_id  # beside the run it searched
    assert parent.info.run_name == "resnet_mini-pareto-a100-stages"
    assert parent.data.tags["adn.training_run"] == run_id
    children = client.search_runs([run.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'", max_results=100)
    assert sorted(c.info.run_name for c in children) == sorted(c["mask"] for c in report["candidates"])
    assert len(children) == 16
    key = searched["view"].split("viewStateShareKey=")[1].split("&")[0]
    view = json.loads(experiment.tags[f"mlflow.sharedViewState.{key}"])
    (chart,) = view["compareRunCharts"]
    assert (chart["type"], chart["xaxis"]["key"], chart["yaxis"]["key"]) == ("SCATTER", "latency_ms", "acc1")
    assert view["searchFilter"] == f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    front = {c["mask"] for c in report["front"]}
    assert {c.info.run_name for c in children if c.data.metrics["on_front"] == 1.0} == front


def _chromium(url: str, tmp: Path, name: str) -> tuple[str, Path]:
    """The page as headless Chromium renders it: its visible text, and a screenshot."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--window-size=1600,1000", "--virtual-time-budget=30000"]
    shot = tmp / f"{name}.png"
    texts = []
    for extra in ([f"--screenshot={shot}"], ["--dump-dom"]):
        profile = tmp / f"profile-{name}-{len(texts)}"
        done = subprocess.run(["chromium", *flags, f"--user-data-dir={profile}", *extra, url], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        texts.append(done.stdout)
    html = re.sub(r"<script.*?</script>|<style.*?</style>", " ", texts[1], flags=re.S)
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))
    return text, shot


def test_the_mlflow_ui_opens_on_the_runs_table_and_shows_the_search(server: dict, trained: dict, searched: dict,
                                                                    tmp_path: Path) -> None:
    """Check 4: the links we print open the runs table (not the GenAI overview) with the training run and the
    search's parent run, and the search's chart view lists its child runs and plots top-1 against latency."""
    require("chromium")
    experiment = _client(server["uri"]).get_run(trained["run_id"]).info.experiment_id
    text, shot = _chromium(f"{server['uri']}/#/experiments/{experiment}?workflowType=machine_learning", tmp_path,
                           "runs")
    assert "Run Name" in text and "No data available" not in text
    assert "resnet_mini-adn-2x1" in text and "resnet_mini-pareto-a100-stages" in text
    assert shot.stat().st_size > 20_000

    text, shot = _chromium(searched["view"], tmp_path, "chart")
    assert "You're viewing a shared view" in text and "16 matching runs" in text
    assert "Pareto front on a100 (1)" in text  # the section holding the one scatter chart
    masks = {c["mask"] for c in searched["report"]["candidates"]}
    assert masks <= set(re.findall(r"\b[TF]{4}\b", text))
    assert shot.stat().st_size > 20_000


def test_a_server_outage_mid_training_loses_nothing(server: dict, digits: Path, tmp_path: Path) -> None:
    """Check 2: the server is killed (SIGKILL, its whole process group) while training logs every step and
    started again by its make target; training finishes, the log states the outage and what was dropped."""
    client = _client(server["uri"])
    out = tmp_path / "run"
    out.parent.mkdir(exist_ok=True)
    steps = 40
    proc = _train(digits, out, server["uri"], steps)
    try:
        wait_for(lambda: (out / "run.json").exists(), 300, "the MLflow run")
        run_id = json.loads((out / "run.json").read_text())["mlflow_run_id"]
        wait_for(lambda: len(client.get_metric_history(run_id, "loss_ce")) >= 2, 300, "the first metrics")
        pid = read_record(server["state"] / "mlflow" / "server.json")["pid"]
        os.killpg(pid, signal.SIGKILL)
        wait_for(lambda: not group_members(pid), 30, "the server's end")
        time.sleep(3)
        assert proc.poll() is None, "training ended before the outage"
        done = _make("mlflow-server", f"MLFLOW_PORT={server['port']}", state=server["state"], timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        _, stderr = proc.communicate(timeout=600)
    finally:
        stop(proc, group=True)
    assert proc.returncode == 0, stderr[-3000:]
    assert f"MLflow server at {server['uri']} unreachable" in stderr
    assert re.search(r"answered again after [\d.]+ s from step \d+; sent \d+ queued metric values late, "
                     r"nothing was dropped", stderr), stderr[-3000:]
    assert [m.step for m in client.get_metric_history(run_id, "loss_ce")] == list(range(1, steps + 1))
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    stored = server["state"] / "mlflow" / "artifacts" / run.info.experiment_id / run_id / "artifacts"
    assert (stored / "weights.safetensors").read_bytes() == (out / "weights.safetensors").read_bytes()


# -- check 3: a Ray head and a worker in two network namespaces ----------------------------------------

def _netns(name: str) -> None:
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)


def test_a_search_spreads_its_evaluation_over_a_two_node_ray_cluster(trained_checkpoint: Path, digits: Path,
                                                                     tmp_path: Path) -> None:
    """Check 3: `make ray-head` in one namespace, `make ray-worker HEAD=...` in another (Ray advertises the
    veth addresses; plain loopback would not be two hosts), the search joins with the head's token, and
    its report names the node of every evaluation worker: one per node, each streaming half of every
    pass. The stop targets leave nothing behind."""
    require("ip")
    tag = f"adr{os.getpid() % 100000}"
    names, ips = [f"{tag}h", f"{tag}w"], ["10.215.7.1", "10.215.7.2"]
    try:
        _netns(names[0])
    except (subprocess.CalledProcessError, FileNotFoundError):
        pytest.skip("cannot create network namespaces here (needs root and iproute2)")
    head_state, worker_state = tmp_path / "head", tmp_path / "worker"
    temp_dirs = [f"/tmp/{tag}-{k}" for k in ("h", "w")]  # Ray's socket paths must stay short
    pids: list[int] = []
    try:
        _netns(names[1])
        subprocess.run(["ip", "link", "add", f"{tag}0", "netns", names[0], "type", "veth", "peer", "name",
                        f"{tag}1", "netns", names[1]], check=True)
        for ns, end, ip in ((names[0], f"{tag}0", ips[0]), (names[1], f"{tag}1", ips[1])):
            subprocess.run(["ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", end], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", end, "up"], check=True)
        port = free_port()
        done = _make("ray-head", f"RAY_PORT={port}", "RAY_CPUS=1", f"RAY_TEMP_DIR={temp_dirs[0]}", state=head_state,
                     netns=names[0])
        assert done.returncode == 0, done.stdout + done.stderr
        pids.append(read_record(head_state / "ray" / "head.json")["pid"])
        assert f"Ray head at {ips[0]}:{port}" in done.stdout
        # Ray Serve on this cluster gets the HAProxy ingress (serving's fast path).
        assert b"RAY_SERVE_ENABLE_HA_PROXY=1" in Path(f"/proc/{pids[0]}/environ").read_bytes().split(b"\0")
        token = head_state / "ray" / "auth_token"
        assert token.stat().st_mode & 0o077 == 0  # owner-only

        env = {**train_env(), "RAY_AUTH_TOKEN_PATH": str(token)}  # the token copied to the worker's host
        done = _make("ray-worker", f"HEAD={ips[0]}:{port}", "RAY_CPUS=1", f"RAY_TEMP_DIR={temp_dirs[1]}",
                     state=worker_state, env=env, netns=names[1])
        assert done.returncode == 0, done.stdout + done.stderr
        pids.append(read_record(worker_state / "ray" / "worker.json")["pid"])
        assert f"Ray worker {ips[1]} joined the head at {ips[0]}:{port}" in done.stdout

        out = tmp_path / "p"
        done = subprocess.run(["ip", "netns", "exec", names[0], sys.executable, "-m", "search.pareto", "--target",
                               "a100", "--checkpoint", str(trained_checkpoint), "--data", str(digits),
                               "--max-samples", "100", "--ray-address", f"{ips[0]}:{port}", "--no-tracking",
                               "--out", str(out)],
                              env={**train_env(), "CLUSTER_STATE": str(head_state),
                                   "ADN_LUT_DIR": str(tmp_path / "luts")},
                              capture_output=True, text=True, timeout=1200)
        assert done.returncode == 0, done.stderr[-3000:]
        report = json.loads((out / "pareto.json").read_text())
        timing = report["timing"]  # one evaluation worker per node, each streaming half of every pass
        assert sorted(w["node"] for w in timing["eval_workers"]) == ips and timing["passes"] == 1
        assert [w["samples"] for w in timing["eval_workers"]] == [50, 50]
        assert [w["samples"] for w in timing["report_pass"]["eval_workers"]] == [50, 50]
        assert set(timing["trials_per_node"]) <= set(ips) and timing["masks"] == 16
        assert {c["node"] for c in report["candidates"]} <= set(ips)
        assert re.search(rf"samples per worker: ({ips[0]}|{ips[1]}) 50, ({ips[0]}|{ips[1]}) 50", done.stdout)

        for target, state in (("ray-worker-stop", worker_state), ("ray-head-stop", head_state)):
            done = _make(target, state=state)
            assert done.returncode == 0 and "stopped the Ray" in done.stdout, done.stdout + done.stderr
        for pid in pids:
            assert not group_members(pid)
    finally:
        for pid in pids:
            if group_members(pid):
                os.killpg(pid, signal.SIGKILL)
        for ns in names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        for d in temp_dirs:
            shutil.rmtree(d, ignore_errors=True)


# -- check 5: bad input is one sentence and a non-zero exit ------------------------------------------

def test_the_authenticated_server_starts_and_refuses_anonymous_requests(server: dict, tmp_path: Path) -> None:
    """`make mlflow-server MLFLOW_AUTH=1` on the running PostgreSQL: 401 without credentials, 200 for the admin,
    whose password and the app's session key are generated, kept and readable by their owner only."""
    import requests

    pg = json.loads((server["state"] / "postgres.json").read_text())
    db = f"postgresql://mlflow:{pg['password']}@127.0.0.1:{pg['port']}/mlflow"
    state, port = tmp_path / "auth", free_port()
    done = _make("mlflow-server", f"MLFLOW_PORT={port}", "MLFLOW_AUTH=1", f"MLFLOW_DB={db}", state=state, timeout=600)
    record = read_record(state / "mlflow" / "server.json")
    try:
        assert done.returncode == 0, done.stdout + done.stderr
        url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=1"
        assert requests.get(url, timeout=30).status_code == 401
        password = (state / "mlflow" / "admin_password").read_text()
        assert requests.get(url, auth=("admin", password), timeout=30).status_code == 200
        assert requests.get(url, auth=("admin", password + "x"), timeout=30).status_code == 401
        for name in ("admin_password", "flask_secret_key"):
            assert (state / "mlflow" / name).stat().st_mode & 0o777 == 0o600, name
    finally:
        stopped = _make("mlflow-server-stop", state=state)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        if record:
            assert not group_members(record["pid"])


def _closed_port() -> int:
    return free_port()  # nothing listens there


def test_mlflow_server_on_a_taken_port_is_one_sentence(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _make("mlflow-server", f"MLFLOW_PORT={port}", state=tmp_path, timeout=120)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert _last_line(done) == (f"error: port {port} on 127.0.0.1 is already taken by another program; stop it or "
                                "choose another port (make mlflow-server MLFLOW_PORT=...).")
    assert not (tmp_path / "postgres").exists()  # refused before any database was made


def test_mlflow_server_beyond_loopback_without_auth_needs_insecure(tmp_path: Path) -> None:
    done = _make("mlflow-server", f"MLFLOW_PORT={free_port()}", "MLFLOW_HOST=0.0.0.0", state=tmp_path, timeout=120)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert _last_line(done) == ("error: --host 0.0.0.0 opens the server to other hosts without authentication; add "
                                "--auth (make mlflow-server MLFLOW_AUTH=1), or --insecure (MLFLOW_INSECURE=1) on a "
                                "trusted network.")
    assert not (tmp_path / "postgres").exists()  # refused before any database was made


def test_mlflow_server_with_an_unreachable_database_is_one_sentence(tmp_path: Path) -> None:
    db_port = _closed_port()
    done = _make("mlflow-server", f"MLFLOW_PORT={free_port()}",
                 f"MLFLOW_DB=postgresql://mlflow:secret@127.0.0.1:{db_port}/mlflow", state=tmp_path, timeout=120)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    line = _last_line(done)
    assert line.startswith(f"error: the database postgresql+psycopg2://mlflow:***@127.0.0.1:{db_port}/mlflow is "
                           "unreachable (") and line.endswith("start it or fix MLFLOW_DB (unset it to run a local "
                                                              "PostgreSQL).")
    assert "secret" not in done.stdout + done.stderr


def test_ray_worker_without_a_head_is_one_sentence(tmp_path: Path) -> None:
    port = _closed_port()
    done = _make("ray-worker", f"HEAD=127.0.0.1:{port}", state=tmp_path, timeout=120)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert _last_line(done) == (f"error: no Ray head answers at 127.0.0.1:{port}; start one there (make ray-head) "
                                "or fix HEAD.")
    done = _make("ray-worker", state=tmp_path, timeout=120)
    assert _last_line(done) == "error: HEAD='' is not HOST:PORT (the address `make ray-head` printed)."


def test_search_with_no_ray_cluster_at_the_address_is_one_sentence(trained_checkpoint: Path, digits: Path,
                                                                   tmp_path: Path) -> None:
    port = _closed_port()
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "search.pareto", "--target", "a100", "--checkpoint",
                           str(trained_checkpoint), "--data", str(digits), "--ray-address", f"127.0.0.1:{port}",
                           "--no-tracking", "--out", str(tmp_path / "p")], env=train_env(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr and time.monotonic() - started < 60
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: no Ray cluster answers at 127.0.0.1:{port}; start one (make ray-head) or fix --ray-address.")
