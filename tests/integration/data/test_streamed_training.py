"""A user's own torch Dataset trains every mini-batch strategy as the same data in memory does.

Also: a regression task against closed-form least squares, a user's metric in
``events.jsonl`` and ``summary.json``, the strategies that refuse streamed data,
and bad input found in a worker process.
"""

from __future__ import annotations

import gc
import json
import os

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset as TorchDataset

import downpour as dp
from downpour.errors import DataError, DownpourError
from tests import events

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

CENTERS = np.random.default_rng(7).normal(0, 1.0, (4, 16))


class Blobs(TorchDataset):
    """Four Gaussian clusters in 16 dimensions, one example per item; labels as ``targets``."""

    def __init__(self, n: int, seed: int, *, ragged_at: int | None = None) -> None:
        rng = np.random.default_rng(seed)
        y = rng.integers(0, 4, n)
        self.x = torch.tensor(CENTERS[y] + rng.normal(0, 1.1, (n, 16)), dtype=torch.float32)
        self.targets = y.tolist()
        self.ragged_at = ragged_at

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.x[i]
        if self.ragged_at is not None and i >= self.ragged_at:
            x = x[:8]  # a bug in a user's transform, from some item on
        return x, self.targets[i]


def in_memory(train: Blobs, test: Blobs) -> dp.data.Dataset:
    return dp.data.Dataset("blobs", train.x, torch.tensor(train.targets), test.x,
                           torch.tensor(test.targets), 4)


def _run(data, strategy: str, **options):
    options = {"save": False, **({} if strategy == "single" else {"workers": 2}), **options}
    return dp.train(model="mlp", data=data, strategy=strategy, epochs=2, batch_size=32,
                    optimizer=dp.optim("sgd", lr=0.05), seed=0, **options)


@pytest.mark.parametrize("strategy", ["single", "downpour", "allreduce", "local-sgd"])
def test_a_torch_dataset_trains_as_the_same_data_in_memory(strategy):
    train, test = Blobs(3000, 1), Blobs(800, 2)
    streamed = _run((train, test), strategy)
    memory = _run(in_memory(train, test), strategy)
    a, b = streamed.summary["accuracy"], memory.summary["accuracy"]
    # Measured in memory 0.949-0.954 over the four strategies (2026-12-04); 5% of single's budget 0.829.
    assert a >= 0.9 and b >= 0.9, (a, b)
    assert abs(a - b) <= 0.02, (a, b)
    assert streamed.summary["samples"] == memory.summary["samples"]
    if strategy in ("single", "allreduce"):
        # Same seeded order and synchronous updates: the very same model.
        assert a == b


def test_loader_workers_read_the_same_batches():
    train, test = Blobs(1500, 1), Blobs(400, 2)
    one = _run((train, test), "allreduce", loader_workers=1)
    none = _run((train, test), "allreduce")
    assert one.summary["accuracy"] == none.summary["accuracy"]


