"""What every kind of cluster does with the roles it started: wait on them, stage faults, handle deaths.

:class:`~downpour.cluster.local.LocalCluster` and the Ray cluster differ in
how a role is started, heard from, killed and stopped; the bookkeeping
around that is this one class.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Self

from downpour.errors import PeerTimeout, WorkerFailed
from downpour.metrics import Metrics

log = logging.getLogger("downpour.cluster")


class Cluster:
    """The roles a run started, and the waits and faults around them.

    A subclass starts roles (appending their handles to ``handles``), and
    writes ``poll`` (take the roles' messages; notice deaths and report each
    through :meth:`_died`), ``_go`` (the start signal), ``_kill`` (SIGKILL a
    role's process) and ``shutdown``. A handle has ``kind``, ``rank``,
    ``name``, ``where`` (its host), ``published``, ``finished``, ``failed``
    and ``alive()``.
    """

    def __init__(self, metrics: Metrics, *, tolerate_worker_deaths: bool = True) -> None:
        self.metrics = metrics
        self.tolerate_worker_deaths = tolerate_worker_deaths
        self.handles: list[Any] = []
        # Called with a role that died; returns True when it restarted it.
        self.on_death: Callable[[Any], bool] | None = None
        self._timers: list[threading.Timer] = []

    # ------------------------------------------------ what a subclass writes
    def poll(self, timeout: float = 0.1) -> None:
        raise NotImplementedError

    def _go(self) -> None:
        raise NotImplementedError

    def _kill(self, handle: Any) -> None:
        raise NotImplementedError

    def shutdown(self, grace: float = 5.0) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------- shared
    def wait_published(self, handle: Any, key: str, timeout: float = 60.0) -> Any:
        """Wait until ``handle`` publishes ``key``; a death or timeout raises."""
        deadline = time.monotonic() + timeout
        while key not in handle.published:
            if time.monotonic() > deadline:
                raise PeerTimeout(handle.name, timeout, f"publish its {key}")
            self.poll(0.05)
            if handle.failed and key not in handle.published:
                raise WorkerFailed(handle.kind, handle.rank, handle.where, handle.failed)
        return handle.published[key]

    def start_together(self, handles: list[Any], timeout: float = 120.0) -> None:
        """Wait until every one of ``handles`` said it is ready, then let them all go at once."""
        for handle in handles:
            self.wait_published(handle, "ready", timeout=timeout)
        self._go()

    def kill_at(self, handle: Any, seconds: float) -> None:
        """SIGKILL ``handle``'s process once ``seconds`` have passed since the run started (a staged fault)."""
        delay = max(0.0, seconds - self.metrics.elapsed())

        def kill() -> None:
            if handle.alive():
                log.warning("staged fault: killing %s", handle.name)
                self.metrics.log(0, {"fault/killed": f"{handle.kind}:{handle.rank}"})
                self._kill(handle)

        timer = threading.Timer(delay, kill)
        timer.daemon = True
        timer.start()
        self._timers.append(timer)

    def _died(self, handle: Any) -> None:
        """A role died (``handle.failed`` says how): restart it, go on without it, or end the run.

        Raises WorkerFailed when nobody restarted it and the run cannot go on
        without it (a server, or a worker where deaths are not tolerated).
        """
        self.metrics.log(0, {"fault/died": f"{handle.kind}:{handle.rank}"})
        log.warning("%s died (%s)", handle.name, handle.failed)
        if self.on_death is not None and self.on_death(handle):
            return
        if handle.kind != "worker" or not self.tolerate_worker_deaths:
            raise WorkerFailed(handle.kind, handle.rank, handle.where, handle.failed)
        log.warning("the run continues without %s", handle.name)

    def running(self, kind: str) -> list[Any]:
        return [h for h in self.handles if h.kind == kind and not h.finished and not h.failed]

    def dead(self, kind: str) -> list[Any]:
        return [h for h in self.handles if h.kind == kind and h.failed]

    def wait_all(self, kind: str, *, timeout: float, watch: Callable[[], None] | None = None) -> None:
        """Poll until every role of ``kind`` finished or died; ``watch()`` runs each poll."""
        deadline = time.monotonic() + timeout
        while self.running(kind):
            if time.monotonic() > deadline:
                names = ", ".join(h.name for h in self.running(kind))
                raise PeerTimeout(names, timeout, "finish")
            self.poll(0.05)
            if watch is not None:
                watch()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown(grace=1.0 if exc_info[0] is not None else 5.0)
