"""What a role is, and what it receives in its process."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

from downpour.metrics import Metrics, Sink

# How often a role waiting for the stop flag looks at it.
_STOP_POLL_SECONDS = 0.02


class Role(Protocol):
    """A unit of a run (server shard, worker, ...) that the cluster starts in its own process."""

    kind: str
    rank: int

    def run(self, ctx: RoleContext) -> None: ...


def process_title(kind: str, rank: int, count: int) -> str:
    """What ``ps`` shows for a role's process: its kind, rank and how many roles of its kind run.

    Example:
        >>> process_title("worker", 3, 4)
        'downpour: worker 3/4'
    """
    return f"downpour: {kind} {rank}/{count}"


def role_counts(roles: list[Role], started: list[Any]) -> dict[str, int]:
    """How many roles of each kind a cluster runs once ``roles`` start beside ``started``.

    Distinct ranks, so a restarted role (a rank started again) is not counted twice.

    Example:
        >>> from types import SimpleNamespace as R
        >>> role_counts([R(kind="worker", rank=2)], [R(kind="worker", rank=r) for r in range(4)])
        {'worker': 4}
    """
    ranks: dict[str, set[int]] = {}
    for role in [*started, *roles]:
        ranks.setdefault(role.kind, set()).add(role.rank)
    return {kind: len(found) for kind, found in ranks.items()}


class _ConnSink:
    """Sends events to the coordinator over this role's own pipe.

    One pipe per role (not one shared queue): a role killed mid-message can
    corrupt only its own pipe, never block the others.
    """

    def __init__(self, conn) -> None:
        self._conn = conn
        self._lock = threading.Lock()

    def write(self, event: dict[str, Any]) -> None:
        with self._lock:
            self._conn.send(event)

    def close(self) -> None:
        pass


@dataclass
class RoleContext:
    """Everything a role gets from the cluster; passed in, never global.

    Attributes:
        metrics: stamped with this role's kind and rank; events reach the
            coordinator's sinks.
        stop: a shared flag the coordinator sets when the run should end
            (a plain shared byte, not an Event: an Event's condition
            deadlocks when a waiting process is SIGKILLed).
        host: the address other roles reach this role's host at (a server
            binds it): loopback on this machine (local processes, a local Ray),
            the node's IP on a Ray cluster.
    """

    kind: str
    rank: int
    metrics: Metrics
    stop: Any  # a RawValue('b') or a Flag: workers wind down (target reached, budget spent)
    go: Any  # a RawValue('b') or a Flag: set once every worker is ready
    end: Any  # a RawValue('b') or a Flag: the run is over, every role leaves
    _sink: Sink
    host: str = "127.0.0.1"

    @classmethod
    def create(cls, kind: str, rank: int, conn, flags, start_time: float) -> RoleContext:
        stop, go, end = flags
        sink = _ConnSink(conn)
        metrics = Metrics([sink], role=kind, rank=rank, start_time=start_time)
        return cls(kind=kind, rank=rank, metrics=metrics, stop=stop, go=go, end=end, _sink=sink)

    def send(self, message: dict[str, Any]) -> None:
        self._sink.write(message)

    def flush(self, timeout: float = 5.0) -> None:
        """Wait (at most ``timeout`` s) until every event sent so far reached the coordinator:
        before a role ends its own process. A pipe delivers as it writes; a Ray actor's outbox
        waits for the coordinator's drains."""
        flush = getattr(self._sink, "flush", None)
        if flush is not None:
            flush(timeout)

    def publish(self, key: str, value: Any) -> None:
        """Tell the coordinator a value (such as the address a server bound)."""
        self.send({"_control": "publish", "key": key, "value": value})

    def ready_and_wait(self, timeout: float) -> None:
        """Say this role is ready, then wait for the coordinator's start signal.

        Workers start training together, so that process start-up (seconds
        on a busy machine) neither staggers them nor counts as training time.
        """
        self.publish("ready", True)
        deadline = time.monotonic() + timeout
        while not self.go.value and not self.should_stop():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.kind} {self.rank} got no start signal within {timeout:g} s")
            time.sleep(_STOP_POLL_SECONDS)

    def should_stop(self) -> bool:
        """Whether to wind down: the coordinator asked workers to stop, or the run is over."""
        return bool(self.stop.value or self.end.value)

    def should_end(self) -> bool:
        """Whether the whole run is over (servers serve until then: workers may still need them)."""
        return bool(self.end.value)

    def wait_stop(self, timeout: float) -> bool:
        """Sleep until the stop flag is set or ``timeout`` passes; True if stopping."""
        deadline = time.monotonic() + timeout
        while not (self.stop.value or self.end.value):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(_STOP_POLL_SECONDS, left))
        return True


class Flag:
    """A flag with the ``.value`` interface of a shared RawValue, for roles outside a LocalCluster.

    Set in the role's own process: by a signal handler (roles run by hand) or
    by the coordinator's call to a Ray actor.
    """

    def __init__(self, value: int = 0) -> None:
        self.value = value


class StandaloneContext(RoleContext):
    """The context of a role started by hand (``downpour server`` / ``downpour worker``).

    Events go to the given sinks; published values are logged; the start
    signal is immediate; SIGINT or SIGTERM sets the stop flag so the role
    winds down cleanly.
    """

    @classmethod
    def standalone(cls, kind: str, rank: int, sinks, on_publish=None) -> StandaloneContext:
        import signal

        stop, end = Flag(0), Flag(0)
        ctx = cls(kind=kind, rank=rank, metrics=Metrics(list(sinks), role=kind, rank=rank), stop=stop,
                  go=Flag(1), end=end, _sink=None)  # type: ignore[arg-type]
        ctx._on_publish = on_publish

        def request_stop(signum, frame) -> None:
            stop.value = end.value = 1

        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGTERM, request_stop)
        return ctx

    def send(self, message: dict[str, Any]) -> None:
        if message.get("_control") == "publish" and self._on_publish is not None:
            self._on_publish(message["key"], message["value"])
