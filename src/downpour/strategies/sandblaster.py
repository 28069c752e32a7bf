"""``sandblaster``: batch optimization with the vectors on the parameter-server shards.

DistBelief's Sandblaster (Dean et al., "Large Scale Distributed Deep
Networks", NIPS 2012, section 4.2): a coordinator drives a batch method —
L-BFGS, Nesterov's accelerated gradient descent or nonlinear conjugate
gradients (:mod:`downpour.optim.batch`) — while every full-length vector
stays on the shards. The coordinator sends the shards small commands (dot
products, ``axpy``, scale, copy; :mod:`downpour.server.vectors`) and gets
scalars back, so what it receives per iteration does not grow with the model.

A gradient evaluation is a *pass*: the coordinator announces it (the shard
versions to compute on) and the workers take the pass's portions of the
training set as they become free, so a fast worker takes more. Each pushes
its portion's summed gradient to the shards with the portion's number
(:class:`~downpour.server.SumPortions` sums each portion once) and reports
the portion's loss. Near the end of a pass, a worker with nothing left takes
a portion still outstanding on another (a backup portion): whichever answer
comes first counts, so one slow machine does not hold up the pass.

Portions are handed out through a ``torch.distributed.TCPStore`` the
coordinator hosts: an atomic counter per pass, a key per finished portion
holding its loss as text. Every worker holds the whole training set, so any
worker can compute any portion.
"""

from __future__ import annotations

import datetime
import itertools
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal

import numpy as np
import torch.distributed as dist
from torch import nn

from downpour.errors import PeerTimeout, check_range, choose
from downpour.flat import shard_ranges
from downpour.optim.batch import BETAS, METHODS, Result, Stopping, minimize
from downpour.server import SumPortions
from downpour.server.role import ServerRole
from downpour.server.vectors import MAX_VECTORS, Op, axpy, dot, scale
from downpour.strategies.base import Job, Strategy, refuse_inexact
from downpour.strategies.parameter_server import PSWorker
from downpour.strategies.plan import Plan, Session
from downpour.transport import ParameterClient, new_token

# How long the coordinator waits on a pass before it looks at the workers again
# (c10d logs a warning at every expired wait, so the slice is not short).
_WAIT_SLICE = datetime.timedelta(seconds=5)
# What the coordinator announces instead of a pass when the method is done.
_END = b"end"


def portion_bounds(n: int, portions: int) -> list[tuple[int, int]]:
    """``portions`` contiguous ranges covering ``range(n)``, sizes differing by at most one.

    Example:
        >>> portion_bounds(10, 3)
        [(0, 4), (4, 7), (7, 10)]
    """
    base, extra = divmod(n, portions)
    cuts = np.cumsum([0] + [base + (i < extra) for i in range(portions)])
    return [(int(a), int(b)) for a, b in itertools.pairwise(cuts)]


@dataclass(kw_only=True)
class SandblasterWorker(PSWorker):
    """Take portions of each gradient pass; push their summed gradients; report their losses.

    ``comm/rounds`` counts the passes this worker took part in;
    ``sandblaster/backups`` the portions it took as another's backup.
    """

    store_address: str
    portions: int
    backup_portions: bool = True

    def counters(self) -> dict[str, Any]:
        return super().counters() | {"sandblaster/backups": getattr(self, "backups_taken", 0)}

    def connect(self) -> None:
        super().connect()
        host, port = self.store_address.rsplit(":", 1)
        self.store = dist.TCPStore(host, int(port), is_master=False, wait_for_workers=False,
                                   timeout=datetime.timedelta(seconds=self.timeout))

    def train(self, ctx: Any, stream: Any) -> None:
        x, y = self.job.data.x_train, self.job.data.y_train
        bounds = portion_bounds(len(y), self.portions)
        k = 1
        while not ctx.should_stop():
            # The coordinator announces every pass, and the end; it may think for a while in between.
            self.store.wait([f"pass/{k}"], datetime.timedelta(hours=24))
            announced = self.store.get(f"pass/{k}")
            if announced == _END:
                return
            versions = [int(v) for v in announced.decode().split(",")]
            self.pull(wait_versions=versions, timeout=self.timeout)
            self.rounds += 1
            self._step_started = None  # the wait between passes is not work to slow down by
            while (p := self._take(k, len(bounds))) is not None and not ctx.should_stop():
                lo, hi = bounds[p]
                loss = self.gradient(x[lo:hi], y[lo:hi]) * (hi - lo)  # sums, not means, add up
                self.flat.grads.mul_(hi - lo)
                results = self.client.push_all(self.rank, versions, self.flat.grads.cpu(), portion=p)
                if any(r.version != v for r, v in zip(results, versions)):
                    break  # the coordinator has moved on: this pass is over
                if self.store.add(f"done/{k}/{p}", 1) == 1:  # the first answer counts
                    self.store.set(f"loss/{k}/{p}", repr(loss))
                    if self.store.add(f"finished/{k}", 1) == len(bounds):
                        self.store.set(f"complete/{k}", "1")
            k += 1

    def _take(self, k: int, portions: int) -> int | None:
        """The next portion of pass ``k``: a fresh one, else (with backups) one still outstanding."""
        i = self.store.add(f"next/{k}", 1) - 1
        if i < portions:
            return i
        if not self.backup_portions:
            return None
        for p in range(portions):
            if not self.store.check([f"done/{k}/{p}"]) and self.store.add(f"backup/{k}/{p}", 1) == 1:
                self.backups_taken = getattr(self, "backups_taken", 0) + 1
                return p
        return None


