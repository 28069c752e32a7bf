"""LocalCluster: every role a process on this host, forked from a server that has imported torch.

Roles start through multiprocessing's ``forkserver``: one clean process,
started once per coordinator, imports torch and numpy (seconds of CPU) and
forks every role from there, so a role is ready in milliseconds instead of
re-importing torch as a ``spawn``ed process must. Nothing but imports happens
in the fork server (no threads, no sockets, no CUDA), which is what makes
forking it safe; the role, its data and its pipe reach the child pickled,
as with ``spawn``.

Either way a role's process imports the main module before it unpickles its
role, so a script that starts a run at module level, outside
``if __name__ == "__main__":``, would start it again in every role: the
role leaves at once, and the coordinator raises one
:class:`~downpour.errors.UnguardedMain` naming the script.

Each role's process is titled ``downpour: KIND RANK/COUNT`` (``ps`` shows
``downpour: worker 3/4``).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing as mp
import os
import queue as queue_lib
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from setproctitle import setproctitle

from downpour.cluster.base import Cluster
from downpour.cluster.role import Role, RoleContext, process_title, role_counts
from downpour.errors import UnguardedMain, WorkerFailed
from downpour.metrics import Metrics

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1

# Every role's process is named so (multiprocessing's name, not the title ps shows).
_PROCESS_PREFIX = "downpour-"
# The exit code of a role whose process, importing the main module, was asked to start a run
# (sysexits' EX_USAGE): the coordinator raises UnguardedMain for it.
_UNGUARDED_MAIN_EXIT = 64


# What the fork server imports before it forks roles: the slow imports every role makes.
# torch._dynamo is what a role's first torch.optim optimizer imports (1-2 s); downpour's
# own modules are what unpickling a role imports. None starts a thread or a socket.
_PRELOAD = ["torch", "numpy", "torch._dynamo", "downpour.strategies", "downpour.server.role"]


def _context() -> Any:
    """The multiprocessing context roles start in: ``forkserver`` with torch preloaded, else ``spawn``."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)
    return context


def _refuse_a_run_while_importing_main() -> None:
    """Raise UnguardedMain if this process, being started, is still importing the main module.

    A process that multiprocessing starts with ``forkserver`` or ``spawn``
    runs the main module (as ``__mp_main__``) before it unpickles its role;
    ``_inheriting`` is multiprocessing's own mark of that phase, the one its
    "bootstrapping phase" error looks at. A cluster opened then is the
    script starting a run at import time. The error unwinds the script's own
    ``with`` and ``finally`` blocks; then, in a role's process, the exit code
    tells the coordinator, which raises the one error the user sees (instead
    of a traceback from every role and "exited with code 1").
    """
    process = mp.current_process()
    if not getattr(process, "_inheriting", False):
        return
    main = sys.modules.get("__mp_main__") or sys.modules["__main__"]
    error = UnguardedMain(getattr(main, "__file__", None) or getattr(main, "__name__", "?"))
    if process.name.startswith(_PROCESS_PREFIX):
        hook = sys.excepthook

        def exit_quietly(kind, value, tb) -> None:
            if value is error:
                os._exit(_UNGUARDED_MAIN_EXIT)
            hook(kind, value, tb)

        # multiprocessing reports an error of the start-up with sys.excepthook, then exits with 1.
        sys.excepthook = exit_quietly
    raise error


def _main_path() -> str | None:
    """The main module's file, which role processes import; None under ``python -c`` or a REPL."""
    main = sys.modules.get("__main__")
    return getattr(main, "__file__", None)


def _die_with_parent(coordinator_pid: int) -> None:
    """Ask Linux to SIGKILL this process when its parent dies, so no role is orphaned.

    The parent is the fork server, which exits when the coordinator does, once
    no role holds the "coordinator alive" pipe the server hands each child:
    roles start no processes of their own, so they let go of it.
    """
    from multiprocessing import forkserver

    alive = getattr(forkserver._forkserver, "_forkserver_alive_fd", None)
    if alive is not None and os.getpid() != coordinator_pid:
        with contextlib.suppress(OSError):
            os.close(alive)
        forkserver._forkserver._forkserver_alive_fd = None
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # not Linux: the coordinator's shutdown path still reaps us
        return
    try:
        os.kill(coordinator_pid, 0)
    except ProcessLookupError:  # the coordinator died before prctl took effect
        os._exit(1)


