"""Samples/s of Downpour and allreduce on the local cluster against a 3-node Ray cluster on loopback.

Same workload on both (MNIST from ../shared/data, MLP, iid shards, the same
optimizer, batch size, workers and steps): only where the roles run differs.
The Ray cluster is a head and two worker nodes started here with ``ray
start`` on this machine (each its own raylet and object store, as on
separate machines) and stopped at the end; roles are actors spread over the
nodes. samples/s is the run's own (training time, evaluation excluded).
Runs alternate between the clusters, best of ``--repeats``. Prints a table.

    .venv/bin/python benchmarks/ray_cluster.py [--workers 4] [--servers 2] [--steps 300] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import downpour as dp
from downpour.strategies.allreduce import Allreduce

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MARK = "DOWNPOUR_BENCH_RAY_NODES"  # marks the processes the nodes start: only those are stopped


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nodes(num_nodes: int, cpus_per_node: int, token: str, temp_dir: Path) -> str:
    """Start a head and ``num_nodes - 1`` worker nodes on loopback; returns the head's address."""
    ray = Path(sys.executable).parent / "ray"
    env = {**os.environ, MARK: token, "RAY_USAGE_STATS_ENABLED": "0"}
    port = _free_port()
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", str(cpus_per_node), "--num-gpus", "0",
              "--object-store-memory", str(400_000_000), "--disable-usage-stats"]
    head = ["--head", "--port", str(port), "--temp-dir", str(temp_dir), "--include-dashboard", "false",
            "--dashboard-port", str(_free_port()), "--ray-client-server-port", str(_free_port())]
    for node in range(num_nodes):
        where = head if node == 0 else ["--address", f"127.0.0.1:{port}"]
        subprocess.run([str(ray), "start", *where, *common, "--dashboard-agent-listen-port", str(_free_port())],
                       env=env, check=True, capture_output=True, timeout=120)
    return f"127.0.0.1:{port}"


def stop_nodes(token: str) -> None:
    """SIGKILL every process whose environment carries ``token`` (as ``ray stop --force``, for these alone)."""
    needle = f"{MARK}={token}".encode()

    def marked() -> list[int]:
        pids = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and needle in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:
                continue
        return pids

    deadline = time.monotonic() + 15.0
    while (pids := marked()) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)


def train(data, strategy: str, cluster: str, workers: int, servers: int, steps: int) -> dict:
    if strategy == "downpour":
        run = {"strategy": dp.Downpour(), "optimizer": dp.optim("adam", lr=0.001), "servers": servers,
               "batch_size": 32}
    else:
        run = {"strategy": Allreduce(), "optimizer": dp.optim("nesterov", lr=0.15, schedule="cosine"),
               "batch_size": 64}
    result = dp.train(model="mlp", data=data, workers=workers, epochs=100, max_steps=steps, eval_every=10 * steps,
                      cluster=cluster, save=False, progress=False, **run)
    nodes = {e["cluster/node"] for e in result.history if "cluster/node" in e}
    return {**result.summary, "nodes": len(nodes) or 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--servers", type=int, default=2, help="parameter-server shards (Downpour)")
    parser.add_argument("--steps", type=int, default=300, help="steps per worker")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs each")
    parser.add_argument("--nodes", type=int, default=3, help="Ray nodes (a head and worker nodes)")
    args = parser.parse_args()
    data = dp.data.load("mnist", data_dir=DATA)
    # A throwaway cluster that only this machine reaches: no token authentication (which Ray turns on
    # for new clusters, keeping the token in ~/.ray), so nothing is read from or written to the home.
    os.environ["RAY_AUTH_MODE"] = "disabled"
    token = uuid.uuid4().hex
    temp_dir = Path(tempfile.mkdtemp(prefix="dpray-", dir="/tmp"))  # short: Ray's socket paths live under it
    rows = []
    try:
        address = start_nodes(args.nodes, cpus_per_node=args.workers + args.servers, token=token, temp_dir=temp_dir)
        for strategy in ("downpour", "allreduce"):
            best: dict[str, dict] = {}
            for _ in range(args.repeats):  # alternate, so that load on the machine hits both alike
                for cluster in ("local", f"ray:{address}"):
                    s = train(data, strategy, cluster, args.workers, args.servers, args.steps)
                    if s["samples_per_second"] > best.get(cluster, {}).get("samples_per_second", 0.0):
                        best[cluster] = s
            local, ray = best["local"], best[f"ray:{address}"]
            rows.append((strategy, local, ray))
    finally:
        stop_nodes(token)
        shutil.rmtree(temp_dir, ignore_errors=True)

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"local cluster vs {args.nodes}-node Ray cluster on loopback ({os.cpu_count()} CPUs, "
                        f"{args.workers} workers, {args.steps} steps each, best of {args.repeats})")
    for column in ("strategy", "local samples/s", "Ray samples/s", "Ray / local", "Ray nodes used",
                   "local accuracy", "Ray accuracy"):
        table.add_column(column, justify="right")
    for strategy, local, ray in rows:
        table.add_row(strategy, f"{local['samples_per_second']:,.0f}", f"{ray['samples_per_second']:,.0f}",
                      f"{ray['samples_per_second'] / local['samples_per_second']:.2f}", str(ray["nodes"]),
                      f"{local['accuracy']:.4f}", f"{ray['accuracy']:.4f}")
    Console(width=150).print(table)


if __name__ == "__main__":
    main()