@dataclass
class ShardSpace:
    """A :class:`~downpour.optim.batch.Space` on parameter-server shards, with gradient passes by workers.

    The objective is the mean loss over the training set plus ``l2 / 2 ||x||^2``.
    ``bytes_received`` counts what the coordinator received: vector-op
    replies and portion losses, never a full-length vector.
    """

    client: ParameterClient
    store: dist.TCPStore
    examples: int
    portions: int
    l2: float = 0.0
    watch: Any = None  # called while a pass runs; raises to end the run
    stage_faults: Any = None  # starts the job's staged worker kills (from the start of training)
    timeout: float = 60.0
    passes: int = 0
    pass_seconds: list[float] = field(default_factory=list)
    store_bytes: int = 0
    versions: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        _, self.versions = self.client.vector_ops_all([])

    @property
    def bytes_received(self) -> int:
        return self.client.bytes_received + self.store_bytes

    def ops(self, *ops: Op) -> list[float]:
        values, self.versions = self.client.vector_ops_all(list(ops))
        return values

    def evaluate(self, *ops: Op) -> tuple[float, list[float]]:
        started = time.perf_counter()
        self.passes += 1
        k = self.passes
        self.store.set(f"pass/{k}", ",".join(str(v) for v in self.versions))
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                self.store.wait([f"complete/{k}"], _WAIT_SLICE)
                break
            except RuntimeError:  # this slice expired: are the workers still there?
                if self.watch is not None:
                    self.watch()
                if time.monotonic() > deadline:
                    raise PeerTimeout("the sandblaster workers", self.timeout, f"finish gradient pass {k}") from None
        losses = self.store.multi_get([f"loss/{k}/{p}" for p in range(self.portions)])
        self.store_bytes += sum(len(v) for v in losses)
        total = math.fsum(float(v) for v in losses)
        self.pass_seconds.append(time.perf_counter() - started)
        values = self.ops(scale("g", 1.0 / self.examples), axpy("g", self.l2, "x"), dot("x", "x"), *ops)
        return total / self.examples + 0.5 * self.l2 * values[0], values[1:]


