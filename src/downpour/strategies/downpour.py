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

import queue
import threading
from collections.abc import Callable, Iterator
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
    """One model replica: compute, push every n_push steps, fetch every n_fetch.

    A push is the mean of the ``push_every`` gradients it accumulated: one
    server step the size of one gradient's, standing for a batch
    ``push_every`` times larger (gradient accumulation: fewer server updates
    for less traffic). The sum, an n_push-fold step on parameters up to
    n_fetch steps old, diverged at learning rates that train with
    ``push_every=1`` (MNIST MLP, momentum at 0.05, 2 workers and 2 shards,
    4/4: 10.9% accuracy); the mean trains at them.

    With ``overlap=k`` (k >= 1) a courier thread pushes and fetches while
    this thread computes the next gradient, as DistBelief's replicas did.
    At most k pushes are outstanding (the worker blocks before another), so
    a gradient is taken on parameters at most k of its own pushes old; with
    one worker every push's staleness is at most k, which the shards'
    staleness figures show. Fetched parameters replace the replica's between
    steps, never during one. It is off by default: it pays where a core is
    free for the courier and the shard (MNIST MLP on 2 cores, 1 worker and 1
    shard: 12,536 samples/s with it against 8,625 without, single 16,240),
    but its extra staleness costs server momentum dearly (momentum at 0.05,
    2 workers and 2 shards: diverged with ``overlap=1``, 92.7% without).
    """

    fetch_every: int = 1
    push_every: int = 1
    sparse_push: bool = True
    overlap: int = 0

    def train(self, ctx: Any, stream: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> None:
        courier = _Courier(self, self.overlap) if self.overlap else None
        try:
            self._train(ctx, stream, courier)
        finally:
            if courier is not None:
                courier.close(timeout=self.timeout)

    def _train(self, ctx: Any, stream: Iterator[tuple[torch.Tensor, torch.Tensor]],
               courier: _Courier | None) -> None:
        flat = self.flat
        versions = self.pull()
        if courier is not None:
            courier.versions = versions
        accumulated = torch.zeros_like(flat.grads) if self.push_every > 1 else None
        pending = pending_samples = 0
        for x, y in stream:
            if self.steps >= self.total_steps or ctx.should_stop():
                break
            if courier is not None:
                courier.take_fresh()
            self.gradient(x, y)
            pending += 1
            pending_samples += len(y)
            if accumulated is not None:
                accumulated.add_(flat.grads)
            update = None
            if pending == self.push_every:
                update = flat.grads if accumulated is None else accumulated.div_(pending)
            fetch = self.steps % self.fetch_every == 0
            if update is None and not fetch:
                continue
            if courier is not None:
                copy = None if update is None else update.detach().to("cpu", copy=True)
                courier.send(copy, pending_samples, fetch=fetch)
            else:
                versions, _ = self.exchange(versions, update, pending_samples, fetch=fetch)
            if update is not None:
                if accumulated is not None:
                    accumulated.zero_()
                pending = pending_samples = 0
        if courier is not None:
            versions = courier.drain(timeout=self.timeout)
        if pending:
            assert accumulated is not None
            self.exchange(versions, accumulated.div_(pending), pending_samples, fetch=False)

    def exchange(self, versions: list[int], update: torch.Tensor | None, samples: int, *,
                 fetch: bool, into: torch.Tensor | None = None,
                 lose: Callable[[int], None] | None = None) -> tuple[list[int], bool]:
        """Push ``update`` (taken on parameters at ``versions``) and, with ``fetch``, pull.

        One round trip per shard when both are due. A pull goes into ``into``
        (the replica's parameters by default). Returns the versions of the
        parameters there now and whether they were pulled. A push refused
        (bounded staleness) or dropped trained nothing: its samples go to
        ``lose`` (:meth:`discard` by default), and a refused one is
        followed by a fetch.
        """
        out = self.flat.params if into is None else into
        lose = self.discard if lose is None else lose
        if update is None:
            return self.pull(out=out), True
        try:
            if fetch:
                results, versions = self.push_pull(versions, update, out=out)
            else:
                results = self.push(versions, update)
        except StaleUpdate:
            self.refused += 1
            lose(samples)
            return self.pull(out=out), True
        if any(r.dropped for r in results):
            self.dropped += 1
            lose(samples)
        return versions, fetch

    def payload(self, update: torch.Tensor) -> torch.Tensor | SparseUpdate | list:
        # "Only send parameters updated": models with sparse inputs touch few
        # coordinates per batch, and then (index, value) pairs are smaller.
        # sparsify counts before it makes indices, so a dense gradient costs
        # one read here, and lists them only at or below MAX_SPARSE_DENSITY.
        if self.sparse_push and not self.streams:
            sparse = sparsify(update)
            if sparse is not None:
                return SparseUpdate(sparse.indices.cpu(), sparse.values.cpu(), sparse.size)
        return super().payload(update)


class _Courier:
    """The thread that pushes and fetches for a Downpour worker while the worker computes.

    The worker hands it one push (or fetch) at a time through a queue of
    one, so it blocks only when two are outstanding. Fetches land in two
    host buffers in turn; the worker copies the latest into its replica
    between steps (:meth:`take_fresh`) while the next fetch fills the other.
    """

    def __init__(self, worker: DownpourWorker, ahead: int) -> None:
        self.worker = worker
        self.jobs: queue.Queue[tuple | None] = queue.Queue()
        self.slots = threading.BoundedSemaphore(ahead)
        pin = worker.flat.params.device.type == "cuda"
        self.buffers = [torch.empty(worker.flat.numel, dtype=torch.float32, pin_memory=pin)
                        for _ in range(2)]
        self.writing = [threading.Lock(), threading.Lock()]
        self.next = 0  # the buffer the next fetch fills
        self.fresh: tuple[int, list[int]] | None = None  # (buffer, versions) not yet taken
        self.versions: list[int] = []  # versions of the parameters the replica computes on
        self.lost_samples = 0  # of pushes refused or dropped, for the worker's thread to take back
        self.error: BaseException | None = None
        self.done = threading.Condition()
        self.outstanding = 0  # jobs sent and not finished
        self.thread = threading.Thread(target=self._run, name=f"courier-{worker.rank}", daemon=True)
        self.thread.start()

    def send(self, update: torch.Tensor | None, samples: int, *, fetch: bool) -> None:
        """Queue a push of ``update`` (None: a fetch alone), blocking while two are outstanding."""
        while not self.slots.acquire(timeout=0.1):
            self._check()
        with self.done:
            self.outstanding += 1
        self.jobs.put((self.versions, update, samples, fetch))

    def take_fresh(self) -> None:
        """Copy the parameters fetched since the last step, if any, into the replica."""
        self._check()
        with self.done:
            fresh, self.fresh = self.fresh, None
            lost, self.lost_samples = self.lost_samples, 0
        if lost:
            self.worker.discard(lost)
        if fresh is not None:
            buffer, versions = fresh
            with self.writing[buffer]:
                self.worker.flat.params.copy_(self.buffers[buffer])
            self.versions = versions

    def drain(self, *, timeout: float) -> list[int]:
        """Wait until every queued job is done; returns the versions of the replica's parameters."""
        with self.done:
            if not self.done.wait_for(lambda: self.outstanding == 0 or self.error is not None, timeout):
                raise TimeoutError(f"worker {self.worker.rank}: pushes not done within {timeout:g} s")
        self.take_fresh()
        return self.versions

    def close(self, *, timeout: float) -> None:
        self.jobs.put(None)
        self.thread.join(timeout)  # a courier stuck in a call is a daemon: it dies with the process

    def _run(self) -> None:
        try:
            while (job := self.jobs.get()) is not None:
                versions, update, samples, fetch = job
                buffer = self.next
                with self.writing[buffer]:
                    versions, pulled = self.worker.exchange(versions, update, samples, fetch=fetch,
                                                            into=self.buffers[buffer], lose=self._lose)
                with self.done:
                    if pulled:
                        self.fresh, self.next = (buffer, versions), 1 - buffer
                    self.outstanding -= 1
                    self.done.notify_all()
                self.slots.release()
        except BaseException as error:  # handed to the worker's thread, which raises it
            with self.done:
                self.error = error
                self.done.notify_all()

    def _lose(self, samples: int) -> None:
        with self.done:
            self.lost_samples += samples

    def _check(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"worker {self.worker.rank}: communication failed: {self.error}") from self.error


@dataclass(frozen=True, kw_only=True)
class Downpour(Strategy):
    """Downpour SGD's configuration.

    Args:
        fetch_every: n_fetch, steps between parameter fetches.
        push_every: n_push, steps whose gradients are averaged into one push (see
            :class:`DownpourWorker` for why the mean, not the sum).
        overlap: pushes a courier thread may have on the wire while the worker computes
            the next gradient (0: the worker waits for each; see :class:`DownpourWorker`).
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
    overlap: int = 0
    ema_decay: float | None = None
    evaluate_average: bool = False
    compress: str | None = None
    log_every: int = 10

    def __post_init__(self) -> None:
        if self.compress is not None:
            parse(self.compress)  # a bad spec fails here, naming the problem
        check_range("fetch_every", self.fetch_every, 1)
        check_range("push_every", self.push_every, 1)
        check_range("overlap", self.overlap, 0, 64)
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
                         sparse_push=self.sparse_push, overlap=self.overlap, compress=self.compress,
                         log_every=self.log_every,
                         total_steps=per_worker)
        return ParameterServerPlan(job, policy=policy, make_worker=worker, server_optimizer=optimizer,
                                   global_steps=per_worker * job.workers, ema_decay=self.ema_decay,
                                   evaluate_average=self.evaluate_average)
