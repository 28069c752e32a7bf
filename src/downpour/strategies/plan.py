"""A strategy's plan: the roles a run needs and how its model is read; the Coordinator runs it.

A strategy starts no process, evaluates nothing and writes no metrics of the
run's own (start, end, throughput): it returns a :class:`Plan`, and the one
Coordinator (:mod:`downpour.run`) opens the cluster, starts the plan's
servers and workers, stages faults, restarts roles, evaluates the model the
plan reads, accounts time and throughput and returns that model. What the
Coordinator offers a plan while it runs is a :class:`Session`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Protocol

from torch import nn

from downpour.flat import FlatParams
from downpour.strategies.base import Job


class Progress:
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


class EventLog(Protocol):
    """Where a plan logs its own measurements (the coordinator's ``downpour.metrics.Metrics``)."""

    def log(self, step: int, values: dict[str, Any]) -> None: ...


class Session(Protocol):
    """What the Coordinator offers a plan while the run goes on.

    Attributes:
        job: the run's workload.
        metrics: the coordinator's event sink (for a plan's own measurements).
        progress: every worker's latest reported steps and samples.
        host: this machine's address as the roles reach it.
        workers: the workers' handles by rank (a restarted worker takes its rank's place).
        servers: the servers' handles by shard.
        addresses: where every server listens (kept current across restarts).
    """

    job: Job
    metrics: EventLog
    progress: Progress
    host: str
    workers: list[Any]
    servers: list[Any]
    addresses: list[str]

    def poll(self, timeout: float = 0.05) -> None:
        """Hear from the roles (their events and deaths) for up to ``timeout`` seconds."""

    def start(self, roles: list[Any]) -> list[Any]:
        """Start ``roles`` now (a restarted server, say); returns their handles."""

    def wait_published(self, handle: Any, key: str, timeout: float) -> Any:
        """Wait until ``handle`` publishes ``key``; a death or a timeout raises."""

    def request_stop(self) -> None:
        """Ask the workers to wind down."""

    def should_stop(self) -> bool:
        """Whether an inline plan's training should stop (target reached, time spent, diverged)."""

    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        """Evaluate ``model`` now (an inline plan's own model, in this process)."""


class Plan:
    """The parts of a run that differ between strategies; every method has a default.

    Attributes:
        global_steps: steps of all workers together that make the run (the
            progress bar's total and the evaluation interval's base).
        unit: what ``global_steps`` counts (``"steps"``, or a batch method's ``"iterations"``).
        tolerate_worker_deaths: whether the run goes on when a worker dies.
        inline: training runs in the coordinator's own thread (:meth:`drive`),
            so its evaluations stop training and are subtracted from its time.
        driven: the coordinator runs :meth:`drive` while the workers serve it
            (a batch method), instead of waiting for the workers to finish.
        snapshots: the workers publish parameter snapshots (``Worker.snapshot``)
            and every new one is evaluated; else the coordinator reads the
            model every evaluation interval.
    """

    global_steps: int = 0
    unit: str = "steps"
    tolerate_worker_deaths: bool = True
    inline: bool = False
    driven: bool = False
    snapshots: bool = False

    def __init__(self, job: Job) -> None:
        self.job = job

    def model(self) -> nn.Module:
        """The coordinator's model, what it evaluates and returns; ``self.flat`` its flat parameters."""
        model = self.build_model()
        self.flat = FlatParams(model)
        return model

    def build_model(self) -> nn.Module:
        """A fresh coordinator's model (on the host): the job's, or a strategy's own (an ensemble)."""
        return replace(self.job, device="cpu").build_model()

    def open(self, session: Session) -> None:
        """Resources the roles need before they start (a store, shared memory)."""

    def servers(self, session: Session) -> list[Any]:
        """The server roles, started first; their published ``address`` fills ``session.addresses``."""
        return []

    def serving(self, session: Session) -> None:
        """The servers listen (``session.addresses``); called before any worker is built."""

    def worker(self, session: Session, rank: int, *, incarnation: int = 0, start_steps: int = 0,
               start_samples: int = 0) -> Any:
        """Worker ``rank``'s role (a restarted one goes on from its predecessor's last report)."""
        raise NotImplementedError(f"{type(self).__name__} has no workers")

    def num_workers(self) -> int:
        """How many workers to start (the job's)."""
        return self.job.workers

    def on_death(self, session: Session, handle: Any) -> bool:
        """A role died: restart it here and return True (a shard), or leave it to the Coordinator."""
        return False

    def before_restart(self, session: Session, rank: int) -> None:
        """Worker ``rank`` is about to be restarted (tell the survivors)."""

    def watch(self, session: Session) -> None:
        """Called at every poll while the workers train; raises to end the run."""

    def read(self, session: Session, model: nn.Module, *, final: bool) -> bool:
        """Load the parameters and buffers to evaluate into ``model``; False when there is nothing new."""
        return False

    def drive(self, session: Session) -> dict[str, Any] | None:
        """The coordinator-side part of the algorithm, where it has one (a batch method, one process).

        Returns values for the run's end event. A plan without it waits for
        its workers instead.
        """
        raise NotImplementedError

    def checkpoint(self, session: Session, *, finished: bool) -> None:
        """Save the coordinator's part of a checkpoint (when the plan keeps checkpoints)."""

    def finish(self, session: Session, model: nn.Module) -> dict[str, Any]:
        """After the final evaluation: extra values for the end event (or events of its own)."""
        return {}

    def result(self, model: nn.Module) -> nn.Module:
        """The model handed back to the user: the coordinator's own, or a copy (out of shared memory)."""
        return model

    def close(self, session: Session) -> None:
        """Release what :meth:`open` took."""
