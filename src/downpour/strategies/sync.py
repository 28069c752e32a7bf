"""``sync``: synchronous SGD with backup workers (Chen et al., "Revisiting Distributed
Synchronous SGD", 2016).

Every round, each of the N + b workers pulls the current parameters, computes
a gradient on its own mini-batch and pushes it with the version it used. The
shards average the first N gradients of the round, apply them, and advance
the version; the b late ones are dropped (or, with ``late="fold"``, folded
into the next round with weight 1/(1+staleness)). The run is a number of
rounds; a moving average of the parameters is kept and can be evaluated.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar, Literal

import torch

from downpour.compress import parse
from downpour.errors import TransportError, WorkerFailed, check_range
from downpour.server import Synchronous
from downpour.strategies.base import Job, Strategy
from downpour.strategies.parameter_server import ParameterServerPlan, PSWorker


# How long one wait for a round to close lasts before the worker looks at the stop flag.
_WAIT_SLICE_S = 1.0


def next_round(versions: list[int], total_rounds: int) -> list[int]:
    """The shard versions a worker waits for after pushing on ``versions``.

    Each shard closes its rounds on its own, so a worker can see shards one
    version apart (it pulled just as one of them closed a round). The last
    round is the run's end: waiting for a shard to pass ``total_rounds``
    would wait for pushes that never come, since workers stop there.

    Example:
        >>> next_round([7, 8], total_rounds=8)
        [8, 8]
    """
    return [min(v + 1, total_rounds) for v in versions]


@dataclass(kw_only=True)
class SyncWorker(PSWorker):
    """Pull the current version, push one gradient on it, wait for the next version."""

    def train(self, ctx: Any, stream: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> None:
        versions = self.pull()
        for x, y in stream:
            # total_steps counts rounds (server versions) here: every worker
            # stops when the run has taken them, however many it joined.
            if min(versions) >= self.total_steps or ctx.should_stop():
                break
            self.gradient(x, y)
            reconnections = self.client.reconnections
            results = self.push(versions, self.flat.grads)
            if any(r.dropped for r in results):
                # A dropped gradient is work the model never sees: it does not count as samples trained.
                self.dropped += 1
                self.discard(len(y))
            versions = self._next_round(ctx, versions, reconnections)
            if versions is None:
                break

    def _next_round(self, ctx: Any, versions: list[int], reconnections: int) -> list[int] | None:
        """Wait for the round to close, in short slices so that a stop request is seen.

        When the coordinator stops the run (target reached) the other workers
        stop pushing and this round may never close: return None then. When a
        shard came back from its checkpoint since this round's push began
        (``reconnections`` then), rounds go on from the versions the shards are at.
        """
        wanted = next_round(versions, self.total_steps)
        deadline = time.monotonic() + self.timeout
        while True:
            if self.client.reconnections != reconnections:
                return self.pull()
            try:
                return self.pull(wait_versions=wanted, timeout=_WAIT_SLICE_S)
            except TransportError:
                if ctx.should_stop():
                    return None
                if time.monotonic() > deadline:
                    raise


@dataclass(frozen=True, kw_only=True)
class Sync(Strategy):
    """Synchronous parameter-server SGD's configuration.

    Args:
        backup: b, the workers beyond the N = workers - b whose gradients a
            round waits for.
        late: what happens to a gradient that arrives after its round closed.
        ema_decay: decay of the parameters' moving average kept on the shards.
        evaluate_average: evaluate the moving average instead of the parameters.
        compress: compress each pushed gradient (a :func:`downpour.compress.parse`
            spec), one compressor state per shard.

    Example:
        >>> Sync(backup=1).backup
        1
    """

    name: ClassVar[str] = "sync"
    uses_servers: ClassVar[bool] = True
    recoverable: ClassVar[bool] = True  # checkpoints, shard and worker restarts, --resume
    restartable: ClassVar[bool] = True  # restart_workers
    buffers: ClassVar[str] = "each worker's own; the coordinator averages the workers' latest"
    backup: int = 0
    late: Literal["drop", "fold"] = "drop"
    ema_decay: float = 0.99
    evaluate_average: bool = False
    compress: str | None = None
    log_every: int = 10

    def __post_init__(self) -> None:
        if self.compress is not None:
            parse(self.compress)  # a bad spec fails here, naming the problem
        check_range("backup", self.backup, 0)
        check_range("ema_decay", self.ema_decay, 0.0, 1.0, low_open=True)

    def plan(self, job: Job) -> ParameterServerPlan:
        required = job.workers - self.backup
        if required < 1:
            raise ValueError(f"backup must be smaller than workers ({job.workers}), got {self.backup}")
        # A round consumes N mini-batches; the run takes as many rounds as one
        # epoch of the data needs at that rate.
        rounds = job.total_steps(job.data.num_train // required)

        def check(workers: list[Any]) -> None:
            dead = [h for h in workers if h.failed]
            if sum(not h.failed for h in workers) < required and dead:
                victim = dead[0]
                raise WorkerFailed(victim.kind, victim.rank, "localhost",
                                   f"{victim.failed}; sync needs {required} live workers per round and "
                                   f"has {self.backup} backup(s), so the run cannot go on")

        worker = partial(SyncWorker, compress=self.compress, log_every=self.log_every, total_steps=rounds)
        return ParameterServerPlan(
            job, policy=Synchronous(num_required=required, late=self.late), make_worker=worker,
            server_optimizer=job.optimizer, global_steps=rounds * job.workers, ema_decay=self.ema_decay,
            evaluate_average=self.evaluate_average, check=check,
        )
