import os
import signal
import subprocess
import sys
import textwrap

import pytest

from downpour.cluster import LocalCluster
from downpour.errors import PeerTimeout, WorkerFailed
from downpour.metrics import MemorySink, Metrics
from tests.integration.cluster.roles import Raiser, Sleeper
from tests.waiting import wait_until
from tests.processes import alive, child_processes

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def test_roles_run_publish_and_log():
    sink = MemorySink()
    with LocalCluster(Metrics([sink])) as cluster:
        handles = cluster.start([Sleeper(rank=0), Sleeper(rank=1)])
        pids = [cluster.wait_published(h, "pid", timeout=30) for h in handles]
        cluster.wait_all("worker", timeout=30)
    assert len(set(pids)) == 2 and os.getpid() not in pids
    assert sorted(e["rank"] for e in sink.events if "train/loss" in e) == [0, 1]
    assert all(not h.alive() for h in handles)


def test_a_raising_role_is_reraised_with_its_traceback():
    with pytest.raises(WorkerFailed) as info, LocalCluster(Metrics()) as cluster:
        cluster.start([Raiser(rank=3), Sleeper(rank=0, seconds=30)])
        cluster.wait_all("worker", timeout=30)
    assert info.value.rank == 3
    assert "boom in the role" in str(info.value)
    assert "Traceback" in info.value.remote_traceback


def test_a_killed_worker_is_tolerated_and_recorded():
    sink = MemorySink()
    with LocalCluster(Metrics([sink])) as cluster:
        victim, survivor = cluster.start([Sleeper(rank=0, seconds=30), Sleeper(rank=1, seconds=1.0)])
        cluster.wait_published(victim, "pid", timeout=30)
        cluster.kill_at(victim, 0.0)
        cluster.wait_all("worker", timeout=30)
    assert victim.failed and "SIGKILL" in victim.failed
    assert survivor.finished
    assert any(e.get("fault/died") == "worker:0" for e in sink.events)


def test_a_dead_server_is_not_tolerated():
    with pytest.raises(WorkerFailed, match="server 0"), LocalCluster(Metrics()) as cluster:
        [server] = cluster.start([Sleeper(kind="server", rank=0, seconds=30)])
        cluster.wait_published(server, "pid", timeout=30)
        os.kill(server.process.pid, signal.SIGKILL)
        cluster.wait_all("server", timeout=30)


def test_waiting_for_a_value_never_published_times_out():
    with pytest.raises(PeerTimeout, match="worker 0"), LocalCluster(Metrics()) as cluster:
        [h] = cluster.start([Sleeper(rank=0, seconds=30)])
        cluster.wait_published(h, "address", timeout=1.0)


def test_sigint_to_the_coordinator_leaves_no_process(tmp_path):
    script = tmp_path / "coordinator.py"
    script.write_text(textwrap.dedent("""
        import sys, time
        sys.path.insert(0, %r)
        from test_local_cluster_roles import Sleeper
        from downpour.cluster import LocalCluster
        from downpour.metrics import Metrics
        if __name__ == "__main__":
            with LocalCluster(Metrics()) as cluster:
                hs = cluster.start([Sleeper(rank=r, seconds=120) for r in range(2)])
                for h in hs:
                    cluster.wait_published(h, "pid", timeout=30)
                print("ready", flush=True)
                cluster.wait_all("worker", timeout=120)
    """ % str(tmp_path)))
    (tmp_path / "test_local_cluster_roles.py").write_text(textwrap.dedent("""
        import os
        from dataclasses import dataclass
        @dataclass
        class Sleeper:
            kind: str = "worker"
            rank: int = 0
            seconds: float = 0.2
            def run(self, ctx):
                ctx.publish("pid", os.getpid())
                ctx.wait_stop(self.seconds)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        children = child_processes(proc.pid)
        assert len(children) >= 2
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        wait_until(lambda: not [pid for pid, _ in children if alive(pid)], timeout=10,
                   what="every role process exiting after Ctrl-C")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigkill_of_the_coordinator_takes_its_roles_along(tmp_path):
    script = tmp_path / "coordinator.py"
    (tmp_path / "roles_k.py").write_text(textwrap.dedent("""
        import os
        from dataclasses import dataclass
        @dataclass
        class Sleeper:
            kind: str = "worker"
            rank: int = 0
            def run(self, ctx):
                ctx.publish("pid", os.getpid())
                ctx.wait_stop(120)
    """))
    script.write_text(textwrap.dedent("""
        import sys
        sys.path.insert(0, %r)
        from roles_k import Sleeper
        from downpour.cluster import LocalCluster
        from downpour.metrics import Metrics
        if __name__ == "__main__":
            with LocalCluster(Metrics()) as cluster:
                hs = cluster.start([Sleeper(rank=r) for r in range(2)])
                for h in hs:
                    cluster.wait_published(h, "pid", timeout=30)
                print("ready", flush=True)
                cluster.wait_all("worker", timeout=120)
    """ % str(tmp_path)))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        children = child_processes(proc.pid)
        proc.kill()
        proc.wait(timeout=10)
        wait_until(lambda: not [pid for pid, _ in children if alive(pid)], timeout=10,
                   what="every role process exiting after the coordinator was killed")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

