"""RayCluster: every role a Ray actor on a Ray cluster, behind LocalCluster's interface.

``RayCluster(address=...)`` is the configuration (which cluster, what each
role reserves); :meth:`RayCluster.open` connects and returns a
:class:`RayRoles`, which strategies use exactly as they use a
:class:`~downpour.cluster.LocalCluster`: start roles, wait for what they
publish, stage faults, poll, stop. So every strategy runs unchanged on Ray.

Each role runs in an actor of its own (one process, its CPUs and, for roles
on CUDA, its GPU), spread over the nodes. The role object reaches its actor
through Ray's own serialization, inside the trusted cluster, as
multiprocessing pickles a role to a local child; training traffic never goes
that way: parameters and gradients travel over gRPC and protobuf or
``torch.distributed``, as on the local cluster.

What would be a remote call at every step stays local to the actor:

- events: ``ctx.metrics.log`` appends to the actor's outbox. The coordinator
  keeps one ``drain`` call in flight per actor, a long poll that returns as
  soon as events are there (plain events a few milliseconds later, batched),
  so a role never waits on the coordinator and a busy role costs a few
  calls a second.
- flags (stop, go, end): plain values in the actor, which roles read at
  every step; the coordinator sets them with one call per actor when they
  change, which is a handful of times per run.

Both calls run on a control thread of the actor (a Ray concurrency group),
beside the role's own. So does ``kill``, by which :meth:`RayRoles.kill_at`
stages a fault: the actor SIGKILLs its own process, on whatever node it is.

Each actor's process is titled ``ray::downpour: KIND RANK/COUNT`` for as
long as its role runs: ``ps`` shows ``ray::downpour: worker 3/4`` where Ray
alone would show ``ray::RoleActor.drain``. The ``ray::`` prefix stays, as
Ray's own tools (``ray stack``) find its workers by it.

Ray is an extra (``pip install downpour-sgd[ray]``); it is imported when a
cluster is opened, never by ``import downpour``. Every node needs the same
Python environment with downpour installed.

Example:
    >>> cluster = RayCluster(address="10.0.0.1:6379", num_cpus=2)
    >>> cluster.address
    '10.0.0.1:6379'
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import socket
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from downpour.cluster.base import Cluster
from downpour.cluster.role import Flag, Role, RoleContext, process_title, role_counts
from downpour.errors import WorkerFailed, check_range
from downpour.metrics import Metrics

log = logging.getLogger(__name__)

# How long a drain call waits for the first event before it returns empty.
_DRAIN_WAIT_SECONDS = 1.0
# How long a drain call holding plain events waits for more, so a role logging at every step makes few calls.
_BATCH_SECONDS = 0.02
# How long shutdown waits for the answers of calls nobody waits for (flags sent to a role that had gone).
_SETTLE_SECONDS = 2.0


def _ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ImportError("the Ray cluster needs Ray: pip install 'downpour-sgd[ray]'") from exc
    return ray


# Logical CPUs a local Ray (started for one run) declares at least.
_LOCAL_RAY_CPUS = 64


@dataclass(frozen=True, kw_only=True)
class RayCluster:
    """Where roles run as Ray actors: the cluster to join and what each role reserves on it.

    Args:
        address: the cluster to join: its head's ``HOST:PORT``, ``"auto"``
            (the one started on this machine), or ``"ray://HOST:PORT"`` (Ray
            Client). ``None`` starts a local Ray for the run and stops it
            after. A process already connected (``ray.init``) runs its roles
            on that connection's cluster and stays connected.
        num_cpus: logical CPUs each role reserves.
        num_gpus: GPUs each role whose job runs on CUDA reserves; a fraction
            lets roles share a GPU (``0.25``: four workers on one).
        spread: place roles on as many nodes as there are (Ray's ``SPREAD``
            strategy) rather than fill one node first.

    Example:
        >>> RayCluster(address="ray://head:10001", num_cpus=0.5).num_cpus
        0.5
    """

    address: str | None = None
    num_cpus: float = 1.0
    num_gpus: float = 1.0
    spread: bool = True

    def __post_init__(self) -> None:
        if self.address is not None and not self.address.strip():
            raise ValueError("address must be HOST:PORT, 'auto', 'ray://HOST:PORT' or None (a local Ray), got ''")
        check_range("num_cpus", self.num_cpus, 0)
        check_range("num_gpus", self.num_gpus, 0)

    @property
    def host(self) -> str:
        """This machine's IP as the cluster's nodes reach it, for rendezvous the coordinator hosts.

        The source address of this machine's route to the head node (no
        packet is sent); loopback for a local Ray.

        Example:
            >>> RayCluster(address="127.0.0.1:6379").host
            '127.0.0.1'
        """
        if self.address is None:
            return "127.0.0.1"
        head = self.address.removeprefix("ray://").rpartition(":")[0]
        target = "8.8.8.8" if self.address == "auto" or not head else head.strip("[]")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.connect((target, 9))
                return probe.getsockname()[0]
            except OSError:  # no route (an offline machine): the cluster can only be on this one
                return "127.0.0.1"

    def open(self, metrics: Metrics, *, tolerate_worker_deaths: bool = True) -> RayRoles:
        """Connect to the cluster (or start a local Ray) and return the live cluster for one run."""
        return RayRoles(self, metrics, tolerate_worker_deaths=tolerate_worker_deaths)


class _Outbox:
    """A role's events and control messages, waiting in its actor for the coordinator's next drain."""

    def __init__(self) -> None:
        self._items: list[dict[str, Any]] = []
        self._urgent = False  # a control message (publish, done, error) is waiting: no batching
        self._finished = False
        self._takes = 0  # drains begun: one begun after a take means that take's items arrived
        self._changed = threading.Condition()

    def write(self, event: dict[str, Any]) -> None:
        with self._changed:
            self._items.append(event)
            self._urgent = self._urgent or "_control" in event
            self._changed.notify_all()

    def close(self) -> None:
        pass  # the outbox outlives the role's metrics: finish() marks its end

    def finish(self) -> None:
        with self._changed:
            self._finished = True
            self._changed.notify_all()

    def flush(self, timeout: float) -> None:
        """Wait (at most ``timeout`` s) until everything written so far reached the coordinator.

        A drain's items have arrived once the coordinator begins its next drain
        (it drains one call after another), so a role about to die by its own
        hand (a staged fault) waits for that, not just for its items' take.
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            self._urgent = True
            self._changed.notify_all()
            if not self._changed.wait_for(lambda: not self._items, timeout=timeout):
                return
            taken = self._takes
            self._changed.wait_for(lambda: self._takes > taken, timeout=max(0.0, deadline - time.monotonic()))

    def take(self, wait: float) -> list[dict[str, Any]]:
        """Everything written so far, once there is something (or the role ended, or ``wait`` passed)."""
        with self._changed:
            self._takes += 1
            self._changed.notify_all()
            self._changed.wait_for(lambda: self._items or self._finished, timeout=wait)
            if self._items and not (self._urgent or self._finished):
                self._changed.wait_for(lambda: self._urgent or self._finished, timeout=_BATCH_SECONDS)
            items, self._items, self._urgent = self._items, [], False
            return items


