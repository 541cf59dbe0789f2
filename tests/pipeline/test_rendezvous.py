"""The rendezvous store of a training listens on the master address only, not on every interface."""

from __future__ import annotations

import subprocess
import sys

from ..conftest import ROOT, train_env
from ..daemons import free_port

PROBE = """
import sys
from pipeline.distributed import rendezvous
port = int(sys.argv[1])
rendezvous("gloo", 0, 1, "127.0.0.1", port, timeout_s=30)
listening = []
for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    for line in open(table).read().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
            listening.append(local.rsplit(":", 1)[0])
print(",".join(listening))
"""


def test_the_rendezvous_store_listens_on_the_master_address_only() -> None:
    port = free_port()
    done = subprocess.run([sys.executable, "-c", PROBE, str(port)], cwd=ROOT, env=train_env(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    # /proc/net/tcp writes 127.0.0.1 as 0100007F; every interface would be 00000000, or :: in tcp6.
    assert done.stdout.strip().splitlines()[-1] == "0100007F"
