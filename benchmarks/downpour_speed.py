"""Downpour's speed against one process on the same model: samples/s from summary.json, best of N.

MNIST MLP, momentum, batch 32, one epoch, one final evaluation, in one run: ``single`` (on one
thread, as every worker runs, and on torch's default threads), then Downpour with 1 worker and 1
shard, 2 workers and 1 shard, 2 workers and 2 shards, and 2 x 2 with fetch/push every 4.

    .venv/bin/python benchmarks/downpour_speed.py [--repeats 3] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import downpour as dp

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-dir", default=str(DATA))
    parser.add_argument("--model", default="mlp")
    args = parser.parse_args()
    data = dp.data.load("mnist", data_dir=args.data_dir)
    common = {"model": args.model, "data": data, "optimizer": dp.optim("momentum", lr=0.05), "epochs": 1,
              "batch_size": 32, "eval_every": 10**9, "save": False}
    threads = torch.get_num_threads()
    runs = {
        "single, 1 thread": ({"strategy": "single"}, 1),
        f"single, {threads} threads": ({"strategy": "single"}, threads),
        "downpour 1 worker, 1 shard": ({"strategy": dp.Downpour(), "workers": 1, "servers": 1}, threads),
        "downpour 2 workers, 1 shard": ({"strategy": dp.Downpour(), "workers": 2, "servers": 1}, threads),
        "downpour 2 workers, 2 shards": ({"strategy": dp.Downpour(), "workers": 2, "servers": 2}, threads),
        "downpour 2 x 2, fetch/push every 4": (
            {"strategy": dp.Downpour(fetch_every=4, push_every=4), "workers": 2, "servers": 2}, threads),
    }
    best: dict[str, dict] = {}
    for _ in range(args.repeats):  # alternate the runs, so that the machine's moods touch them all
        for name, (options, n) in runs.items():
            torch.set_num_threads(n)
            summary = dp.train(**common, **options).summary
            if name not in best or summary["samples_per_second"] > best[name]["samples_per_second"]:
                best[name] = summary
    torch.set_num_threads(threads)
    baseline = best["single, 1 thread"]["samples_per_second"]
    print(f"| run | samples/s (best of {args.repeats}) | vs single on 1 thread | accuracy |")
    print("| --- | --- | --- | --- |")
    for name, s in best.items():
        print(f"| {name} | {s['samples_per_second']:,.0f} | {s['samples_per_second'] / baseline:.2f}x | "
              f"{s['accuracy']:.2%} |")


if __name__ == "__main__":
    main()
