"""What the study tests share: a study's command run as a user types it."""

from __future__ import annotations

import subprocess
from pathlib import Path

from ..conftest import run_module


def run_study(module: str, *args: str, cwd: Path, timeout: int = 1800) -> subprocess.CompletedProcess:
    """``python -m studies.<module> ARGS`` in ``cwd`` (``run_module``)."""
    return run_module(f"studies.{module}", *args, cwd=cwd, timeout=timeout)
