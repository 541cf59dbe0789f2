"""What the service targets started, recorded by PID under a state directory, so stop targets stop only that.

The state directory is ``$CLUSTER_STATE``, else ``.cluster`` in the working directory (gitignored).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from search.ray_client import default_state_dir


class ServiceError(RuntimeError):
    """A service cannot start or be reached; the message is one sentence that says what to do."""


def state_dir(path: str | os.PathLike[str] | None = None, create: bool = True) -> Path:
    """``path``, else ``$CLUSTER_STATE``, else ``./.cluster``: absolute, created unless ``create`` is False."""
    root = Path(path).resolve() if path else default_state_dir()
    if create:
        root.mkdir(parents=True, exist_ok=True)
    return root


def read_record(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_record(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)


def write_secret(path: Path, value: str) -> None:
    """A file only its owner can read (tokens, passwords)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value)


def launch(cmd: list[str], log_path: Path, record_path: Path, record: dict[str, Any], header: str,
           env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a service in its own session (its process group is what stop_group stops), its output appended to
    ``log_path`` after a ``=== header`` line, and record its PID and log beside ``record``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        log.write(f"=== {header}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    write_record(record_path, {**record, "pid": proc.pid, "log": str(log_path)})
    return proc


def is_running(pid: int, marker: str) -> bool:
    """Whether ``pid`` is alive and still the process we started (its command line holds ``marker``)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z" and marker in cmdline


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes in process group ``pgid``."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(stat.parent.name))
    return members


def stop_group(pid: int, marker: str, grace_s: float = 20.0, first: signal.Signals | None = None) -> bool:
    """Stop the process group ``pid`` leads: ``first`` to the leader alone (its own clean shutdown, e.g.
    SIGINT for ``ray start --block``), then SIGTERM, then SIGKILL to the group, each after ``grace_s``
    without the group emptying. False if ``pid`` was not our running process."""
    if not is_running(pid, marker):
        return False
    steps = [(first, False)] if first is not None else []
    for sig, whole in [*steps, (signal.SIGTERM, True), (signal.SIGKILL, True)]:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig) if whole else os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            if not group_members(pid):
                return True
            time.sleep(0.1)
    return True


def wait_until(condition: Callable[[], bool], timeout_s: float, interval_s: float = 0.25,
               alive: Callable[[], bool] | None = None) -> bool:
    """Poll ``condition`` until it holds (True), ``timeout_s`` passes or ``alive`` turns False (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        if alive is not None and not alive():
            return False
        time.sleep(interval_s)
    return condition()


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
