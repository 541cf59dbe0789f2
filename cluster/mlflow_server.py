"""The team's MLflow tracking server on PostgreSQL: ``python -m cluster.mlflow_server start|stop|status``.

``make mlflow-server`` runs ``start``. The backend is a PostgreSQL database: ``--db`` (SQLAlchemy URL,
``postgresql+psycopg2://USER:PASS@HOST:PORT/DB``), else a local PostgreSQL cluster that ``start``
creates (initdb) and starts (pg_ctl) under the state directory, on a loopback port. Artifacts are
proxied by the server (``--serve-artifacts``), so clients log and download weights through HTTP
and need no storage credentials. The server binds 127.0.0.1 unless ``--host`` says otherwise;
``--auth`` turns on MLflow's basic auth with an admin password generated at the first start.

Clients: ``export MLFLOW_TRACKING_URI=http://HOST:PORT`` (or ``--tracking-uri``) for
``pipeline.train`` and ``search.pareto``. ``stop`` stops exactly the processes ``start`` started:
the server's process group by its recorded PID, and the local PostgreSQL through pg_ctl (which
reads its postmaster.pid).
"""

from __future__ import annotations

import argparse
import glob
import ipaddress
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.distributed import accepts, free_port, port_taken

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

CONFIG = Path(__file__).parent / "mlflow"
MARKER = "mlflow"  # in the server's command line: guards stop against a reused PID
START_TIMEOUT_S = 180.0  # the first start migrates an empty database (alembic), tens of seconds on 2 cores


# -- the database ---------------------------------------------------------------------------------

def normalize_db_url(url: str) -> str:
    """``postgresql://`` -> ``postgresql+psycopg2://`` (SQLAlchemy 2.1 maps the bare scheme to psycopg 3)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError as err:
        raise ServiceError(f"MLFLOW_DB={url!r} is not a database URL; use "
                           "postgresql+psycopg2://USER:PASSWORD@HOST:PORT/DATABASE.") from err
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg2")
    return parsed.render_as_string(hide_password=False)


def redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def check_database(url: str, timeout_s: int = 5) -> None:
    """Connect once, so an unreachable database is one sentence before any server starts."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if not parsed.drivername.startswith("postgresql"):
        return
    import psycopg2

    try:
        psycopg2.connect(host=parsed.host or "127.0.0.1", port=parsed.port or 5432, user=parsed.username,
                         password=parsed.password, dbname=parsed.database, connect_timeout=timeout_s).close()
    except psycopg2.OperationalError as err:
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise ServiceError(f"the database {redact(url)} is unreachable ({reason.rstrip('.')}); start it or "
                           "fix MLFLOW_DB (unset it to run a local PostgreSQL).") from err


class LocalPostgres:
    """A PostgreSQL cluster under ``<state>/postgres`` on a loopback port, owned by this state directory.

    PostgreSQL refuses to run as root, so as root its commands run as the ``postgres`` user that
    Debian's package creates.
    """

    def __init__(self, root: Path) -> None:
        self.root = root / "postgres"
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.record_path = root / "postgres.json"
        self.bin = self._find_bin()

    @staticmethod
    def _find_bin() -> Path:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[4]))
        initdb = found[-1] if found else shutil.which("initdb")
        if not initdb:
            raise ServiceError("PostgreSQL is not installed (no initdb); run `make system-deps` as root, or pass "
                               "MLFLOW_DB=postgresql+psycopg2://USER:PASSWORD@HOST:PORT/DATABASE.")
        return Path(initdb).parent

    def _as_owner(self, *cmd: str) -> list[str]:
        if os.geteuid() != 0:
            return list(cmd)
        return ["runuser", "-u", "postgres", "--", *cmd]

    def _run(self, *cmd: str, timeout: float = 120) -> subprocess.CompletedProcess:
        done = subprocess.run(self._as_owner(*cmd), capture_output=True, text=True, timeout=timeout)
        if done.returncode:
            lines = (done.stderr or done.stdout).strip().splitlines()
            raise ServiceError(f"{Path(cmd[0]).name} failed: {lines[-1] if lines else done.returncode} "
                               f"(log: {self.log}).")
        return done

    def ensure(self, port: int | None) -> str:
        """Create the cluster on first use, start it if it is down; the database URL for MLflow."""
        record = read_record(self.record_path)
        if record is None:
            record = self._create(port)
        if not accepts("127.0.0.1", record["port"]):
            if port_taken("127.0.0.1", record["port"]):
                raise ServiceError(f"port {record['port']} of the local PostgreSQL is taken by another program; "
                                   f"stop it or remove {self.root} to create the database again.")
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                      "start")
        return (f"postgresql+psycopg2://mlflow:{record['password']}@127.0.0.1:{record['port']}/mlflow")

    def _create(self, port: int | None) -> dict[str, Any]:
        port = port or free_port()
        if self.root.exists():
            shutil.rmtree(self.root)  # a half-made cluster from an interrupted first start
        self.root.mkdir(parents=True)
        if os.geteuid() == 0 and subprocess.run(self._as_owner("test", "-x", str(self.root.parent))).returncode:
            shutil.rmtree(self.root)
            raise ServiceError(f"the postgres user cannot reach {self.root.parent} (a parent directory is private); "
                               "choose a state directory it can enter (CLUSTER_STATE=...).")
        superuser, password = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        pwfile = self.root / "pwfile"
        write_secret(pwfile, superuser)
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
            shutil.chown(pwfile, "postgres", "postgres")
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--pwfile", str(pwfile),
                  "--auth-host=scram-sha-256", "--auth-local=scram-sha-256", "-E", "UTF8", "--no-locale")
        pwfile.unlink()
        settings = (CONFIG / "postgresql.conf").read_text().replace("{port}", str(port))
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write("\n" + settings)
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", password=superuser, dbname="postgres",
                                connect_timeout=10)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("CREATE ROLE mlflow LOGIN PASSWORD %s", (password,))
            cur.execute("CREATE DATABASE mlflow OWNER mlflow")
            cur.execute("CREATE DATABASE mlflow_auth OWNER mlflow")
        conn.close()
        record = {"port": port, "password": password, "superuser_password": superuser, "data": str(self.data)}
        write_secret(self.record_path, json.dumps(record, indent=1))
        return record

    def stop(self) -> bool:
        if not (self.data / "postmaster.pid").exists():
            return False
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")
        return True


