"""Join the process group: a bounded rendezvous, and a network interface that other nodes can reach.

Every launcher (a plain process, ``deepspeed`` on one node, ``--no_ssh`` per node under SLURM or
the local emulation, pdsh over ssh) ends here with the env:// variables set. Two multi-node
failures that otherwise hang for many minutes are turned into one sentence each:
- an unreachable ``MASTER_ADDR`` (a wrong address, a firewall, a node that never started): the
  rendezvous gives up after ``--rendezvous-timeout`` seconds;
- gloo binding loopback: without ``GLOO_SOCKET_IFNAME`` gloo binds the address the host name
  resolves to, 127.0.x.x on many machines, and the other nodes' connections are refused. On a
  multi-node job the interface that reaches ``MASTER_ADDR`` is chosen instead, and an interface a
  user named that this host lacks is an error.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import sys
import time
from datetime import timedelta

log = logging.getLogger(__name__)

RENDEZVOUS_TIMEOUT_S = 600.0
# torch and DeepSpeed are imported where the process group is made: the per-node launcher checks the
# network with this module before any rank starts, without paying for them.


class ClusterError(RuntimeError):
    """The job cannot form its process group; the message says what to fix."""


def free_port() -> int:
    """A TCP port free on loopback now (for a rendezvous on this machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_taken(host: str, port: int) -> bool:
    """Whether binding ``host:port`` fails now (someone listens there)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def accepts(host: str, port: int, timeout: float = 1.0) -> bool:
    """Whether something accepts a TCP connection at ``host:port`` within ``timeout`` seconds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _is_loopback(address: str) -> bool:
    return ipaddress.ip_address(address).is_loopback


def _resolve(host: str) -> str:
    try:
        return socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    except socket.gaierror as err:
        raise ClusterError(f"MASTER_ADDR {host!r} does not resolve on {socket.gethostname()} ({err.strerror}); "
                           "set it to an address of node 0.") from None


def interfaces() -> dict[str, list[str]]:
    """IPv4 addresses of each network interface of this host."""
    import psutil

    return {name: [a.address for a in addrs if a.family == socket.AF_INET]
            for name, addrs in psutil.net_if_addrs().items()}


def interface_towards(address: str) -> str | None:
    """The interface this host would use to reach ``address`` (the one owning the routed source address)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((address, 9))  # UDP: picks a route, sends nothing
        except OSError:
            return None
        source = probe.getsockname()[0]
    return next((name for name, addrs in interfaces().items() if source in addrs), None)


def _check_named(variable: str, names: dict[str, list[str]]) -> None:
    """An interface variable must name interfaces this host has (NCCL also takes prefixes, "=" and "^")."""
    value = os.environ.get(variable, "").strip()
    if not value or value.startswith("^"):  # an exclusion list names what not to use
        return
    exact = variable.startswith("GLOO") or value.startswith("=")
    wanted = [v.strip() for v in value.lstrip("=").split(",") if v.strip()]
    if exact:
        missing = [w for w in wanted if w not in names]
    else:
        missing = [] if any(n.startswith(w) for w in wanted for n in names) else wanted
    if missing:
        raise ClusterError(f"{variable}={value} names {', '.join(missing)}, which {socket.gethostname()} does not "
                           f"have (its interfaces: {', '.join(sorted(names))}); set {variable} to the interface "
                           "that reaches MASTER_ADDR on every node, or unset it.")


def prepare_network(master_addr: str, multi_node: bool) -> str | None:
    """Check the interface variables and, on a multi-node job, point gloo at the interface reaching the master.

    Returns the interface set in ``GLOO_SOCKET_IFNAME`` here, or None when nothing was changed.
    """
    names = interfaces()
    for variable in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        _check_named(variable, names)
    master_ip = _resolve(master_addr)
    if not multi_node or _is_loopback(master_ip):
        return None  # one host (or nodes emulated on one): loopback is right
    chosen = os.environ.get("GLOO_SOCKET_IFNAME")
    if chosen:
        loopback = [n for n in chosen.split(",") if any(_is_loopback(a) for a in names.get(n, []))]
        if loopback:
            raise ClusterError(f"GLOO_SOCKET_IFNAME={chosen} is a loopback interface, but MASTER_ADDR {master_addr} "
                               f"is another host; set it to the interface that reaches {master_ip} "
                               f"({interface_towards(master_ip) or 'see ip route get ' + master_ip}).")
        return None
    iface = interface_towards(master_ip)
    if iface is None:
        raise ClusterError(f"no network interface of {socket.gethostname()} reaches MASTER_ADDR {master_addr} "
                           f"({master_ip}); check the address, or set GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME "
                           "to the interface of the cluster network.")
    os.environ["GLOO_SOCKET_IFNAME"] = iface
    return iface


def check_master_is_local(master_addr: str) -> None:
    """Rank 0 hosts the rendezvous, so MASTER_ADDR must be one of its own addresses."""
    master_ip = _resolve(master_addr)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((master_ip, 0))
        except OSError:
            own = sorted({a for addrs in interfaces().values() for a in addrs})
            raise ClusterError(f"MASTER_ADDR {master_addr} ({master_ip}) is not an address of "
                               f"{socket.gethostname()}, where rank 0 runs the rendezvous (its addresses: "
                               f"{', '.join(own)}); set MASTER_ADDR to an address of node 0.") from None


def _reachable(host: str, port: int, timeout_s: float) -> OSError | None:
    """Poll until ``host:port`` accepts a connection; the last error if it never does within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
                return None
        except OSError as err:
            if time.monotonic() >= deadline:
                return err
        time.sleep(0.5)


_LISTENERS: list[socket.socket] = []  # the rendezvous sockets, open for the process's life


def _listen(address: str, port: int) -> socket.socket:
    """The rendezvous store's listening socket, bound to the master address only (torch's binds every interface)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((address, port))
    except OSError as err:
        sock.close()
        raise ClusterError(f"the rendezvous cannot listen on {address}:{port} ({err.strerror}); choose another "
                           "MASTER_PORT.") from None
    sock.listen(socket.SOMAXCONN)
    _LISTENERS.append(sock)
    return sock


def rendezvous(backend: str, rank: int, world_size: int, master_addr: str, master_port: int,
               timeout_s: float = RENDEZVOUS_TIMEOUT_S) -> None:
    """``init_process_group`` through a TCPStore whose connect and wait are bounded by ``timeout_s``.

    Other ranks first poll the master's port themselves: torch's own client would log a C++
    stack for every failed try before giving up.
    """
    import torch
    from deepspeed.constants import default_pg_timeout

    master_ip = _resolve(master_addr)
    started = time.monotonic()
    if rank == 0:
        check_master_is_local(master_addr)
    else:
        failed = _reachable(master_ip, master_port, timeout_s)
        if failed is not None:
            raise ClusterError(f"rank {rank} on {socket.gethostname()} could not reach the rendezvous at "
                               f"{master_addr}:{master_port} within {timeout_s:.0f} s "
                               f"({failed.strerror or type(failed).__name__}); check that MASTER_ADDR is node 0's "
                               "address on the cluster network, that node 0 started and the port is open, and "
                               "GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME.")
    remaining = max(timeout_s - (time.monotonic() - started), 1.0)
    listen_fd = _listen(master_ip, master_port).fileno() if rank == 0 else None
    try:
        store = torch.distributed.TCPStore(master_ip, master_port, world_size, is_master=rank == 0,
                                           timeout=timedelta(seconds=remaining), wait_for_workers=True,
                                           master_listen_fd=listen_fd)
    except (torch.distributed.DistError, RuntimeError) as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ClusterError(f"rank {rank}: the rendezvous at {master_ip}:{master_port} failed ({detail}); check that "
                           f"all {world_size} ranks started (every node's log) and reach MASTER_ADDR.") from None
    store.set_timeout(default_pg_timeout)  # collectives and later store calls: the usual timeout
    torch.distributed.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                         timeout=default_pg_timeout)


def setup_distributed(use_cuda: bool = False, rendezvous_timeout_s: float = RENDEZVOUS_TIMEOUT_S,
                      ) -> tuple[int, int, int]:
    """Join (or, for a plain single process, create) the process group, then hand it to DeepSpeed.

    Returns (rank, world size, local rank). Launchers (deepspeed, SLURM, the local emulation) set
    the env:// variables; a plain process gets a one-rank group on a free loopback port.
    """
    import torch

    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    import deepspeed

    backend = "nccl" if use_cuda else "gloo"
    if "RANK" in os.environ and not torch.distributed.is_initialized():
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_size = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or world)  # DS, torchrun
        multi_node = int(os.environ.get("CROSS_SIZE", 1)) > 1 or world > local_size
        iface = prepare_network(os.environ["MASTER_ADDR"], multi_node)
        if iface and rank == 0:
            log.info("GLOO_SOCKET_IFNAME=%s (the interface that reaches MASTER_ADDR)", iface)
        rendezvous(backend, rank, world, os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                   rendezvous_timeout_s)
    # DeepSpeed's CPU shared-memory op serves only inference_all_reduce (training reduces through
    # torch.distributed), yet its backend JIT-compiles it with g++ when first created: not wanted here.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return (torch.distributed.get_rank(), torch.distributed.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def teardown() -> None:
    """Destroy this process's process group, if it made one (torch is not imported to find out)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