def _role_main(role: Role, conn, flags, start_time: float, parent_pid: int, title: str) -> None:
    _die_with_parent(parent_pid)
    setproctitle(title)
    # Ctrl-C reaches the whole process group; the coordinator alone decides how to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ctx = RoleContext.create(role.kind, role.rank, conn, flags, start_time)
    try:
        role.run(ctx)
    except BaseException as exc:  # noqa: BLE001 - everything is reported, then turned into an exit code
        ctx.send({"_control": "error", "host": socket.gethostname(),
                  "reason": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
        conn.close()
        os._exit(1)
    ctx.send({"_control": "done"})
    conn.close()


@dataclass
class RoleHandle:
    """The coordinator's view of one started role."""

    kind: str
    rank: int
    process: Any
    conn: Any = field(repr=False, default=None)
    published: dict[str, Any] = field(default_factory=dict)
    finished: bool = False  # returned normally
    failed: str | None = None  # reason, when it raised or died

    @property
    def name(self) -> str:
        return f"{self.kind} {self.rank}"

    @property
    def where(self) -> str:
        return socket.gethostname()

    def alive(self) -> bool:
        return self.process.is_alive()


class LocalCluster(Cluster):
    """Runs roles as processes on this machine and reaps every one of them.

    Use as a context manager: leaving the block (normally, on an exception or
    on Ctrl-C) stops every process it started.

    Example:
        >>> with LocalCluster(metrics) as cluster:          # doctest: +SKIP
        ...     [server] = cluster.start([ServerRole(...)])
        ...     address = cluster.wait_published(server, "address")
    """

    def __init__(self, metrics: Metrics, *, tolerate_worker_deaths: bool = True) -> None:
        _refuse_a_run_while_importing_main()
        super().__init__(metrics, tolerate_worker_deaths=tolerate_worker_deaths)
        self._mp = _context()
        self.stop_flag = self._mp.RawValue("b", 0)
        self.go_flag = self._mp.RawValue("b", 0)
        self.end_flag = self._mp.RawValue("b", 0)
        self.host = "127.0.0.1"  # where the roles and the coordinator reach one another
        # A reader thread drains every role's pipe at once, so a role never
        # blocks on a full pipe while the coordinator is busy evaluating.
        self._inbox: queue_lib.Queue = queue_lib.Queue()
        self._lock = threading.Lock()
        self._closing = False
        self._reader = threading.Thread(target=self._read_pipes, name="downpour-role-reader", daemon=True)
        self._reader.start()

    # ----------------------------------------------------------------- start
    def start(self, roles: list[Role]) -> list[RoleHandle]:
        started = []
        counts = role_counts(roles, self.handles)
        for role in roles:
            receiver, sender = self._mp.Pipe(duplex=False)
            flags = (self.stop_flag, self.go_flag, self.end_flag)
            title = process_title(role.kind, role.rank, counts[role.kind])
            process = self._mp.Process(
                target=_role_main,
                args=(role, sender, flags, self.metrics.start_time, os.getpid(), title),
                name=f"{_PROCESS_PREFIX}{role.kind}-{role.rank}",
                daemon=True,
            )
            process.start()
            sender.close()  # the child holds the only writing end: EOF means it is gone
            handle = RoleHandle(role.kind, role.rank, process, receiver)
            with self._lock:
                self.handles.append(handle)
            started.append(handle)
        return started

    def _read_pipes(self) -> None:
        from multiprocessing.connection import wait

        open_conns: dict[Any, RoleHandle] = {}
        while not self._closing:
            with self._lock:
                for handle in self.handles:
                    if handle.conn is not None and handle.conn not in open_conns and not handle.conn.closed:
                        open_conns[handle.conn] = handle
            if not open_conns:
                time.sleep(0.01)
                continue
            for conn in wait(list(open_conns), timeout=0.05):
                handle = open_conns[conn]
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    del open_conns[conn]
                    handle.conn = None
                    continue
                self._inbox.put((handle, message))

    def _go(self) -> None:
        self.go_flag.value = 1

    def _kill(self, handle: RoleHandle) -> None:
        os.kill(handle.process.pid, signal.SIGKILL)

    # ------------------------------------------------------------------ poll
    def poll(self, timeout: float = 0.1) -> None:
        """Forward queued events to the metrics; record finished, failed and dead roles.

        Raises WorkerFailed when a role raised, or when a role died and
        deaths are not tolerated (servers are never tolerated).
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                handle, item = self._inbox.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue_lib.Empty:
                break
            self._handle(handle, item)
            if handle.finished or handle.failed or time.monotonic() >= deadline:
                break  # a role ended: the caller looks at once, not at the end of the timeout
        self._check_deaths()

    def _handle(self, handle: RoleHandle, item: dict[str, Any]) -> None:
        control = item.get("_control")
        if control is None:
            self.metrics.forward(item)
        elif control == "publish":
            handle.published[item["key"]] = item["value"]
        elif control == "done":
            handle.finished = True
        elif control == "error":
            handle.failed = item["reason"]
            dead = self._died_before(handle)
            if dead is not None:
                # A peer's death is the cause; this role's error (a broken collective) the consequence.
                raise WorkerFailed(dead.kind, dead.rank, socket.gethostname(),
                                   f"{self._death(dead)}; then {handle.name} failed: {item['reason']}",
                                   item["traceback"])
            raise WorkerFailed(handle.kind, handle.rank, item["host"], item["reason"], item["traceback"])

    def _died_before(self, failing: RoleHandle) -> RoleHandle | None:
        """A role other than ``failing`` that was killed or crashed and whose death is not yet noticed."""
        for handle in self.handles:
            if (handle is not failing and not handle.finished and handle.failed is None and not handle.alive()
                    and handle.process.exitcode):
                return handle
        return None

    @staticmethod
    def _death(handle: RoleHandle) -> str:
        code = handle.process.exitcode
        return f"{handle.name} died: process exited with code {code}" + (
            f" (signal {signal.Signals(-code).name})" if code is not None and code < 0 else "")

    def _check_deaths(self) -> None:
        for handle in list(self.handles):
            if handle.finished or handle.failed or handle.alive():
                continue
            code = handle.process.exitcode
            if code == 0 or handle.conn is not None or not self._inbox.empty():
                # Its last messages ("done", or the error with its traceback) may still be in transit.
                continue
            handle.failed = self._death(handle).split(": ", 1)[1]
            path = _main_path()
            if code == _UNGUARDED_MAIN_EXIT and path is not None:
                # Every role would fail so, and a restarted one too: the run cannot start.
                raise UnguardedMain(path)
            self._died(handle)

    @property
    def ended(self) -> bool:
        """Whether the coordinator told every role the run is over."""
        return bool(self.end_flag.value)

    # -------------------------------------------------------------- shutdown
    def request_stop(self) -> None:
        """Ask workers to wind down; servers keep serving until :meth:`end`."""
        self.stop_flag.value = 1

    def end(self) -> None:
        """Tell every role the run is over."""
        self.stop_flag.value = 1
        self.end_flag.value = 1

    def shutdown(self, grace: float = 5.0) -> None:
        """Stop every role: set the stop event, wait ``grace`` seconds, then terminate and kill."""
        for timer in self._timers:
            timer.cancel()
        self.end()
        deadline = time.monotonic() + grace
        for handle in self.handles:
            handle.process.join(max(0.0, deadline - time.monotonic()))
        for handle in self.handles:
            if handle.process.is_alive():
                handle.process.terminate()
        for handle in self.handles:
            handle.process.join(2.0)
            if handle.process.is_alive():
                handle.process.kill()
                handle.process.join(2.0)
        # Give the reader a moment to take the last events out of the pipes.
        deadline = time.monotonic() + 1.0
        while any(h.conn is not None for h in self.handles) and time.monotonic() < deadline:
            time.sleep(0.01)
        self._closing = True
        self._reader.join(1.0)
        while True:
            try:
                _, item = self._inbox.get_nowait()
            except queue_lib.Empty:
                break
            if item.get("_control") is None:
                self.metrics.forward(item)
        for handle in self.handles:
            if handle.conn is not None:
                handle.conn.close()
