"""Bytes pushed against accuracy: Downpour on MNIST with each compressor, at equal steps.

Every run is the same job (``--model``, 4 workers, 2 shards, batch 32, one
epoch, the shards' optimizer ``--optimizer`` at ``--lr``); only ``--compress``
differs, so the runs take the same number of steps. Prints, for each spec,
the test accuracy, what the workers pushed, the ratio to float32 pushes and
the accuracy lost against the uncompressed run.

    .venv/bin/python benchmarks/compressed_downpour.py --model cnn --optimizer adam --lr 0.001 \\
        --specs "none;threshold:tau=0.05,entropy;topk:0.005,fp16,entropy"
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
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--optimizer", default="adam")
    parser.add_argument("--lr", type=float, default=0.001)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--specs", default="none;threshold:tau=0.05,entropy",
                        help="compress specs separated by semicolons ('none' for uncompressed)")
    args = parser.parse_args()
    data = dp.data.load("mnist", data_dir=DATA)
    rows = []
    for spec in args.specs.split(";"):
        compress = None if spec == "none" else spec
        s = dp.train(model=args.model, data=data, strategy=dp.Downpour(compress=compress),
                     optimizer=dp.optim(args.optimizer, lr=args.lr), workers=args.workers, servers=args.servers,
                     epochs=args.epochs, batch_size=32, save=False).summary
        rows.append((spec, s))
    baseline = next((s for spec, s in rows if spec == "none"), None)
    table = Table(title=f"Downpour on MNIST ({args.model}), {args.workers} workers x {args.servers} shards, "
                        f"{args.optimizer} {args.lr:g} on the shards, batch 32, {args.epochs:g} epoch(s) "
                        f"(torch {torch.__version__})")
    for column in ("compression", "steps", "accuracy", "vs none", "bytes pushed", "ratio to float32"):
        table.add_column(column, justify="right")
    for spec, s in rows:
        lost = "" if baseline is None or spec == "none" else f"{100 * (s['accuracy'] - baseline['accuracy']):+.2f} pp"
        ratio = "" if s["compression_ratio"] is None else f"{s['compression_ratio']:,.0f}x"
        table.add_row(spec, f"{s['steps']:,}", f"{100 * s['accuracy']:.2f}%", lost,
                      f"{s['bytes_sent'] / 1e6:,.1f} MB", ratio)
    Console(width=150).print(table)


if __name__ == "__main__":
    main()
