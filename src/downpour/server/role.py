"""A parameter-server shard as a role: serve it, report on it, stop when told."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from downpour.flat import ShardRange
from downpour.optim import OptimSpec
from downpour.server.policy import UpdatePolicy
from downpour.server.shard import ServerShard
from downpour.transport import Security, serve_shard


@dataclass(kw_only=True)
class ServerRole:
    """Runs one :class:`ServerShard` behind gRPC until the run stops.

    Publishes ``address`` once listening. Every ``report_every`` seconds it
    logs the shard's version, dropped and refused pushes and the staleness
    of the pushes applied since the last report (as a histogram).
    """

    kind: ClassVar[str] = "server"
    rank: int
    shard: ShardRange
    initial: torch.Tensor = field(repr=False)
    optimizer: OptimSpec
    policy: UpdatePolicy
    token: str = field(repr=False)
    host: str = "127.0.0.1"
    port: int = 0
    ema_decay: float | None = None
    security: Security | None = None
    report_every: float = 0.5
    threads: int = 1

    def build_shard(self) -> ServerShard:
        return ServerShard(self.initial, shard=self.shard, optimizer=self.optimizer.build,
                           policy=self.policy, ema_decay=self.ema_decay)

    def run(self, ctx: Any) -> None:
        torch.set_num_threads(self.threads)
        torch.set_flush_denormal(True)  # subnormal optimizer state is slow on CPUs; this process is ours
        shard = self.build_shard()
        server = serve_shard(shard, host=self.host, port=self.port, token=self.token, security=self.security)
        ctx.publish("address", server.address)
        reported: dict[int, int] = {}
        try:
            while not ctx.should_end() and not server.shutdown_requested.is_set():
                time.sleep(self.report_every)
                reported = self._report(ctx, shard, reported)
        finally:
            self._report(ctx, shard, reported)
            server.stop(grace=0.5)

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
