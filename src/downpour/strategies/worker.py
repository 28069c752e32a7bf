"""What every worker shares, and the plan of strategies made of workers alone.

A worker builds its replica, reads an endless stream of mini-batches from
its own shard, computes gradients (slowed down, or killed at a step, when a
fault is staged), reports progress and traffic, and can hand a snapshot of
its parameters and buffers to the coordinator, which evaluates it.
Strategies subclass :class:`Worker` and write ``train``; parameter-server
workers add a client (:mod:`downpour.strategies.parameter_server`).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from downpour.data import stream
from downpour.flat import FlatParams, decode_buffers_, encode_buffers, has_buffers
from downpour.strategies.base import Job
from downpour.strategies.plan import Plan, Session
from downpour.strategies.sparse_linear import compiled_gradient

log = logging.getLogger(__name__)


def worker_stream(job: Job, rank: int, num_workers: int, skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Worker ``rank``'s endless stream of mini-batches over ``job.data`` (its shard), reshuffled each pass.

    The stream is a function of the seed and the rank alone, so a worker
    restarted or resumed after ``skip`` steps goes on where it was; a streamed
    dataset is read through the worker's own DataLoader in that same order.
    """
    generator = torch.Generator().manual_seed(job.seed * 7919 + rank)
    return stream(job.data, job.batch_size, generator=generator, skip=skip,
                  pin_memory=str(job.device).startswith("cuda"))


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
    kill_at_step: int | None = None  # a staged fault: SIGKILL this process when it reaches that step
    # Publish the model's buffers with every report (where no snapshot carries them: the shards
    # hold the parameters, the workers the buffers).
    publish_buffers: ClassVar[bool] = False
    # What the loss a worker reports is: the training loss, or a method's own objective (which may be
    # negative, as SelfieBoost's is).
    loss_key: ClassVar[str] = "train/loss"

    def run(self, ctx: Any) -> None:
        torch.set_num_threads(self.threads)
        # Subnormal floats make small late-training gradients 5x slower on CPUs;
        # this process is ours alone, so flush them to zero here.
        torch.set_flush_denormal(True)
        self.ctx = ctx
        self.model = self.job.build_model()
        self.flat = FlatParams(self.model)
        # A sparse linear model's gradient from the compiled kernel: autograd's, without its dispatch.
        self.compiled_gradient = compiled_gradient(self.job, self.model) if self.flat_gradients else None
        self.has_buffers = has_buffers(self.model)
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

        self.pace()
        if self.flat_gradients:
            self.flat.zero_grad_()
        else:
            self.model.zero_grad(set_to_none=True)
        if getattr(self, "compiled_gradient", None) is not None:
            loss = self.compiled_gradient(x, y)
        else:
            loss = float(backward(self.model, self.job.loss, x.to(self.job.device),
                                  y.to(self.job.device)))
        self.steps += 1
        self.samples += len(y)
        if self.steps % self.log_every == 0 or not math.isfinite(loss):
            self.report(loss=loss)  # a non-finite loss at once: the coordinator stops a diverged run
        return loss

    def pace(self) -> None:
        """Before a step: the staged faults. A slow worker sleeps; a worker killed at this step dies."""
        now = time.perf_counter()
        if self.slow_factor > 1 and self._step_started is not None:
            time.sleep((self.slow_factor - 1) * (now - self._step_started))
            now = time.perf_counter()
        self._step_started = now
        if self.kill_at_step is not None and self.steps >= self.kill_at_step:
            self._die()

    def _die(self) -> None:
        """The staged fault: this process is SIGKILLed at this step, as a crashed machine would be."""
        log.warning("staged fault: worker %d killed at step %d", self.rank, self.steps)
        self.ctx.metrics.log(self.steps, {"fault/killed": f"worker:{self.rank}",
                                          "fault/killed_at_step": self.steps})
        self.ctx.flush()
        os.kill(os.getpid(), signal.SIGKILL)

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
            values[self.loss_key] = loss
            values["train/samples_per_second"] = (self.samples - samples_then) / max(now - start, 1e-9)
            self._window = (now, self.samples)
        if final:
            values["worker/done"] = True
            values |= self.final_report()
        if self.publish_buffers and self.has_buffers:
            self.ctx.publish("buffers", (self.steps, encode_buffers(self.model)))
        self.ctx.metrics.log(self.steps, values)

    def final_report(self) -> dict[str, Any]:
        """What the worker's last report adds (a subclass's hook)."""
        return {}

    def snapshot(self, vector: torch.Tensor | None = None, *, final: bool = False,
                 buffers: bytes | None = None) -> None:
        """Hand the coordinator this worker's parameters (or ``vector``) and buffers for evaluation.

        The snapshot is ``(steps, parameters, buffers)``, raw bytes both
        (:func:`encode_params`, :func:`downpour.flat.encode_buffers`).
        """
        payload = encode_params(self.flat.params if vector is None else vector)
        if buffers is None:
            buffers = encode_buffers(self.model) if self.has_buffers else b""
        self.ctx.publish("final" if final else "params", (self.steps, payload, buffers))


