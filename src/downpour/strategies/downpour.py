"""``downpour``: Downpour SGD (Dean et al., "Large Scale Distributed Deep Networks", NIPS 2012).

Model replicas, each on its own shard of the data, fetch parameters from a
parameter server sharded across processes and push gradients back, without
waiting for one another. A replica fetches every ``fetch_every`` steps
(n_fetch) and pushes the gradients it accumulated every ``push_every`` steps
(n_push); the shards apply each push on arrival with the server optimizer
(Adagrad in the paper). Staleness can scale the learning rate down or be
bounded (stale synchronous parallel).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar, Literal

import torch

from downpour.compress import parse
from downpour.errors import StaleUpdate, check_range
from downpour.flat import SparseUpdate, sparsify
from downpour.optim import optim
from downpour.server import ApplyAtOnce, BoundedStaleness
from downpour.strategies.base import Job, Strategy
from downpour.strategies.parameter_server import ParameterServerPlan, PSWorker


@dataclass(kw_only=True)
class DownpourWorker(PSWorker):
    """One model replica: compute, accumulate, push every n_push, fetch every n_fetch."""

    fetch_every: int = 1
    push_every: int = 1
    sparse_push: bool = True

    def train(self, ctx: Any, stream: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> None:
        flat = self.flat
        versions = self.pull()
        accumulated = torch.zeros_like(flat.grads)
        pending = pending_samples = 0
        for x, y in stream:
            if self.steps >= self.total_steps or ctx.should_stop():
                break
            self.gradient(x, y)
            accumulated.add_(flat.grads)
            pending += 1
            pending_samples += len(y)
            if pending == self.push_every:
                self._push(versions, accumulated, pending_samples)
                accumulated.zero_()
                pending = pending_samples = 0
            if self.steps % self.fetch_every == 0:
                versions = self.pull()
        if pending:
            self._push(versions, accumulated, pending_samples)

    def _push(self, versions: list[int], update: torch.Tensor, samples: int) -> None:
        # "Only send parameters updated": models with sparse inputs touch few
        # coordinates per batch, and then (index, value) pairs are smaller.
        # sparsify counts before it makes indices, so a dense gradient costs
        # one read here; the decision is made where the gradient lies, and
        # only what is sent comes to the host.
        payload: torch.Tensor | SparseUpdate = update
        if self.sparse_push and not self.streams:
            sparse = sparsify(update)
            if sparse is not None:
                payload = SparseUpdate(sparse.indices.cpu(), sparse.values.cpu(), sparse.size)
        try:
            results = self.push(versions, payload)
        except StaleUpdate:
            # Bounded staleness refused it: this gradient is lost; fetch and go on.
            self.refused += 1
            self.discard(samples)
            self.pull()
            return
        if any(r.dropped for r in results):
            self.dropped += 1
            self.discard(samples)


@dataclass(frozen=True, kw_only=True)
class Downpour(Strategy):
    """Downpour SGD's configuration.

    Args:
        fetch_every: n_fetch, steps between parameter fetches.
        push_every: n_push, steps whose gradients are accumulated into one push.
        staleness: ``"none"`` applies every push as is; ``"scale-lr"`` divides
            the server learning rate by the push's staleness.
        max_staleness: if set, a push staler than this is refused
            (stale synchronous parallel) and the worker fetches again.
        server_optimizer: overrides the job optimizer's name on the shards
            (keeping its learning rate), e.g. ``"adagrad"`` as in DistBelief.
        sparse_push: send only nonzero entries when that is smaller.
        ema_decay: if set, the shards keep a moving average of the parameters with this decay.
        evaluate_average: evaluate (and return) that moving average instead of the parameters.
        compress: compress each push (a :func:`downpour.compress.parse` spec,
            e.g. ``"threshold:tau=0.01,entropy"``), one compressor state per shard.

    Example:
        >>> Downpour(fetch_every=4, push_every=4, staleness="scale-lr").push_every
        4
    """

    name: ClassVar[str] = "downpour"
    uses_servers: ClassVar[bool] = True
    recoverable: ClassVar[bool] = True  # checkpoints, shard and worker restarts, --resume
    restartable: ClassVar[bool] = True  # restart_workers
    buffers: ClassVar[str] = "each worker's own; the coordinator averages the workers' latest"
    fetch_every: int = 1
    push_every: int = 1
    staleness: Literal["none", "scale-lr"] = "none"
    max_staleness: int | None = None
    server_optimizer: str | None = None
    sparse_push: bool = True
    ema_decay: float | None = None
    evaluate_average: bool = False
    compress: str | None = None
    log_every: int = 10

    def __post_init__(self) -> None:
        if self.compress is not None:
            parse(self.compress)  # a bad spec fails here, naming the problem
        check_range("fetch_every", self.fetch_every, 1)
        check_range("push_every", self.push_every, 1)
        if self.staleness not in ("none", "scale-lr"):
            raise ValueError(f"staleness must be 'none' or 'scale-lr', got {self.staleness!r}")
        if self.max_staleness is not None:
            check_range("max_staleness", self.max_staleness, 0)
        if self.ema_decay is not None:
            check_range("ema_decay", self.ema_decay, 0.0, 1.0, low_open=True)
        elif self.evaluate_average:
            raise ValueError("evaluate_average needs a moving average: set ema_decay (e.g. 0.99)")

    def plan(self, job: Job) -> ParameterServerPlan:
        scale = self.staleness == "scale-lr"
        policy = (ApplyAtOnce(scale_lr_by_staleness=scale) if self.max_staleness is None
                  else BoundedStaleness(max_staleness=self.max_staleness, scale_lr_by_staleness=scale))
        optimizer = job.optimizer
        if self.server_optimizer is not None:
            optimizer = optim(self.server_optimizer, lr=job.optimizer.lr)
        per_worker = job.total_steps(job.data.num_train // job.workers)
        worker = partial(DownpourWorker, fetch_every=self.fetch_every, push_every=self.push_every,
                         sparse_push=self.sparse_push, compress=self.compress, log_every=self.log_every,
                         total_steps=per_worker)
        return ParameterServerPlan(job, policy=policy, make_worker=worker, server_optimizer=optimizer,
                                   global_steps=per_worker * job.workers, ema_decay=self.ema_decay,
                                   evaluate_average=self.evaluate_average)
