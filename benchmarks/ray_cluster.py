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
from pathlib import Path

import downpour as dp
from downpour.cluster.ray_nodes import loopback_ray
from downpour.strategies.allreduce import Allreduce

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
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
    rows = []
    with loopback_ray(num_nodes=args.nodes, cpus_per_node=args.workers + args.servers) as nodes:
        for strategy in ("downpour", "allreduce"):
            best: dict[str, dict] = {}
            for _ in range(args.repeats):  # alternate, so that load on the machine hits both alike
                for cluster in ("local", f"ray:{nodes.address}"):
                    s = train(data, strategy, cluster, args.workers, args.servers, args.steps)
                    if s["samples_per_second"] > best.get(cluster, {}).get("samples_per_second", 0.0):
                        best[cluster] = s
            rows.append((strategy, best["local"], best[f"ray:{nodes.address}"]))

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
