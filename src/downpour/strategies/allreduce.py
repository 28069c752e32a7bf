"""``allreduce``: synchronous data parallelism with ``DistributedDataParallel``
(Li et al., "PyTorch Distributed: Experiences on Accelerating Data Parallel
Training", VLDB 2020; the ring allreduce of Patarasuk and Yuan, "Bandwidth
Optimal All-reduce Algorithms for Clusters of Workstations", JPDC 2009).

Every worker holds a full replica and its own shard of the data. Each step it
computes a gradient on its mini-batch; DDP averages the gradients across
workers during the backward pass (bucketed allreduces overlapping the
computation), and every worker applies the same averaged gradient with its own
copy of the job's optimizer, so the replicas stay identical without a server.
With W workers of batch b, a step is one step of SGD on a batch of W * b.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, ClassVar

import torch
from torch.nn.parallel import DistributedDataParallel

from downpour.errors import check_range
from downpour.models import FunctionModel
from downpour.strategies.base import Job, Strategy
from downpour.strategies.collective import (
    BACKENDS,
    Backend,
    CollectivePlan,
    CollectiveWorker,
    check_lockstep_optimizer,
)


@dataclass(kw_only=True)
class AllreduceWorker(CollectiveWorker):
    """One replica: forward and backward through DDP (which averages the gradient), then a local optimizer step."""

    bucket_cap_mb: float = 25.0
    eval_every: int = 10

    def leave(self, *, broken: bool = False) -> None:
        self.model = self.replica  # the DDP wrapper holds the group; join() wraps the model again
        super().leave(broken=broken)

    def join(self) -> None:
        super().join()
        if self.run_over:
            return
        replica = self.model
        device_ids = [self.flat.params.device] if self.flat.params.device.type == "cuda" else None
        # Worker.gradient runs the forward pass through self.model, so that is the
        # DDP wrapper from here on. DDP starts by broadcasting rank 0's parameters
        # and buffers; its gradient hooks write the averaged gradient into the
        # existing .grad tensors, which stay views of the flat gradient buffer.
        self.model = DistributedDataParallel(replica, device_ids=device_ids, process_group=self.group,
                                             bucket_cap_mb=self.bucket_cap_mb)
        regularization = getattr(replica, "regularization", None)
        if regularization is not None:  # downpour.models.backward looks for it on the module it is given
            self.model.regularization = regularization
        self._buffer_bytes = sum(b.numel() * b.element_size() for b in replica.buffers())
        self.count_broadcast(self.flat.numel * 4 + self._buffer_bytes)

    def train(self, ctx: Any, stream: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.train_elastic(lambda: self._steps(ctx))
        # Every replica is the same; an elastic group's rank 0 may have been replaced after its last step.
        if not self.run_over and (self.rank == 0 or self.elastic):
            self.snapshot(final=True)

    def _steps(self, ctx: Any) -> None:
        optimizer, scheduler = self.optimizer, self.scheduler
        while self.steps < self.total_steps:
            # Workers stop together: at a fixed step, or at a step they all vote at.
            if self.steps % self.log_every == 0 and self.vote_to_stop(ctx):
                break
            self.gradient(*next(self.minibatches))
            # DDP reduced the float32 gradient of every parameter and, before the
            # forward pass, broadcast rank 0's buffers (batch-norm statistics).
            self.count_allreduce(self.flat.numel * 4)
            self.count_broadcast(self._buffer_bytes)
            self.count_round()
            optimizer.step()
            scheduler.step()
            if self.rank == 0 and self.steps % self.eval_every == 0:
                self.snapshot()


@dataclass(frozen=True, kw_only=True)
class Allreduce(Strategy):
    """Synchronous data parallelism's configuration.

    The run is one pass over the data by all workers together: with W workers
    of batch b, ``epochs * num_train / (W * b)`` steps per worker (each on W * b
    examples), capped by ``max_steps``. Scale the learning rate for the
    combined batch.

    Args:
        backend: ``"auto"`` (NCCL when every worker has a GPU, else gloo),
            ``"gloo"`` or ``"nccl"``.
        bucket_cap_mb: size of DDP's gradient buckets, in MiB: one allreduce
            each, started as soon as its gradients are ready.
        log_every: steps between a worker's progress events (and its votes on
            whether to stop early).

    Example:
        >>> Allreduce(backend="gloo").backend
        'gloo'
    """

    name: ClassVar[str] = "allreduce"
    restartable: ClassVar[bool] = True  # restart_workers: the group re-forms with the new worker
    buffers: ClassVar[str] = "rank 0's, broadcast to every replica before each forward pass (DDP)"
    backend: Backend = "auto"
    bucket_cap_mb: float = 25.0
    log_every: int = 10

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        check_range("bucket_cap_mb", self.bucket_cap_mb, 0.0, low_open=True)
        check_range("log_every", self.log_every, 1)

    def plan(self, job: Job) -> CollectivePlan:
        check_lockstep_optimizer(job, self.name)
        if isinstance(replace(job, device="cpu").build_model(), FunctionModel):
            raise TypeError("allreduce averages gradients inside autograd (DistributedDataParallel), which a "
                            "FunctionModel bypasses; use strategy local-sgd with average_every=1 instead")
        steps = job.total_steps(job.data.num_train // job.workers)
        worker = partial(AllreduceWorker, total_steps=steps, bucket_cap_mb=self.bucket_cap_mb,
                         log_every=self.log_every, eval_every=job.eval_interval(steps))
        return CollectivePlan(job, make_worker=worker, global_steps=steps * job.workers, backend=self.backend)
