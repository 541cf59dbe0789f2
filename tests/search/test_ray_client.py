"""Joining Ray with our signal handling: a SIGTERM during ``ray.init`` waits until init has returned."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest

from pipeline.signals import Terminated
from search.ray_client import _sigterm_held


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
