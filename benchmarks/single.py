"""Overhead of ``downpour train --strategy single`` against a plain PyTorch loop.

Same data (MNIST from ../shared/data), model, optimizer and batch size; both
run the same number of steps in this process, one after the other, each
measured over steps only (evaluation excluded). Prints a table.

    .venv/bin/python benchmarks/single.py [--steps 400] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import downpour as dp
from downpour.data import batches
from downpour.models import build, default_loss

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def plain_loop(data, model_name: str, batch_size: int, steps: int, lr: float) -> float:
    torch.manual_seed(0)
    model = build(model_name, data.input_shape, data.num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = default_loss(model_name)
    generator = torch.Generator().manual_seed(0)
    done, samples = 0, 0
    started = time.perf_counter()
    while done < steps:
        for x, y in batches(data.x_train, data.y_train, batch_size, generator=generator):
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()
            done += 1
            samples += len(y)
            if done == steps:
                break
    return samples / (time.perf_counter() - started)


def downpour_single(data, model_name: str, batch_size: int, steps: int, lr: float) -> float:
    result = dp.train(model=model_name, data=data, strategy=dp.Single(), optimizer=dp.optim("sgd", lr=lr),
                      batch_size=batch_size, epochs=100, max_steps=steps, eval_every=steps, save=False)
    return result.summary["samples_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs each")
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--batch-sizes", default="64,256")
    args = parser.parse_args()
    data = dp.data.load("mnist", data_dir=DATA)
    rows = []
    for model_name in args.models.split(","):
        for batch_size in map(int, args.batch_sizes.split(",")):
            steps = args.steps if model_name == "mlp" else max(50, args.steps // 4)
            plain = max(plain_loop(data, model_name, batch_size, steps, 0.05) for _ in range(args.repeats))
            ours = max(downpour_single(data, model_name, batch_size, steps, 0.05) for _ in range(args.repeats))
            rows.append((model_name, batch_size, steps, plain, ours, 100 * (plain - ours) / plain))

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"single-process overhead (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    for column in ("model", "batch", "steps", "plain PyTorch samples/s", "downpour samples/s", "overhead"):
        table.add_column(column, justify="right")
    for model_name, batch_size, steps, plain, ours, overhead in rows:
        table.add_row(model_name, str(batch_size), str(steps), f"{plain:,.0f}", f"{ours:,.0f}", f"{overhead:+.1f}%")
    Console().print(table)


if __name__ == "__main__":
    main()
