"""What every strategy receives (the Job) and the pieces they share."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from downpour.data import Dataset
from downpour.errors import check_range
from downpour.models import backward
from downpour.optim import OptimSpec

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True, kw_only=True)
class Faults:
    """Stragglers and failures a user stages.

    ``slow`` maps a worker's rank to a slowdown factor; ``kill`` maps it to
    the second (since training started) it is SIGKILLed, ``kill_at_step`` to
    the step at which it is (so a test's kill lands at a known point);
    ``kill_server`` maps a shard to the second it is SIGKILLed,
    ``kill_server_at_version`` to the version at which it is: right after the
    update that takes it there, so that the updates lost are known exactly.

    Example:
        >>> Faults(kill_at_step={1: 200}).kill_at_step
        {1: 200}
    """

    slow: dict[int, float] = field(default_factory=dict)
    kill: dict[int, float] = field(default_factory=dict)
    kill_server: dict[int, float] = field(default_factory=dict)
    kill_at_step: dict[int, int] = field(default_factory=dict)
    kill_server_at_version: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for rank, factor in self.slow.items():
            check_range(f"slow-worker factor of rank {rank}", factor, 1.0)
        for rank, seconds in self.kill.items():
            check_range(f"kill-worker time of rank {rank}", seconds, 0.0)
        for shard, seconds in self.kill_server.items():
            check_range(f"kill-server time of shard {shard}", seconds, 0.0)
        for rank, step in self.kill_at_step.items():
            check_range(f"kill-worker step of rank {rank}", step, 1)
        for shard, version in self.kill_server_at_version.items():
            check_range(f"kill-server version of shard {shard}", version, 1)
        both = sorted(set(self.kill_server) & set(self.kill_server_at_version))
        if both:
            raise ValueError(f"shard {both[0]} is staged to be killed both by time and at a version; "
                             "choose one")


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
    shared_memory: bool = True  # roles on one host may move tensors through /dev/shm

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
        for rank in (*self.faults.slow, *self.faults.kill, *self.faults.kill_at_step):
            check_range("faulty worker rank", rank, 0, self.workers - 1)
        for shard in (*self.faults.kill_server, *self.faults.kill_server_at_version):
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
    """A distributed-training method: one frozen config dataclass whose ``plan`` says how it runs.

    ``plan(job)`` validates the job for this method and returns a
    :class:`~downpour.strategies.plan.Plan`; the Coordinator
    (:mod:`downpour.run`) runs it. What a strategy supports is declared here,
    with the defaults a strategy class inherits by subclassing ``Strategy``.

    Attributes:
        name: the registry name (``"downpour"``).
        uses_servers: the run has parameter-server shards (``servers`` counts them).
        recoverable: checkpoints, shard restarts and ``resume`` (its state lives on the shards).
        restartable: a dead worker can be restarted (``restart_workers``).
        takes_workers: the run has workers (``workers`` counts them).
        buffers: what the strategy does with a model's buffers (BatchNorm
            statistics): a line for the docs and ``--help``.
        ignores: the run options (:mod:`downpour.run.config`) it does not read, each
            with what to use instead; a key may be a whole section (``"optimizer"``) and
            a hint may name the strategy's own options in braces (``"use {rounds}"``).
            Setting one is an error (``servers`` and ``workers`` follow from above).
        in_memory: what the strategy needs the training set held in memory for, if it
            does (a line for the error that refuses a streamed dataset); empty if it
            trains from mini-batches alone and so reads a streamed dataset too.
    """

    name: ClassVar[str]
    uses_servers: ClassVar[bool] = False
    recoverable: ClassVar[bool] = False
    restartable: ClassVar[bool] = False
    takes_workers: ClassVar[bool] = True
    buffers: ClassVar[str] = ""
    in_memory: ClassVar[str] = ""
    ignores: ClassVar[dict[str, str]] = {}

    def plan(self, job: Job) -> Any: ...


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


def refuse_buffers(job: Job, strategy: str, why: str, model: nn.Module | None = None) -> None:
    """Refuse a model with buffers (BatchNorm statistics) for a strategy that cannot keep them right.

    Example:
        >>> job = Job(model=lambda: nn.BatchNorm1d(2), loss=None, data=None, optimizer=None)  # doctest: +SKIP
        >>> refuse_buffers(job, "sandblaster", "...")  # doctest: +SKIP
        Traceback (most recent call last):
        ValueError: strategy 'sandblaster' cannot train a model with buffers ...
    """
    model = job.build_model() if model is None else model
    names = [name for name, _ in model.named_buffers()]
    if names:
        raise ValueError(f"strategy {strategy!r} cannot train a model with buffers ({', '.join(names[:3])}"
                         f"{', ...' if len(names) > 3 else ''}): {why}. Use a model without them (no "
                         "BatchNorm; GroupNorm or LayerNorm keep no running statistics) or another strategy")


def refuse_inexact(job: Job, strategy: str, why: str) -> None:
    """Refuse, for a batch method, a model whose loss is not a fixed function of its parameters
    (buffers: :func:`refuse_buffers`, for ``why``) or whose gradient is not the loss's (a linear
    model's bias scaled by ``bias_lr``: its line searches and local solvers need the loss's own)."""
    model = job.build_model()
    refuse_buffers(job, strategy, why, model)
    bias_lr = getattr(model, "bias_lr", 1.0)
    if bias_lr != 1.0:
        raise ValueError(f"strategy {strategy!r} needs the loss's own gradient, and the model scales "
                         f"its bias's by bias_lr={bias_lr:g} (a step size for SGD); build it with "
                         "bias_lr=1 or use an SGD strategy")
