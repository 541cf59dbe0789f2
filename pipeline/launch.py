"""Train on N nodes with DeepSpeed's own launcher: ``python -m pipeline.launch [...] -- TRAIN ARGS``.

- ``slurm`` submits ``cluster/slurm/train.sbatch``: one task per node, each running the per-node
  command below; the hostfile comes from ``scontrol show hostnames``, the master address from the
  allocation's first node.
- ``ssh`` runs ``deepspeed --hostfile`` (pdsh starts the ranks on every host).
- ``local`` emulates N nodes on this machine: the same per-node command, N times, on loopback.

The per-node command, ``python -m pipeline.launch node --node-rank K ...``, executes the DeepSpeed
launcher with ``--no_ssh --node_rank K`` (K defaults to ``$SLURM_NODEID``), which starts this
node's ranks of ``pipeline.train``. TRAIN ARGS are ``pipeline.train``'s flags; they are checked,
and the data's manifests read, before anything is started or submitted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

ROOT = Path(__file__).resolve().parents[1]
SBATCH_SCRIPT = ROOT / "cluster" / "slurm" / "train.sbatch"
LAUNCHERS = ("auto", "slurm", "ssh", "local")
# What the ranks on other hosts need from this environment; DeepSpeed's pdsh runner forwards only
# NCCL/MLFLOW/PYTHON/UCX variables by itself, the rest go through its DS_ENV_FILE.
FORWARDED_ENV = ("GLOO_SOCKET_IFNAME", "DS_ACCELERATOR", "OMP_NUM_THREADS", "AWS_", "HF_", "TORCH_", "CUDA_")
STOP_GRACE_S = 20.0
LAUNCH_MARK = "=== launch at "


class LaunchError(ValueError):
    """Bad cluster input (launcher, nodes, hostfile); one sentence for the user.

    This module imports torch, DeepSpeed and the training code only where it needs them, so bad
    input is answered in a second.
    """


# -- the pieces every launcher shares ----------------------------------------------------------------

@dataclass
class TrainJob:
    """``pipeline.train``'s arguments, checked, with the output and data every node must see."""

    args: list[str]
    model: str
    output: Path
    experiment: str
    tracking_uri: str | None


def _replace_option(args: list[str], flag: str, value: str) -> list[str]:
    """``args`` with ``flag``'s value set to ``value`` (replaced in place, or appended)."""
    out, skip = [], False
    for i, arg in enumerate(args):
        if skip:
            skip = False
            continue
        if arg == flag and i + 1 < len(args):
            skip = True
            continue
        if arg.startswith(flag + "="):
            continue
        out.append(arg)
    return [*out, flag, value]


def check_train_args(args: list[str]) -> TrainJob:
    """Parse, resolve and check the training flags here (``pipeline.config.preflight``, as every rank does), so
    errors come before any launch. ``--output`` and ``--data`` are made absolute: every node resolves them alike.
    """
    from .config import parse_args, preflight, resolve_config
    from .tracking import resolve_tracking_uri

    try:
        parsed = parse_args(args)
    except SystemExit as exit_:  # argparse has printed what is wrong
        if exit_.code:
            raise LaunchError("the training arguments after -- are not valid for pipeline.train "
                              "(see python -m pipeline.train --help).") from None
        raise
    config = resolve_config(parsed)
    init = preflight(config, check_tracking=False).init  # a source that cannot serve the run fails here
    args = _replace_option(_replace_option(args, "--output", config.output), "--data", config.data_dir)
    if init is not None:
        init.cleanup()
        if init.kind == "file":
            args = _replace_option(args, "--init-from", str(Path(config.init_from).resolve()))
    uri = config.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    return TrainJob(args, config.model, Path(config.output), config.experiment,
                    resolve_tracking_uri(uri) if config.tracking else None)


HOSTFILE_LINE = re.compile(r"^(\S+)\s+slots=(\d+)")


