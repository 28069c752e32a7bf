"""A real multi-node Ray cluster on this machine: a head and two worker nodes started with ``ray start``.

Every node is its own raylet with its own object store, as on separate
machines, so roles placed on different nodes are different Ray nodes that
talk over the network stack. The processes the nodes start are marked with
an environment variable, and only those are stopped at the end: ``ray stop``
would stop every Ray on the machine, a user's own included.
"""

from __future__ import annotations

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

import pytest

import downpour as dp

_MARK = "DOWNPOUR_TEST_RAY_NODES"
_START_TIMEOUT = 120.0


@dataclass(frozen=True)
class RayNodes:
    """A running loopback Ray cluster: the head's ``address`` and how many nodes joined it."""

    address: str
    num_nodes: int
    cpus_per_node: int


def _free_port() -> int:
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
    for many seconds, and a test cluster has nothing to save), until nothing is left."""
    deadline = time.monotonic() + timeout
    while (pids := _marked_processes(token)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)


def start_ray_nodes(ray: Path, temp_dir: Path, token: str, *, num_nodes: int = 3, cpus_per_node: int = 2,
                    object_store_bytes: int = 400_000_000) -> RayNodes:
    """Start a head and ``num_nodes - 1`` worker nodes on loopback; returns once every node has joined."""
    env = {**os.environ, _MARK: token, "RAY_USAGE_STATS_ENABLED": "0"}
    port = _free_port()
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", str(cpus_per_node), "--num-gpus", "0",
              "--object-store-memory", str(object_store_bytes), "--disable-usage-stats"]
    head = ["--head", "--port", str(port), "--temp-dir", str(temp_dir), "--include-dashboard", "false",
            "--dashboard-port", str(_free_port()), "--ray-client-server-port", str(_free_port())]
    # One node at a time: nodes starting together on one host may pick the same free port for a service.
    for node in range(num_nodes):
        where = head if node == 0 else ["--address", f"127.0.0.1:{port}"]
        started = subprocess.run(
            [str(ray), "start", *where, *common, "--dashboard-agent-listen-port", str(_free_port())],
            env=env, capture_output=True, text=True, timeout=_START_TIMEOUT, check=False)
        if started.returncode != 0:
            raise RuntimeError(f"ray start of node {node} failed ({started.returncode}):\n"
                               f"{(started.stdout + started.stderr)[-3000:]}")
    return RayNodes(address=f"127.0.0.1:{port}", num_nodes=num_nodes, cpus_per_node=cpus_per_node)


@pytest.fixture(scope="module")
def ray_nodes() -> Iterator[RayNodes]:
    """A 3-node Ray cluster on loopback for this module's tests, stopped (only it) at the end.

    A throwaway cluster that only this machine reaches, so without token
    authentication (which Ray turns on for new clusters, keeping the token in
    ``~/.ray``): nothing is read from or written to the user's home.
    """
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_AUTH_MODE", "disabled")
        pytest.importorskip("ray", reason="the Ray cluster tests need Ray: pip install 'downpour-sgd[ray]'")
        ray = Path(sys.executable).parent / "ray"
        if not ray.exists():
            pytest.skip(f"the ray command is not beside {sys.executable}")
        # Short: Ray puts its sockets under it, and a socket path has at most 107 characters.
        temp_dir = Path(tempfile.mkdtemp(prefix="dpray-", dir="/tmp"))
        token = uuid.uuid4().hex
        try:
            nodes = start_ray_nodes(ray, temp_dir, token)
            # One driver connection for the module: the runs use it (as they use a user's own) instead of
            # connecting and disconnecting each time.
            import ray as ray_lib

            ray_lib.init(address=nodes.address, configure_logging=False)
            try:
                yield nodes
            finally:
                ray_lib.shutdown()
        finally:
            _stop(token)
            shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def mnist(shared_data):
    """MNIST from the shared datasets, loaded once."""
    return dp.data.load("mnist", data_dir=shared_data)
