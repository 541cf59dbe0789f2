"""What the study tests share: a study's command run as a user types it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ..conftest import train_env


def run_study(module: str, *args: str, cwd: Path, timeout: int = 1800) -> subprocess.CompletedProcess:
    """``python -m studies.<module> ARGS`` in ``cwd``, with the trainings' environment."""
    return subprocess.run([sys.executable, "-m", f"studies.{module}", *args], cwd=cwd, env=train_env(),
                          capture_output=True, text=True, timeout=timeout)