def read_hostfile(path: str | os.PathLike[str]) -> dict[str, int]:
    """Hosts and slots of a DeepSpeed (MPI-style) hostfile, ``worker-0 slots=8`` per line, as DeepSpeed reads it.

    Parsed here rather than by DeepSpeed's runner so that a bad hostfile is answered without importing torch.
    """
    path = Path(path)
    if not path.is_file():
        raise LaunchError(f"hostfile {str(path)!r} does not exist; write one host per line as 'HOST slots=GPUS' "
                          "(see cluster/hostfile.example).")
    hosts: dict[str, int] = {}
    for line in (raw.strip() for raw in path.read_text().splitlines()):
        if not line or line.startswith("#"):
            continue
        match = HOSTFILE_LINE.match(line)
        if match is None or match.group(1) in hosts:
            problem = "a bad entry" if match is None else "a second entry for its host"
            raise LaunchError(f"hostfile {str(path)!r} has {problem}, {line!r}; write one host per line as "
                              "'HOST slots=GPUS'.")
        hosts[match.group(1)] = int(match.group(2))
    if not hosts:
        raise LaunchError(f"hostfile {str(path)!r} lists no hosts; write one host per line as 'HOST slots=GPUS'.")
    return hosts


def write_hostfile(path: Path, hosts: list[str], slots: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{host} slots={slots}\n" for host in hosts))
    return path


def node_command(node_rank: int, hostfile: Path, master_addr: str, master_port: int, train_args: list[str],
                 include: str | None = None) -> list[str]:
    """The DeepSpeed launcher for one node: this node's ranks of ``pipeline.train``, no ssh."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh",
           "--node_rank", str(node_rank), "--master_addr", master_addr, "--master_port", str(master_port)]
    if include:
        cmd += ["--include", include]
    return [*cmd, "--module", "pipeline.train", *train_args]


def _accelerator(requested: str) -> str:
    if requested != "auto":
        return requested
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def _log_dir(job: TrainJob) -> Path:
    logs = job.output / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    return logs


def _mlflow_line(job: TrainJob) -> str:
    if job.tracking_uri is None:
        return "MLflow: off (--no-tracking)"
    run_file = job.output / "run.json"
    if run_file.is_file():
        run = json.loads(run_file.read_text())
        return f"MLflow run {run['mlflow_run_id']} in {run['tracking_uri']} (experiment {run['experiment']})"
    return (f"MLflow: experiment {job.experiment} in {job.tracking_uri}; rank 0 writes the run id to "
            f"{job.output / 'run.json'} when it starts")


# -- local: N nodes emulated on this machine ---------------------------------------------------------

def _pump(source: BinaryIO, log_path: Path, prefix: bytes | None) -> None:
    """Copy a node's output to its log file (appended: a resumed run keeps the first one's) and to this terminal."""
    out = sys.stdout.buffer
    with open(log_path, "ab") as log:
        log.write(f"{LAUNCH_MARK}{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        for chunk in iter(lambda: source.read1(1 << 16) if prefix is None else source.readline(), b""):
            log.write(chunk)
            log.flush()
            out.write(chunk if prefix is None else prefix + chunk)
            out.flush()


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each node's process group (its launcher and ranks), SIGKILL what is left after a grace period."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, sig)
        deadline = time.monotonic() + STOP_GRACE_S
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.1)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _status(code: int) -> str:
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"


def _last_error(log: Path) -> str | None:
    """The error sentence this launch's ranks printed on the node, if any."""
    text = log.read_text(errors="replace").rsplit(LAUNCH_MARK, 1)[-1]
    lines = [line for line in text.splitlines() if line.startswith("error: ")]
    return lines[-1].removeprefix("error: ") if lines else None