def _on_assigned_gpu(role: Any) -> Any:
    """``role`` with its job on ``cuda`` when Ray gave this actor a GPU.

    Ray shows an actor only the GPUs it assigned, as ``cuda:0`` onwards, so
    a device index the coordinator chose for a single host may not exist
    here; the assigned GPU is the one to use.
    """
    job = getattr(role, "job", None)
    if (job is None or not str(getattr(job, "device", "")).startswith("cuda") or not _ray().get_gpu_ids()
            or not dataclasses.is_dataclass(role) or not dataclasses.is_dataclass(job)):
        return role
    return dataclasses.replace(role, job=dataclasses.replace(job, device="cuda"))


def _hold_title(title: str) -> None:
    """Title this actor's process ``ray::TITLE`` for the rest of its life.

    Ray retitles the process around every call it runs (``ray::RoleActor.drain``,
    then ``ray::RoleActor``), and a drain of the coordinator's is nearly always
    in flight, so a title set once would not last a second. The process runs
    this one role until its actor is killed, so the hook Ray retitles through
    becomes one that keeps the role's title. Ray's own ``setproctitle``, not the
    package's: in a Ray worker the package's changes nothing.
    """
    ray = _ray()
    worker = getattr(getattr(ray, "_private", None), "worker", None)
    set_title = getattr(getattr(ray, "_raylet", None), "setproctitle", None)
    if set_title is None or not hasattr(worker, "_changeproctitle"):
        log.debug("this Ray retitles its workers its own way; the role's title is not set")
        return
    full_title = f"ray::{title}"

    @contextlib.contextmanager
    def keep_title(title_during: str, title_after: str) -> Iterator[None]:
        # Again at every call: the call that created the actor began under Ray's own hook,
        # which retitles the process once that call returns.
        set_title(full_title)
        yield

    worker._changeproctitle = keep_title
    set_title(full_title)


