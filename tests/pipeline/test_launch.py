"""`make train-cluster`: two nodes emulated on loopback, a real SLURM cluster, two hosts in network namespaces.

Every run is the real chain: make -> pipeline.launch -> the DeepSpeed launcher per node (--no_ssh)
-> pipeline.train ranks on gloo. Processes are stopped by PID (process groups the launcher made).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline.launch import _replace_option, node_command, read_hostfile

from ..conftest import ROOT, train_env
from ..daemons import free_port, require, slurm_cluster, stop, wait_for

MAKE = shutil.which("make") or "make"
# 6 steps of batch 16 per rank, one epoch's validation at the end: about 30 s for two nodes on 2 cores.
STEPS = ["--epochs", "1", "--max-steps", "6", "--batch-size", "16", "--workers", "1"]


def _make(*variables: str, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([MAKE, "-s", "-C", str(ROOT), "train-cluster", "MODEL=resnet_mini", *variables],
                          env=env or train_env(), capture_output=True, text=True, timeout=timeout)


def _args(*args: str) -> str:
    return "ARGS=" + " ".join(args)


def _same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(a / "weights.safetensors"), load_file(b / "weights.safetensors")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _replicas(out: Path, world: int) -> list[list[dict]]:
    return [[json.loads(line) for line in (out / "replicas" / f"rank{r}.jsonl").read_text().splitlines()]
            for r in range(world)]


@pytest.fixture(scope="module")
def two_local_nodes(digits: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Check 1: `make train-cluster LAUNCHER=local NODES=2`, uninterrupted, tracked in a SQLite MLflow store."""
    work = tmp_path_factory.mktemp("local")
    done = _make("LAUNCHER=local", "NODES=2", f"DATA={digits}",
                 _args(*STEPS, "--verify-replicas", "--save-every-steps", "2", "--output", str(work / "run"),
                       "--tracking-uri", f"sqlite:///{work / 'mlflow.db'}"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "MLflow run" in done.stdout and f"logs: {work / 'run' / 'logs'}" in done.stdout
    return work


@pytest.mark.slow
def test_two_local_nodes_train_one_run_with_identical_replicas(two_local_nodes: Path) -> None:
    out = two_local_nodes / "run"
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["world_size"] == 2 and config["nodes"] == 2
    hashes = _replicas(out, 2)
    assert [h["step"] for h in hashes[0]] == [1, 2, 3, 4, 5, 6]
    assert hashes[0] == hashes[1]  # both ranks hold the same weights after every step
    assert len({h["sha256"] for h in hashes[0]}) == 6  # and the weights change every step
    from mlflow import MlflowClient

    run_id = json.loads((out / "run.json").read_text())["mlflow_run_id"]
    run = MlflowClient(f"sqlite:///{two_local_nodes / 'mlflow.db'}").get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["world_size"] == "2" and run.data.params["nodes"] == "2"
    nodes = json.loads((out / "logs" / "nodes.json").read_text())["nodes"]
    for k, node in enumerate(nodes):
        text = Path(node["log"]).read_text()
        assert f"nnodes=2, num_local_procs=1, node_rank={k}" in text  # DeepSpeed's launcher, one rank per node


@pytest.mark.slow
def test_killing_one_node_stops_the_job_and_resume_finishes_it(two_local_nodes: Path, digits: Path,
                                                               tmp_path: Path) -> None:
    out = tmp_path / "run"
    variables = ["LAUNCHER=local", "NODES=2", f"DATA={digits}"]
    args = [*STEPS, "--save-every-steps", "2", "--output", str(out), "--no-tracking"]
    job = subprocess.Popen([MAKE, "-s", "-C", str(ROOT), "train-cluster", "MODEL=resnet_mini", *variables,
                            _args(*args)], env=train_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, start_new_session=True)
    try:
        wait_for(lambda: (out / "checkpoints" / "latest").is_file() or job.poll() is not None, 240,
                 "the first checkpoint")
        assert job.poll() is None, "the job ended before a node could be killed"
        node1 = json.loads((out / "logs" / "nodes.json").read_text())["nodes"][1]
        os.killpg(node1["pid"], signal.SIGKILL)  # node 1's launcher and its rank, by PID
        _, stderr = job.communicate(timeout=120)
    finally:
        stop(job, group=True)
    assert job.returncode != 0
    last = [line for line in stderr.strip().splitlines() if not line.startswith("make")][-1]
    assert last.startswith("error: node 1 failed (killed by SIGKILL)"), last
    assert "node 0: killed by SIGTERM" in last or "node 0: exit status" in last
    assert (out / "checkpoints" / "latest").read_text().strip() < "step000000006"
    resumed = _make(*variables, _args(*args, "--resume"))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert _same_weights(out, two_local_nodes / "run")  # bit-identical to the uninterrupted job


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """One SLURM cluster for this module's jobs (munged, slurmctld, two slurmd): the environment that reaches it."""
    with slurm_cluster(tmp_path_factory.mktemp("slurm")) as env:
        yield env


@pytest.mark.slow
def test_slurm_job_on_two_slurmd_nodes_trains_one_rank_per_node(slurm: dict[str, str], digits: Path,
                                                                tmp_path: Path) -> None:
    """Check 2: munged, slurmctld and two `slurmd -N` on this host; `make train-cluster LAUNCHER=slurm` waits."""
    out = tmp_path / "run"
    done = _make("LAUNCHER=slurm", "NODES=2", "ACCELERATOR=cpu", "WAIT=1", f"DATA={digits}",
                 f"MASTER_PORT={free_port()}",
                 _args(*STEPS, "--output", str(out), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"),
                 env=train_env(SLURM_CONF=slurm["SLURM_CONF"]), timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    job_id = re.search(r"SLURM job (\d+):", done.stdout).group(1)
    assert f"SLURM job {job_id} finished" in done.stdout and "MLflow run" in done.stdout
    logs = out / "logs"
    assert (logs / f"hostfile-{job_id}").read_text() == "n1 slots=1\nn2 slots=1\n"
    for k, name in enumerate(("n1", "n2")):
        text = (logs / f"slurm-{job_id}-node{k}.log").read_text()
        assert f"node {k} of 2 on {name}:" in text and f"--no_ssh --node_rank {k}" in text
        assert f"nnodes=2, num_local_procs=1, node_rank={k}" in text
    from mlflow import MlflowClient

    run_id = json.loads((out / "run.json").read_text())["mlflow_run_id"]
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["world_size"] == "2" and run.data.params["nodes"] == "2"
    assert (out / "weights.safetensors").is_file()


@pytest.mark.slow
def test_slurm_usr1_checkpoints_requeues_the_job_and_it_resumes(slurm: dict[str, str], digits: Path,
                                                                tmp_path: Path) -> None:
    """`sbatch --signal=USR1@120` before the time limit: both ranks stop at the same step with a checkpoint,
    rank 0 requeues the job, and the restarted batch script resumes it to the end."""
    out = tmp_path / "run"
    steps = ["--epochs", "1", "--batch-size", "16", "--workers", "1"]  # 39 steps
    env = slurm
    done = _make("LAUNCHER=slurm", "NODES=2", "ACCELERATOR=cpu", f"DATA={digits}", f"MASTER_PORT={free_port()}",
                 _args(*steps, "--output", str(out), "--no-tracking"),
                 env=train_env(SLURM_CONF=env["SLURM_CONF"]), timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    job_id = re.search(r"SLURM job (\d+):", done.stdout).group(1)

    def job() -> dict[str, str]:
        text = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=env, capture_output=True,
                              text=True).stdout
        return dict(item.split("=", 1) for item in text.split() if "=" in item)

    wait_for(lambda: (out / "config.yaml").is_file() or job().get("JobState") in ("FAILED", "COMPLETED"), 240,
             "the training to start")
    time.sleep(3)  # a few of the 39 steps
    subprocess.run(["scancel", "--signal=USR1", job_id], env=env, check=True, timeout=30)
    # A requeued job starts again after the credential lifetime (cred_expire, 10 s in this cluster's
    # slurm.conf; 120 s by default): its old credential must have expired first.
    wait_for(lambda: job().get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 300,
             "the requeued job to finish", interval=1.0)
    state = job()
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", state
    logs = out / "logs"
    node0 = (logs / f"slurm-{job_id}-node0.log").read_text()
    stopped = re.search(r"stopped by SIGUSR1 at step (\d+); checkpoint (step\d+) is complete; SLURM job "
                        + job_id + " requeued: it resumes from that checkpoint.", node0)
    assert stopped, node0[-3000:]
    assert 0 < int(stopped.group(1)) < 39
    assert f"restart 1 of job {job_id}: resuming" in (logs / f"slurm-{job_id}.out").read_text()
    assert f"resuming from {out / 'checkpoints' / stopped.group(2)}" in node0
    assert json.loads((out / "summary.json").read_text())["steps"] == 39


def _netns(name: str) -> None:
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)


# Each "host" joins the job as every rank does (pipeline.distributed), then all-reduces its rank + 1.
_JOIN = """
import sys, torch
from pipeline.distributed import prepare_network, rendezvous
rank, master, port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
iface = prepare_network(master, multi_node=True)
rendezvous("gloo", rank, 2, master, port, timeout_s=60)
total = torch.tensor([rank + 1.0])
torch.distributed.all_reduce(total)
print(iface, total.item())
torch.distributed.barrier()  # then leave as every rank does (pipeline.distributed.teardown): no abort at exit
torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
def test_two_hosts_in_network_namespaces_find_the_interface_gloo_needs(tmp_path: Path) -> None:
    """Two "hosts" whose host name resolves to 127.0.0.1 (as here), so gloo would bind loopback and the
    other host's connections would be refused. Each picks the veth that reaches MASTER_ADDR instead;
    a user who names `lo` gets one sentence at once from the per-node command."""
    require("ip")
    tag = f"adn{os.getpid() % 100000}"
    names = [f"{tag}a", f"{tag}b"]
    try:
        _netns(names[0])
    except (subprocess.CalledProcessError, FileNotFoundError):
        pytest.skip("cannot create network namespaces here (needs root and iproute2)")
    procs: list[subprocess.Popen] = []
    try:
        _netns(names[1])
        subprocess.run(["ip", "link", "add", f"{tag}0", "netns", names[0], "type", "veth", "peer", "name",
                        f"{tag}1", "netns", names[1]], check=True)
        for ns, end, ip in ((names[0], f"{tag}0", "10.213.7.1/24"), (names[1], f"{tag}1", "10.213.7.2/24")):
            subprocess.run(["ip", "-n", ns, "addr", "add", ip, "dev", end], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", end, "up"], check=True)
        port = free_port()
        env = {k: v for k, v in train_env().items() if not k.endswith("SOCKET_IFNAME")}
        for rank, ns in enumerate(names):
            procs.append(subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", _JOIN, str(rank),
                                           "10.213.7.1", str(port)], env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True, start_new_session=True))
        outputs = [p.communicate(timeout=120) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outputs
        assert [out.split() for out, _ in outputs] == [[f"{tag}0", "3.0"], [f"{tag}1", "3.0"]]

        hostfile = tmp_path / "hostfile"
        hostfile.write_text("hosta slots=1\nhostb slots=1\n")
        started = time.monotonic()
        done = subprocess.run(["ip", "netns", "exec", names[1], sys.executable, "-m", "pipeline.launch", "node",
                               "--node-rank", "1", "--hostfile", str(hostfile), "--master-addr", "10.213.7.1",
                               "--master-port", str(port), "--", "--model", "resnet_mini", "--data", "unused"],
                              env={**env, "GLOO_SOCKET_IFNAME": "lo"}, capture_output=True, text=True, timeout=120)
        assert done.returncode != 0 and time.monotonic() - started < 30
        assert "Traceback" not in done.stdout + done.stderr
        assert done.stderr.strip().splitlines()[-1] == (
            f"error: GLOO_SOCKET_IFNAME=lo is a loopback interface, but MASTER_ADDR 10.213.7.1 is another host; "
            f"set it to the interface that reaches 10.213.7.1 ({tag}1).")
    finally:
        for p in procs:
            stop(p, group=True)
        for ns in names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


# -- check 4: bad input is one sentence and a non-zero exit, no traceback ------------------------------

def _one_sentence(done: subprocess.CompletedProcess, *fragments: str) -> None:
    assert done.returncode != 0
    assert "Traceback" not in done.stdout + done.stderr
    last = [line for line in done.stderr.strip().splitlines() if not line.startswith("make")][-1]  # make's own
    assert last.startswith("error: "), done.stderr[-2000:]
    for fragment in fragments:
        assert fragment in last, last


def test_more_nodes_than_the_hostfile_lists(digits: Path, tmp_path: Path) -> None:
    hostfile = tmp_path / "hosts"
    hostfile.write_text("gpu-a slots=8\ngpu-b slots=8\n")
    done = _make("LAUNCHER=ssh", f"HOSTFILE={hostfile}", "NODES=3", f"DATA={digits}", timeout=60)
    _one_sentence(done, "NODES=3", "lists 2 hosts (gpu-a, gpu-b)")


def test_slurm_launcher_without_sbatch(digits: Path, tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    done = _make("LAUNCHER=slurm", f"DATA={digits}", env=train_env(PATH=str(tmp_path / "bin")), timeout=60)
    _one_sentence(done, "LAUNCHER=slurm needs sbatch")


def test_master_address_of_another_host_fails_at_once(digits: Path, tmp_path: Path) -> None:
    started = time.monotonic()
    done = _make("LAUNCHER=local", "NODES=2", "MASTER_ADDR=10.255.255.1", f"DATA={digits}",
                 _args(*STEPS, "--output", str(tmp_path / "run"), "--no-tracking"), timeout=120)
    _one_sentence(done, "MASTER_ADDR 10.255.255.1", "not an address of")
    assert time.monotonic() - started < 30


@pytest.mark.slow
def test_unreachable_master_address_fails_within_the_rendezvous_timeout(digits: Path, tmp_path: Path) -> None:
    """Rank 1 of 2 whose master never answers: an error after --rendezvous-timeout, not a hang."""
    env = train_env(RANK="1", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.train", "--model", "resnet_mini", "--data", str(digits), "--output",
         str(tmp_path / "run"), "--no-tracking", "--rendezvous-timeout", "5"],
        env=env, capture_output=True, text=True, timeout=120)
    assert time.monotonic() - started < 60
    _one_sentence(done, "rank 1 on", "could not reach the rendezvous at 127.0.0.1:", "within 5 s", "Connection refused")


def test_data_url_without_manifest(tmp_path: Path) -> None:
    from ..daemons import http_server

    (tmp_path / "empty").mkdir()
    with http_server(tmp_path / "empty") as url:
        done = _make("LAUNCHER=local", f"DATA={url}/shards", timeout=60)
    _one_sentence(done, f"no manifest {url}/shards/train.json", "404")


def test_http_data_without_curl(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    done = _make("LAUNCHER=local", "DATA=http://127.0.0.1:9/shards", env=train_env(PATH=str(tmp_path / "bin")),
                 timeout=60)
    _one_sentence(done, "curl", "not on PATH", "apt-get install curl")


# -- the pieces ---------------------------------------------------------------------------------------

def test_per_node_command_is_the_deepspeed_launcher_without_ssh(tmp_path: Path) -> None:
    cmd = node_command(1, tmp_path / "h", "10.0.0.1", 29500, ["--model", "vit_b16"])
    assert cmd[1:3] == ["-m", "deepspeed.launcher.runner"]
    joined = " ".join(cmd)
    assert "--no_ssh --node_rank 1 --master_addr 10.0.0.1 --master_port 29500" in joined
    assert joined.endswith("--module pipeline.train --model vit_b16")


def test_hostfile_is_read_as_deepspeed_reads_it(tmp_path: Path) -> None:
    from deepspeed.launcher.runner import _parse_hostfile

    text = "# comment\nworker-0 slots=8\n\n  worker-1   slots=4 # spare\n"
    (tmp_path / "h").write_text(text)
    assert read_hostfile(tmp_path / "h") == dict(_parse_hostfile(text.splitlines())) == {"worker-0": 8, "worker-1": 4}
    for bad in ("a 8\n", "a slots=1\na slots=2\n", "# only a comment\n"):
        (tmp_path / "bad").write_text(bad)
        with pytest.raises(ValueError):
            _parse_hostfile(bad.splitlines())
        with pytest.raises(ValueError, match="HOST slots=GPUS"):
            read_hostfile(tmp_path / "bad")


def test_option_replacement() -> None:
    assert _replace_option(["--output", "x", "--epochs", "2"], "--output", "/abs") == ["--epochs", "2", "--output",
                                                                                        "/abs"]
    assert _replace_option(["--output=x"], "--output", "/abs") == ["--output", "/abs"]
    assert _replace_option(["--epochs", "2"], "--data", "/d") == ["--epochs", "2", "--data", "/d"]