# -- the server -----------------------------------------------------------------------------------

def _auth_config(root: Path, db_url: str, local_pg: bool) -> dict[str, str]:
    """Environment for ``--app-name basic-auth``: our config, and the admin password and the Flask session key,
    each generated at the first start and kept, readable by its owner only, in the state directory."""
    auth_db = db_url.rsplit("/", 1)[0] + "/mlflow_auth" if local_pg else f"sqlite:///{root / 'mlflow' / 'auth.db'}"
    config = root / "mlflow" / "basic_auth.ini"
    write_secret(config, (CONFIG / "basic_auth.ini").read_text().replace("{database_uri}", auth_db))
    password_file = root / "mlflow" / "admin_password"
    key_file = root / "mlflow" / "flask_secret_key"  # signs the auth app's sessions and CSRF tokens
    for path, make in ((password_file, lambda: secrets.token_urlsafe(18)), (key_file, lambda: secrets.token_hex(32))):
        if not path.exists():
            write_secret(path, make())
    return {"MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_AUTH_ADMIN_PASSWORD": password_file.read_text(),
            "MLFLOW_FLASK_SERVER_SECRET_KEY": key_file.read_text()}


def error_line(log: str) -> str:
    """The server's own last error line in its log since the last start (else its last line)."""
    if "=== start at" in log:
        log = log.rsplit("=== start at", 1)[1].split("\n", 1)[-1]
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    errors = [line for line in lines if re.search(r"(Error|Exception)\b|error:", line)]
    return (errors or lines or ["(no output)"])[-1]


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: whatever it resolves to, it is not this machine's loopback by name


def health(uri: str, timeout: float = 2.0) -> bool:
    import requests

    try:
        return requests.get(uri.rstrip("/") + "/health", timeout=timeout).ok
    except requests.RequestException:
        return False