def run_local(job: TrainJob, nodes: int, procs_per_node: int, accelerator: str, master_addr: str,
              master_port: int | None) -> int:
    """Start one per-node command per emulated node, each in its own process group; stop all if one fails."""
    logs = _log_dir(job)
    include = None
    env = dict(os.environ)
    if accelerator == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
        # The emulated nodes share this machine's cores: without a limit each rank takes them all.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // (nodes * procs_per_node))))
        hostfile = write_hostfile(logs / "hostfile.local", [f"node{k}" for k in range(nodes)], procs_per_node)
    else:
        import torch

        have = torch.cuda.device_count()
        if nodes * procs_per_node > have:
            raise LaunchError(f"emulating {nodes} nodes x {procs_per_node} GPUs needs {nodes * procs_per_node} GPUs, "
                              f"this machine has {have}; lower NODES or GPUS_PER_NODE, or use ACCELERATOR=cpu.")
        # Every emulated node lists all GPUs; --include gives node k its own block of them.
        hostfile = write_hostfile(logs / "hostfile.local", [f"node{k}" for k in range(nodes)], have)
        include = "@".join(f"node{k}:" + ",".join(str(k * procs_per_node + g) for g in range(procs_per_node))
                           for k in range(nodes))
    from .distributed import free_port

    port = master_port or free_port()
    procs, pumps, record = [], [], []
    # The nodes run in sessions of their own (so each can be stopped as a group): a SIGTERM to this
    # launcher must stop them too, as Ctrl-C does.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    print(f"local launcher: {nodes} nodes x {procs_per_node} {accelerator.upper()} ranks, master "
          f"{master_addr}:{port}, hostfile {hostfile}", flush=True)
    try:
        for k in range(nodes):
            cmd = [sys.executable, "-m", "pipeline.launch", "node", "--node-rank", str(k), "--hostfile",
                   str(hostfile), "--master-addr", master_addr, "--master-port", str(port),
                   *(["--include", include] if include else []), "--", *job.args]
            log_path = logs / f"node{k}.log"
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            pump = threading.Thread(target=_pump, args=(proc.stdout, log_path, f"[node {k}] ".encode() if k else None),
                                    daemon=True)
            pump.start()
            procs.append(proc)
            pumps.append(pump)
            record.append({"node_rank": k, "pid": proc.pid, "log": str(log_path), "command": shlex.join(cmd)})
        (logs / "nodes.json").write_text(json.dumps({"launcher": "local", "master": f"{master_addr}:{port}",
                                                     "nodes": record}, indent=1))
        while all(p.poll() in (None, 0) for p in procs) and any(p.poll() is None for p in procs):
            time.sleep(0.2)
    except BaseException:
        _stop(procs)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    failed = [(k, p.returncode) for k, p in enumerate(procs) if p.poll() not in (None, 0)]
    _stop(procs)
    for pump in pumps:
        pump.join(timeout=10)
    if failed:
        k, code = failed[0]
        reason = _last_error(logs / f"node{k}.log")
        others = "; ".join(f"node {j}: {_status(procs[j].returncode)}" for j in range(nodes) if j != k)
        print(f"error: node {k} failed ({_status(code)})" + (f": {reason}" if reason else "") +
              f" [{others}; logs in {logs}]", file=sys.stderr)
        return code if code > 0 else 1
    print(f"output: {job.output}\nlogs: {logs}\n{_mlflow_line(job)}")
    return 0


# -- ssh: DeepSpeed's pdsh runner over a hostfile ---------------------------------------------------

def check_ssh(hostfile: str | None, nodes: int | None) -> int:
    """The number of nodes an ssh launch uses; the hostfile must list them and pdsh must be here."""
    if not hostfile:
        raise LaunchError("LAUNCHER=ssh needs HOSTFILE (see cluster/hostfile.example).")
    hosts = read_hostfile(hostfile)
    nodes = nodes or len(hosts)
    if nodes > len(hosts):
        raise LaunchError(f"NODES={nodes} but the hostfile {hostfile} lists {len(hosts)} host"
                          f"{'s' if len(hosts) != 1 else ''} ({', '.join(hosts)}); lower NODES or add hosts.")
    if shutil.which("pdsh") is None:
        raise LaunchError("LAUNCHER=ssh runs DeepSpeed's pdsh runner, but pdsh is not on PATH; install it "
                          "(apt-get install pdsh) or use LAUNCHER=slurm.")
    return nodes


