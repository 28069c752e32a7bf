"""The README's comparison: every strategy on MNIST (MLP, 4 workers), side by side.

Same data, partitions, model, seed and evaluation schedule for each; one
epoch's worth of samples, target accuracy 0.95. Prints the table and writes
the comparison directory (figures, report.html).

    .venv/bin/python benchmarks/compare_mnist.py [--strategies ...] [--workers 4] [--out-dir DIR] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import downpour as dp
from downpour.compare import compare, show

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# One optimizer for all (momentum, lr 0.02, batch 32: what asynchronous updates from four
# replicas tolerate); where a strategy has options that matter, the README's recipe.
RECIPES = {
    "sync": dp.Sync(backup=1),
    "downpour": dp.Downpour(ema_decay=0.99, evaluate_average=True),
    "decentralized": dp.Decentralized(compress="threshold:tau=0.002,entropy"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", default=",".join(sorted(dp.strategies.STRATEGIES)))
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--out-dir", default=None)
    parser.add_argument("--data-dir", default=str(DATA), help="the datasets' folder (default: ../shared/data)")
    args = parser.parse_args()
    strategies = [RECIPES.get(name, name) for name in args.strategies.split(",")]
    comparison = compare(
        strategies=strategies, model="mlp", data=dp.data.load("mnist", data_dir=args.data_dir),
        workers=args.workers, servers=args.servers, optimizer=dp.optim("momentum", lr=0.02),
        epochs=1, batch_size=32, target_accuracy=args.target, out_dir=args.out_dir,
        command="python benchmarks/compare_mnist.py " + " ".join(f"--{k.replace('_', '-')} {v}"
                                                                  for k, v in vars(args).items() if v is not None),
    )
    show(comparison)
    print(f"report: {comparison.path / 'report.html'}")


if __name__ == "__main__":
    main()
