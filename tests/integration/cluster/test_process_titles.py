"""Every role's process is titled with its kind, rank and count (``downpour: worker 3/4``)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from downpour.cluster import LocalCluster
from downpour.cluster.ray import RayCluster
from downpour.metrics import Metrics
from tests.integration.cluster.roles import Sleeper

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def _cmdline(pid: int) -> str:
    # The title is padded with NULs to the length of the command line it replaced.
    return Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").replace(b"\0", b" ").decode()


def _ps_args(pid: int) -> str | None:
    if shutil.which("ps") is None:
        return None
    return subprocess.run(["ps", "-o", "args=", "-p", str(pid)], capture_output=True, text=True,
                          timeout=30, check=True).stdout.strip()


def _roles() -> list[Sleeper]:
    # Each publishes its pid once its role runs, then waits for the stop flag (the cluster's exit).
    return ([Sleeper(kind="server", rank=r, seconds=120) for r in range(2)]
            + [Sleeper(rank=r, seconds=120) for r in range(2)])


EXPECTED = ["downpour: server 0/2", "downpour: server 1/2", "downpour: worker 0/2",
            "downpour: worker 1/2"]


def test_local_roles_are_titled_with_kind_rank_and_count():
    with LocalCluster(Metrics()) as cluster:
        handles = cluster.start(_roles())
        pids = [cluster.wait_published(h, "pid", timeout=120) for h in handles]
        titles = [_cmdline(pid) for pid in pids]
        ps_titles = [_ps_args(pid) for pid in pids]
        # A rank started again (as a restart does) is counted once.
        [again] = cluster.start([Sleeper(rank=1, seconds=120)])
        again_title = _cmdline(cluster.wait_published(again, "pid", timeout=120))
    assert titles == EXPECTED
    assert ps_titles in (EXPECTED, [None] * len(EXPECTED))
    assert again_title == "downpour: worker 1/2"


@pytest.fixture(scope="module")
def one_node():
    """A one-node Ray cluster on loopback, stopped (only it) at the end."""
    pytest.importorskip("ray", reason="needs Ray: pip install 'downpour-sgd[ray]'")
    if not (Path(sys.executable).parent / "ray").exists():
        pytest.skip(f"the ray command is not beside {sys.executable}")
    from downpour.cluster.ray_nodes import loopback_ray

    with loopback_ray(num_nodes=1, cpus_per_node=4) as nodes:
        yield nodes


def test_ray_actors_are_titled_with_kind_rank_and_count(one_node):
    with RayCluster(address=one_node.address).open(Metrics()) as cluster:
        handles = cluster.start(_roles())
        # The pid comes back through the coordinator's drain calls, around each of which Ray
        # retitles the process: the title must have outlasted them.
        pids = [cluster.wait_published(h, "pid", timeout=120) for h in handles]
        titles = [_cmdline(pid) for pid in pids]
    # Ray's prefix stays: Ray's own tools find its workers by it.
    assert titles == [f"ray::{title}" for title in EXPECTED]
