"""Time to accuracy on MNIST: single vs. downpour vs. sync at 2 and 4 workers.

Every run trains the same model on the same data with the same seed for one
epoch's worth of samples (or until the target), and reports time to the
target accuracy, final accuracy, samples/s and bytes on the wire per step.

    .venv/bin/python benchmarks/time_to_accuracy.py [--models mlp,cnn] [--workers 2,4] [--target 0.95]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import downpour as dp

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def configurations(workers: list[int]):
    yield "single", 1, dp.Single(), dp.optim("momentum", lr=0.05)
    for w in workers:
        yield "downpour", w, dp.Downpour(ema_decay=0.99, evaluate_average=True), dp.optim("adam", lr=0.001)
        yield "sync", w, dp.Sync(backup=1 if w > 2 else 0), dp.optim("momentum", lr=0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--workers", default="2,4")
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--servers", type=int, default=2)
    args = parser.parse_args()
    data = dp.data.load("mnist", data_dir=DATA)
    rows = []
    for model in args.models.split(","):
        for name, workers, strategy, optimizer in configurations([int(w) for w in args.workers.split(",")]):
            config = strategy if not isinstance(strategy, str) else dp.strategies.get(strategy)
            roles = {"workers": workers} if config.takes_workers else {}
            if config.uses_servers:
                roles["servers"] = args.servers
            result = dp.train(model=model, data=data, strategy=strategy, optimizer=optimizer, epochs=args.epochs,
                              target_accuracy=args.target, save=False, **roles)
            s = result.summary
            traffic = (s["bytes_sent"] + s["bytes_received"]) / max(s["steps"], 1)
            rows.append((model, name, workers, s["time_to_target"], s["accuracy"], s["seconds"],
                         s["samples_per_second"], traffic))

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"MNIST time to {args.target:.0%} ({torch.get_num_threads()} threads, "
                        f"{args.servers} servers for PS strategies)")
    for column in ("model", "strategy", "workers", "time to target (s)", "accuracy", "seconds", "samples/s",
                   "bytes/step"):
        table.add_column(column, justify="right")
    for model, name, workers, ttt, acc, seconds, rate, traffic in rows:
        table.add_row(model, name, str(workers), "not reached" if ttt is None else f"{ttt:.1f}", f"{acc:.4f}",
                      f"{seconds:.1f}", f"{rate:,.0f}", f"{traffic / 1e6:.2f} MB")
    Console(width=150).print(table)


if __name__ == "__main__":
    main()
