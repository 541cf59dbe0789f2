"""Real daemons for the cluster tests, started in the foreground and stopped by their PIDs.

Each helper skips the test (with the reason) when the programs it needs are missing;
`make system-deps` installs them as root, and CI runs it before `make test`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from pipeline.distributed import free_port


def listening_on(port: int) -> list[str]:
    """The local addresses of the TCP sockets listening on ``port``, as /proc/net/tcp and tcp6 write them
    (127.0.0.1 is 0100007F; every interface would be 00000000, or zeros in tcp6)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                found.append(local.rsplit(":", 1)[0])
    return found


def require(*programs: str) -> None:
    missing = [p for p in programs if shutil.which(p) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (make system-deps installs them as root)")


def wait_for(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise TimeoutError(f"{what} did not happen within {timeout:.0f} s")


def stop(proc: subprocess.Popen, grace: float = 10.0, group: bool = False) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds: the process (or its process group) by PID."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue


@contextmanager
def http_server(directory: Path) -> Iterator[str]:
    """``python -m http.server`` on 127.0.0.1 serving ``directory``; yields its base URL."""
    import sys

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port), "--directory",
                             str(directory)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _accepts(port), 20, "http.server")
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@contextmanager
def s3_server() -> Iterator[dict[str, str]]:
    """moto's S3-compatible server on 127.0.0.1; yields the environment boto3 and the AWS CLI need to use it."""
    import sys

    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "moto_server").is_file() or not (bin_dir / "aws").is_file():
        pytest.skip("moto_server and the AWS CLI are not installed (pip install -e '.[dev]')")
    port = free_port()
    proc = subprocess.Popen([str(bin_dir / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _accepts(port), 30, "moto_server")
        yield {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
               "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
               "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    finally:
        stop(proc)


SLURM_CONF = """\
ClusterName=adntest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
AuthType=auth/munge
AuthInfo=socket={munge_socket},cred_expire=10
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
InactiveLimit=0
KillWait=5
MinJobAge=600
NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.1 Port={port_n1} CPUs={cpus} State=UNKNOWN
NodeName=n2 NodeHostname=localhost NodeAddr=127.0.0.1 Port={port_n2} CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


@contextmanager
def slurm_cluster(root: Path) -> Iterator[dict[str, str]]:
    """munged, slurmctld and two ``slurmd -N n1|n2`` on this host; yields the environment that reaches them."""
    require("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "scancel")
    if os.geteuid() != 0:
        pytest.skip("slurmd runs jobs as their users only when it is root (CI runs as root)")
    for sub in ("munge", "state", "spool/n1", "spool/n2", "log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    munge = root / "munge"
    munge.chmod(0o700)
    key = munge / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    conf = root / "slurm.conf"
    ctld_port = free_port()
    conf.write_text(SLURM_CONF.format(root=root, ctld_port=ctld_port, port_n1=free_port(),
                                      port_n2=free_port(), munge_socket=munge / "socket", cpus=os.cpu_count() or 1))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    procs: list[subprocess.Popen] = []

    def start(*cmd: str) -> None:
        log = open(root / "log" / f"{Path(cmd[0]).name}-{len(procs)}.out", "wb")  # noqa: SIM115
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
        log.close()

    try:
        start("munged", "--foreground", "--force", f"--socket={munge / 'socket'}", f"--key-file={key}",
              f"--pid-file={munge / 'pid'}", f"--seed-file={munge / 'seed'}", f"--log-file={root / 'log/munged.log'}")
        wait_for(lambda: (munge / "socket").exists(), 20, "munged's socket")
        start("slurmctld", "-D", "-f", str(conf))
        start("slurmd", "-D", "-N", "n1", "-f", str(conf))
        start("slurmd", "-D", "-N", "n2", "-f", str(conf))

        def idle() -> bool:
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=env, capture_output=True, text=True)
            return sorted(out.stdout.split()) == ["idle", "idle", "n1", "n2"]

        wait_for(idle, 120, "two idle SLURM nodes", interval=0.5)
        yield env
    finally:
        subprocess.run(["scancel", "--full", "--user", "root"], env=env, capture_output=True, timeout=30)
        with suppress(TimeoutError, OSError):
            wait_for(lambda: not subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True).stdout
                     .strip(), 60, "the cancelled jobs to end", interval=0.5)
        for proc in reversed(procs):
            stop(proc)
