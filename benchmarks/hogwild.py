"""Hogwild! in downpour against PyTorch's own shared-memory Hogwild, and against its locking comparators.

1. MNIST (../shared/data), MLP and CNN: ``downpour`` hogwild with 1 and 2
   worker processes against the plain PyTorch pattern of the
   ``mnist_hogwild`` example (``torch.multiprocessing`` +
   ``model.share_memory()`` + one optimizer per process), both with one
   thread per process, the same optimizer (SGD, lr 0.01, momentum 0.5),
   batch size, in-memory batching and steps per process, run in turns in the
   same invocation. samples/s counts training only: from the moment every
   process is ready to the last step (downpour excludes its final evaluation).
2. w8a, sparse linear SVM: hogwild (lock-free), ``lock`` and ``round_robin``
   with the same workers, learning rate and passes; samples/s and test error,
   with single-process SGD as the reference.

    .venv/bin/python benchmarks/hogwild.py [--repeats 3] [--mlp-steps 600] [--cnn-steps 150]
"""

from __future__ import annotations

import argparse
import multiprocessing
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import downpour as dp
from downpour.models import build
from downpour.strategies.hogwild import Hogwild

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
LR, MOMENTUM, BATCH = 0.01, 0.5, 64


def _plain_worker(rank: int, model, x: torch.Tensor, y: torch.Tensor, steps: int, barrier) -> None:
    torch.set_num_threads(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    generator = torch.Generator().manual_seed(rank)
    barrier.wait()
    for _ in range(steps):
        index = torch.randint(len(y), (BATCH,), generator=generator)
        optimizer.zero_grad()
        F.cross_entropy(model(x[index]), y[index]).backward()
        optimizer.step()
    barrier.wait()


def plain_hogwild(data, model_name: str, processes: int, steps: int) -> float:
    """PyTorch's mnist_hogwild pattern; samples/s of all processes together."""
    context = multiprocessing.get_context("spawn")
    torch.manual_seed(0)
    model = build(model_name, data.input_shape, data.num_classes)
    model.share_memory()
    barrier = context.Barrier(processes + 1)
    workers = [context.Process(target=_plain_worker, args=(rank, model, data.x_train, data.y_train, steps, barrier))
               for rank in range(processes)]
    for worker in workers:
        worker.start()
    barrier.wait()  # every process built its optimizer
    started = time.perf_counter()
    barrier.wait()  # every process took its steps
    seconds = time.perf_counter() - started
    for worker in workers:
        worker.join()
    return processes * steps * BATCH / seconds


def downpour_hogwild(data, model_name: str, processes: int, steps: int, **options) -> dict:
    return dp.train(model=model_name, data=data, strategy=Hogwild(**options),
                    optimizer=dp.optim("momentum", lr=LR, momentum=MOMENTUM), workers=processes, epochs=1000,
                    max_steps=steps, batch_size=BATCH, eval_every=10**9, save=False).summary


def mnist_table(args) -> list[tuple]:
    data = dp.data.load("mnist", data_dir=DATA)
    rows = []
    for model_name, steps in (("mlp", args.mlp_steps), ("cnn", args.cnn_steps)):
        plain, ours = {}, {}
        for processes in (1, 2):
            plain[processes] = ours[processes] = 0.0
            for _ in range(args.repeats):  # best of, interleaved so both see the same machine load
                plain[processes] = max(plain[processes], plain_hogwild(data, model_name, processes, steps))
                summary = downpour_hogwild(data, model_name, processes, steps)
                ours[processes] = max(ours[processes], summary["samples_per_second"])
        for processes in (1, 2):
            rows.append((model_name, processes, steps, plain[processes], ours[processes],
                         plain[processes] / plain[1], ours[processes] / ours[1]))
    return rows


def w8a_table(args) -> list[tuple]:
    data = dp.data.load("w8a", data_dir=DATA)
    optimizer = dp.optim("sgd", lr=args.svm_lr, schedule="cosine")
    common = {"model": "svm", "data": data, "optimizer": optimizer, "epochs": args.svm_epochs,
              "batch_size": args.svm_batch, "eval_every": 10**9, "save": False}
    rows = []
    single = dp.train(strategy=dp.Single(), **common).summary
    rows.append(("single", 1, single["samples_per_second"], 100 * (1 - single["accuracy"]), 0.0))
    for label, options in (("hogwild", {}), ("lock", {"lock": True}), ("round_robin", {"round_robin": True})):
        best = None
        for _ in range(args.repeats):
            result = dp.train(strategy=Hogwild(**options), workers=args.svm_workers, **common)
            waited = sum(e.get("hogwild/wait_seconds", 0.0) for e in result.history if e.get("worker/done"))
            if best is None or result.summary["samples_per_second"] > best[0]["samples_per_second"]:
                best = (result.summary, waited)
        summary, waited = best
        rows.append((label, args.svm_workers, summary["samples_per_second"], 100 * (1 - summary["accuracy"]), waited))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs each")
    parser.add_argument("--mlp-steps", type=int, default=600, help="steps per process, MLP")
    parser.add_argument("--cnn-steps", type=int, default=150, help="steps per process, CNN")
    parser.add_argument("--svm-workers", type=int, default=4)
    parser.add_argument("--svm-epochs", type=float, default=2.0)
    parser.add_argument("--svm-batch", type=int, default=16)
    parser.add_argument("--svm-lr", type=float, default=0.5)
    parser.add_argument("--skip", choices=("mnist", "w8a"), help="leave one part out")
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    console = Console()
    if args.skip != "mnist":
        table = Table(title=f"Hogwild on MNIST, one thread per process (torch {torch.__version__}, "
                            f"{multiprocessing.cpu_count()} cores, best of {args.repeats})")
        for column in ("model", "processes", "steps/process", "plain PyTorch samples/s", "downpour samples/s",
                       "downpour / plain", "plain speedup", "downpour speedup"):
            table.add_column(column, justify="right")
        for model_name, processes, steps, plain, ours, plain_up, ours_up in mnist_table(args):
            table.add_row(model_name, str(processes), str(steps), f"{plain:,.0f}", f"{ours:,.0f}",
                          f"{100 * ours / plain:.0f}%", f"{plain_up:.2f}x", f"{ours_up:.2f}x")
        console.print(table)
    if args.skip != "w8a":
        table = Table(title=f"Sparse linear SVM on w8a: {args.svm_epochs:g} passes, batch {args.svm_batch}, "
                            f"SGD lr {args.svm_lr:g} cosine, best of {args.repeats}")
        for column in ("strategy", "processes", "samples/s", "test error", "time waiting for lock/turn (s)"):
            table.add_column(column, justify="right")
        for label, processes, speed, error, waited in w8a_table(args):
            table.add_row(label, str(processes), f"{speed:,.0f}", f"{error:.2f}%", f"{waited:.1f}")
        console.print(table)


if __name__ == "__main__":
    main()
