"""What the parameter-server strategies share: the coordinator and the worker's scaffolding.

Downpour and sync use the same server and the same worker; only the
server's update policy and the worker's inner loop differ (sync vs. async is
a policy, not a second component). The coordinator starts the shards, then
the workers, evaluates the served parameters as training goes, and stops
everything at the end.
"""

from __future__ import annotations

import base64
import datetime
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from downpour.checkpoint import Checkpointing, VersionFile, load_run_state, save_run_state
from downpour.cluster import LocalCluster, open_cluster
from downpour.compress import Stream, parse
from downpour.errors import PeerUnavailable
from downpour.flat import FlatParams, ShardRange, shard_ranges
from downpour.metrics import Metrics, compression_counters
from downpour.optim import OptimSpec
from downpour.server import UpdatePolicy
from downpour.server.role import ServerRole
from downpour.strategies.base import Evaluator, Job, log_end, log_start
from downpour.strategies.worker import Progress, Worker, WorkerRestarts, shard_job
from downpour.transport import ParameterClient, Security, new_token

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class PSWorker(Worker):
    """A worker with a client for every shard of the parameter server."""

    addresses: list[str]
    ranges: list[ShardRange]
    token: str = field(repr=False)
    compress: str | None = None  # a compress.parse spec for pushes; one stream per shard
    security: Security | None = None  # TLS to the shards (hand-started roles)
    directory: ShardDirectory | None = None  # where restarted shards say they are now

    def connect(self) -> None:
        self.streams = [] if self.compress is None else [Stream(parse(self.compress)) for _ in self.ranges]
        recover = None if self.directory is None else self.directory.recover
        self.client = ParameterClient(self.addresses, self.ranges, self.token, security=self.security,
                                      timeout=self.timeout, recover=recover)
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
                    "comm/pushes": c.pushes, "comm/pulls": c.pulls, "comm/rounds": self.rounds,
                    "comm/reconnections": c.reconnections}
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


@dataclass(frozen=True)
class ShardDirectory:
    """Where every shard listens now: a ``torch.distributed.TCPStore`` the coordinator keeps.

    When the coordinator restarts a dead shard it writes the new address
    here; a client that finds a shard unreachable asks, with backoff, until
    the address changes or ``timeout`` seconds pass (then it raises, naming
    the shard).
    """

    host: str
    port: int
    timeout: float = 60.0

    def recover(self, shard: int, error: PeerUnavailable) -> str:
        store = self._store()
        deadline = time.monotonic() + self.timeout
        delay = 0.05
        while True:
            address = store.get(f"shard/{shard}").decode()
            if address != error.peer:
                return address
            if time.monotonic() > deadline:
                raise PeerUnavailable(error.peer, f"{error}; shard {shard} did not come back within "
                                                  f"{self.timeout:g} s") from None
            time.sleep(delay)
            delay = min(2 * delay, 1.0)

    def _store(self) -> dist.TCPStore:
        with _STORE_LOCK:
            store = _STORES.get((self.host, self.port))
            if store is None:
                store = dist.TCPStore(self.host, self.port, is_master=False, wait_for_workers=False,
                                      timeout=datetime.timedelta(seconds=self.timeout))
                _STORES[self.host, self.port] = store
            return store