def start(args: argparse.Namespace) -> int:
    root = state_dir(args.state_dir)
    record_path = root / "mlflow" / "server.json"
    record = read_record(record_path)
    if record and is_running(record["pid"], MARKER):
        print(f"the MLflow server is already running at {record['uri']} (pid {record['pid']}); "
              "`make mlflow-server-stop` stops it.")
        return 0
    if not _loopback(args.host) and not args.auth:
        if not args.insecure:
            raise ServiceError(f"--host {args.host} opens the server to other hosts without authentication; add "
                               "--auth (make mlflow-server MLFLOW_AUTH=1), or --insecure (MLFLOW_INSECURE=1) on a "
                               "trusted network.")
        print(f"warning: the MLflow server on {args.host} takes requests from any host that reaches it, without "
              "authentication (--insecure).", file=sys.stderr)
    if port_taken(args.host, args.port):
        raise ServiceError(f"port {args.port} on {args.host} is already taken by another program; stop it or "
                           f"choose another port (make mlflow-server MLFLOW_PORT=...).")
    local_pg = not args.db
    db_url = normalize_db_url(args.db) if args.db else LocalPostgres(root).ensure(args.postgres_port)
    check_database(db_url)
    artifacts = args.artifacts or str(root / "mlflow" / "artifacts")
    if "://" not in artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        artifacts = str(Path(artifacts).resolve())
    log_path = root / "mlflow" / "server.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "mlflow", "server", "--serve-artifacts", "--artifacts-destination", artifacts,
           "--host", args.host, "--port", str(args.port), "--workers", str(args.workers)]
    if args.allowed_hosts:
        cmd += ["--allowed-hosts", args.allowed_hosts]
    env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": db_url}  # not in argv, where `ps` shows every user the password
    if args.auth:
        cmd += ["--app-name", "basic-auth"]
        env.update(_auth_config(root, db_url, local_pg))
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    uri = f"http://{host}:{args.port}"
    proc = launch(cmd, log_path, record_path,
                  {"uri": uri, "host": args.host, "port": args.port, "backend": redact(db_url), "artifacts": artifacts,
                   "auth": args.auth, "local_postgres": local_pg},
                  f"start at {time.strftime('%Y-%m-%d %H:%M:%S')}: {redact(db_url)} -> {uri}", env)
    began = time.monotonic()
    if not wait_until(lambda: health(uri), args.timeout, interval_s=0.5, alive=lambda: proc.poll() is None):
        exited = proc.poll() is not None
        stop_group(proc.pid, MARKER)
        waited = time.monotonic() - began
        if exited:
            why = error_line(log_path.read_text(errors="replace"))
            raise ServiceError(f"the MLflow server exited after {waited:.0f} s: {why} (log: {log_path})")
        raise ServiceError(f"the MLflow server did not come up within {waited:.0f} s (log: {log_path}):\n"
                           + tail(log_path))
    print(f"MLflow server at {uri} (pid {proc.pid})\n  backend:   {redact(db_url)}\n  artifacts: {artifacts} "
          f"(proxied: clients need no storage credentials)\n  log:       {log_path}")
    if args.auth:
        print(f"  auth:      basic; user admin, password in {root / 'mlflow' / 'admin_password'}; clients set "
              "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
    print(f"export MLFLOW_TRACKING_URI={uri}")
    return 0


def stop(args: argparse.Namespace) -> int:
    root = state_dir(args.state_dir, create=False)
    record = read_record(root / "mlflow" / "server.json")
    stopped = []
    if record and stop_group(record["pid"], MARKER):
        stopped.append(f"the MLflow server (pid {record['pid']})")
    if (root / "postgres.json").exists() and not args.keep_db and LocalPostgres(root).stop():
        stopped.append("the local PostgreSQL")
    print("stopped " + " and ".join(stopped) if stopped else f"nothing to stop in {root}")
    return 0


def status(args: argparse.Namespace) -> int:
    root = state_dir(args.state_dir, create=False)
    record = read_record(root / "mlflow" / "server.json")
    if not record or not is_running(record["pid"], MARKER):
        print(f"no MLflow server running from {root}")
        return 1
    state = "healthy" if health(record["uri"]) else "not answering"
    print(f"MLflow server at {record['uri']} (pid {record['pid']}): {state}; backend {record['backend']}, "
          f"artifacts {record['artifacts']}")
    return 0 if state == "healthy" else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cluster.mlflow_server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--state-dir", help="where PIDs, logs and the local database live (default: $CLUSTER_STATE "
                                       "or ./.cluster)")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("start", help="start PostgreSQL (when no --db) and the MLflow server; waits until healthy")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for other hosts; add --auth)")
    s.add_argument("--port", type=int, default=5000)
    s.add_argument("--db", help="SQLAlchemy URL of the backend store (default: a local PostgreSQL)")
    s.add_argument("--postgres-port", type=int, help="port of the local PostgreSQL when it is created "
                                                     "(default: a free one)")
    s.add_argument("--artifacts", help="artifact destination: a directory or s3://BUCKET/PREFIX "
                                       "(default: <state>/mlflow/artifacts)")
    s.add_argument("--auth", action="store_true", help="MLflow basic auth (admin password generated at first start)")
    s.add_argument("--insecure", action="store_true",
                   help="allow a --host beyond loopback without --auth (anyone who reaches it reads and writes runs)")
    s.add_argument("--workers", type=int, default=2, help="server worker processes")
    s.add_argument("--allowed-hosts", help="Host headers the server accepts, for a --host other than loopback")
    s.add_argument("--timeout", type=float, default=START_TIMEOUT_S, help="seconds to wait for the server")
    t = sub.add_parser("stop", help="stop the server and the local PostgreSQL that start started")
    t.add_argument("--keep-db", action="store_true", help="leave the local PostgreSQL running")
    sub.add_parser("status", help="say whether the server runs and answers")
    args = p.parse_args(argv)
    try:
        return {"start": start, "stop": stop, "status": status}[args.command](args)
    except ServiceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