class Linear(TorchDataset):
    """y = x . w + 0.5 + noise, float targets (a regression)."""

    def __init__(self, n: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        w = np.random.default_rng(0).normal(0, 1, 8)
        self.x = rng.normal(0, 1, (n, 8)).astype(np.float32)
        self.y = (self.x @ w + 0.5 + rng.normal(0, 0.2, n)).astype(np.float32)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(self.x[i]), torch.tensor(self.y[i])


def linear_model() -> nn.Module:
    return nn.Linear(8, 1)


def least_squares_mse(train: Linear, test: Linear) -> float:
    design = np.hstack([train.x, np.ones((len(train), 1))]).astype(np.float64)
    solution, *_ = np.linalg.lstsq(design, train.y.astype(np.float64), rcond=None)
    predicted = np.hstack([test.x, np.ones((len(test), 1))]) @ solution
    return float(np.mean((predicted - test.y) ** 2))


@pytest.mark.parametrize("strategy", ["single", "downpour"])
def test_regression_reaches_least_squares(strategy):
    train, test = Linear(4000, 1), Linear(1000, 2)
    best = least_squares_mse(train, test)
    workers = {} if strategy == "single" else {"workers": 2}
    result = dp.train(model=linear_model, data=(train, test), strategy=strategy, task="regression",
                      epochs=4, batch_size=32, optimizer=dp.optim("sgd", lr=0.02,
                                                                 schedule="cosine"),
                      save=False, seed=0, **workers)
    summary = result.summary
    assert summary["metric_name"] == "mse" and summary["accuracy"] is None
    assert summary["metric"] <= 1.10 * best, (summary["metric"], best)
    last = [e for e in result.history if "eval/r2" in e][-1]
    assert last["eval/r2"] > 0.9


def test_a_target_metric_stops_training():
    train, test = Linear(4000, 1), Linear(1000, 2)
    result = dp.train(model=linear_model, data=(train, test), strategy="single", task="regression",
                      target_metric="mse<=0.5", epochs=4, batch_size=32, eval_every=10,
                      optimizer=dp.optim("sgd", lr=0.02), save=False)
    summary = result.summary
    assert summary["metric"] <= 0.5 and summary["target_metric"] == "mse<=0.5"
    assert summary["time_to_target"] is not None
    assert summary["steps"] < 4 * 4000 // 32


def confident_share(outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """A user's metric: the share of test examples predicted with probability over 0.9."""
    top = outputs.softmax(dim=1).max(dim=1).values
    return {"confident": float((top > 0.9).float().mean()), "examples": float(len(targets))}


def test_a_user_metric_is_in_the_events_and_the_summary(tmp_path):
    train, test = Blobs(1500, 1), Blobs(400, 2)
    _run((train, test), "downpour", metric=confident_share, run_dir=tmp_path / "run",
                  save=True)
    scored = [e for e in events.read(tmp_path / "run") if "eval/user/confident" in e]
    assert scored and all(e["eval/user/examples"] == 400.0 for e in scored)
    assert scored[-1]["eval/metric_name"] == "user/confident"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["metric_name"] == "user/confident"
    assert summary["metric"] == scored[-1]["eval/user/confident"] > 0.0
    assert summary["user_metrics"]["examples"] == 400.0
    # Classification keeps its accuracy: measured 0.935; one worker on 5% of the budget 0.785.
    assert summary["accuracy"] >= 0.88


@pytest.mark.parametrize("strategy", ["sandblaster", "boost", "selfieboost", "dane"])
def test_strategies_that_need_the_data_in_memory_refuse_it(strategy):
    with pytest.raises(ValueError, match=rf"strategy '{strategy}' needs the training set in memory "
                                         r"\(.+\); 'torch' is a streamed dataset.*allreduce"):
        dp.train(model="mlp", data=(Blobs(100, 1), Blobs(20, 2)), strategy=strategy, workers=2,
                 save=False)


def test_bad_input_found_in_a_worker_ends_the_run_with_its_message():
    train = Blobs(600, 1, ragged_at=400)  # items 0 and 1 agree: found only when read
    with pytest.raises(DownpourError, match="inputs of varying shape in one batch"):
        _run((train, Blobs(100, 2)), "downpour")
    with pytest.raises(DataError, match="inputs of varying shape in one batch"):
        _run((train, Blobs(100, 2)), "single")


def test_a_worker_killed_with_its_loader_processes_leaves_none_behind():
    # Worker 1 is SIGKILLed at step 20 while its DataLoader process runs; downpour goes on with
    # worker 0, and the test's reaper (tests/conftest.py) finds no process left behind.
    train, test = Blobs(1500, 1), Blobs(200, 2)
    result = _run((train, test), "downpour", loader_workers=1,
                  faults=dp.Faults(kill_at_step={1: 20}))
    assert any(e.get("fault/killed") == "worker:1" for e in result.history)
    # Measured 0.935 (worker 0 alone on its half also 0.945: blobs is easy; the test is about the
    # processes); one worker on 5% of the budget 0.785.
    assert result.summary["accuracy"] >= 0.88


class Tags(TorchDataset):
    """Multi-label: label j is on where x . w_j > 0, four labels, as a multi-hot int vector."""

    def __init__(self, n: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        w = np.random.default_rng(0).normal(0, 1, (8, 4))
        self.x = torch.tensor(rng.normal(0, 1, (n, 8)), dtype=torch.float32)
        self.y = torch.tensor(self.x.numpy() @ w > 0, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


def test_a_multilabel_task_reports_per_label_f1():
    result = dp.train(model="mlp", data=(Tags(3000, 1), Tags(500, 2)), strategy="allreduce",
                      workers=2, task="multilabel", target_metric="f1_macro>=0.99", epochs=2,
                      batch_size=32, optimizer=dp.optim("sgd", lr=0.1), save=False)
    summary = result.summary
    # Measured macro F1 0.949 (2026-12-04); 5% of the budget 0.643.
    assert summary["metric_name"] == "f1_macro" and summary["metric"] >= 0.85
    last = [e for e in result.history if "eval/f1_per_label" in e][-1]
    assert len(last["eval/f1_per_label"]) == 4 and min(last["eval/f1_per_label"]) >= 0.75


def dropout_net() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 4))


@pytest.mark.parametrize("loader_workers", [0, 1])
def test_single_streamed_is_bit_identical_to_in_memory(loader_workers):
    # Same seeded order, and reading or evaluating the stream draws nothing from torch's global
    # generator, so the dropout masks are the same too: the very same parameters.
    train, test = Blobs(1200, 1), Blobs(300, 2)
    options = {"model": dropout_net, "strategy": "single", "epochs": 2, "batch_size": 32,
               "eval_every": 7, "save": False, "seed": 0}
    streamed = dp.train(data=(train, test), loader_workers=loader_workers, **options)
    memory = dp.train(data=in_memory(train, test), **options)
    for a, b in zip(streamed.model.parameters(), memory.model.parameters()):
        assert torch.equal(a, b)


class _Litter:
    """Garbage in a reference cycle whose collection, in whatever process, leaves a file."""

    def __init__(self, where: str) -> None:
        self.where, self.me, self.pid = where, self, os.getpid()

    def __del__(self) -> None:
        with open(os.path.join(self.where, f"collected-in-{os.getpid()}"), "w"):
            pass


class CollectingBlobs(Blobs):
    """Blobs whose loader processes (not the process that made them) run the garbage collector
    as they read."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.maker = os.getpid()

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if os.getpid() != self.maker:
            gc.collect()
        return super().__getitem__(i)


def test_loader_processes_never_collect_the_garbage_they_inherit(tmp_path):
    # A loader process inherits its parent's garbage; collected there, it runs destructors meant
    # for the parent (a TCPStore's aborted a loader process in a test run). Forked frozen, it is
    # not: without the freeze this test leaves a file named after the loader process.
    gc.disable()  # the litter must still be uncollected garbage when the loader forks
    try:
        _Litter(str(tmp_path))
        train, test = CollectingBlobs(300, 1), Blobs(100, 2)
        dp.train(data=(train, test), loader_workers=1, model=dropout_net, strategy="single",
                 epochs=1, batch_size=32, save=False, seed=0)
        children = [p.name for p in tmp_path.iterdir() if p.name != f"collected-in-{os.getpid()}"]
        assert children == [], children
    finally:
        gc.enable()
        gc.collect()