class RoleActor:
    """The Ray actor that runs one role: the role on one thread, the coordinator's calls on another.

    Not created directly: :class:`RayRoles` makes one per role.
    """

    def __init__(self, flags: tuple[int, int, int], start_time: float, host: str | None = None,
                 title: str | None = None) -> None:
        # Titled here, before any call of the coordinator's runs (its calls run on two threads).
        if title is not None:  # None: the plain class, outside Ray, leaves its process alone
            _hold_title(title)
        self.stop, self.go, self.end = (Flag(value) for value in flags)
        self.start_time = start_time
        self.host = host  # None: the node's IP
        self.outbox = _Outbox()

    def run(self, role: Role) -> None:
        """Run ``role`` to its end; its last message says how it ended ("done", or "error" with the traceback)."""
        ray = _ray()
        host = self.host or ray.util.get_node_ip_address()
        self.outbox.write({"_control": "placed", "node": ray.get_runtime_context().get_node_id(),
                           "pid": os.getpid(), "host": host})
        ctx = RoleContext(kind=role.kind, rank=role.rank, stop=self.stop, go=self.go, end=self.end,
                          metrics=Metrics([self.outbox], role=role.kind, rank=role.rank, start_time=self.start_time),
                          _sink=self.outbox, host=host)
        try:
            _on_assigned_gpu(role).run(ctx)
        except BaseException as exc:  # noqa: BLE001 - everything is reported to the coordinator
            ctx.send({"_control": "error", "host": host, "reason": f"{type(exc).__name__}: {exc}",
                      "traceback": traceback.format_exc()})
        else:
            ctx.send({"_control": "done"})
        finally:
            self.outbox.finish()

    def drain(self, wait: float) -> list[dict[str, Any]]:
        """The role's messages since the last drain (a long poll: see :meth:`_Outbox.take`)."""
        return self.outbox.take(wait)

    def set_flags(self, stop: int, go: int, end: int) -> None:
        """Raise the flags given as 1. Flags only go up: calls run on a pool of threads and may overtake
        one another, and a late call with fewer flags must not lower one."""
        for flag, value in ((self.stop, stop), (self.go, go), (self.end, end)):
            flag.value = max(flag.value, value)

    def kill(self) -> None:
        """SIGKILL this actor's process (a staged fault), as a crash would end it."""
        os.kill(os.getpid(), signal.SIGKILL)


@cache
def _actor_class() -> Any:
    # Control calls get a thread pool of their own, so they run while the role does.
    return _ray().remote(concurrency_groups={"control": 3}, max_restarts=0)(RoleActor)


def _control(method: Any) -> Any:
    return method.options(concurrency_group="control")


