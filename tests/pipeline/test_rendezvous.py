"""The rendezvous store of a training listens on the master address only, not on every interface."""

from __future__ import annotations

import subprocess
import sys

from ..conftest import ROOT, train_env
from ..daemons import free_port

PROBE = """
import sys
from pipeline.distributed import rendezvous
from tests.daemons import listening_on
port = int(sys.argv[1])
rendezvous("gloo", 0, 1, "127.0.0.1", port, timeout_s=30)
print(",".join(listening_on(port)))
"""


def test_the_rendezvous_store_listens_on_the_master_address_only() -> None:
    port = free_port()
    done = subprocess.run([sys.executable, "-c", PROBE, str(port)], cwd=ROOT, env=train_env(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "0100007F"
