"""Joining the Ray cluster a search or a server runs on: its address, its token, Ray Serve's ingress, and
``ray.init`` with our signal handling.

The head (``make ray-head``, ``cluster/ray_node.py``) keeps its token in ``<state>/ray/auth_token``; a
driver presents the same token, from ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or that file.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

from pipeline.distributed import accepts, free_port, port_taken
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


SERVE_INGRESSES = ("haproxy", "proxy")


def serve_ingress_env(ingress: str = "haproxy", free_ports: bool = False) -> dict[str, str]:
    """What a Ray node must start with for Ray Serve's HTTP ingress: ``haproxy`` routes requests from HAProxy straight
    to the replicas, with Serve's throughput settings (Ray >= 2.56); ``proxy`` keeps Serve's Python proxy actor.

    HAProxy's stats and Prometheus listeners bind every interface (Ray's template), on 8404 and 9101 unless
    ``free_ports`` picks free ones, so that several local Rays can serve on one machine."""
    if ingress not in SERVE_INGRESSES:
        raise ValueError(f"the ingress must be one of {', '.join(SERVE_INGRESSES)}, got {ingress!r}.")
    on = "1" if ingress == "haproxy" else "0"
    env = {"RAY_SERVE_ENABLE_HA_PROXY": on, "RAY_SERVE_THROUGHPUT_OPTIMIZED": on}
    if ingress == "haproxy" and free_ports:
        stats = quiet_port()
        env |= {"RAY_SERVE_HAPROXY_STATS_PORT": str(stats), "RAY_SERVE_HAPROXY_METRICS_PORT": str(quiet_port(stats))}
    return env


QUIET_PORTS = range(20000, 32768)  # above Ray's worker ports (10002-19999), below Linux's usual ephemeral range


def quiet_port(*taken: int) -> int:
    """A port free on every interface now and out of the ranges the processes Ray starts pick theirs from, so that
    it is still free when a listener binds it later (a ``free_port`` from the ephemeral range may be gone by then)."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for port in random.sample(QUIET_PORTS, 64):
        if port < low and port not in taken and not port_taken("0.0.0.0", port):
            return port
    return free_port()


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
def _sigterm_held() -> Iterator[None]:
    """Hold a SIGTERM that arrives while ``ray.init`` runs and raise it as ``Terminated`` once init returns,
    so Ray is never left half-started; Ray's own handler (``set_sigterm_handler``) is kept out for the call."""
    import ray._private.utils as ray_utils

    if threading.current_thread() is not threading.main_thread():  # only the main thread sets handlers
        yield
        return
    held: list[int] = []
    install = ray_utils.set_sigterm_handler
    ray_utils.set_sigterm_handler = lambda handler: None
    signal.signal(signal.SIGTERM, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        ray_utils.set_sigterm_handler = install
        raise_on_sigterm()
    if held:
        raise Terminated("stopped by SIGTERM")


def connect(address: str | None, metrics_port: int | None = None) -> None:
    """Join the cluster at ``address``, or start a local Ray (exporting Prometheus metrics on ``metrics_port`` when
    given; a cluster's nodes export on the port they were started with).

    A SIGTERM raises ``Terminated`` (held while init runs), so a terminated search marks its MLflow runs
    KILLED and shuts Ray down on the way out.
    """
    import ray

    if not address:
        with _sigterm_held():
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False,
                     num_cpus=os.cpu_count() or 1, _metrics_export_port=metrics_port)
        return
    probe(address)
    try:
        with _sigterm_held():
            ray.init(address=address, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot join the Ray cluster at {address} ({reason.rstrip('.')}); start one "
                         "(make ray-head) or check its token (RAY_AUTH_TOKEN_PATH).") from err


def leave(code: int) -> NoReturn:
    """Shut this process's Ray down and exit with ``code`` at once, without the interpreter's teardown.

    The way out of an interrupted search, whose MLflow runs and output lock are closed by then: once Ray's
    C++ signal handler has seen a SIGTERM, that teardown can abort the process (SIGABRT) instead.
    """
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
