"""What the parameter-server strategies share: the coordinator and the worker's scaffolding.

Downpour and sync use the same server and the same worker; only the
server's update policy and the worker's inner loop differ (sync vs. async is
a policy, not a second component). The coordinator starts the shards, then
the workers, evaluates the served parameters as training goes, and stops
everything at the end.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch import nn

from downpour.cluster import LocalCluster
from downpour.data import batches
from downpour.flat import FlatParams, ShardRange, shard_ranges
from downpour.metrics import Metrics
from downpour.optim import OptimSpec
from downpour.server import UpdatePolicy
from downpour.server.role import ServerRole
from downpour.strategies.base import Evaluator, Job, log_end
from downpour.transport import ParameterClient, new_token


def worker_stream(job: Job, rank: int, num_workers: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Worker ``rank``'s endless stream of mini-batches over its own iid shard, reshuffled each pass."""
    data = job.data
    generator = torch.Generator().manual_seed(job.seed * 7919 + rank)
    while True:
        yield from batches(data.x_train, data.y_train, job.batch_size, generator=generator)


@dataclass(kw_only=True)
class PSWorker:
    """The scaffolding every parameter-server worker shares; subclasses write ``train``.

    ``job.data`` is already this worker's shard (training part only), so a
    worker process holds just its own examples.
    """

    kind: ClassVar[str] = "worker"
    rank: int
    num_workers: int
    job: Job = field(repr=False)
    addresses: list[str]
    ranges: list[ShardRange]
    token: str = field(repr=False)
    total_steps: int
    slow_factor: float = 1.0
    log_every: int = 10
    threads: int = 1
    timeout: float = 60.0

    def run(self, ctx: Any) -> None:
        torch.set_num_threads(self.threads)
        self.model = self.job.build_model()
        self.flat = FlatParams(self.model)
        self.client = ParameterClient(self.addresses, self.ranges, self.token, timeout=self.timeout)
        self.ctx = ctx
        self.samples = self.steps = self.dropped = self.refused = 0
        self._step_started: float | None = None
        self._window = (time.perf_counter(), 0)
        try:
            self.client.wait_ready(timeout=self.timeout)
            ctx.ready_and_wait(timeout=10 * self.timeout)
            self._window = (time.perf_counter(), 0)
            self.train(ctx, worker_stream(self.job, self.rank, self.num_workers))
        finally:
            self.report(final=True)
            self.client.close()

    def train(self, ctx: Any, stream: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> None:
        raise NotImplementedError

    def pull(self, **kwargs: Any) -> list[int]:
        """Pull every shard into the model's parameters; returns the shards' versions.

        The transport fills host memory; a worker on a GPU pulls into a host
        buffer and copies it over in one transfer.
        """
        if self.flat.params.device.type == "cpu":
            versions, _ = self.client.pull_all(out=self.flat.params, **kwargs)
            return versions
        if not hasattr(self, "_host"):
            self._host = torch.empty(self.flat.numel, dtype=torch.float32).pin_memory()
        versions, _ = self.client.pull_all(out=self._host, **kwargs)
        self.flat.params.copy_(self._host, non_blocking=True)
        return versions

    def push(self, versions: list[int], update: Any) -> list[Any]:
        """Push ``update`` (dense or sparse) to every shard; device tensors go through the host."""
        if isinstance(update, torch.Tensor) and update.device.type != "cpu":
            update = update.cpu()
        return self.client.push_all(self.rank, versions, update)

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
        self.flat.zero_grad_()
        loss = float(backward(self.model, self.job.loss, x.to(self.job.device), y.to(self.job.device)))
        self.steps += 1
        self.samples += len(y)
        if self.steps % self.log_every == 0:
            self.report(loss=loss)
        return loss

    def report(self, *, loss: float | None = None, final: bool = False) -> None:
        now = time.perf_counter()
        start, samples_then = self._window
        values: dict[str, Any] = {
            "worker/steps": self.steps,
            "worker/samples": self.samples,
            "worker/dropped": self.dropped,
            "worker/refused": self.refused,
            "comm/bytes_sent": self.client.bytes_sent,
            "comm/bytes_received": self.client.bytes_received,
            "comm/pushes": self.client.pushes,
            "comm/pulls": self.client.pulls,
        }
        if loss is not None:
            values["train/loss"] = loss
            values["train/samples_per_second"] = (self.samples - samples_then) / max(now - start, 1e-9)
            self._window = (now, self.samples)
        if final:
            values["worker/done"] = True
        self.ctx.metrics.log(self.steps, values)


class _Progress:
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


@dataclass(frozen=True, kw_only=True)
class ParameterServerRun:
    """The coordinator of a parameter-server run.

    Args:
        policy: the shards' update policy.
        make_worker: builds worker ``rank``'s role from the common keyword arguments.
        server_optimizer: the optimizer the shards apply gradients with.
        global_steps: steps of all workers together that make the run (for
            evaluation timing and the progress bar).
        evaluate_average: evaluate the shards' moving average, not the parameters.
        check: called every poll with the cluster; raises to end the run.
    """

    policy: UpdatePolicy
    make_worker: Callable[..., PSWorker]
    server_optimizer: OptimSpec
    global_steps: int
    ema_decay: float | None = None
    evaluate_average: bool = False
    check: Callable[[LocalCluster], None] | None = None
    timeout: float = 60.0

    def run(self, job: Job, metrics: Metrics) -> nn.Module:
        model = replace(job, device="cpu").build_model()  # the coordinator evaluates on the host
        flat = FlatParams(model)
        ranges = shard_ranges(flat.numel, job.servers)
        token = new_token()
        progress = _Progress()
        metrics.sinks.append(progress)
        evaluator = Evaluator(job, metrics)
        interval = job.eval_interval(self.global_steps)
        with LocalCluster(metrics) as cluster:
            servers = cluster.start([
                ServerRole(rank=r.shard, shard=r, initial=flat.params[r.start : r.stop].clone(),
                           optimizer=self.server_optimizer, policy=self.policy, token=token,
                           ema_decay=self.ema_decay)
                for r in ranges
            ])
            addresses = [cluster.wait_published(h, "address", timeout=self.timeout) for h in servers]
            workers = cluster.start([
                self.make_worker(
                    rank=rank, num_workers=job.workers, addresses=addresses, ranges=ranges, token=token,
                    job=replace(job, data=job.data.shard(rank, job.workers, seed=job.seed).train_only()),
                    slow_factor=job.faults.slow.get(rank, 1.0), timeout=self.timeout,
                )
                for rank in range(job.workers)
            ])
            cluster.start_together(workers, timeout=10 * self.timeout)
            started = time.perf_counter()
            for rank, seconds in job.faults.kill.items():
                cluster.kill_at(workers[rank], metrics.elapsed() + seconds)
            with ParameterClient(addresses, ranges, token, timeout=self.timeout) as client:
                next_eval = interval

                def watch() -> None:
                    nonlocal next_eval
                    if self.check is not None:
                        self.check(cluster)
                    if progress.total_steps >= next_eval and not evaluator.reached:
                        client.pull_all(out=flat.params, average=self.evaluate_average)
                        evaluator(model, progress.total_steps)
                        next_eval = progress.total_steps + interval
                        metrics.log(progress.total_steps, {"progress/step": progress.total_steps})
                        if evaluator.reached:
                            cluster.request_stop()

                cluster.wait_all("worker", timeout=24 * 3600, watch=watch)
                client.pull_all(out=flat.params, average=self.evaluate_average)
                evaluator(model, progress.total_steps)
                seconds = time.perf_counter() - started
                cluster.request_stop()
                cluster.wait_all("server", timeout=self.timeout)
        metrics.sinks.remove(progress)
        log_end(metrics, steps=progress.total_steps, samples=progress.total_samples, seconds=seconds,
                eval_seconds=evaluator.seconds)
        return model
