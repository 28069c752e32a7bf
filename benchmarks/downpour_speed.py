"""Downpour's speed against one process on the same model: samples/s from summary.json, best of N.

In one run, for each model (the MNIST MLP at batch 32 and the CNN at batch 64, one final
evaluation): ``single`` on one thread (as every worker runs) and on torch's default threads, then
Downpour with 1 worker and 1 shard, 2 workers and 1 shard, 2 workers and 2 shards, each with the
courier thread off and on (``overlap=1``), and 2 x 2 with fetch/push every 4. Momentum (at 0.05
for the MLP, 0.01 for the CNN).

    .venv/bin/python benchmarks/downpour_speed.py [--repeats 3] [--models mlp,cnn] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import downpour as dp

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# Momentum at 0.05 for the MLP (where Downpour 2 x 2 trains without the courier); the CNN at 0.05
# diverges under any staleness (1 x 1 with overlap 1: 60%), so it runs at 0.01.
WORKLOADS = {"mlp": {"batch_size": 32, "epochs": 1, "lr": 0.05},
             "cnn": {"batch_size": 64, "epochs": 0.25, "lr": 0.01}}


def runs(threads: int) -> dict[str, tuple[dict, int]]:
    table: dict[str, tuple[dict, int]] = {
        "single, 1 thread": ({"strategy": "single"}, 1),
        f"single, {threads} threads": ({"strategy": "single"}, threads),
    }
    for workers, servers in ((1, 1), (2, 1), (2, 2)):
        for overlap in (0, 1):
            name = f"downpour {workers} x {servers}" + (", overlap 1" if overlap else "")
            table[name] = ({"strategy": dp.Downpour(overlap=overlap), "workers": workers,
                            "servers": servers}, threads)
    table["downpour 2 x 2, fetch/push every 4"] = (
        {"strategy": dp.Downpour(fetch_every=4, push_every=4), "workers": 2, "servers": 2}, threads)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-dir", default=str(DATA))
    parser.add_argument("--models", default="mlp,cnn")
    args = parser.parse_args()
    data = dp.data.load("mnist", data_dir=args.data_dir)
    threads = torch.get_num_threads()
    for model in args.models.split(","):
        workload = dict(WORKLOADS[model])
        common = {"model": model, "data": data, "optimizer": dp.optim("momentum", lr=workload.pop("lr")),
                  "eval_every": 10**9, "save": False, **workload}
        best: dict[str, dict] = {}
        for _ in range(args.repeats):  # alternate the runs, so that the machine's moods touch them all
            for name, (options, n) in runs(threads).items():
                torch.set_num_threads(n)
                summary = dp.train(**common, **options).summary
                if name not in best or summary["samples_per_second"] > best[name]["samples_per_second"]:
                    best[name] = summary
        torch.set_num_threads(threads)
        baseline = best["single, 1 thread"]["samples_per_second"]
        print(f"\n{model}, batch {WORKLOADS[model]['batch_size']}, {WORKLOADS[model]['epochs']} epoch(s)")
        print(f"| run | samples/s (best of {args.repeats}) | vs single on 1 thread | accuracy | "
              "staleness mean |")
        print("| --- | --- | --- | --- | --- |")
        for name, s in best.items():
            accuracy = f"{s['accuracy']:.2%}" + (" (diverged)" if s.get("diverged") else "")
            print(f"| {name} | {s['samples_per_second']:,.0f} | {s['samples_per_second'] / baseline:.2f}x | "
                  f"{accuracy} | {s.get('staleness_mean') or 0:.2f} |", flush=True)


if __name__ == "__main__":
    main()
