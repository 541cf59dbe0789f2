"""A Ray cluster for the search: ``python -m cluster.ray_node head|worker|stop|status``.

``make ray-head`` starts the head node (``ray start --head --block``), ``make ray-worker HEAD=HOST:PORT``
joins a worker to it, and the stop targets stop what they started: the recorded ``ray start``
process group, by PID. (``ray stop`` would end every Ray process on the host, other users' too.)

Token authentication, which Ray 2.60 turns on by default, is set up explicitly: the head writes a
random token to ``<state>/ray/auth_token`` (owner-only), and every worker and every driver
(``search.pareto --ray-address``) must present the same token, from ``RAY_AUTH_TOKEN``,
``RAY_AUTH_TOKEN_PATH`` or that file. A node without it is refused (``InvalidAuthToken``).

Every node starts with Ray Serve's HAProxy ingress (``search.ray_client.serve_ingress_env``), which the serving
application needs to be fast; ``RAY_SERVE_ENABLE_HA_PROXY=0`` in the environment keeps Serve's Python proxy.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import sys
import time
from pathlib import Path

from pipeline.distributed import accepts, interfaces, port_taken
from search.ray_client import auth_env, parse_address, serve_ingress_env, token_file

from .state import (
    ServiceError,
    is_running,
    launch,
    read_record,
    state_dir,
    stop_group,
    tail,
    wait_until,
    write_secret,
)

MARKER = "ray"
STARTED = "Ray runtime started"
START_TIMEOUT_S = 120.0


def ensure_token(root: Path) -> dict[str, str]:
    """``auth_env``, first writing a random token into the state directory when no token is given or kept."""
    env = auth_env(root)
    if not env:
        write_secret(token_file(root), secrets.token_hex(32))  # 256 bits, as Ray's own generator makes them
        env = auth_env(root)
    return env


def local_address(peer: str) -> str:
    """This host's address on the route to ``peer`` (what Ray should advertise to the other nodes)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((peer, 9))  # no packet is sent: connect() on UDP only picks the route
        return s.getsockname()[0]


def outward_address() -> str:
    """The address other hosts reach this one by: the default route's, else the first address of an interface
    other than loopback, else what the host name resolves to."""
    try:
        return local_address("192.0.2.1")  # TEST-NET-1: any off-host address selects the default route
    except OSError:
        found = [a for addrs in interfaces().values() for a in addrs if not a.startswith("127.")]
        return found[0] if found else socket.gethostbyname(socket.gethostname())


def parse_head(head: str) -> tuple[str, int]:
    parsed = parse_address(head)
    if parsed is None:
        raise ServiceError(f"HEAD={head!r} is not HOST:PORT (the address `make ray-head` printed).")
    return parsed


def _ray() -> str:
    return str(Path(sys.executable).with_name("ray"))


def _launch(role: str, root: Path, cmd: list[str], env: dict[str, str], record: dict) -> int:
    log_path = root / "ray" / f"{role}.log"
    start_at = log_path.stat().st_size if log_path.exists() else 0
    proc = launch(cmd, log_path, root / "ray" / f"{role}.json", record,
                  f"{role} start at {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(cmd)}",
                  {**serve_ingress_env(), **os.environ, **env})

    def started() -> bool:
        with open(log_path, errors="replace") as f:
            f.seek(start_at)
            return STARTED in f.read()

    if not wait_until(started, START_TIMEOUT_S, interval_s=0.5, alive=lambda: proc.poll() is None):
        stop_group(proc.pid, MARKER, first=signal.SIGINT)
        text = tail(log_path, 40)
        if "InvalidAuthToken" in text or "Unauthenticated" in text or "authentication" in text.lower():
            raise ServiceError(f"the Ray head at {record.get('head')} refused this node's token; use the head's "
                               "<state>/ray/auth_token (RAY_AUTH_TOKEN_PATH=FILE or RAY_AUTH_TOKEN=...).")
        raise ServiceError(f"the Ray {role} did not start within {START_TIMEOUT_S:.0f} s (log: {log_path}):\n"
                           + tail(log_path, 12))
    return proc.pid


def head(args: argparse.Namespace) -> int:
    root = state_dir(args.state_dir)
    record = read_record(root / "ray" / "head.json")
    if record and is_running(record["pid"], MARKER):
        print(f"the Ray head is already running at {record['address']} (pid {record['pid']}).")
        return 0
    if port_taken(args.host, args.port):
        raise ServiceError(f"port {args.port} on {args.host} is already taken by another program (another Ray "
                           "head?); stop it or choose another port (make ray-head RAY_PORT=...).")
    ip = args.node_ip or (outward_address() if args.host in ("0.0.0.0", "") else args.host)
    env = ensure_token(root)
    cmd = [_ray(), "start", "--head", "--block", "--port", str(args.port), "--node-ip-address", ip,
           "--include-dashboard=false", "--disable-usage-stats", "--temp-dir", args.temp_dir]
    cmd += _resources(args)
    pid = _launch("head", root, cmd, env, {"address": f"{ip}:{args.port}"})
    token = env.get("RAY_AUTH_TOKEN_PATH", "$RAY_AUTH_TOKEN")
    print(f"Ray head at {ip}:{args.port} (pid {pid}), token authentication on\n"
          f"  token: {token}: copy it to each node (RAY_AUTH_TOKEN_PATH) or share the state directory\n"
          f"  join:  make ray-worker HEAD={ip}:{args.port}\n"
          f"  use:   python -m search.pareto --ray-address {ip}:{args.port} ...\n"
          f"  log:   {root / 'ray' / 'head.log'}")
    return 0


