"""Sparse linear models: downpour's compiled kernel against scikit-learn's ``SGDClassifier``.

On w8a (../shared/data) and on the RCV1-shaped synthetic set (``rcv1-like``,
781,265 x 47,236, about 75 nonzeros a row), per row of the table:

- scikit-learn ``SGDClassifier`` (hinge, and log loss), ``--epochs`` passes,
  constant rate, ``alpha`` = λ, one binary weight vector;
- downpour ``single`` (the compiled kernel: a 2-class linear SVM or logistic
  regression, started at zero, which the kernel holds as one vector), and both
  again with averaged SGD (the mean of the iterates from the first step on);
  the bias at 0.01 of the rate (``bias_lr``), as scikit-learn moves it on sparse
  data (its intercept decay) and Bottou's sgd does;
- both with the rows shuffled once and then passed in order (Bottou's sgd's
  way): scikit-learn ``shuffle=False`` on the rows permuted, downpour
  ``single --single.shuffle once``; both times include laying the rows out in
  that order (one shuffled read of the data);
- downpour ``hogwild`` with 1, 2, ... threads over one weight matrix (no
  lock), and its ``lock`` and ``round_robin`` comparators at 2 threads;
- the machine's own ceiling for threads: Hogwild's kernel (split L2) on one
  thread, and on 2 threads with nothing shared (a model each, each over half
  of every epoch's rows; the error is the two models' mean).

samples/s is each run's own (downpour: the summary's, evaluations
excluded; scikit-learn: examples / fit time); s/epoch = 1 / (samples/s) x
rows. Speeds are the best of ``--repeats`` runs, one a seed, the rows taking turns within each
repeat (so that a slow spell of the machine's touches them all alike); the test error is the
mean over those runs, with their range.

    .venv/bin/python benchmarks/sparse_linear.py [--epochs 5] [--repeats 3] [--threads 1 2]
        [--rcv1-rows 781265]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import threading

import numpy as np
import scipy.sparse
from sklearn.linear_model import SGDClassifier

import downpour as dp
from downpour.models.sparse_sgd import SparseSGD, check_csr, compact, warm_up

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

L2 = 1e-5  # λ of 0.5 λ ||w||² (scikit-learn's alpha)
BIAS_LR = 0.01  # scikit-learn's SPARSE_INTERCEPT_DECAY: its bias's share of each step on CSR input
LR = {"w8a": 0.02, "rcv1-like": 0.2}


def scipy_csr(tensor) -> scipy.sparse.csr_matrix:
    return scipy.sparse.csr_matrix((tensor.values().numpy(), tensor.col_indices().numpy(),
                                    tensor.crow_indices().numpy()), shape=tuple(tensor.shape))


def sklearn_row(data, loss: str, epochs: int, seed: int, average: bool = False,
                once: bool = False) -> dict:
    """``once``: the rows shuffled once (on the clock, as downpour's are), then passed in order."""
    rows, labels = scipy_csr(data.x_train), data.y_train.numpy()
    x_test, y_test = scipy_csr(data.x_test), data.y_test.numpy()
    model = SGDClassifier(loss=loss, alpha=L2, max_iter=epochs, tol=None, random_state=seed,
                          learning_rate="constant", eta0=LR[data.name], average=average,
                          shuffle=not once)
    started = time.perf_counter()
    x, y = rows, labels
    if once:
        order = np.random.default_rng(seed).permutation(len(y))
        x, y = x[order], y[order]
    model.fit(x, y)
    seconds = time.perf_counter() - started
    return {"samples_per_second": epochs * len(y) / seconds,
            "error": 1.0 - model.score(x_test, y_test)}


def downpour_row(data, model: str, strategy, epochs: int, seed: int, workers: int = 1) -> dict:
    factory = partial(dp.models.build, model, data.input_shape, 2, l2=L2, bias_lr=BIAS_LR)
    result = dp.train(model=factory, loss=dp.models.default_loss(model), data=data,
                      strategy=strategy, workers=workers, epochs=epochs, batch_size=1,
                      optimizer=dp.optim("sgd", lr=LR[data.name]), eval_every=10**9,
                      seed=seed, save=False)
    kernel = any(e.get("train/kernel") == "compiled" for e in result.history)
    assert kernel, "the run did not use the compiled kernel"
    return {"samples_per_second": result.summary["samples_per_second"],
            "error": 1.0 - result.summary["accuracy"]}


def kernel_row(data, epochs: int, seed: int, threads: int) -> dict:
    """Hogwild's kernel with nothing shared: ``threads`` models, thread i training model i over
    its part of each epoch's shuffled rows (no shared writes, no cache lines passed between the
    cores): how far this machine lets threads scale at all."""
    x, y = compact(check_csr(data.x_train)), data.y_train.numpy()
    models = [SparseSGD("svm", num_features=x.shape[1], num_classes=2, lr=LR[data.name], l2=L2,
                        regularization="split", bias_lr=BIAS_LR) for _ in range(threads)]
    for model in models:
        model.frequencies(x)
        warm_up(model)
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    for _ in range(epochs):
        parts = np.array_split(rng.permutation(len(y)), threads)
        workers = [threading.Thread(target=model.fit_epoch, args=(x, y, part),
                                    kwargs={"checked": True}) for model, part in zip(models, parts)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    seconds = time.perf_counter() - started
    x_test, y_test = check_csr(data.x_test), data.y_test.numpy()
    return {"samples_per_second": epochs * len(y) / seconds,
            "error": float(np.mean([model.error(x_test, y_test) for model in models]))}


def methods(data, epochs: int, threads: list[int]) -> dict[str, tuple[Callable, int]]:
    """Each row's measurement (a function of the seed) and how many repeats it gets."""
    sk, down = partial(sklearn_row, data), partial(downpour_row, data)
    table = {
        "scikit-learn SGDClassifier hinge": partial(sk, "hinge", epochs),
        "scikit-learn SGDClassifier log loss": partial(sk, "log_loss", epochs),
        "downpour single, svm": partial(down, "svm", dp.Single(), epochs),
        "downpour single, logistic": partial(down, "logistic", dp.Single(), epochs),
        "scikit-learn SGDClassifier hinge, averaged": partial(sk, "hinge", epochs, average=True),
        "downpour single, svm, averaged": partial(down, "svm", dp.Single(average=1), epochs),
        "scikit-learn SGDClassifier hinge, rows shuffled once": partial(sk, "hinge", epochs,
                                                                        once=True),
        "downpour single, svm, shuffled once": partial(down, "svm", dp.Single(shuffle="once"),
                                                       epochs),
    }
    rows = {name: (measure, 0) for name, measure in table.items()}
    for n in threads:
        rows[f"downpour hogwild, svm, {n} thread(s)"] = (
            partial(down, "svm", dp.Hogwild(threads="on"), epochs, workers=n), 0)
    for n in threads:
        rows[f"kernel alone, split L2, {n} thread(s), nothing shared"] = (
            partial(kernel_row, data, epochs, threads=n), 0)
    for mode in ("lock", "round_robin"):  # slow by design: one short run each
        strategy = dp.Hogwild(threads="on", **{mode: True})
        rows[f"downpour hogwild {mode}, svm, 2 threads"] = (
            partial(down, "svm", strategy, max(1, epochs // 5), workers=2), 1)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rcv1-rows", type=int, default=781_265)
    parser.add_argument("--sets", nargs="+", default=["w8a", "rcv1-like"])
    args = parser.parse_args()

    print(f"{os.cpu_count()} CPUs; {args.epochs} epochs, batch 1, lambda {L2:g}, best of "
          f"{args.repeats}", flush=True)
    print("| set | method | s/epoch | samples/s | x scikit-learn hinge | test error |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in args.sets:
        started = time.perf_counter()
        if name == "w8a":
            data = dp.data.load("w8a", data_dir=DATA)
        else:
            data = dp.data.load("rcv1-like", n_train=args.rcv1_rows)
        print(f"<!-- {name}: {data.num_train} rows, loaded in {time.perf_counter() - started:.1f} s -->",
              flush=True)
        runs: dict[str, list[dict]] = {}
        table = methods(data, args.epochs, args.threads)
        for seed in range(args.repeats):  # every row once per repeat: the machine's moods hit all
            for method, (measure, repeats) in table.items():
                if not repeats or seed < repeats:
                    runs.setdefault(method, []).append(measure(seed))
        reference = max(r["samples_per_second"] for r in next(iter(runs.values())))
        for method, seen in runs.items():
            speed = max(r["samples_per_second"] for r in seen)
            print(f"| {name} | {method} | {data.num_train / speed:.3f} | {speed:,.0f} | "
                  f"{speed / reference:.2f}x | {error_cell(seen)} |", flush=True)


def error_cell(runs: list[dict]) -> str:
    """The mean test error of a row's runs (one a seed) and, for several, their range: the last
    iterate at a constant rate moves by tenths of a point from seed to seed."""
    errors = [100 * r["error"] for r in runs]
    mean = f"{sum(errors) / len(errors):.2f}%"
    return mean if len(errors) == 1 else f"{mean} ({min(errors):.2f}–{max(errors):.2f})"


if __name__ == "__main__":
    sys.exit(main())
