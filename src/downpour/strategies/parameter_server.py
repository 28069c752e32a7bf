"""What the parameter-server strategies share: their plan and the worker's scaffolding.

Downpour and sync use the same server and the same worker; only the
server's update policy and the worker's inner loop differ (sync vs. async is
a policy, not a second component). Their plan has the coordinator start the
shards, then the workers, and evaluate the served parameters as training goes.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from downpour.checkpoint import Checkpointing, VersionFile, load_run_state, save_run_state
from downpour.compress import Stream, compression_counters, parse
from downpour.errors import PeerUnavailable
from downpour.flat import ShardRange, combine_buffers_, shard_ranges
from downpour.optim import OptimSpec
from downpour.server import UpdatePolicy
from downpour.server.role import ServerRole
from downpour.strategies.base import Job
from downpour.strategies.plan import Plan, Progress, Session
from downpour.strategies.worker import Worker, shard_job
from downpour.transport import ParameterClient, Refused, Security, new_token

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class PSWorker(Worker):
    """A worker with a client for every shard of the parameter server."""

    addresses: list[str]
    ranges: list[ShardRange]
    token: str = field(repr=False)
    publish_buffers: ClassVar[bool] = True  # the shards hold the parameters; the buffers are the workers'
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

    def pull(self, *, out: torch.Tensor | None = None, **kwargs: Any) -> list[int]:
        """Pull every shard into ``out`` (the model's parameters by default); returns the shards' versions.

        The transport fills host memory; a worker on a GPU pulls into a host
        buffer and copies it over in one transfer.
        """
        target = self.flat.params if out is None else out
        if target.device.type == "cpu":
            versions, _ = self.client.pull_all(out=target, **kwargs)
            return versions
        versions, _ = self.client.pull_all(out=self._host_buffer(), **kwargs)
        target.copy_(self._host, non_blocking=True)
        return versions

    def _host_buffer(self) -> torch.Tensor:
        if not hasattr(self, "_host"):
            self._host = torch.empty(self.flat.numel, dtype=torch.float32).pin_memory()
        return self._host

    def payload(self, update: Any) -> Any:
        """What goes on the wire for ``update``: on the host, and compressed per shard where asked."""
        if isinstance(update, torch.Tensor) and update.device.type != "cpu":
            update = update.cpu()
        if self.streams and isinstance(update, torch.Tensor):
            flat = update.reshape(-1)
            update = [stream.encode(flat[r.start : r.stop]) for stream, r in zip(self.streams, self.ranges)]
        return update

    def push(self, versions: list[int], update: Any) -> list[Any]:
        """Push ``update`` (dense or sparse) to every shard; device tensors go through the host."""
        payload = self.payload(update)
        self.rounds += 1
        with self._finite_only():
            return self.client.push_all(self.rank, versions, payload)
        return []

    def push_pull(self, versions: list[int], update: Any, *,
                  out: torch.Tensor | None = None) -> tuple[list[Any], list[int]]:
        """:meth:`push`, then a pull into ``out`` (the parameters by default): one round trip per shard.

        Returns the push results and the versions pulled.
        """
        target = self.flat.params if out is None else out
        host = target if target.device.type == "cpu" else self._host_buffer()
        payload = self.payload(update)
        self.rounds += 1
        with self._finite_only():
            results, pulled, _ = self.client.push_pull_all(self.rank, versions, payload, out=host)
            if host is not target:
                target.copy_(host, non_blocking=True)
            return results, pulled
        # A refused non-finite push leaves the shards as they were; fetch them as they are.
        return [], self.pull(out=target)

    @contextlib.contextmanager
    def _finite_only(self) -> Iterator[None]:
        """Swallow a shard's refusal of a non-finite update, logging it: the coordinator reports divergence."""
        try:
            yield
        except Refused as error:
            if error.reason != "NON_FINITE":
                raise
            # The shard keeps its parameters; the run has diverged, which the coordinator reports.
            log.warning("worker %d: a shard refused a non-finite update: %s", self.rank, error.detail)
            self.ctx.metrics.log(self.steps, {"worker/non_finite_update": error.detail})


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


class ParameterServerPlan(Plan):
    """The plan of a parameter-server run: shards first, then workers with a client for every shard.

    The coordinator evaluates the served parameters (or their moving
    average), pulled from the shards, with the buffers the workers report:
    the shards hold the parameters, the workers' own replicas the buffers
    (BatchNorm statistics), which the coordinator averages (counters summed)
    over the workers' latest reports. The shards never see the buffers:
    running statistics are not gradients, and an optimizer must not step them.

    Args:
        job: the run's workload.
        policy: the shards' update policy.
        make_worker: builds worker ``rank``'s role from the common keyword arguments.
        server_optimizer: the optimizer the shards apply gradients with.
        global_steps: steps of all workers together that make the run (for
            evaluation timing and the progress bar).
        ema_decay: the shards keep a moving average of the parameters with this decay.
        evaluate_average: evaluate (and return) the shards' moving average, not the parameters.
        check: called every poll with the workers' handles; raises to end the run.
    """

    def __init__(self, job: Job, *, policy: UpdatePolicy, make_worker: Callable[..., PSWorker],
                 server_optimizer: OptimSpec, global_steps: int, ema_decay: float | None = None,
                 evaluate_average: bool = False, check: Callable[[list[Any]], None] | None = None,
                 timeout: float = 60.0) -> None:
        super().__init__(job)
        self.policy, self.make_worker, self.server_optimizer = policy, make_worker, server_optimizer
        self.global_steps, self.ema_decay, self.evaluate_average = global_steps, ema_decay, evaluate_average
        self.check, self.timeout = check, timeout
        self.checkpointing: Checkpointing | None = job.checkpoint
        self.client: ParameterClient | None = None

    def open(self, session: Session) -> None:
        self.ranges = shard_ranges(self.flat.numel, self.job.servers)
        self.token = new_token()
        if self.checkpointing is not None and self.checkpointing.resume:
            _restore_progress(self.checkpointing, session.progress)
        self.store = dist.TCPStore(session.host, 0, is_master=True, wait_for_workers=False,
                                   timeout=datetime.timedelta(seconds=self.timeout))
        self.directory = ShardDirectory(session.host, self.store.port, timeout=self.timeout)

    def servers(self, session: Session) -> list[ServerRole]:
        checkpoint = self.checkpointing
        self.server_roles = [
            ServerRole(rank=r.shard, shard=r, initial=self.flat.params[r.start : r.stop].clone(),
                       optimizer=self.server_optimizer, policy=self.policy, token=self.token,
                       ema_decay=self.ema_decay, checkpoint=checkpoint,
                       restore=checkpoint is not None and checkpoint.resume,
                       shared_memory=self.job.shared_memory,
                       kill_at_version=self.job.faults.kill_server_at_version.get(r.shard))
            for r in self.ranges
        ]
        return self.server_roles

    def serving(self, session: Session) -> None:
        for shard, address in enumerate(session.addresses):
            self.store.set(f"shard/{shard}", address)

        def recover(shard: int, error: PeerUnavailable) -> str:
            # The coordinator restarts shards itself (in poll), so it polls while it waits.
            deadline = time.monotonic() + self.timeout
            while session.addresses[shard] == error.peer:
                if time.monotonic() > deadline:
                    raise error
                session.poll(0.05)
            return session.addresses[shard]

        self.client = ParameterClient(session.addresses, self.ranges, self.token, timeout=self.timeout,
                                      recover=recover)

    def worker(self, session: Session, rank: int, *, incarnation: int = 0, start_steps: int = 0,
               start_samples: int = 0) -> PSWorker:
        job = self.job
        return self.make_worker(
            rank=rank, num_workers=job.workers, addresses=list(session.addresses), ranges=self.ranges,
            token=self.token, job=shard_job(job, rank), timeout=self.timeout, directory=self.directory,
            start_steps=start_steps, start_samples=start_samples, incarnation=incarnation)

    def on_death(self, session: Session, handle: Any) -> bool:
        if handle.kind != "server" or self.checkpointing is None:
            return False
        self._restart_server(session, handle.rank)
        return True

    def _restart_server(self, session: Session, shard: int) -> None:
        assert self.checkpointing is not None
        started = time.perf_counter()
        reached = VersionFile.read(self.checkpointing.version_path(shard))
        # The restarted shard is not killed again at the version its predecessor died at.
        [handle] = session.start([replace(self.server_roles[shard], restore=True,
                                          kill_at_version=None)])
        session.servers[shard] = handle
        address = session.wait_published(handle, "address", timeout=self.timeout)
        restored = int(handle.published["restored_version"])
        session.addresses[shard] = address
        self.store.set(f"shard/{shard}", address)
        lost = None if reached is None else max(0, reached - restored)
        log.warning("server shard %d restarted at %s from version %d (%s updates lost)", shard, address,
                    restored, "unknown" if lost is None else lost)
        session.metrics.log(session.progress.total_steps, {
            "fault/restarted": f"server:{shard}", "fault/restored_version": restored,
            "fault/lost_updates": lost, "fault/restart_seconds": time.perf_counter() - started})

    def watch(self, session: Session) -> None:
        if self.check is not None:
            self.check(session.workers)

    def read(self, session: Session, model: nn.Module, *, final: bool) -> bool:
        assert self.client is not None, "read before the shards served"
        self.client.pull_all(out=self.flat.params, average=self.evaluate_average)
        buffers = [h.published["buffers"][1] for h in session.workers if "buffers" in h.published]
        combine_buffers_(model, buffers)
        return True

    def checkpoint(self, session: Session, *, finished: bool) -> None:
        if self.checkpointing is not None:
            _save_progress(self.checkpointing, session.progress, finished=finished)

    def close(self, session: Session) -> None:
        if self.client is not None:
            self.client.close()


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
