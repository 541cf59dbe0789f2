"""Joining Ray with our signal handling: a SIGTERM during ``ray.init`` waits until init has returned; the ports of
Ray Serve's HAProxy ingress."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.distributed import port_taken
from pipeline.signals import Terminated
from search.ray_client import QUIET_PORTS, _sigterm_held, quiet_port, serve_ingress_env


@pytest.fixture
def own_sigterm_handler() -> Iterator[None]:
    """The test's changes to the SIGTERM handler undone afterwards."""
    before = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, before)


def test_a_sigterm_inside_is_raised_once_the_block_is_done(own_sigterm_handler: None) -> None:
    steps = []
    with pytest.raises(Terminated, match="stopped by SIGTERM"), _sigterm_held():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)  # the handler has run by now: held, not raised
        steps.append("finished")
    assert steps == ["finished"]
    with pytest.raises(Terminated):  # afterwards a SIGTERM raises at once
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)


def test_off_the_main_thread_it_changes_no_handler() -> None:
    before = signal.getsignal(signal.SIGTERM)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with _sigterm_held():
                pass
        except BaseException as err:  # noqa: BLE001 (signal.signal off the main thread raises ValueError)
            errors.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(10)
    assert not errors and signal.getsignal(signal.SIGTERM) is before


def test_an_unreadable_shard_behind_a_ray_error_is_the_sentence_training_gives() -> None:
    """A search whose data server died printed Ray's traceback; the worker's ShardReadError is the message."""
    from ray.exceptions import RayTaskError

    from pipeline.data.storage import ShardReadError
    from search.evaluation import shard_error

    sentence = ("shard http://127.0.0.1:9/val-000001.tar could not be read (4 attempts, last: curl exited with "
                "status 7: could not connect to the server); check that it exists and the storage is reachable.")
    try:
        raise ShardReadError(sentence)
    except ShardReadError as cause:
        import traceback

        wrapped = RayTaskError("EvalWorker.run", traceback.format_exc(), cause).as_instanceof_cause()
    assert str(shard_error(wrapped)) == sentence
    assert str(shard_error(RuntimeError(f"the Ray Tune search stopped: {wrapped}"))) == sentence
    assert shard_error(RuntimeError("something else")) is None


def test_the_haproxy_ingress_gets_two_ports_that_ray_and_the_kernel_do_not_hand_out() -> None:
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert serve_ingress_env("proxy", free_ports=True) == {"RAY_SERVE_ENABLE_HA_PROXY": "0",
                                                           "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"}
    env = serve_ingress_env("haproxy", free_ports=True)
    ports = [int(env["RAY_SERVE_HAPROXY_STATS_PORT"]), int(env["RAY_SERVE_HAPROXY_METRICS_PORT"])]
    assert ports[0] != ports[1]
    for port in ports:
        assert port in QUIET_PORTS and port < low and not port_taken("0.0.0.0", port)
    # A port someone listens on is never given.
    with socket.socket() as s:
        s.bind(("0.0.0.0", ports[0]))
        s.listen()
        assert all(quiet_port() != ports[0] for _ in range(50))
