"""Streamed datasets: their samples/s against the same data in memory, and their memory per role.

1. ``single`` on Fashion-MNIST (../shared/data) with the reference CNN: the
   data in memory, then the same tensors through a map-style
   ``torch.utils.data.Dataset`` (one item per ``__getitem__``) streamed with
   0, 1 and 2 DataLoader worker processes. samples/s is the run's own
   (training time, evaluations excluded); best of ``--repeats``, alternating.
   The goal: streamed with 1 loader worker at least 0.9 x in memory.
2. A generated Caltech-101-shaped folder (101 classes of JPEGs of about
   300 x 200, ``--per-class`` each) trained by ``downpour`` (2 workers, 1
   shard, the CNN at 64 x 64) in a fresh process: samples/s and every role's
   peak resident memory, beside what the training images take decoded at
   full size as float32.

    .venv/bin/python benchmarks/streamed_data.py [--steps 400] [--repeats 2] [--per-class 45]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils.data import Dataset as TorchDataset

import downpour as dp

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

from tests.integration.data.caltech import make_folder  # noqa: E402  (the tests' generated folder)


class Items(TorchDataset):
    """In-memory tensors served one item at a time, as a user's Dataset serves them."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y
        self.targets = y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


def fashion_mnist(steps: int, repeats: int) -> None:
    memory = dp.data.load("fashion-mnist", data_dir=DATA, download=False)
    streamed = dp.data.from_torch(Items(memory.x_train, memory.y_train),
                                  Items(memory.x_test, memory.y_test), name="fashion-mnist")
    forms = {"in memory": (memory, 0), "streamed, 0 loader workers": (streamed, 0),
             "streamed, 1 loader worker": (streamed, 1),
             "streamed, 2 loader workers": (streamed, 2)}
    best: dict[str, float] = {}
    accuracy: dict[str, float] = {}
    for _ in range(repeats):
        for label, (data, workers) in forms.items():
            options = {"loader_workers": workers} if data.streamed else {}
            summary = dp.train(model="cnn", data=data, strategy="single", max_steps=steps,
                               batch_size=64, eval_samples=2000, save=False, seed=0,
                               optimizer=dp.optim("sgd", lr=0.05), **options).summary
            best[label] = max(best.get(label, 0.0), summary["samples_per_second"])
            accuracy[label] = summary["accuracy"]
    base = best["in memory"]
    print(f"## single, Fashion-MNIST, CNN, batch 64, {steps} steps; best of {repeats}")
    print(f"{'form':<28} {'samples/s':>10} {'x memory':>9} {'accuracy':>9}")
    for label in forms:
        print(f"{label:<28} {best[label]:>10.0f} {best[label] / base:>9.2f} "
              f"{accuracy[label]:>9.4f}")


def caltech(per_class: int, steps: int, loader_workers: int) -> None:
    with tempfile.TemporaryDirectory(prefix="caltech-shaped-") as folder:
        make_folder(Path(folder), per_class=per_class)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(
            [sys.executable, "-m", "tests.integration.data.caltech", folder, "--steps", str(steps),
             "--loader-workers", str(loader_workers)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800, check=True)
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    mb = 1e6
    print(f"## downpour, Caltech-101-shaped folder: {figures['images']} JPEGs of ~300x200 in "
          f"{figures['classes']} classes, CNN at 64x64, 2 workers, 1 shard, {steps} steps a "
          f"worker, {loader_workers} loader worker(s)")
    print(f"samples/s {figures['samples_per_second']:.0f}; test accuracy "
          f"{figures['accuracy']:.3f} (chance {1 / figures['classes']:.3f}); training images "
          f"decoded at full size: {figures['decoded_train_bytes'] / mb:,.0f} MB")
    print(f"{'role':<36} {'peak RSS (MB)':>14}")
    print(f"{'coordinator':<36} {figures['coordinator_peak_bytes'] / mb:>14,.0f}")
    for title, peak in sorted(figures["role_peak_bytes"].items()):
        print(f"{title:<36} {peak / mb:>14,.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--per-class", type=int, default=45)
    parser.add_argument("--caltech-steps", type=int, default=300)
    parser.add_argument("--caltech-loader-workers", type=int, default=0)
    parser.add_argument("--skip", choices=("fashion-mnist", "caltech"), default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"# torch {torch.__version__}, {os.cpu_count()} CPUs")
    if args.skip != "fashion-mnist":
        fashion_mnist(args.steps, args.repeats)
    if args.skip != "caltech":
        caltech(args.per_class, args.caltech_steps, args.caltech_loader_workers)


if __name__ == "__main__":
    main()