# One store client per directory and process, shared by the client's threads.
_STORES: dict[tuple[str, int], dist.TCPStore] = {}
_STORE_LOCK = threading.Lock()


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
        checkpoint: Checkpointing | None = job.checkpoint
        progress = Progress()
        if checkpoint is not None and checkpoint.resume:
            _restore_progress(checkpoint, progress)
        metrics.sinks.append(progress)
        evaluator = Evaluator(job, metrics)
        interval = job.eval_interval(self.global_steps)
        interrupted = False
        with open_cluster(job.cluster, metrics) as cluster:
            host = getattr(cluster, "host", "127.0.0.1")
            store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False,
                                  timeout=datetime.timedelta(seconds=self.timeout))
            directory = ShardDirectory(host, store.port, timeout=self.timeout)
            server_roles = [
                ServerRole(rank=r.shard, shard=r, initial=flat.params[r.start : r.stop].clone(),
                           optimizer=self.server_optimizer, policy=self.policy, token=token,
                           ema_decay=self.ema_decay, checkpoint=checkpoint,
                           restore=checkpoint is not None and checkpoint.resume)
                for r in ranges
            ]
            servers = cluster.start(server_roles)
            addresses = [cluster.wait_published(h, "address", timeout=10 * self.timeout) for h in servers]
            for shard, address in enumerate(addresses):
                store.set(f"shard/{shard}", address)

            def worker_role(rank: int, incarnation: int = 0) -> PSWorker:
                return self.make_worker(
                    rank=rank, num_workers=job.workers, addresses=list(addresses), ranges=ranges, token=token,
                    job=shard_job(job, rank), slow_factor=job.faults.slow.get(rank, 1.0), timeout=self.timeout,
                    directory=directory, start_steps=progress.steps.get(rank, 0),
                    start_samples=progress.samples.get(rank, 0), incarnation=incarnation,
                )

            workers = cluster.start([worker_role(rank) for rank in range(job.workers)])
            restarts = WorkerRestarts(cluster, metrics, progress, worker_role, workers) if job.restart_workers else None
            cluster.on_death = _Recovery(cluster, metrics, progress, checkpoint, server_roles, addresses, store,
                                         restarts, self.timeout)
            cluster.start_together(workers, timeout=10 * self.timeout)
            log_start(metrics, evaluator)
            started = time.perf_counter()
            for rank, seconds in job.faults.kill.items():
                cluster.kill_at(workers[rank], metrics.elapsed() + seconds)
            for shard, seconds in job.faults.kill_server.items():
                cluster.kill_at(servers[shard], metrics.elapsed() + seconds)

            def recover(shard: int, error: PeerUnavailable) -> str:
                # The coordinator restarts shards itself (in poll), so it polls while it waits.
                deadline = time.monotonic() + self.timeout
                while addresses[shard] == error.peer:
                    if time.monotonic() > deadline:
                        raise error
                    cluster.poll(0.05)
                return addresses[shard]

            with ParameterClient(addresses, ranges, token, timeout=self.timeout, recover=recover) as client:
                next_eval = progress.total_steps + interval

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
                        if checkpoint is not None:
                            _save_progress(checkpoint, progress, finished=False)
                        if evaluator.reached:
                            cluster.request_stop()

                try:
                    cluster.wait_all("worker", timeout=24 * 3600, watch=watch)
                except KeyboardInterrupt:
                    # Stop cleanly so the run can be resumed: workers finish their step and push it,
                    # then the shards write their final checkpoints as they end. A second Ctrl-C aborts.
                    interrupted = True
                    log.warning("interrupted: stopping workers, then checkpointing the shards")
                    cluster.request_stop()
                    cluster.wait_all("worker", timeout=self.timeout)
                if not interrupted:
                    client.pull_all(out=flat.params, average=self.evaluate_average)
                    evaluator(model, progress.total_steps)
                seconds = time.perf_counter() - started
                cluster.end()
                cluster.wait_all("server", timeout=self.timeout)
                if checkpoint is not None:
                    _save_progress(checkpoint, progress, finished=not interrupted)
        metrics.sinks.remove(progress)
        if interrupted:
            raise KeyboardInterrupt
        log_end(metrics, steps=progress.total_steps, samples=progress.total_samples, seconds=seconds,
                eval_seconds=evaluator.seconds)
        return model


class _Recovery:
    """What the coordinator does when a role dies: restart a shard from its checkpoint, or a worker.

    Called by the cluster's poll with the dead role's handle; returns whether
    it restarted it (else the cluster treats the death as before: a dead shard
    ends the run, a dead worker is left behind).
    """

    def __init__(self, cluster: Any, metrics: Metrics, progress: Progress, checkpoint: Checkpointing | None,
                 server_roles: list[ServerRole], addresses: list[str], store: dist.TCPStore,
                 workers: WorkerRestarts | None, timeout: float) -> None:
        self.cluster, self.metrics, self.progress, self.timeout = cluster, metrics, progress, timeout
        self.checkpoint, self.server_roles, self.addresses, self.store = checkpoint, server_roles, addresses, store
        self.workers = workers

    def __call__(self, handle: Any) -> bool:
        if handle.kind == "server" and self.checkpoint is not None:
            self._restart_server(handle.rank)
            return True
        return self.workers is not None and self.workers(handle)

    def _restart_server(self, shard: int) -> None:
        assert self.checkpoint is not None
        started = time.perf_counter()
        reached = VersionFile.read(self.checkpoint.version_path(shard))
        [handle] = self.cluster.start([replace(self.server_roles[shard], restore=True)])
        address = self.cluster.wait_published(handle, "address", timeout=self.timeout)
        restored = int(handle.published["restored_version"])
        self.addresses[shard] = address
        self.store.set(f"shard/{shard}", address)
        lost = None if reached is None else max(0, reached - restored)
        log.warning("server shard %d restarted at %s from version %d (%s updates lost)", shard, address,
                    restored, "unknown" if lost is None else lost)
        self.metrics.log(self.progress.total_steps, {
            "fault/restarted": f"server:{shard}", "fault/restored_version": restored,
            "fault/lost_updates": lost, "fault/restart_seconds": time.perf_counter() - started})


def _save_progress(checkpoint: Checkpointing, progress: Progress, *, finished: bool) -> None:
    """The coordinator's part of a checkpoint: each worker's steps and samples (its data position)."""
    save_run_state(checkpoint.directory, {
        "steps": {str(rank): steps for rank, steps in progress.steps.items()},
        "samples": {str(rank): samples for rank, samples in progress.samples.items()},
        "finished": finished,
        "torch_rng": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    })


def _restore_progress(checkpoint: Checkpointing, progress: Progress) -> None:
    state = load_run_state(checkpoint.directory)
    if state.get("finished"):
        raise ValueError(f"the run in {checkpoint.directory.parent} already finished; there is nothing to resume")
    progress.steps.update({int(rank): int(steps) for rank, steps in state["steps"].items()})
    progress.samples.update({int(rank): int(samples) for rank, samples in state["samples"].items()})
    rng = np.frombuffer(base64.b64decode(state["torch_rng"]), dtype=np.uint8).copy()
    torch.set_rng_state(torch.from_numpy(rng))
