"""The boosting seed's table, measured: SGD, hot potato, accelerated batch GD and boost on a separable problem.

The problem is linearly separable with a margin (``load_synthetic(separable=True)``):
n training examples (``--n`` draws 80% for training and 20% for the test),
d features, two classes. There are
m workers and a target test error eps. Every method trains the same model
(``--model``, logistic by default) and stops at the target where it can:

- ``single``: single-process SGD, one example per step;
- ``hot-potato``: the seed's hot potato. The parameters move to the next
  worker after every example (``steps_per_turn=1``, batch 1);
- ``sandblaster`` with ``method="agd"``: Nesterov's accelerated batch
  gradient descent on parameter-server shards. It has no target stop, so
  ``max_iterations`` doubles until a run reaches the target; the row is that run;
- ``boost``: k = 4 n eps sampled examples per round, c = ceil(ln(1/eps)) rounds.

Columns: iterations (SGD steps, hot potato's too since it hands off after
every step; AGD iterations; boosting rounds), the test error reached, the
training wall time (``seconds`` in summary.json, process start-up
excluded), messages, and bytes sent by all roles. Messages count the
data-bearing transfers: a hot-potato hand-off, an AGD worker's gradient push
or parameter pull, a boost sample message or model broadcast. The last
column is the seed's predicted order of the iterations: n, n, sqrt n, log(1/eps).

``--figure PATH`` also writes "SelfieBoost vs SGD": the training error on
the whole MNIST training set (MLP) against gradient steps, both with
momentum SGD (lr 0.05, cosine), as a PNG.

    .venv/bin/python benchmarks/boost_table.py [--n 2500,10000,40000] [--d 30] [--margin 0.1] [--workers 8] [--eps 0.01]
        [--figure selfieboost_vs_sgd.png] [--figure-epochs 0.75]
"""

from __future__ import annotations

import argparse
import math
from dataclasses import replace
from pathlib import Path

import downpour as dp
from downpour.strategies.boost import Boost, SelfieBoost, default_rounds, default_sample_size
from downpour.strategies.hot_potato import HotPotato

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _last(history: list[dict], key: str, default: float = 0) -> float:
    return next((e[key] for e in reversed(history) if e.get(key) is not None), default)


def _row(size: int, label: str, result: dp.TrainResult, iterations: int, messages: int, predicted: str) -> tuple:
    s = result.summary
    sent = s["bytes_sent"] + int(_last(result.history, "coordinator/bytes_sent"))  # sandblaster's commands
    return size, label, iterations, 1 - s["accuracy"], s["seconds"], messages, sent, predicted


def measure(args: argparse.Namespace, size: int) -> list[tuple]:
    """The four rows for a problem of ``size`` examples."""
    data = dp.data.load("synthetic", n=size, d=args.d, separable=True, margin=args.margin, seed=args.seed)
    n, m, eps = data.num_train, args.workers, args.eps
    target = 1 - eps
    common = {"model": args.model, "data": data, "seed": args.seed, "save": False}
    per_example = {**common, "batch_size": 1, "epochs": args.epochs, "target_accuracy": target,
                   "eval_every": args.eval_every, "optimizer": dp.optim("sgd", lr=args.lr)}
    rows = []

    single = dp.train(strategy=dp.Single(), **per_example)
    rows.append(_row(n, "single-process SGD", single, single.summary["steps"], 0, f"n = {n:,}"))

    potato = dp.train(strategy=HotPotato(steps_per_turn=1), workers=m, **per_example)
    rows.append(_row(n, "hot-potato SGD", potato, potato.summary["steps"], potato.summary["pushes"], f"n = {n:,}"))

    try:
        from downpour.strategies.sandblaster import Sandblaster
    except ImportError:  # not built in this checkout: the row is left out
        Sandblaster = None
    if Sandblaster is not None:
        iterations = 1
        while True:
            agd = dp.train(strategy=Sandblaster(method="agd", max_iterations=iterations), workers=m, servers=1,
                           **common)
            if agd.summary["accuracy"] >= target or iterations >= args.max_agd_iterations:
                break
            iterations *= 2
        done = int(_last(agd.history, "run/iterations", iterations))
        rows.append(_row(n, "accelerated batch GD (sandblaster agd)", agd, done,
                         agd.summary["pushes"] + agd.summary["pulls"], f"√n ≈ {math.sqrt(n):,.0f}"))

    boost = dp.train(strategy=Boost(eps=eps), workers=m, optimizer=dp.optim("momentum", lr=0.1, schedule="cosine"),
                     target_accuracy=None, **common)
    rows.append(_row(n, f"boost (k = {default_sample_size(n, eps)}, c = {default_rounds(eps)})", boost,
                     boost.summary["rounds"], boost.summary["pushes"], f"ln(1/ε) ≈ {math.log(1 / eps):.1f}"))
    return rows