@dataclass
class RayRoleHandle:
    """The coordinator's view of one role started as a Ray actor (a LocalCluster ``RoleHandle`` alike).

    ``node``, ``pid`` and ``host`` say where it runs, once its actor reported them.
    """

    kind: str
    rank: int
    actor: Any = field(repr=False)
    run_ref: Any = field(repr=False)
    drain_ref: Any = field(repr=False, default=None)  # the drain in flight; None once its messages ended
    published: dict[str, Any] = field(default_factory=dict)
    finished: bool = False  # returned normally
    failed: str | None = None  # reason, when it raised or died
    node: str | None = None
    pid: int | None = None
    host: str | None = None
    on_gpu: bool = False  # it reserved GPUs
    killed: bool = False  # by a staged fault
    exit: str | None = None  # how its actor ended, once Ray reported it gone

    @property
    def name(self) -> str:
        return f"{self.kind} {self.rank}"

    @property
    def where(self) -> str:
        return self.host or "a Ray node"

    def alive(self) -> bool:
        """Whether its actor is still running the role (or still starting)."""
        ray = _ray()
        if self.finished or self.failed or self.exit is not None or not ray.is_initialized():
            return False  # (a Ray call after the run disconnected would start a new local Ray)
        ready, _ = ray.wait([self.run_ref], timeout=0)
        return not ready