def shard_job(job: Job, rank: int, **partition: Any) -> Job:
    """Worker ``rank``'s job: its own partition of the training data, no test set."""
    return replace(job, data=job.data.shard(rank, job.workers, seed=job.seed, **partition).train_only())


def load_snapshot_(model: nn.Module, flat: FlatParams, snapshot: tuple) -> None:
    """Load a published snapshot ``(steps, parameters, buffers)`` into ``model`` (``flat`` its params)."""
    decode_params_(snapshot[1], flat.params)
    if len(snapshot) > 2 and snapshot[2]:
        decode_buffers_(model, snapshot[2])


class WorkerGroupPlan(Plan):
    """The plan of a strategy made of workers alone (no servers).

    The workers publish parameter snapshots (``Worker.snapshot``), each new
    one evaluated; at the end the coordinator's model is the snapshot
    published as ``final`` by ``final_rank`` (or any), or what
    :meth:`combine` makes of all the final ones.

    Args:
        job: the run's workload.
        make_worker: builds worker ``rank``'s role from keyword arguments
            ``rank, num_workers, job, timeout, incarnation, start_steps, start_samples``.
        global_steps: steps of all workers together that make the run.
        tolerate_deaths: whether the run goes on when a worker dies.
        final_rank: whose final snapshot is the model.
        partition: keyword arguments for ``Dataset.shard`` (scheme, alpha...).
    """

    snapshots = True

    def __init__(self, job: Job, *, make_worker: Callable[..., Worker], global_steps: int,
                 tolerate_deaths: bool = True, final_rank: int = 0, partition: dict[str, Any] | None = None,
                 timeout: float = 60.0) -> None:
        super().__init__(job)
        self.make_worker, self.global_steps = make_worker, global_steps
        self.tolerate_worker_deaths, self.final_rank = tolerate_deaths, final_rank
        self.partition = partition or {}
        self.timeout = timeout
        self._evaluated: set[int] = set()

    def worker(self, session: Session, rank: int, *, incarnation: int = 0, start_steps: int = 0,
               start_samples: int = 0) -> Worker:
        return self.make_worker(rank=rank, num_workers=self.job.workers, job=self.worker_job(rank),
                                timeout=self.timeout, incarnation=incarnation, start_steps=start_steps,
                                start_samples=start_samples, **self.worker_options(session, rank))

    def worker_job(self, rank: int) -> Job:
        """Worker ``rank``'s job: its partition of the training data, no test set."""
        return shard_job(self.job, rank, **self.partition)

    def worker_options(self, session: Session, rank: int) -> dict[str, Any]:
        """Keyword arguments a family adds to every worker (a store's address, say)."""
        return {}

    def read(self, session: Session, model: nn.Module, *, final: bool) -> bool:
        if final:
            finals = {h.rank: h.published["final"] for h in session.workers if "final" in h.published}
            if not finals:
                return False
            self.combine(finals, model, session)
            return True
        for handle in session.workers:
            snapshot = handle.published.get("params")
            if snapshot is not None and id(snapshot) not in self._evaluated:
                self._evaluated.add(id(snapshot))
                load_snapshot_(model, self.flat, snapshot)
                return True
        return False

    def combine(self, finals: dict[int, tuple], model: nn.Module, session: Session) -> None:
        """Load the model to return from every worker's final snapshot: ``final_rank``'s by default."""
        load_snapshot_(model, self.flat, finals.get(self.final_rank) or next(iter(finals.values())))