@dataclass(frozen=True, kw_only=True)
class Sandblaster(Strategy):
    """Sandblaster's configuration.

    Args:
        method: ``"lbfgs"``, ``"agd"`` or ``"cg"``.
        beta: conjugate gradients' ``"fr"`` (Fletcher–Reeves) or ``"hs"`` (Hestenes–Stiefel).
        memory: L-BFGS's number of correction pairs.
        l2: the L2 penalty ``l2 / 2 ||x||^2`` added to the mean loss.
        portions: the portions a gradient pass is split into (more than the
            workers, so a fast worker can take more).
        backup_portions: hand portions still outstanding near a pass's end to idle workers.
        max_iterations, gtol, ftol: when the method stops (:class:`~downpour.optim.batch.Stopping`).
        step: accelerated gradient descent's first step (default ``1 / ||g||``).

    Example:
        >>> Sandblaster(method="cg", beta="hs").beta
        'hs'
    """

    name: ClassVar[str] = "sandblaster"
    uses_servers: ClassVar[bool] = True
    buffers: ClassVar[str] = "refused: a model with buffers is an error naming the buffer"
    in_memory: ClassVar[str] = "its workers compute full gradients over portions of their shard"
    ignores: ClassVar[dict[str, str]] = {
        "optimizer": "its optimizer is the batch method: use {method}",
        "epochs": "a batch method counts iterations, not epochs: use {max_iterations}",
        "max_steps": "a batch method counts iterations, not steps: use {max_iterations}",
        "max_seconds": "it stops by iterations and tolerances: {max_iterations}, {gtol}, {ftol}",
        "batch_size": "a gradient is a pass over the whole training set; {portions} splits it up",
        "eval_every": "it evaluates once, at the end; the objective is logged every iteration"}
    method: Literal["lbfgs", "agd", "cg"] = "lbfgs"
    beta: Literal["fr", "hs"] = "fr"
    memory: int = 10
    l2: float = 0.0
    portions: int = 16
    backup_portions: bool = True
    max_iterations: int = 100
    gtol: float = 1e-5
    ftol: float = 2.2e-9
    step: float | None = None

    def __post_init__(self) -> None:
        choose("method", self.method, METHODS)
        choose("beta", self.beta, BETAS)
        # L-BFGS keeps 2 (memory + 1) history vectors and four more (q, d, x0, g0) on every shard.
        check_range("memory", self.memory, 1, (MAX_VECTORS - 4) // 2 - 1)
        check_range("l2", self.l2, 0.0)
        check_range("portions", self.portions, 1)
        Stopping(max_iterations=self.max_iterations, gtol=self.gtol, ftol=self.ftol)
        if self.step is not None:
            check_range("step", self.step, 0.0, low_open=True)

    def plan(self, job: Job) -> SandblasterPlan:
        refuse_inexact(job, self.name, "a gradient pass computes the loss over fixed portions of the data "
                       "with the same parameters, and running statistics would change between portions")
        return SandblasterPlan(job, self)


class SandblasterPlan(Plan):
    """Shards holding the job's initial parameters, workers holding its data, the method driven here."""

    driven = True

    def __init__(self, job: Job, config: Sandblaster, *, timeout: float = 60.0) -> None:
        super().__init__(job)
        self.config, self.timeout = config, timeout
        self.portions = min(config.portions, job.data.num_train)
        self.global_steps, self.unit = config.max_iterations, "iterations"
        self.client: ParameterClient | None = None

    def open(self, session: Session) -> None:
        self.ranges = shard_ranges(self.flat.numel, self.job.servers)
        self.token = new_token()
        self.store = dist.TCPStore(session.host, 0, is_master=True, wait_for_workers=False,
                                   timeout=datetime.timedelta(seconds=self.timeout))

    def servers(self, session: Session) -> list[ServerRole]:
        return [ServerRole(rank=r.shard, shard=r, initial=self.flat.params[r.start : r.stop].clone(),
                           optimizer=self.job.optimizer, policy=SumPortions(), token=self.token,
                           shared_memory=self.job.shared_memory)
                for r in self.ranges]

    def worker(self, session: Session, rank: int, *, incarnation: int = 0, start_steps: int = 0,
               start_samples: int = 0) -> SandblasterWorker:
        return SandblasterWorker(
            rank=rank, num_workers=self.job.workers, job=replace(self.job, data=self.job.data.train_only()),
            store_address=f"{session.host}:{self.store.port}", portions=self.portions,
            backup_portions=self.config.backup_portions, addresses=list(session.addresses), ranges=self.ranges,
            token=self.token, total_steps=0, timeout=self.timeout, incarnation=incarnation)

    def drive(self, session: Session) -> dict[str, Any]:
        def watch() -> None:
            session.poll(0.0)
            if not any(h.alive() and not h.failed for h in session.workers):
                raise RuntimeError("every sandblaster worker has died; no gradient pass can finish")

        config = self.config
        self.client = ParameterClient(session.addresses, self.ranges, self.token, timeout=self.timeout)
        space = ShardSpace(self.client, self.store, examples=self.job.data.num_train, portions=self.portions,
                           l2=config.l2, watch=watch, timeout=self.timeout)

        def log(result: Result) -> None:
            session.metrics.log(result.iterations, {
                "batch/objective": result.objective, "batch/iterations": result.iterations,
                "batch/evaluations": result.evaluations, "batch/pass_seconds": space.pass_seconds[-1],
                "coordinator/bytes_received": space.bytes_received,
                "coordinator/bytes_sent": space.client.bytes_sent,
                "progress/step": result.iterations,
            })

        try:
            result = minimize(config.method, space, memory=config.memory, beta=config.beta, step=config.step,
                              stop=Stopping(max_iterations=config.max_iterations, gtol=config.gtol,
                                            ftol=config.ftol),
                              callback=log)
        finally:
            self.store.set(f"pass/{space.passes + 1}", _END)
        received = space.bytes_received  # before the final pull, which is the result, not the method
        return {
            "run/iterations": result.iterations, "batch/objective": result.objective,
            "batch/evaluations": result.evaluations, "batch/converged": result.converged,
            "batch/stop_reason": result.reason,
            "batch/passes": space.passes, "coordinator/bytes_received": received,
            "coordinator/bytes_per_iteration": received / max(result.iterations, 1),
            "batch/pass_seconds_mean": float(np.mean(space.pass_seconds)) if space.pass_seconds else 0.0,
        }

    def read(self, session: Session, model: nn.Module, *, final: bool) -> bool:
        assert self.client is not None, "read before the method was driven"
        self.client.pull_all(out=self.flat.params)
        return True

    def close(self, session: Session) -> None:
        if self.client is not None:
            self.client.close()
