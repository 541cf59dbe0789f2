"""The ADN serving application as a background service: ``python -m cluster.serving start|stop|status``.

``make serve`` runs ``start``: it launches ``python -m serving`` (Ray Serve, on 127.0.0.1 unless ``--host`` says
otherwise) in its own process group, records its PID under the state directory and returns once the
application answers. ``make serve-stop`` stops exactly that process group: the server shuts Ray Serve and its
local Ray down on SIGTERM. Flags after ``--`` go to ``python -m serving`` as they are.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
import urllib.request

from .state import ServiceError, is_running, launch, read_record, state_dir, stop_group, tail, wait_until

MARKER = "serving"
START_TIMEOUT_S = 300.0


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/v1/model", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def start(args: argparse.Namespace) -> int:
    root = state_dir(args.state_dir)
    record = read_record(root / "serving.json")
    if record and is_running(record["pid"], MARKER):
        print(f"the ADN is already served at {record['url']} (pid {record['pid']}); make serve-stop first.")
        return 0
    flags = list(args.serving_args)
    if flags[:1] == ["--"]:
        flags = flags[1:]
    check = subprocess.run([sys.executable, "-m", "serving", *flags, "--port", str(args.port), "--host", args.host,
                            "--check"], capture_output=True, text=True)
    if check.returncode != 0:
        raise ServiceError(check.stderr.strip().removeprefix("error: ") or "python -m serving refused its flags.")
    log_path = root / "serving.log"
    cmd = [sys.executable, "-m", "serving", *flags, "--port", str(args.port), "--host", args.host]
    host = "127.0.0.1" if args.host in ("0.0.0.0", "") else args.host
    url = f"http://{host}:{args.port}"
    proc = launch(cmd, log_path, root / "serving.json", {"url": url, "cmd": cmd},
                  f"start at {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(cmd)}")
    if not wait_until(lambda: _answers(url), START_TIMEOUT_S, interval_s=0.5, alive=lambda: proc.poll() is None):
        stop_group(proc.pid, MARKER, grace_s=20)
        raise ServiceError(f"the ADN server did not start within {START_TIMEOUT_S:.0f} s (log: {log_path}):\n"
                           + tail(log_path, 12))
    print(f"ADN served at {url} (pid {proc.pid})\n"
          f"  classify: curl -s --data-binary @image.png -H 'X-Deadline-Ms: 50' {url}/v1/classify\n"
          f"  model:    curl -s {url}/v1/model\n"
          f"  stop:     make serve-stop\n"
          f"  log:      {log_path}")
    return 0


def stop(args: argparse.Namespace) -> int:
    root = state_dir(args.state_dir, create=False)
    record = read_record(root / "serving.json")
    if record and stop_group(record["pid"], MARKER, grace_s=30, first=signal.SIGTERM):
        print(f"stopped the ADN server (pid {record['pid']})")
    else:
        print(f"no ADN server from {root} was running")
    return 0


def status(args: argparse.Namespace) -> int:
    record = read_record(state_dir(args.state_dir, create=False) / "serving.json")
    if record and is_running(record["pid"], MARKER):
        print(f"ADN served at {record['url']} (pid {record['pid']})")
        return 0
    print("no ADN server is running")
    return 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cluster.serving", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--state-dir", help="where the PID and log live (default: $CLUSTER_STATE or ./.cluster)")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("start", help="serve in the background; flags after -- go to python -m serving")
    s.add_argument("--host", default="127.0.0.1", help="HTTP address (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    s.add_argument("serving_args", nargs=argparse.REMAINDER, help="-- then python -m serving's flags")
    sub.add_parser("stop", help="stop the server that start started (by PID)")
    sub.add_parser("status", help="whether it runs, and where")
    args = p.parse_args(argv)
    try:
        return {"start": start, "stop": stop, "status": status}[args.command](args)
    except ServiceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
