"""What the parameter-server strategies share: the coordinator and the worker's scaffolding.

Downpour and sync use the same server and the same worker; only the
server's update policy and the worker's inner loop differ (sync vs. async is
a policy, not a second component). The coordinator starts the shards, then
the workers, evaluates the served parameters as training goes, and stops
everything at the end.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from downpour.cluster import LocalCluster, open_cluster
from downpour.compress import Stream, parse
from downpour.flat import FlatParams, ShardRange, shard_ranges
from downpour.metrics import Metrics, compression_counters
from downpour.optim import OptimSpec
from downpour.server import UpdatePolicy
from downpour.server.role import ServerRole
from downpour.strategies.base import Evaluator, Job, log_end, log_start
from downpour.strategies.worker import Progress, Worker, shard_job
from downpour.transport import ParameterClient, new_token


@dataclass(kw_only=True)
class PSWorker(Worker):
    """A worker with a client for every shard of the parameter server."""

    addresses: list[str]
    ranges: list[ShardRange]
    token: str = field(repr=False)
    compress: str | None = None  # a compress.parse spec for pushes; one stream per shard

    def connect(self) -> None:
        self.streams = [] if self.compress is None else [Stream(parse(self.compress)) for _ in self.ranges]
        self.client = ParameterClient(self.addresses, self.ranges, self.token, timeout=self.timeout)
        self.client.wait_ready(timeout=self.timeout)

    def disconnect(self) -> None:
        if hasattr(self, "client"):
            self.client.close()

    def counters(self) -> dict[str, Any]:
        if not hasattr(self, "client"):
            return super().counters()
        # Bytes moved, whichever way they went: over gRPC, or (for roles on the
        # same host) through shared memory with gRPC carrying only the header.
        # Strategies compare on what they move; the shared part is also reported.
        c = self.client
        counters = {"comm/bytes_sent": c.bytes_sent + c.bytes_shared_sent,
                    "comm/bytes_received": c.bytes_received + c.bytes_shared_received,
                    "comm/bytes_shared": c.bytes_shared_sent + c.bytes_shared_received,
                    "comm/pushes": c.pushes, "comm/pulls": c.pulls, "comm/rounds": self.rounds}
        if self.streams:
            counters |= compression_counters(self.streams)
        return counters

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
        if self.streams and isinstance(update, torch.Tensor):
            flat = update.reshape(-1)
            update = [stream.encode(flat[r.start : r.stop]) for stream, r in zip(self.streams, self.ranges)]
        self.rounds += 1
        return self.client.push_all(self.rank, versions, update)


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
        progress = Progress()
        metrics.sinks.append(progress)
        evaluator = Evaluator(job, metrics)
        interval = job.eval_interval(self.global_steps)
        with open_cluster(job.cluster, metrics) as cluster:
            servers = cluster.start([
                ServerRole(rank=r.shard, shard=r, initial=flat.params[r.start : r.stop].clone(),
                           optimizer=self.server_optimizer, policy=self.policy, token=token,
                           ema_decay=self.ema_decay)
                for r in ranges
            ])
            addresses = [cluster.wait_published(h, "address", timeout=10 * self.timeout) for h in servers]
            workers = cluster.start([
                self.make_worker(
                    rank=rank, num_workers=job.workers, addresses=addresses, ranges=ranges, token=token,
                    job=shard_job(job, rank),
                    slow_factor=job.faults.slow.get(rank, 1.0), timeout=self.timeout,
                )
                for rank in range(job.workers)
            ])
            cluster.start_together(workers, timeout=10 * self.timeout)
            log_start(metrics, evaluator)
            started = time.perf_counter()
            for rank, seconds in job.faults.kill.items():
                cluster.kill_at(workers[rank], metrics.elapsed() + seconds)
            with ParameterClient(addresses, ranges, token, timeout=self.timeout) as client:
                next_eval = interval

                def watch() -> None:
                    nonlocal next_eval
                    if self.check is not None:
                        self.check(cluster)
                    if evaluator.out_of_time:
                        cluster.request_stop()
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
                cluster.end()
                cluster.wait_all("server", timeout=self.timeout)
        metrics.sinks.remove(progress)
        log_end(metrics, steps=progress.total_steps, samples=progress.total_samples, seconds=seconds,
                eval_seconds=evaluator.seconds)
        return model