def run_ssh(job: TrainJob, hostfile: str, nodes: int, procs_per_node: int | None, accelerator: str,
            master_addr: str | None, master_port: int | None) -> int:
    logs = _log_dir(job)
    env = dict(os.environ)
    if accelerator == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    env_file = logs / "deepspeed_env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in sorted(env.items()) if k.startswith(FORWARDED_ENV)))
    env["DS_ENV_FILE"] = str(env_file)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", hostfile, "--num_nodes", str(nodes),
           "--master_port", str(master_port or 29500)]
    if procs_per_node:
        cmd += ["--num_gpus", str(procs_per_node)]
    if master_addr:
        cmd += ["--master_addr", master_addr]
    cmd += ["--module", "pipeline.train", *job.args]
    print(f"ssh launcher: {shlex.join(cmd)}", flush=True)
    code = subprocess.call(cmd, env=env)
    print(f"output: {job.output}\n{_mlflow_line(job)}")
    return code


# -- slurm: sbatch cluster/slurm/train.sbatch ---------------------------------------------------------

def _slurm_gpus() -> int:
    """GPUs per node the cluster's partitions advertise (0 when none), from ``sinfo``'s generic resources."""
    try:
        gres = subprocess.run(["sinfo", "-h", "-o", "%G"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    counts = []
    for entry in gres.replace(",", " ").split():  # e.g. gpu:h100:8(S:0-1)
        name = entry.split("(")[0]
        if name.startswith("gpu") and name.rsplit(":", 1)[-1].isdigit():
            counts.append(int(name.rsplit(":", 1)[-1]))
    return max(counts, default=0)


def run_slurm(job: TrainJob, nodes: int, procs_per_node: int | None, accelerator: str, opts: argparse.Namespace,
              ) -> int:
    script = Path(opts.sbatch_script)
    if not script.is_file():
        raise LaunchError(f"the SLURM script {str(script)!r} does not exist.")
    advertised = _slurm_gpus()
    if accelerator == "auto":
        accelerator = "gpu" if advertised else "cpu"
    procs_per_node = procs_per_node or ((advertised or 8) if accelerator == "gpu" else 1)
    logs = _log_dir(job)
    cmd = ["sbatch", "--parsable", f"--job-name=adn-{job.model}", f"--nodes={nodes}", "--ntasks-per-node=1",
           f"--output={logs}/slurm-%j.out"]
    if accelerator == "gpu":
        cmd.append(f"--gpus-per-node={procs_per_node}")
    for flag in ("partition", "account", "time"):
        if getattr(opts, flag):
            cmd.append(f"--{flag}={getattr(opts, flag)}")
    if opts.wait:
        cmd.append("--wait")
    cmd += [*shlex.split(opts.sbatch_args or ""), str(script), *job.args]
    env = {**os.environ, "ADN_PYTHON": sys.executable, "ADN_PROCS_PER_NODE": str(procs_per_node),
           "ADN_LOG_DIR": str(logs)}
    if opts.master_addr:
        env["ADN_MASTER_ADDR"] = opts.master_addr
    if opts.master_port:
        env["ADN_MASTER_PORT"] = str(opts.master_port)
    if accelerator == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    job_id = (proc.stdout.readline() if proc.stdout else "").strip().split(";")[0]
    if not job_id:
        _, err = proc.communicate()
        raise LaunchError(f"sbatch refused the job: {err.strip().splitlines()[-1] if err.strip() else 'no reason'}.")
    print(f"SLURM job {job_id}: {nodes} nodes x {procs_per_node} {accelerator.upper()} ranks\n"
          f"logs: {logs}/slurm-{job_id}.out (batch script), {logs}/slurm-{job_id}-node<N>.log (per node)\n"
          f"output: {job.output}\n{_mlflow_line(job)}\n"
          f"watch: squeue -j {job_id}; stop: scancel {job_id}; continue later: the same command with ARGS=--resume",
          flush=True)
    _, err = proc.communicate()
    if proc.returncode != 0:
        print(f"error: SLURM job {job_id} failed ({err.strip() or _status(proc.returncode)}); see "
              f"{logs}/slurm-{job_id}.out and the per-node logs.", file=sys.stderr)
        return proc.returncode
    if opts.wait:
        print(f"SLURM job {job_id} finished\n{_mlflow_line(job)}")
    return 0


# -- the CLI ----------------------------------------------------------------------------------------

def _split_train_args(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.launch",
        usage="%(prog)s [options] -- PIPELINE.TRAIN ARGS\n       %(prog)s node [options] -- PIPELINE.TRAIN ARGS",
        description="Train on N nodes with the DeepSpeed launcher: submit to SLURM, start over ssh (pdsh), or "
                    "emulate the nodes on this machine. `make train-cluster` calls this.")
    p.add_argument("--launcher", choices=LAUNCHERS, default="auto",
                   help="auto: slurm when sbatch is on PATH, else ssh when --hostfile is given, else local")
    p.add_argument("--nodes", type=int, help="number of nodes (default: 2; ssh: every host of the hostfile)")
    p.add_argument("--gpus-per-node", type=int,
                   help="ranks per node (default: slurm: the GPUs a node advertises; local: all GPUs / nodes, or 1 "
                        "on CPU; ssh: the hostfile's slots)")
    p.add_argument("--accelerator", choices=("auto", "gpu", "cpu"), default="auto",
                   help="what the ranks run on (auto: local: this machine's GPUs; slurm: whether the partitions "
                        "advertise GPUs; ssh: each host's own)")
    p.add_argument("--hostfile", help="ssh: DeepSpeed hostfile, 'HOST slots=GPUS' per line")
    p.add_argument("--master-addr", help="address of node 0 (default: local: 127.0.0.1; ssh: DeepSpeed asks node 0 "
                                         "with `hostname -I`; slurm: the first node's NodeAddr)")
    p.add_argument("--master-port", type=int, help="rendezvous port (default: a free port, 29500 for ssh, "
                                                     "20000 + job id %% 20000 under SLURM)")
    g = p.add_argument_group("slurm")
    g.add_argument("--partition", help="sbatch --partition")
    g.add_argument("--account", help="sbatch --account")
    g.add_argument("--time", help="time limit, e.g. 24:00:00")
    g.add_argument("--sbatch-args", help="more sbatch flags, quoted as one string")
    g.add_argument("--sbatch-script", default=str(SBATCH_SCRIPT),
                   help="the batch script to submit (default: cluster/slurm/train.sbatch)")
    g.add_argument("--wait", action="store_true", help="wait for the job to end (sbatch --wait)")
    return p.parse_args(argv)


def parse_node_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.launch node",
        description="Start this node's ranks: the DeepSpeed launcher with --no_ssh --node_rank K "
                    "(what each SLURM task and each emulated node runs).")
    p.add_argument("--node-rank", type=int, default=os.environ.get("SLURM_NODEID"),
                   help="this node's index in the hostfile (default: $SLURM_NODEID)")
    p.add_argument("--hostfile", required=True, help="every node of the job, 'HOST slots=RANKS' per line")
    p.add_argument("--master-addr", required=True, help="address of node 0")
    p.add_argument("--master-port", type=int, required=True)
    p.add_argument("--include", help="DeepSpeed --include filter (which GPUs each node uses)")
    return p.parse_args(argv)


def run_node(opts: argparse.Namespace, train_args: list[str]) -> int:
    """Replace this process with the DeepSpeed launcher for this node (signals reach it directly)."""
    from .distributed import check_master_is_local, prepare_network

    hosts = read_hostfile(opts.hostfile)
    if opts.node_rank is None:
        raise LaunchError("pass --node-rank (or run under srun, which sets SLURM_NODEID).")
    node_rank = int(opts.node_rank)
    if not 0 <= node_rank < len(hosts):
        raise LaunchError(f"--node-rank {node_rank} is outside the {len(hosts)} nodes of {opts.hostfile}.")
    cmd = node_command(node_rank, Path(opts.hostfile), opts.master_addr, opts.master_port, train_args, opts.include)
    where = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    # Checked once per node before any rank starts (pipeline.train checks again, for launches not made here).
    iface = prepare_network(opts.master_addr, multi_node=len(hosts) > 1)
    if node_rank == 0:
        check_master_is_local(opts.master_addr)
    print(f"node {node_rank} of {len(hosts)} on {where}" + (f" (GLOO_SOCKET_IFNAME={iface}, the interface that "
          "reaches the master)" if iface else "") + f": {shlex.join(cmd)}", flush=True)
    # SLURM signals every process of the step (sbatch --signal=USR1@120). SIGUSR1 would end DeepSpeed's
    # launchers (its default action); ignored here, the ignoring is inherited by them, while the ranks set
    # their own handler and stop at the next step with a checkpoint.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    os.execv(sys.executable, cmd)
    return 1  # not reached


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, train_args = _split_train_args(argv)
    try:
        if ours[:1] == ["node"]:
            return run_node(parse_node_args(ours[1:]), train_args)
        opts = parse_args(ours)
        if not train_args:
            raise LaunchError("pass pipeline.train's arguments after --, e.g. -- --model resnet_mini --data DIR.")
        launcher = opts.launcher
        if launcher == "auto":
            launcher = "slurm" if shutil.which("sbatch") else "ssh" if opts.hostfile else "local"
        for name in ("nodes", "gpus_per_node"):
            if getattr(opts, name) is not None and getattr(opts, name) < 1:
                raise LaunchError(f"{name.upper()} must be at least 1, got {getattr(opts, name)}.")
        if opts.hostfile and launcher != "ssh":
            raise LaunchError(f"--hostfile is read by the ssh launcher; LAUNCHER={launcher} makes its own.")
        # What can be checked without the training code comes first: these answer in a second.
        nodes = opts.nodes or 2
        if launcher == "slurm" and shutil.which("sbatch") is None:
            raise LaunchError("LAUNCHER=slurm needs sbatch, which is not on PATH; run this on the cluster's login "
                              "node, or use LAUNCHER=ssh with a HOSTFILE or LAUNCHER=local.")
        if launcher == "ssh":
            nodes = check_ssh(opts.hostfile, opts.nodes)
        master_addr = opts.master_addr or "127.0.0.1"
        if launcher == "local":
            from .distributed import check_master_is_local

            check_master_is_local(master_addr)  # every emulated node, node 0 included, runs here
        job = check_train_args(train_args)
        if launcher == "slurm":
            return run_slurm(job, nodes, opts.gpus_per_node, opts.accelerator, opts)
        if launcher == "ssh":  # the hosts' own GPUs decide, unless ACCELERATOR=cpu
            return run_ssh(job, opts.hostfile, nodes, opts.gpus_per_node, opts.accelerator, opts.master_addr,
                           opts.master_port)
        accelerator = _accelerator(opts.accelerator)
        if accelerator == "gpu":
            import torch

            per_node = opts.gpus_per_node or max(torch.cuda.device_count() // nodes, 1)
        else:
            per_node = opts.gpus_per_node or 1
        return run_local(job, nodes, per_node, accelerator, master_addr, opts.master_port)
    except (LaunchError, ValueError, RuntimeError, FileNotFoundError) as err:  # DataError is a ValueError,
        # ClusterError a RuntimeError, adn.pretrained.PretrainedUnavailable (timm's weights offline) a FileNotFoundError
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; the nodes this launcher started were stopped (continue with --resume).",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
