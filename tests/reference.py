"""SGD in the test's own process: what a distributed run at a fixed seed must equal."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import partial

import torch

from downpour.flat import FlatParams
from downpour.models import backward, build, default_loss
from downpour.optim.spec import OptimSpec
from downpour.strategies import Job
from downpour.strategies.worker import shard_job, worker_stream


def reference_job(model: str, data, optimizer: OptimSpec, *, workers: int, batch_size: int,
                  **options) -> Job:
    """The job a run of ``model`` on ``data`` gives its workers (``options``: epochs, ...)."""
    return Job(model=partial(build, model, data.input_shape, data.num_classes),
               loss=default_loss(model), data=data, optimizer=optimizer, workers=workers,
               batch_size=batch_size, **options)


def reference_sgd(job: Job, schedule: Iterable[Sequence[int]]) -> torch.Tensor:
    """The flat parameters after one optimizer step per entry of ``schedule``.

    Each entry names the ranks whose next mini-batch (from that worker's own
    stream over its shard, as the worker draws it) make up the step's batch,
    concatenated in that order: ``[range(W)] * k`` is k steps of large-batch
    SGD over every worker's batch (sync, allreduce); ``[[0], [0], [1], ...]``
    is SGD over the shards in turn (hot potato).

    Example:
        >>> import downpour as dp
        >>> data = dp.data.load("digits")
        >>> job = reference_job("logistic", data, dp.optim("sgd", lr=0.1), workers=2, batch_size=16)
        >>> reference_sgd(job, [[0, 1]]).shape
        torch.Size([650])
    """
    streams = [worker_stream(shard_job(job, rank), rank, job.workers)
               for rank in range(job.workers)]
    model = job.build_model()
    flat = FlatParams(model)
    optimizer = job.optimizer.build(model.parameters())
    for ranks in schedule:
        xs, ys = zip(*(next(streams[rank]) for rank in ranks))
        flat.zero_grad_()
        backward(model, job.loss, torch.cat(xs), torch.cat(ys))
        optimizer.step()
    return flat.params
