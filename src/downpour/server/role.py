"""A parameter-server shard as a role: serve it, checkpoint it, report on it, stop when told."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar, Protocol

import torch

from downpour.checkpoint import Checkpointing, VersionFile, load_shard, save_shard
from downpour.flat import ShardRange
from downpour.server.policy import UpdatePolicy
from downpour.server.shard import ServerShard
from downpour.transport import Security, serve_shard

log = logging.getLogger(__name__)


class OptimizerSpec(Protocol):
    """What a shard needs of its optimizer's spec (a :class:`downpour.optim.OptimSpec`): a builder.

    The server layer sits below ``downpour.optim``, whose batch methods drive
    the shards' vector operations, so it names only this seam.
    """

    def build(self, params: Any) -> torch.optim.Optimizer: ...


@dataclass(kw_only=True)
class ServerRole:
    """Runs one :class:`ServerShard` behind gRPC until the run stops.

    Publishes ``address`` once listening. Every ``report_every`` seconds it
    logs the shard's version, dropped and refused pushes and the staleness
    of the pushes applied since the last report (as a histogram).

    With ``checkpoint`` it writes its slice, optimizer state and version
    every N versions (taken under the shard's lock at exactly that version,
    written by a thread of its own) or every S seconds, and once more when
    the run ends; with ``restore`` it starts from its last checkpoint and
    publishes ``restored_version``.
    """

    kind: ClassVar[str] = "server"
    rank: int
    shard: ShardRange
    initial: torch.Tensor = field(repr=False)
    optimizer: OptimizerSpec
    policy: UpdatePolicy
    token: str = field(repr=False)
    host: str | None = None  # None: the host the cluster gives the role (127.0.0.1 locally)
    port: int = 0
    ema_decay: float | None = None
    security: Security | None = None
    report_every: float = 0.5
    threads: int = 1
    checkpoint: Checkpointing | None = None
    restore: bool = False
    shared_memory: bool = True  # offer shared-memory sessions to clients on this host
    kill_at_version: int | None = None  # a staged fault: SIGKILL this process at that version

    def build_shard(self) -> ServerShard:
        return ServerShard(self.initial, shard=self.shard, optimizer=partial(self.optimizer.build, fused=True),
                           policy=self.policy, ema_decay=self.ema_decay)

    def run(self, ctx: Any) -> None:
        torch.set_num_threads(self.threads)
        torch.set_flush_denormal(True)  # subnormal optimizer state is slow on CPUs; this process is ours
        shard = self.build_shard()
        if self.restore:
            assert self.checkpoint is not None, "restore needs a checkpoint directory"
            shard.load_state_dict(load_shard(self.checkpoint.shard_path(self.rank)))
            ctx.publish("restored_version", shard.version)
        writer = _Checkpointer(shard, self.checkpoint, self.rank, ctx) if self.checkpoint else None
        if self.kill_at_version is not None:
            shard.observe(self._die_at(self.kill_at_version, ctx,
                                       then=writer._applied if writer is not None else None))
        host = self.host or getattr(ctx, "host", None) or "127.0.0.1"
        server = serve_shard(shard, host=host, port=self.port, token=self.token, security=self.security,
                             shared_memory=self.shared_memory)
        ctx.publish("address", server.address)
        reported: dict[int, int] = {}
        try:
            while not ctx.should_end() and not server.shutdown_requested.is_set():
                time.sleep(self.report_every)
                reported = self._report(ctx, shard, reported)
                if writer is not None:
                    writer.tick()
        finally:
            server.stop(grace=0.5)
            if writer is not None:
                writer.close()
            self._report(ctx, shard, reported)

    def _die_at(self, version: int, ctx: Any, then: Callable[[int, Any], None] | None = None
                ) -> Callable[[int, Any], None]:
        """The staged fault: SIGKILL this process once an update takes the shard to ``version``
        (under the shard's lock, so no later update is applied first), as a crashed machine.
        ``then`` is the observer it stands in front of (the checkpointer's), called first."""

        def observe(reached: int, state: Any) -> None:
            if then is not None:
                then(reached, state)
            if reached >= version:
                log.warning("staged fault: server %d killed at version %d", self.rank, reached)
                ctx.metrics.log(reached, {"fault/killed": f"server:{self.rank}",
                                          "fault/killed_at_version": reached})
                ctx.flush()
                os.kill(os.getpid(), signal.SIGKILL)

        return observe

    @staticmethod
    def _report(ctx: Any, shard: ServerShard, reported: dict[int, int]) -> dict[int, int]:
        status = shard.status()
        histogram = {int(k): int(v) for k, v in status["staleness"].items()}
        new = {k: v - reported.get(k, 0) for k, v in histogram.items() if v - reported.get(k, 0) > 0}
        ctx.metrics.log(status["version"], {
            "ps/version": status["version"],
            "ps/applied": status["applied"],
            "ps/dropped": status["dropped"],
            "ps/refused": status["refused"],
            "ps/folded": status["folded"],
            "ps/staleness_counts": {str(k): v for k, v in new.items()},
        })
        return histogram


class _Checkpointer:
    """Writes a shard's checkpoints off the serving threads; keeps its version file current."""

    def __init__(self, shard: ServerShard, checkpoint: Checkpointing, rank: int, ctx: Any) -> None:
        self.shard, self.checkpoint, self.rank, self.ctx = shard, checkpoint, rank, ctx
        self.saved_version, self.saved_at = shard.version, time.monotonic()
        self.version_file = VersionFile(checkpoint.version_path(rank), shard.version)
        self._pending: dict[str, Any] | None = None
        self._ready = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._write_loop, name="downpour-checkpoint", daemon=True)
        self._thread.start()
        if not checkpoint.shard_path(rank).exists():
            self._save(shard.state_dict())  # version 0: a restart always has something to start from
        shard.observe(self._applied)

    def _applied(self, version: int, state: Callable[[], dict[str, Any]]) -> None:
        """After each update, under the shard's lock: record the version; take a due checkpoint."""
        self.version_file.set(version)
        if self.checkpoint.every_versions is not None and version - self.saved_version >= self.checkpoint.every_versions:
            self.saved_version = version
            with self._ready:
                self._pending = state()
                self._ready.notify()

    def tick(self) -> None:
        """From the role's loop: a checkpoint every S seconds, when the version moved."""
        if self.checkpoint.every_seconds is not None and self.checkpoint.due(
                self.shard.version, self.saved_version, self.saved_at):
            state = self.shard.state_dict()
            self.saved_version, self.saved_at = state["version"], time.monotonic()
            with self._ready:
                self._pending = state
                self._ready.notify()

    def _write_loop(self) -> None:
        while True:
            with self._ready:
                while self._pending is None and not self._closed:
                    self._ready.wait()
                state, self._pending = self._pending, None
            if state is None:
                return
            self._save(state)

    def _save(self, state: dict[str, Any]) -> None:
        started = time.perf_counter()
        save_shard(self.checkpoint.shard_path(self.rank), state)
        self.ctx.metrics.log(state["version"], {"ps/checkpoint_version": state["version"],
                                                "ps/checkpoint_seconds": time.perf_counter() - started})

    def close(self) -> None:
        """The run is over (or this shard stops): write the final state, then stop the writer."""
        self.shard.observe(None)
        with self._ready:
            self._closed = True
            self._pending = None
            self._ready.notify()
        self._thread.join()
        try:
            self._save(self.shard.state_dict())
        except OSError as error:
            log.error("shard %d could not write its final checkpoint: %s", self.rank, error)
        self.version_file.close()
