"""Joining the Ray cluster a search runs on: its address, its token, and ``ray.init`` with our signal handling.

The head (``make ray-head``, ``cluster/ray_node.py``) keeps its token in ``<state>/ray/auth_token``; a
driver presents the same token, from ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or that file.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

from pipeline.distributed import accepts
from pipeline.signals import Terminated, raise_on_sigterm


def default_state_dir() -> Path:
    """Where the service targets keep their state: ``$CLUSTER_STATE``, else ``./.cluster`` (absolute)."""
    return Path(os.environ.get("CLUSTER_STATE") or ".cluster").resolve()


def token_file(root: Path) -> Path:
    """The head's token file under the state directory ``root``."""
    return root / "ray" / "auth_token"


def auth_env(root: Path | None = None) -> dict[str, str]:
    """``RAY_AUTH_MODE=token`` and where the token is: the environment's, else the state directory's file
    (empty when neither exists: Ray's own default, ``~/.ray/auth_token``, may still hold it)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return {"RAY_AUTH_MODE": "token"}
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": os.environ["RAY_AUTH_TOKEN_PATH"]}
    path = token_file(root or default_state_dir())
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(path)} if path.exists() else {}


def parse_address(address: str) -> tuple[str, int] | None:
    """``HOST:PORT`` (``[v6]:PORT`` too) as a pair; None when it is not that."""
    match = re.fullmatch(r"\[?([^\]]+?)\]?:(\d+)", address or "")
    return (match.group(1), int(match.group(2))) if match else None


def probe(address: str) -> None:
    """One sentence at once when nothing listens at ``--ray-address`` (before any table is measured)."""
    if address == "auto":
        return
    parsed = parse_address(address)
    if parsed is None:
        raise ValueError(f"--ray-address {address!r} is not HOST:PORT or auto.")
    if not accepts(*parsed, timeout=5):
        raise ValueError(f"no Ray cluster answers at {address}; start one (make ray-head) or fix --ray-address.")


@contextlib.contextmanager
def _sigterm_during_init() -> Iterator[None]:
    """A SIGTERM while ``ray.init`` runs meets Ray's own handler, ``sys.exit(15)``: made an interruption too."""
    try:
        yield
    except SystemExit as err:
        if err.code != signal.SIGTERM:
            raise
        raise Terminated("stopped by SIGTERM") from None


def connect(address: str | None) -> None:
    """Join the cluster at ``address``, or start a local Ray.

    Ray's core worker replaces the SIGTERM handler with one that aborts the driver; ours goes back, so a
    terminated search still marks its MLflow runs KILLED and shuts Ray down on the way out.
    """
    import ray

    if not address:
        with _sigterm_during_init():
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False,
                     num_cpus=os.cpu_count() or 1)
        raise_on_sigterm()
        return
    probe(address)
    try:
        with _sigterm_during_init():
            ray.init(address=address, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot join the Ray cluster at {address} ({reason.rstrip('.')}); start one "
                         "(make ray-head) or check its token (RAY_AUTH_TOKEN_PATH).") from err
    raise_on_sigterm()
