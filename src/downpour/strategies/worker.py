"""What every worker shares, and the coordinator of strategies made of workers alone.

A worker builds its replica, reads an endless stream of mini-batches from
its own shard, computes gradients (slowed down when a straggler is staged),
reports progress and traffic, and can hand a snapshot of its parameters to
the coordinator, which evaluates it. Strategies subclass :class:`Worker` and
write ``train``; parameter-server workers add a client
(:mod:`downpour.strategies.parameter_server`).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from downpour.cluster import open_cluster
from downpour.data import batches
from downpour.flat import FlatParams
from downpour.metrics import Metrics
from downpour.strategies.base import Evaluator, Job, log_end, log_start

log = logging.getLogger(__name__)


def worker_stream(job: Job, rank: int, num_workers: int, skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Worker ``rank``'s endless stream of mini-batches over ``job.data`` (its shard), reshuffled each pass.

    The stream is a function of the seed and the rank alone, so a worker
    restarted or resumed after ``skip`` steps goes on where it was.
    """
    generator = torch.Generator().manual_seed(job.seed * 7919 + rank)
    stream = _passes(job, generator)
    return itertools.islice(stream, skip, None) if skip else stream


def _passes(job: Job, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:
        yield from batches(job.data.x_train, job.data.y_train, job.batch_size, generator=generator)


def encode_params(vector: torch.Tensor) -> bytes:
    """A parameter snapshot as raw little-endian float32 bytes (no pickle)."""
    return vector.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False).tobytes()


def decode_params_(payload: bytes, out: torch.Tensor) -> None:
    """Copy a snapshot made by :func:`encode_params` into ``out`` (a float32 vector of the same length)."""
    array = np.frombuffer(payload, dtype="<f4")
    if array.size != out.numel():
        raise ValueError(f"parameter snapshot has {array.size} values, the model {out.numel()}")
    out.copy_(torch.from_numpy(array.copy()))


