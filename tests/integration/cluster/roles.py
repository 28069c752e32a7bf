"""Small roles the cluster tests start, on the local cluster and on Ray alike."""

import os
from dataclasses import dataclass


@dataclass
class Sleeper:
    """Publishes its pid, logs ``events`` losses, then waits ``seconds`` or for the stop flag."""

    kind: str = "worker"
    rank: int = 0
    seconds: float = 0.2
    events: int = 1

    def run(self, ctx):
        ctx.publish("pid", os.getpid())
        for step in range(self.events):
            ctx.metrics.log(step + 1, {"train/loss": 1.0})
        ctx.wait_stop(self.seconds)


@dataclass
class Raiser:
    kind: str = "worker"
    rank: int = 0

    def run(self, ctx):
        raise RuntimeError("boom in the role")