def print_table(rows: list[tuple], args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"separable problem, n training examples (and n / 4 test): d = {args.d}, "
                        f"margin {args.margin}, m = {args.workers} workers, ε = {args.eps}, model {args.model}")
    for column in ("n", "method", "iterations", "test error", "seconds", "messages", "bytes sent", "seed's order"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for size, label, iterations, error, seconds, messages, sent, predicted in rows:
        table.add_row(f"{size:,}", label, f"{iterations:,}", f"{error:.4f}", f"{seconds:.2f}", f"{messages:,}",
                      f"{sent:,}", predicted, end_section=label.startswith("boost"))
    Console(width=160).print(table)


def figure(path: Path, epochs: float, workers: int) -> None:
    """Training error on all of MNIST against gradient steps: SelfieBoost (its own per-round log) and SGD."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mnist = dp.data.load("mnist", data_dir=DATA)
    common = {"model": "mlp", "optimizer": dp.optim("momentum", lr=0.05, schedule="cosine"), "epochs": epochs,
              "batch_size": 64, "save": False}
    selfie = dp.train(strategy=SelfieBoost(sample_size=8192), data=mnist, workers=workers, eval_every=10**6,
                      **common)
    curves = {"SelfieBoost": [(e["step"], e["train/error"]) for e in selfie.history if "train/error" in e]}
    # SGD evaluated on its own training set: the test split swapped for the training split.
    on_train = replace(mnist, x_test=mnist.x_train, y_test=mnist.y_train)
    sgd = dp.train(strategy=dp.Single(), data=on_train, eval_every=64, **common)
    # Both start from the same seeded network, so SGD's step 0 is SelfieBoost's.
    curves["SGD"] = [curves["SelfieBoost"][0]] + [(e["step"], 1 - e["eval/accuracy"]) for e in sgd.history
                                                  if e.get("role") == "coordinator" and "eval/accuracy" in e]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, points in curves.items():
        ax.plot(*zip(*points), marker="o", markersize=3, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("gradient steps (batch 64)")
    ax.set_ylabel("training error (all 60,000 examples)")
    ax.set_title(f"SelfieBoost vs SGD · MNIST · MLP · momentum 0.05 cosine · {workers} workers")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}: final training error SelfieBoost {curves['SelfieBoost'][-1][1]:.4f}, "
          f"SGD {curves['SGD'][-1][1]:.4f}; test accuracy SelfieBoost {selfie.summary['accuracy']:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", default="10000", help="examples drawn (80%% train, 20%% test); comma-separated")
    parser.add_argument("--d", type=int, default=30)
    parser.add_argument("--margin", type=float, default=0.1)
    parser.add_argument("--workers", type=int, default=8, help="m")
    parser.add_argument("--eps", type=float, default=0.01, help="target test error")
    parser.add_argument("--model", default="logistic")
    parser.add_argument("--lr", type=float, default=0.1, help="SGD and hot potato, one example per step")
    parser.add_argument("--epochs", type=float, default=2.0, help="at most, for SGD and hot potato")
    parser.add_argument("--eval-every", type=int, default=100, help="steps between checks of the target")
    parser.add_argument("--max-agd-iterations", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--figure", type=Path, default=None, help="also write the SelfieBoost vs SGD figure here")
    parser.add_argument("--figure-epochs", type=float, default=0.75)
    parser.add_argument("--figure-workers", type=int, default=2)
    args = parser.parse_args()
    print_table([row for size in args.n.split(",") for row in measure(args, int(size))], args)
    if args.figure is not None:
        figure(args.figure, args.figure_epochs, args.figure_workers)


if __name__ == "__main__":
    main()