def worker(args: argparse.Namespace) -> int:
    root = state_dir(args.state_dir)
    host, port = parse_head(args.head)
    record = read_record(root / "ray" / "worker.json")
    if record and is_running(record["pid"], MARKER):
        print(f"a Ray worker from {root} is already running (pid {record['pid']}, head {record['head']}).")
        return 0
    if not accepts(host, port, timeout=5):
        raise ServiceError(f"no Ray head answers at {host}:{port}; start one there (make ray-head) or fix HEAD.")
    env = auth_env(root)
    if not env:
        raise ServiceError(f"no Ray token: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, or copy the head's "
                           f"<state>/ray/auth_token to {token_file(root)}.")
    ip = args.node_ip or local_address(host)
    cmd = [_ray(), "start", "--address", f"{host}:{port}", "--block", "--node-ip-address", ip,
           "--disable-usage-stats", "--temp-dir", args.temp_dir, *_resources(args)]
    pid = _launch("worker", root, cmd, env, {"head": f"{host}:{port}", "address": ip})
    print(f"Ray worker {ip} joined the head at {host}:{port} (pid {pid}); log: {root / 'ray' / 'worker.log'}")
    return 0


def _resources(args: argparse.Namespace) -> list[str]:
    out = []
    if args.num_cpus is not None:
        out += ["--num-cpus", str(args.num_cpus)]
    if args.num_gpus is not None:
        out += ["--num-gpus", str(args.num_gpus)]
    return out


def token(args: argparse.Namespace) -> int:
    """The cluster's token file, created if missing: for the cluster launcher's file_mounts (cluster/ray)."""
    env = ensure_token(state_dir(args.state_dir))
    print(env.get("RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN is set in this environment"))
    return 0


def stop(args: argparse.Namespace) -> int:
    root = state_dir(args.state_dir, create=False)
    stopped = []
    # The worker first: a worker whose head is already gone takes its grace period to give up.
    for role in (("worker", "head") if args.role == "all" else (args.role,)):
        record = read_record(root / "ray" / f"{role}.json")
        if record and stop_group(record["pid"], MARKER, grace_s=30, first=signal.SIGINT):
            stopped.append(f"the Ray {role} (pid {record['pid']})")
    print("stopped " + " and ".join(stopped) if stopped else f"no Ray node from {root} was running")
    return 0


def status(args: argparse.Namespace) -> int:
    root = state_dir(args.state_dir, create=False)
    running = 0
    for role in ("head", "worker"):
        record = read_record(root / "ray" / f"{role}.json")
        if record and is_running(record["pid"], MARKER):
            running += 1
            print(f"Ray {role} {record['address']} running (pid {record['pid']})")
    if not running:
        print(f"no Ray node from {root} is running")
    return 0 if running else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cluster.ray_node", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--state-dir", help="where PIDs, logs and the token live (default: $CLUSTER_STATE or ./.cluster)")
    sub = p.add_subparsers(dest="command", required=True)
    h = sub.add_parser("head", help="start the head node (token authentication on)")
    h.add_argument("--port", type=int, default=6379, help="GCS port the workers and drivers connect to")
    h.add_argument("--host", default="0.0.0.0", help="address the head advertises (default: its outward one)")
    w = sub.add_parser("worker", help="join this host to a head")
    w.add_argument("--head", required=True, metavar="HOST:PORT")
    for q in (h, w):
        q.add_argument("--temp-dir", default="/tmp/ray", help="root of Ray's session directories on this node")
        q.add_argument("--node-ip", help="address this node advertises (default: the one routing to the head)")
        q.add_argument("--num-cpus", type=int, help="CPUs this node offers (default: all)")
        q.add_argument("--num-gpus", type=int, help="GPUs this node offers (default: all it has)")
    s = sub.add_parser("stop", help="stop the head and/or worker this state directory started (by PID)")
    s.add_argument("role", nargs="?", choices=("head", "worker", "all"), default="all")
    sub.add_parser("status", help="say which nodes from this state directory run")
    sub.add_parser("token", help="print the path of the cluster's token file (created if missing)")
    args = p.parse_args(argv)
    try:
        return {"head": head, "worker": worker, "stop": stop, "status": status, "token": token}[args.command](args)
    except ServiceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
