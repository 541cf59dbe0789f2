"""Signals that end a process as exceptions, so its ``finally`` blocks run and its MLflow runs say how it ended.

Python turns Ctrl-C into ``KeyboardInterrupt`` but lets SIGTERM (``kill``, ``scancel``, Ray stopping a
driver) end the process where it stands: runs stayed RUNNING for ever and partial files stayed.
"""

from __future__ import annotations

import signal
import threading
from typing import Any


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread wherever it was; an interruption, not a failure."""


def raise_on_sigterm() -> None:
    """Make SIGTERM raise ``Terminated`` in the main thread (a no-op elsewhere: only it may set handlers)."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum: int, frame: Any) -> None:
        raise Terminated(f"stopped by {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, handler)