class RayRoles(Cluster):
    """The roles of one run on a Ray cluster, with :class:`~downpour.cluster.LocalCluster`'s methods.

    Opened by :meth:`RayCluster.open`; use as a context manager: leaving the
    block ends every role, kills every actor it started and disconnects
    (stopping the local Ray it started, if any).

    Example:
        >>> with RayCluster().open(metrics) as cluster:          # doctest: +SKIP
        ...     [server] = cluster.start([ServerRole(...)])
        ...     address = cluster.wait_published(server, "address")
    """

    def __init__(self, config: RayCluster, metrics: Metrics, *, tolerate_worker_deaths: bool = True) -> None:
        super().__init__(metrics, tolerate_worker_deaths=tolerate_worker_deaths)
        ray = _ray()
        self.config = config
        self.host = config.host
        # A local Ray is one node on this machine: roles reach one another on loopback, where the
        # transport moves tensors through shared memory, as on the local cluster.
        self._role_host = "127.0.0.1" if config.address is None else None
        self._flags = [0, 0, 0]  # stop, go, end
        self._loose: list[Any] = []  # answers of calls nobody waits for, collected so Ray does not report them
        self._loose_lock = threading.Lock()
        self._owns_connection = not ray.is_initialized()
        if self._owns_connection:
            # configure_logging=False: a library installs no log handlers (the CLI does).
            options: dict[str, Any] = {"configure_logging": False}
            if config.address is None:
                options["include_dashboard"] = False
                # A local Ray runs this run's roles alone, as many processes as the local cluster
                # would start; Ray's CPUs are scheduling tokens, so declare enough for every role.
                options["num_cpus"] = max(os.cpu_count() or 1, _LOCAL_RAY_CPUS)
            ray.init(address=config.address, **options)

    # ----------------------------------------------------------------- start
    def start(self, roles: list[Role]) -> list[RayRoleHandle]:
        """Start every role in an actor of its own; returns their handles at once (actors start meanwhile)."""
        self._check_capacity(roles)
        actor_class = _actor_class()
        started = []
        counts = role_counts(roles, self.handles)
        for role in roles:
            title = process_title(role.kind, role.rank, counts[role.kind])
            actor = actor_class.options(**self._placement(role)).remote(
                tuple(self._flags), self.metrics.start_time, self._role_host, title)
            handle = RayRoleHandle(role.kind, role.rank, actor, actor.run.remote(role),
                                   _control(actor.drain).remote(_DRAIN_WAIT_SECONDS),
                                   on_gpu=_on_cuda(role))
            self.handles.append(handle)
            started.append(handle)
        return started

    def _placement(self, role: Role) -> dict[str, Any]:
        options: dict[str, Any] = {"num_cpus": self.config.num_cpus}
        if _on_cuda(role):
            options["num_gpus"] = self.config.num_gpus
        if self.config.spread:
            options["scheduling_strategy"] = "SPREAD"
        return options

    def _check_capacity(self, roles: list[Role]) -> None:
        """Refuse roles the cluster could never place all at once (they would wait for resources forever)."""
        total = _ray().cluster_resources()
        live = [h for h in self.handles if not h.finished and not h.failed]
        cpus = self.config.num_cpus * (len(live) + len(roles))
        if cpus > total.get("CPU", 0.0) + 1e-9:
            raise ValueError(
                f"the run needs {cpus:g} CPUs on the Ray cluster ({len(live) + len(roles)} roles x num_cpus="
                f"{self.config.num_cpus:g}), which has {total.get('CPU', 0.0):g}; add nodes or give "
                f"RayCluster(num_cpus=...) a fraction")
        gpu_roles = sum(h.on_gpu for h in live) + sum(_on_cuda(role) for role in roles)
        gpus = self.config.num_gpus * gpu_roles
        if gpus > total.get("GPU", 0.0) + 1e-9:
            raise ValueError(
                f"{gpu_roles} roles on CUDA need {gpus:g} GPUs on the Ray cluster (num_gpus="
                f"{self.config.num_gpus:g} each), which has {total.get('GPU', 0.0):g}; give "
                f"RayCluster(num_gpus=...) a fraction to share GPUs, or run on the CPU")

    def _go(self) -> None:
        self._raise_flags(1)

    def _kill(self, handle: RayRoleHandle) -> None:
        handle.killed = True
        self._keep(_control(handle.actor.kill).remote())

    # ------------------------------------------------------------------ poll
    def poll(self, timeout: float = 0.1) -> None:
        """Forward the roles' events to the metrics; record finished, failed and dead roles.

        Raises WorkerFailed when a role raised, or when a role died and
        deaths are not tolerated (servers are never tolerated).
        """
        self._collect(timeout, strict=True)
        self._check_deaths()

    def _collect(self, timeout: float, *, strict: bool) -> None:
        """Take every answer that arrives within ``timeout``: drained messages and ended actors.

        ``strict``: raise WorkerFailed for a role that raised (else only record it).
        """
        ray = _ray()
        deadline = time.monotonic() + timeout
        while True:
            waiting: dict[Any, tuple[RayRoleHandle, bool]] = {}
            for handle in self.handles:
                if handle.drain_ref is not None:
                    waiting[handle.drain_ref] = (handle, True)
                if handle.exit is None and not handle.finished and not handle.failed:
                    waiting[handle.run_ref] = (handle, False)
            left = max(0.0, deadline - time.monotonic())
            if not waiting:
                time.sleep(left)
                break
            ready, _ = ray.wait(list(waiting), num_returns=1, timeout=left)
            if ready:
                ready, _ = ray.wait(list(waiting), num_returns=len(waiting), timeout=0)
            # Messages first: a role's last ones must be seen before its actor's end is.
            for ref in sorted(ready, key=lambda r: not waiting[r][1]):
                handle, is_drain = waiting[ref]
                if is_drain:
                    self._take_drain(handle, ref, strict=strict)
                else:
                    self._take_run(handle, ref, strict=strict)
            if time.monotonic() >= deadline:
                break
        self._settle_loose()

    def _take_drain(self, handle: RayRoleHandle, ref: Any, *, strict: bool) -> None:
        ray = _ray()
        handle.drain_ref = None
        try:
            messages = ray.get(ref)
        except ray.exceptions.RayActorError:  # its actor is gone; the run ref says how
            return
        except ray.exceptions.RayError as exc:  # its messages are lost: what it said last is unknown
            self._fail(handle, f"its messages were lost: {_first_line(exc)}", str(exc), strict=strict)
            return
        for message in messages:
            self._handle(handle, message, strict=strict)
        if not (handle.finished or handle.failed):
            handle.drain_ref = _control(handle.actor.drain).remote(_DRAIN_WAIT_SECONDS)

    def _take_run(self, handle: RayRoleHandle, ref: Any, *, strict: bool) -> None:
        ray = _ray()
        try:
            ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            handle.exit = "its process was killed (SIGKILL)" if handle.killed else f"its actor died: {_first_line(exc)}"
            return
        except ray.exceptions.RayError as exc:  # the role never ran: it could not be unpickled on its node
            self._fail(handle, f"{type(exc).__name__}: {_first_line(exc)}", str(exc), strict=strict)
            return
        handle.exit = "returned"  # its "done" or "error" is among the messages still to drain

    def _handle(self, handle: RayRoleHandle, item: dict[str, Any], *, strict: bool) -> None:
        control = item.get("_control")
        if control is None:
            self.metrics.forward(item)
        elif control == "publish":
            handle.published[item["key"]] = item["value"]
        elif control == "placed":
            handle.node, handle.pid, handle.host = item["node"], item["pid"], item["host"]
            # The run's event log records where every role ran.
            self.metrics.log(0, {"cluster/node": handle.node, "cluster/host": handle.host},
                             role=handle.kind, rank=handle.rank)
        elif control == "done":
            handle.finished = True
            self._release(handle)
        elif control == "error":
            self._fail(handle, item["reason"], item["traceback"], strict=strict)

    def _fail(self, handle: RayRoleHandle, reason: str, remote_traceback: str, *, strict: bool) -> None:
        handle.failed = reason
        self._release(handle)
        if strict:
            raise WorkerFailed(handle.kind, handle.rank, handle.where, reason, remote_traceback)

    def _release(self, handle: RayRoleHandle) -> None:
        """End the actor of a role that has ended, so its resources go back to the cluster."""
        if handle.drain_ref is not None:
            self._keep(handle.drain_ref)
            handle.drain_ref = None
        _ray().kill(handle.actor, no_restart=True)

    def _check_deaths(self) -> None:
        for handle in list(self.handles):
            if handle.finished or handle.failed or handle.exit is None or handle.drain_ref is not None:
                continue  # alive, ended as it said, or its last messages are still in transit
            if handle.exit == "returned":
                handle.failed = "its actor returned without saying how the role ended"
            else:
                handle.failed = handle.exit
            self._release(handle)
            self._died(handle)

    def _keep(self, ref: Any) -> None:
        with self._loose_lock:
            self._loose.append(ref)

    def _settle_loose(self, timeout: float = 0.0) -> None:
        """Collect the answers nobody waits for (errors included), so Ray does not log them as unhandled."""
        ray = _ray()
        with self._loose_lock:
            loose, self._loose = self._loose, []
        if not loose:
            return
        ready, pending = ray.wait(loose, num_returns=len(loose), timeout=timeout)
        for ref in ready:
            try:
                ray.get(ref)
            except ray.exceptions.RayError:
                pass
        with self._loose_lock:
            self._loose.extend(pending)

    @property
    def ended(self) -> bool:
        """Whether the coordinator told every role the run is over."""
        return bool(self._flags[2])

    # -------------------------------------------------------------- shutdown
    def _raise_flags(self, *indices: int) -> None:
        """Set the flags at ``indices`` (0 stop, 1 go, 2 end) here and in every running role."""
        if all(self._flags[i] for i in indices):
            return
        for i in indices:
            self._flags[i] = 1
        for handle in self.handles:
            if not (handle.finished or handle.failed or handle.exit):
                self._keep(_control(handle.actor.set_flags).remote(*self._flags))

    def request_stop(self) -> None:
        """Ask workers to wind down; servers keep serving until :meth:`end`."""
        self._raise_flags(0)

    def end(self) -> None:
        """Tell every role the run is over."""
        self._raise_flags(0, 2)

    def shutdown(self, grace: float = 5.0) -> None:
        """End every role: tell them, take their last messages for ``grace`` seconds, then kill their actors."""
        ray = _ray()
        for timer in self._timers:
            timer.cancel()
        try:
            self.end()
            deadline = time.monotonic() + grace
            while any(h.drain_ref is not None for h in self.handles) and time.monotonic() < deadline:
                self._collect(0.05, strict=False)
            for handle in self.handles:
                if handle.drain_ref is not None:
                    self._keep(handle.drain_ref)
                    handle.drain_ref = None
                if not (handle.finished or handle.failed):
                    ray.kill(handle.actor, no_restart=True)
                if handle.exit is None:
                    self._keep(handle.run_ref)
                    handle.exit = "ended with the run"
            self._settle_loose(timeout=_SETTLE_SECONDS)
        finally:
            if self._owns_connection:
                ray.shutdown()


def _on_cuda(role: Role) -> bool:
    return str(getattr(getattr(role, "job", None), "device", "cpu")).startswith("cuda")


def _first_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
