"""What every strategy receives (the Job) and the pieces they share."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from downpour.data import Dataset
from downpour.errors import check_range
from downpour.metrics import Metrics, evaluate
from downpour.models import backward
from downpour.optim import OptimSpec

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True, kw_only=True)
class Faults:
    """Stragglers and failures a user stages: ``slow`` maps rank to a slowdown factor,
    ``kill`` maps rank to the second (since training started) it is SIGKILLed."""

    slow: dict[int, float] = field(default_factory=dict)
    kill: dict[int, float] = field(default_factory=dict)
    kill_server: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for rank, factor in self.slow.items():
            check_range(f"slow-worker factor of rank {rank}", factor, 1.0)
        for rank, seconds in self.kill.items():
            check_range(f"kill-worker time of rank {rank}", seconds, 0.0)
        for shard, seconds in self.kill_server.items():
            check_range(f"kill-server time of shard {shard}", seconds, 0.0)


@dataclass(frozen=True, kw_only=True)
class Job:
    """The workload a strategy trains: the same for every strategy, so they compare.

    ``model`` is a factory: every role builds its own copy with it, seeded
    identically, so all replicas start from the same parameters.
    """

    model: Callable[[], nn.Module]
    loss: LossFn
    data: Dataset
    optimizer: OptimSpec
    workers: int = 1
    servers: int = 1
    epochs: float = 1.0
    batch_size: int = 64
    max_steps: int | None = None
    target_accuracy: float | None = None
    eval_every: int | None = None
    max_seconds: float | None = None
    seed: int = 0
    device: str = "cpu"
    faults: Faults = field(default_factory=Faults)
    cluster: Any = None  # None (local processes) or a RayCluster; see downpour.cluster.open_cluster
    restart_workers: bool = False
    checkpoint: Any = None  # a downpour.checkpoint.Checkpointing, or None

    def __post_init__(self) -> None:
        check_range("workers", self.workers, 1, 4096)
        check_range("servers", self.servers, 1, 1024)
        check_range("epochs", self.epochs, 0.0, low_open=True)
        check_range("batch_size", self.batch_size, 1)
        if self.max_steps is not None:
            check_range("max_steps", self.max_steps, 1)
        if self.target_accuracy is not None:
            check_range("target_accuracy", self.target_accuracy, 0.0, 1.0)
        if self.eval_every is not None:
            check_range("eval_every", self.eval_every, 1)
        if self.max_seconds is not None:
            check_range("max_seconds", self.max_seconds, 0.0, low_open=True)
        for rank in (*self.faults.slow, *self.faults.kill):
            check_range("faulty worker rank", rank, 0, self.workers - 1)
        for shard in self.faults.kill_server:
            check_range("killed server shard", shard, 0, self.servers - 1)

    def build_model(self) -> nn.Module:
        """A fresh replica, seeded so that every role starts from the same parameters."""
        torch.manual_seed(self.seed)
        model = self.model()
        if not isinstance(model, nn.Module):
            raise TypeError(f"the model factory must return a torch.nn.Module, got {type(model).__name__}")
        return model.to(self.device)

    def steps_per_epoch(self, examples: int | None = None) -> int:
        """Mini-batch steps in one pass over ``examples`` (default: the whole training set)."""
        n = self.data.num_train if examples is None else examples
        return max(1, math.ceil(n / self.batch_size))

    def total_steps(self, examples: int | None = None) -> int:
        """Steps one worker takes over ``examples``, capped by ``max_steps``."""
        steps = max(1, math.ceil(self.epochs * self.steps_per_epoch(examples)))
        return steps if self.max_steps is None else min(steps, self.max_steps)

    def eval_interval(self, total_steps: int) -> int:
        """Steps between evaluations: ``eval_every`` or about ten evaluations per run."""
        return self.eval_every or max(1, total_steps // 10)


class Strategy(Protocol):
    """A distributed-training method: one frozen config dataclass with a ``run``.

    ``run`` trains the job's model, logs through ``metrics`` (the coordinator's
    sink) and returns the trained model. The caller owns the run directory and
    the final evaluation.
    """

    name: ClassVar[str]

    def run(self, job: Job, metrics: Metrics) -> nn.Module: ...


class Evaluator:
    """Evaluates the coordinator's model on the test set and watches the target and the time budget."""

    def __init__(self, job: Job, metrics: Metrics) -> None:
        self.job = job
        self.metrics = metrics
        self.seconds = 0.0  # time spent evaluating, excluded from samples/s
        self.reached = False
        self._started = time.monotonic()

    def begin(self) -> None:
        """Training starts now: the time budget counts from here."""
        self._started = time.monotonic()

    @property
    def out_of_time(self) -> bool:
        """Whether the job's ``max_seconds`` budget is spent."""
        budget = self.job.max_seconds
        return budget is not None and time.monotonic() - self._started >= budget

    def done(self) -> bool:
        """Whether training should stop: the target is reached or the time budget spent."""
        return self.reached or self.out_of_time

    def __call__(self, model: nn.Module, step: int, **extra: Any) -> dict[str, float]:
        started = time.perf_counter()
        result = evaluate(model, self.job.loss, self.job.data.x_test, self.job.data.y_test)
        self.seconds += time.perf_counter() - started
        target = self.job.target_accuracy
        if target is not None and result["eval/accuracy"] >= target:
            self.reached = True
        self.metrics.log(step, {**result, **extra})
        return result


def sgd_step(model: nn.Module, zero_grad: Callable[[], None], optimizer: torch.optim.Optimizer, loss: LossFn,
             x: torch.Tensor, y: torch.Tensor) -> float:
    """One local mini-batch step: zero the gradients, forward, backward, optimizer step.

    Optimizers that re-evaluate the loss (L-BFGS, conjugate gradients) get a closure.
    """
    if _needs_closure(optimizer):
        def closure() -> torch.Tensor:
            zero_grad()
            return backward(model, loss, x, y)

        return float(optimizer.step(closure))
    zero_grad()
    value = backward(model, loss, x, y)
    optimizer.step()
    return float(value)


def _needs_closure(optimizer: torch.optim.Optimizer) -> bool:
    return isinstance(optimizer, torch.optim.LBFGS) or getattr(optimizer, "requires_closure", False)


def log_start(metrics: Metrics, evaluator: Evaluator) -> None:
    """The coordinator's mark that training begins (after processes started and met).

    Times to target, the time budget and time axes count from here, so
    process start-up is not charged to a strategy.
    """
    evaluator.begin()
    metrics.log(0, {"event": "start"})


def log_end(metrics: Metrics, *, steps: int, samples: int, seconds: float, eval_seconds: float, **extra: Any) -> None:
    """The coordinator's closing event, from which the summary takes steps, samples and time."""
    metrics.log(
        steps,
        {
            "event": "end",
            "run/steps": steps,
            "run/samples": samples,
            "run/seconds": seconds,
            "run/train_seconds": max(seconds - eval_seconds, 1e-9),
            "progress/step": steps,
            **extra,
        },
    )
