"""A multi-node Ray cluster on this machine: a head and worker nodes started with ``ray start`` on loopback.

Every node is its own raylet with its own object store, as on separate
machines, so roles placed on different nodes are different Ray nodes that
talk over the network stack: a way to try a run across a Ray cluster (and
to test and benchmark one) on a single host. The processes the nodes start
are marked with an environment variable, and only those are stopped at the
end: ``ray stop`` would stop every Ray on the machine, a user's own included.

Example:
    >>> with loopback_ray(num_nodes=3) as nodes:            # doctest: +SKIP
    ...     dp.train(..., cluster=f"ray:{nodes.address}")
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_MARK = "DOWNPOUR_RAY_NODES"
_START_TIMEOUT = 120.0


@dataclass(frozen=True)
class RayNodes:
    """A running loopback Ray cluster: the head's ``address`` and how many nodes joined it."""

    address: str
    num_nodes: int
    cpus_per_node: int


@contextlib.contextmanager
def loopback_ray(*, num_nodes: int = 3, cpus_per_node: int = 2,
                 object_store_bytes: int = 400_000_000) -> Iterator[RayNodes]:
    """Start a head and ``num_nodes - 1`` worker nodes on 127.0.0.1; stop exactly them when the block ends.

    A throwaway cluster only this machine reaches, so without Ray's token
    authentication (Ray keeps that token in ``~/.ray``): nothing is read
    from or written to the user's home. Needs the ``ray`` command beside
    this Python (``pip install 'downpour-sgd[ray]'``).
    """
    ray = Path(sys.executable).parent / "ray"
    if not ray.exists():
        raise FileNotFoundError(f"the ray command is not beside {sys.executable}: pip install 'downpour-sgd[ray]'")
    token = uuid.uuid4().hex
    # Short: Ray puts its sockets under it, and a socket path has at most 107 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="dpray-", dir="/tmp"))
    previous = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # for this process's driver too
    try:
        yield _start(ray, temp_dir, token, num_nodes, cpus_per_node, object_store_bytes)
    finally:
        _stop(token)
        shutil.rmtree(temp_dir, ignore_errors=True)
        if previous is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = previous


def _start(ray: Path, temp_dir: Path, token: str, num_nodes: int, cpus_per_node: int,
           object_store_bytes: int) -> RayNodes:
    env = {**os.environ, _MARK: token, "RAY_USAGE_STATS_ENABLED": "0"}
    port = free_port()
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", str(cpus_per_node), "--num-gpus", "0",
              "--object-store-memory", str(object_store_bytes), "--disable-usage-stats"]
    head = ["--head", "--port", str(port), "--temp-dir", str(temp_dir), "--include-dashboard", "false",
            "--dashboard-port", str(free_port()), "--ray-client-server-port", str(free_port())]
    # One node at a time: nodes starting together on one host may pick the same free port for a service.
    for node in range(num_nodes):
        where = head if node == 0 else ["--address", f"127.0.0.1:{port}"]
        started = subprocess.run(
            [str(ray), "start", *where, *common, "--dashboard-agent-listen-port", str(free_port())],
            env=env, capture_output=True, text=True, timeout=_START_TIMEOUT, check=False)
        if started.returncode != 0:
            raise RuntimeError(f"ray start of node {node} failed ({started.returncode}):\n"
                               f"{(started.stdout + started.stderr)[-3000:]}")
    return RayNodes(address=f"127.0.0.1:{port}", num_nodes=num_nodes, cpus_per_node=cpus_per_node)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _marked_processes(token: str) -> list[int]:
    """Live processes whose environment carries ``token`` (what these nodes started, and their children)."""
    needle = f"{_MARK}={token}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _stop(token: str, timeout: float = 15.0) -> None:
    """SIGKILL what the nodes started, as ``ray stop --force`` does (Ray's own services ignore SIGTERM
    for many seconds, and a throwaway cluster has nothing to save), until nothing is left."""
    deadline = time.monotonic() + timeout
    while (pids := _marked_processes(token)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
