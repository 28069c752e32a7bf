"""How long loading each shared dataset takes: from the files in ../shared/data to tensors.

Every dataset is loaded ``--repeats`` times in this process, without
downloading (the files must be there); the table shows the best and the
median load. The goal for MNIST: under 1.5 s.

    .venv/bin/python benchmarks/data.py [--datasets mnist,fashion-mnist,w8a] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from downpour.data import load

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
GOALS = {"mnist": 1.5}  # seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="mnist,fashion-mnist,w8a")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"# {DATA}; best and median of {args.repeats} loads; torch {torch.__version__}")
    names = args.datasets.split(",")
    width = max(len(name) for name in names)
    print(f"{'dataset':<{width}}  {'best':>8}  {'median':>8}  notes")
    for name in names:
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            data = load(name, data_dir=DATA, download=False)
            times.append(time.perf_counter() - started)
        goal = GOALS.get(name)
        notes = f"{data.num_train:,} training examples"
        if goal is not None:
            notes += f" (goal: under {goal:g} s)"
        print(f"{name:<{width}}  {min(times):>7.2f}s  {statistics.median(times):>7.2f}s  {notes}")


if __name__ == "__main__":
    main()
