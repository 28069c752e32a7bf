"""Bytes moved per epoch by local SGD against allreduce, and the accuracy each reaches.

One epoch of MNIST (MLP, from ../shared/data) with the same workers, batch
size and optimizer: ``allreduce`` (a gradient allreduce every step) and
``local-sgd`` averaging parameters every k steps (and k = 0: once, at the
end). Bytes are the workers' counted traffic (ring-allreduce accounting, see
``downpour.strategies.collective``), summed over workers. Prints a table.

    .venv/bin/python benchmarks/local_sgd.py [--workers 4] [--every 8] [--lr 0.15]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import downpour as dp
from downpour.strategies.allreduce import Allreduce
from downpour.strategies.local_sgd import LocalSGD

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--every", default="8", help="comma-separated k values for local-sgd (0: one-shot)")
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--optimizer", default="nesterov")
    parser.add_argument("--lr", type=float, default=0.15)
    parser.add_argument("--schedule", default="cosine")
    args = parser.parse_args()
    data = dp.data.load("mnist", data_dir=DATA)
    strategies = [("allreduce", Allreduce())] + [
        (f"local-sgd k={k}", LocalSGD(average_every=k)) for k in map(int, args.every.split(","))]
    rows = []
    for label, strategy in strategies:
        result = dp.train(model=args.model, data=data, strategy=strategy,
                          optimizer=dp.optim(args.optimizer, lr=args.lr, schedule=args.schedule),
                          workers=args.workers, batch_size=args.batch_size, epochs=1, save=False)
        s = result.summary
        moved = s["bytes_sent"] + s["bytes_received"]
        rows.append((label, s["rounds"], s["samples"], s["bytes_sent"], moved * data.num_train / max(s["samples"], 1),
                     s["accuracy"], s["samples_per_second"]))

    from rich.console import Console
    from rich.table import Table

    baseline = rows[0][4]
    table = Table(title=f"bytes per epoch: {args.workers} workers x batch {args.batch_size}, {args.model}, "
                        f"{args.optimizer} lr {args.lr:g} {args.schedule} (torch {torch.__version__}, gloo)")
    for column in ("strategy", "rounds", "samples", "bytes sent", "bytes moved / epoch", "vs allreduce",
                   "test accuracy", "samples/s"):
        table.add_column(column, justify="right")
    for label, rounds, samples, sent, per_epoch, accuracy, speed in rows:
        table.add_row(label, str(rounds), f"{samples:,}", f"{sent / 2**20:,.1f} MiB", f"{per_epoch / 2**20:,.1f} MiB",
                      f"{baseline / per_epoch:.2f}x fewer", f"{accuracy:.4f}", f"{speed:,.0f}")
    Console(width=150).print(table)


if __name__ == "__main__":
    main()
