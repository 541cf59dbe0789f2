"""Signals that end a process as exceptions, so its ``finally`` blocks run and its MLflow runs say how it ended.

Python turns Ctrl-C into ``KeyboardInterrupt`` but lets SIGTERM (``kill``, ``scancel``, Ray stopping a
driver) end the process where it stands: runs stayed RUNNING for ever and partial files stayed.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
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


#: What asks a training to stop at the next step: SIGTERM (scancel, a preemption, Ctrl-C's cousin from a
#: launcher) and SIGUSR1 (``sbatch --signal=USR1@120``: SLURM's warning before the time limit).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """A stop signal turned into a flag that the training loop reads between steps.

    The loop finishes its step, writes a checkpoint and leaves (``Preempted``); under SLURM the job then
    requeues itself and resumes. The handlers are inherited by forked data-loader workers, where they
    only set a flag, so a signal sent to the whole process group does not kill a worker mid-batch.
    """

    def __init__(self) -> None:
        self.signum = 0
        self._waiting = False

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                signal.signal(sig, self._request)

    def _request(self, signum: int, frame: Any) -> None:
        self.signum = self.signum or signum
        if self._waiting:
            self._waiting = False
            raise StopWaiting(signum)

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """A wait for data (a stalled storage server can block it for minutes): a stop signal raises
        ``StopWaiting`` here at once instead of at the next step. Enter it after the loader's workers
        are forked, so they keep only the flag."""
        if self.signum:
            raise StopWaiting(self.signum)
        self._waiting = True
        try:
            yield
        finally:
            self._waiting = False


class StopWaiting(Exception):
    """A stop signal arrived while the training waited for its next batch."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Preempted(Exception):
    """The training stopped on a signal after writing checkpoint ``tag`` at ``step``."""

    def __init__(self, signum: int, step: int, tag: str) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint {tag} is complete")
        self.signum, self.step, self.tag = signum, step, tag
