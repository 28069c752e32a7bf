"""What a straggler costs synchronous SGD, with and without a backup worker.

Sync on MNIST from ../shared/data (logistic regression, ``--workers`` workers,
one shard, half an epoch, batch 64, SGD 0.05), calm and with worker 1
``--factor`` times slower, without backups (every round waits for the
straggler) and with one (a round takes the first N - 1 gradients and drops
the last). Prints samples/s, its ratio to the calm run of the same
configuration, and the gradients dropped. The goal with a backup: at least
0.8x the calm samples/s.

    .venv/bin/python benchmarks/straggler.py [--workers 4] [--factor 5] [--repeats 2]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import downpour as dp

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--factor", type=float, default=5.0, help="how many times slower worker 1 is")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each; the best samples/s counts")
    args = parser.parse_args()
    data = dp.data.load("mnist", data_dir=DATA)

    def best(backup: int, slow: dict[int, float]) -> dict:
        runs = [dp.train(model="logistic", data=data, strategy=dp.Sync(backup=backup), workers=args.workers,
                         servers=1, epochs=0.5, batch_size=64, optimizer=dp.optim("sgd", lr=0.05),
                         faults=dp.Faults(slow=slow), save=False).summary for _ in range(args.repeats)]
        return max(runs, key=lambda s: s["samples_per_second"])

    table = Table(title=f"Sync on MNIST (logistic), {args.workers} workers, worker 1 {args.factor:g}x slower, "
                        f"best of {args.repeats} (torch {torch.__version__})")
    for column in ("backups", "straggler", "samples/s", "vs calm", "dropped gradients", "accuracy"):
        table.add_column(column, justify="right")
    for backup in (0, 1):
        calm = best(backup, {})
        for label, slow in (("none", {}), (f"worker 1 {args.factor:g}x", {1: args.factor})):
            s = calm if not slow else best(backup, slow)
            goal = " (goal >= 0.80x)" if backup and slow else ""
            table.add_row(str(backup), label, f"{s['samples_per_second']:,.0f}",
                          f"{s['samples_per_second'] / calm['samples_per_second']:.2f}x{goal}",
                          f"{s['dropped_gradients']:,}", f"{100 * s['accuracy']:.2f}%")
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