@dataclass(kw_only=True)
class Worker:
    """The scaffolding of every worker; subclasses write ``train(ctx, stream)``.

    ``job.data`` is already this worker's shard (training part only), so a
    worker process holds just its own examples.
    """

    kind: ClassVar[str] = "worker"
    # Whether gradient() leaves the gradient in self.flat.grads (zeroed, then
    # accumulated into in place); else autograd hands over fresh p.grad tensors.
    flat_gradients: ClassVar[bool] = True
    rank: int
    num_workers: int
    job: Job = field(repr=False)
    total_steps: int
    slow_factor: float = 1.0
    log_every: int = 10
    threads: int = 1
    timeout: float = 60.0
    # A restarted (or resumed) worker goes on from its predecessor's last report.
    start_steps: int = 0
    start_samples: int = 0
    incarnation: int = 0

    def run(self, ctx: Any) -> None:
        torch.set_num_threads(self.threads)
        # Subnormal floats make small late-training gradients 5x slower on CPUs;
        # this process is ours alone, so flush them to zero here.
        torch.set_flush_denormal(True)
        self.ctx = ctx
        self.model = self.job.build_model()
        self.flat = FlatParams(self.model)
        self.samples = self.steps = self.dropped = self.refused = self.discarded = 0
        self.steps, self.samples = self.start_steps, self.start_samples
        self.bytes_sent = self.bytes_received = self.pushes = self.pulls = self.rounds = 0
        self._step_started: float | None = None
        try:
            self.connect()
            ctx.ready_and_wait(timeout=10 * self.timeout)
            self._window = (time.perf_counter(), 0)
            self.minibatches = worker_stream(self.job, self.rank, self.num_workers, skip=self.steps)
            self.train(ctx, self.minibatches)
        finally:
            self.report(final=True)
            self.disconnect()

    def connect(self) -> None:
        """Open communicators before the start signal (a subclass's hook)."""

    def disconnect(self) -> None:
        """Close communicators (a subclass's hook)."""

    def train(self, ctx: Any, stream: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> None:
        raise NotImplementedError

    def gradient(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Forward and backward on one batch into ``self.flat.grads``.

        A worker staged as slow (``slow_factor`` F) sleeps F - 1 times as long
        as its previous step took, communication included, so the whole step,
        not just the arithmetic, is F times as long: a slow machine.
        """
        from downpour.models import backward

        now = time.perf_counter()
        if self.slow_factor > 1 and self._step_started is not None:
            time.sleep((self.slow_factor - 1) * (now - self._step_started))
            now = time.perf_counter()
        self._step_started = now
        if self.flat_gradients:
            self.flat.zero_grad_()
        else:
            self.model.zero_grad(set_to_none=True)
        loss = float(backward(self.model, self.job.loss, x.to(self.job.device), y.to(self.job.device)))
        self.steps += 1
        self.samples += len(y)
        if self.steps % self.log_every == 0:
            self.report(loss=loss)
        return loss

    def discard(self, samples: int) -> None:
        """Take back ``samples`` whose gradient was dropped or refused: they trained nothing."""
        self.samples -= samples
        self.discarded += samples

    def counters(self) -> dict[str, Any]:
        """Traffic counters to report; subclasses with a client report the client's."""
        return {"comm/bytes_sent": self.bytes_sent, "comm/bytes_received": self.bytes_received,
                "comm/pushes": self.pushes, "comm/pulls": self.pulls, "comm/rounds": self.rounds}

    def report(self, *, loss: float | None = None, final: bool = False) -> None:
        now = time.perf_counter()
        start, samples_then = getattr(self, "_window", (now, 0))
        values: dict[str, Any] = {
            "worker/steps": self.steps,
            "worker/samples": self.samples,
            "worker/dropped": self.dropped,
            "worker/refused": self.refused,
            "worker/discarded_samples": self.discarded,
            "worker/incarnation": self.incarnation,
            **self.counters(),
        }
        if loss is not None:
            values["train/loss"] = loss
            values["train/samples_per_second"] = (self.samples - samples_then) / max(now - start, 1e-9)
            self._window = (now, self.samples)
        if final:
            values["worker/done"] = True
            values |= self.final_report()
        self.ctx.metrics.log(self.steps, values)

    def final_report(self) -> dict[str, Any]:
        """What the worker's last report adds (a subclass's hook)."""
        return {}

    def snapshot(self, vector: torch.Tensor | None = None, *, final: bool = False) -> None:
        """Hand the coordinator this worker's parameters (or ``vector``) for evaluation."""
        payload = encode_params(self.flat.params if vector is None else vector)
        self.ctx.publish("final" if final else "params", (self.steps, payload))


class Progress:
    """A sink that keeps each worker's latest step and sample counts (for evaluation timing)."""

    def __init__(self) -> None:
        self.steps: dict[int, int] = {}
        self.samples: dict[int, int] = {}

    def write(self, event: dict[str, Any]) -> None:
        if event.get("role") == "worker" and "worker/steps" in event:
            self.steps[event["rank"]] = event["worker/steps"]
            self.samples[event["rank"]] = event["worker/samples"]

    def close(self) -> None:
        pass

    @property
    def total_steps(self) -> int:
        return sum(self.steps.values())

    @property
    def total_samples(self) -> int:
        return sum(self.samples.values())


class WorkerRestarts:
    """Restarts dead workers: the same rank again, as its next incarnation, from its predecessor's last report.

    Called by the cluster with a role that died (``Cluster.on_death``);
    returns whether it restarted it: not a server, and not once the run ended.
    A worker that had done all its steps starts, finds nothing left to do and
    returns.

    Args:
        cluster: the run's cluster.
        metrics: where the restart is logged (``fault/restarted``).
        progress: each worker's last reported steps and samples.
        make_role: builds worker ``rank``'s role as incarnation ``incarnation``.
        handles: the workers' handles by rank; a replacement takes its rank's place.
        before: called with the rank before its replacement starts (to tell the survivors).
    """

    def __init__(self, cluster: Any, metrics: Metrics, progress: Progress, make_role: Callable[[int, int], Worker],
                 handles: list[Any], before: Callable[[int], None] | None = None) -> None:
        self.cluster, self.metrics, self.progress = cluster, metrics, progress
        self.make_role, self.handles, self.before = make_role, handles, before
        self.incarnations: dict[int, int] = {}

    def __call__(self, handle: Any) -> bool:
        if handle.kind != "worker" or self.cluster.ended:
            return False
        started = time.perf_counter()
        rank = handle.rank
        incarnation = self.incarnations[rank] = self.incarnations.get(rank, 0) + 1
        if self.before is not None:
            self.before(rank)
        [self.handles[rank]] = self.cluster.start([self.make_role(rank, incarnation)])
        log.warning("worker %d restarted (incarnation %d) at step %d", rank, incarnation,
                    self.progress.steps.get(rank, 0))
        self.metrics.log(self.progress.total_steps, {
            "fault/restarted": f"worker:{rank}", "fault/incarnation": incarnation,
            "fault/restart_seconds": time.perf_counter() - started})
        return True


def shard_job(job: Job, rank: int, **partition: Any) -> Job:
    """Worker ``rank``'s job: its own partition of the training data, no test set."""
    return replace(job, data=job.data.shard(rank, job.workers, seed=job.seed, **partition).train_only())


@dataclass(frozen=True, kw_only=True)
class WorkerGroupRun:
    """The coordinator of a strategy made of workers alone (no servers).

    Starts the workers together, evaluates the latest parameter snapshot any
    worker published (``Worker.snapshot``), and at the end the snapshot
    published as ``final`` by ``final_rank`` (or the latest one).

    Args:
        make_worker: builds worker ``rank``'s role from keyword arguments
            ``rank, num_workers, job, slow_factor, timeout``.
        global_steps: steps of all workers together that make the run.
        tolerate_deaths: whether the run goes on when a worker dies.
        partition: keyword arguments for ``Dataset.shard`` (scheme, alpha...).
        watch: called at every poll with the workers' handles and the steps so far.
        combine: given every final snapshot ``{rank: payload}``, the model, its
            flat parameters and the steps, loads the parameters to evaluate
            (instead of ``final_rank``'s).
        on_restart: with ``job.restart_workers``, called with a dead worker's
            rank before its replacement starts (the strategy's workers must be
            able to take it back).
    """

    make_worker: Callable[..., Worker]
    global_steps: int
    tolerate_deaths: bool = True
    final_rank: int = 0
    partition: dict[str, Any] = field(default_factory=dict)
    watch: Callable[[list[Any], int], None] | None = None
    combine: Callable[[dict[int, bytes], nn.Module, FlatParams, int], None] | None = None
    on_restart: Callable[[int], None] | None = None
    timeout: float = 60.0

    def run(self, job: Job, metrics: Metrics) -> nn.Module:
        model = replace(job, device="cpu").build_model()
        flat = FlatParams(model)
        progress = Progress()
        metrics.sinks.append(progress)
        evaluator = Evaluator(job, metrics)
        with open_cluster(job.cluster, metrics, tolerate_worker_deaths=self.tolerate_deaths) as cluster:

            def worker_role(rank: int, incarnation: int = 0) -> Worker:
                return self.make_worker(
                    rank=rank, num_workers=job.workers, job=shard_job(job, rank, **self.partition),
                    slow_factor=job.faults.slow.get(rank, 1.0), timeout=self.timeout, incarnation=incarnation,
                    start_steps=progress.steps.get(rank, 0), start_samples=progress.samples.get(rank, 0))

            workers = cluster.start([worker_role(rank) for rank in range(job.workers)])
            if job.restart_workers:
                cluster.on_death = WorkerRestarts(cluster, metrics, progress, worker_role, workers, self.on_restart)
            cluster.start_together(workers, timeout=10 * self.timeout)
            log_start(metrics, evaluator)
            started = time.perf_counter()
            for rank, seconds in job.faults.kill.items():
                cluster.kill_at(workers[rank], metrics.elapsed() + seconds)
            evaluated: set[int] = set()

            def watch() -> None:
                if evaluator.out_of_time:
                    cluster.request_stop()
                if self.watch is not None:
                    self.watch(workers, progress.total_steps)
                for handle in workers:
                    snapshot = handle.published.get("params")
                    if snapshot is None or id(snapshot) in evaluated or evaluator.reached:
                        continue
                    evaluated.add(id(snapshot))
                    decode_params_(snapshot[1], flat.params)
                    evaluator(model, progress.total_steps)
                    metrics.log(progress.total_steps, {"progress/step": progress.total_steps})
                    if evaluator.reached:
                        cluster.request_stop()

            cluster.wait_all("worker", timeout=24 * 3600, watch=watch)
            finals = {h.rank: h.published["final"][1] for h in workers if "final" in h.published}
            if not finals:
                raise RuntimeError("no worker published its final parameters")
            if self.combine is not None:
                self.combine(finals, model, flat, progress.total_steps)
            else:
                decode_params_(finals.get(self.final_rank) or next(iter(finals.values())), flat.params)
            evaluator(model, progress.total_steps)
            seconds = time.perf_counter() - started
        metrics.sinks.remove(progress)
        log_end(metrics, steps=progress.total_steps, samples=progress.total_samples, seconds=seconds,
                eval_seconds=evaluator.seconds)
        return model
