"""Recovery from a killed server shard and a killed worker: how long, and how much throughput it costs.

Downpour on MNIST (MLP, 4 workers, 2 shards, Adam 0.001 on the shards,
batch 32, one epoch) three times: undisturbed; with shard 1 SIGKILLed at
``--at`` seconds (it restarts from its checkpoint, every ``--every``
versions); with worker 2 SIGKILLed at ``--at`` seconds and ``restart_workers``.
Then allreduce and local SGD (every 8 steps) on MNIST (MLP, 4 workers,
Nesterov 0.15 with a cosine schedule, batch 64, two epochs), undisturbed and
with worker 2 SIGKILLed and restarted: the survivors re-form the group with
it through the elastic rendezvous.

For each fault it prints when the death was noticed, when the replacement
was up, when training went on (the restarted shard's first applied update,
or the new worker's first report), the updates lost, and the run's
samples/s against the undisturbed run's.

    .venv/bin/python benchmarks/recovery.py
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

import downpour as dp

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _first(events: list[dict[str, Any]], test) -> dict[str, Any] | None:
    return next((e for e in events if test(e)), None)


def _timeline(events: list[dict[str, Any]], role: str) -> dict[str, float | None]:
    """Seconds from the kill to: death noticed, replacement serving, training going on."""
    killed = _first(events, lambda e: e.get("fault/killed") == role)
    died = _first(events, lambda e: e.get("fault/died") == role)
    restarted = _first(events, lambda e: e.get("fault/restarted") == role)
    if killed is None or restarted is None:
        return {"detected": None, "restarted": None, "resumed": None, "lost": None}
    kind, rank = role.split(":")
    if kind == "server":
        restored = restarted["fault/restored_version"]
        resumed = _first(events, lambda e: e["time"] > restarted["time"] and e.get("role") == "server"
                         and e.get("rank") == int(rank) and e.get("ps/version", -1) > restored)
    else:
        resumed = _first(events, lambda e: e.get("role") == "worker" and e.get("rank") == int(rank)
                         and e.get("worker/incarnation", 0) > 0 and e.get("comm/pushes", 0) > 0)
    start = killed["time"]
    return {"detected": died["time"] - start if died else None, "restarted": restarted["time"] - start,
            "resumed": None if resumed is None else resumed["time"] - start,
            "lost": restarted.get("fault/lost_updates")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--at", type=float, default=5.0, help="seconds into training the fault strikes")
    parser.add_argument("--every", type=int, default=100, help="checkpoint interval in versions")
    args = parser.parse_args()
    data = dp.data.load("mnist", data_dir=DATA)

    def downpour(**kwargs: Any) -> dp.TrainResult:
        return dp.train(model="mlp", data=data, strategy=dp.Downpour(), optimizer=dp.optim("adam", lr=0.001),
                        workers=4, servers=2, epochs=1, batch_size=32, save=False, **kwargs)

    def collective(strategy: Any, **kwargs: Any) -> dp.TrainResult:
        return dp.train(model="mlp", data=data, strategy=strategy, workers=4, epochs=2, batch_size=64, save=False,
                        optimizer=dp.optim("nesterov", lr=0.15, schedule="cosine"), **kwargs)

    worker_fault = {"faults": dp.Faults(kill={2: args.at}), "restart_workers": True}
    groups = [
        ("Downpour, 4 workers x 2 shards", downpour(), [
            ("shard 1 SIGKILL", "server:1", downpour(faults=dp.Faults(kill_server={1: args.at}),
                                                     checkpoint_every=args.every)),
            ("worker 2 SIGKILL", "worker:2", downpour(**worker_fault))]),
    ]
    for name, strategy in (("allreduce, 4 workers", dp.Allreduce()),
                           ("local SGD every 8 steps, 4 workers", dp.LocalSGD(average_every=8))):
        groups.append((name, collective(strategy), [
            ("worker 2 SIGKILL", "worker:2", collective(strategy, **worker_fault))]))

    table = Table(title=f"Recovery on MNIST (MLP), fault at {args.at:g} s, shard checkpoints every {args.every} "
                        f"versions (torch {torch.__version__})")
    for column in ("run", "fault", "noticed", "replacement up", "training on", "updates lost", "samples/s",
                   "throughput lost", "accuracy"):
        table.add_column(column, justify="right")

    def seconds(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f} s"

    for run, base, faults in groups:
        b = base.summary
        table.add_row(run, "none", "", "", "", "", f"{b['samples_per_second']:,.0f}", "",
                      f"{100 * b['accuracy']:.2f}%")
        for name, role, result in faults:
            s, t = result.summary, _timeline(result.history, role)
            lost = 1 - s["samples_per_second"] / b["samples_per_second"]
            table.add_row("", name, seconds(t["detected"]), seconds(t["restarted"]), seconds(t["resumed"]),
                          "-" if t["lost"] is None else f"{t['lost']}", f"{s['samples_per_second']:,.0f}",
                          f"{100 * lost:.1f}%", f"{100 * s['accuracy']:.2f}%")
    Console(width=170).print(table)


if __name__ == "__main__":
    main()
