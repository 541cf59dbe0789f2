"""One writer per directory or file: an exclusive POSIX lock with the holder's host and PID written in it.

A training's ``--output``, a search's ``--out`` and a latency table's cache entry each take one. The
kernel drops the lock when its holder dies, even by ``kill -9``, so a lock file left by a dead
process is stale by construction: the next writer takes it and says whose it was. A POSIX record
lock (``lockf``) rather than ``flock``: it belongs to the process, not to the open file, so the
data-loader workers a training forks do not hold it after a ``kill -9`` of their parent (with
``flock`` they did, for seconds); and it works on NFS. Its one trap, that closing any descriptor
of the file in the holder releases it, is why the holder's record is read through the lock's own
descriptor.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

LOCK_NAME = ".lock"


class LockHeld(RuntimeError):
    """Another live process holds the lock."""


def holder(fd: int) -> dict[str, Any]:
    """What the lock file says about who wrote it last ({} when it is empty or unreadable)."""
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}


def describe(info: dict[str, Any]) -> str:
    if not info:
        return "another process"
    return f"PID {info.get('pid')} on {info.get('host')} (since {info.get('since')}: {info.get('command', '?')})"


def _record() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "since": datetime.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.orig_argv)[:200]}


@contextlib.contextmanager
def exclusive(path: str | os.PathLike[str], what: str, wait: float = 0.0) -> Iterator[dict[str, Any]]:
    """Hold an exclusive lock on the file ``path`` for the block; yield the previous holder's record.

    ``wait`` seconds are spent retrying before ``LockHeld`` is raised with one sentence naming the holder
    (0: refuse at once). The record of a holder that died without releasing comes back as the yielded
    dict (empty when the lock was clean), so the caller can say it took over a stale lock.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        deadline, waited = time.monotonic() + wait, False
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() >= deadline:
                    raise LockHeld(f"{what} is in use by {describe(holder(fd))}; wait for it to finish or "
                                   "choose another one.") from None
                if not waited:
                    print(f"waiting up to {wait:.0f} s for {what}, in use by {describe(holder(fd))}",
                          file=sys.stderr)
                    waited = True
                time.sleep(0.2)
        stale = holder(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(_record()) + "\n").encode(), 0)
        try:
            yield stale
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def output_lock(directory: str | os.PathLike[str], what: str) -> Iterator[None]:
    """Lock ``directory/.lock`` for one writer; a directory this call created and nothing else used is removed.

    An early error (a bad flag found after the lock, an unreachable server) then leaves no empty output.
    """
    directory = Path(directory)
    created = not directory.exists()
    lock = directory / LOCK_NAME
    with exclusive(lock, f"{what} {str(directory)!r}") as stale:
        if stale:
            print(f"note: took over the lock of {str(directory)!r} from {describe(stale)}, which is no longer "
                  "running.", file=sys.stderr)
        try:
            yield
        finally:
            if created and [p.name for p in directory.iterdir()] == [LOCK_NAME]:
                lock.unlink()
                directory.rmdir()
