"""Peak resident memory of this process and of the roles it started (Linux).

A role's peak is the kernel's own high-water mark of its resident set
(``VmHWM`` in ``/proc/<pid>/status``), so a sampler that reads it now and
then misses nothing but what a role adds after its last reading.

Example:
    >>> with RoleMemory() as roles:  # doctest: +SKIP
    ...     dp.train(...)
    >>> roles.peaks  # doctest: +SKIP
    {'downpour: worker 0/2 [4242]': 412000000, ...}
"""

from __future__ import annotations

import os
import resource
import sys
import threading
from pathlib import Path

__all__ = ["RoleMemory", "peak_rss"]


def peak_rss() -> int:
    """This process's peak resident set, in bytes.

    On Linux the kernel's ``VmHWM``: ``getrusage``'s ``ru_maxrss`` survives
    ``exec``, so a process started from a large one would report its
    parent's size. Elsewhere ``ru_maxrss`` (KiB, bytes on macOS).
    """
    peak = _high_water_mark(os.getpid())
    if peak is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _high_water_mark(pid: int) -> int | None:
    """``VmHWM`` of process ``pid`` in bytes, or None where /proc does not tell it."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


class RoleMemory:
    """Samples the peak resident set of every process descended from this one, by title.

    Roles a :class:`~downpour.cluster.LocalCluster` starts carry their role in
    their title (``downpour worker 0``), so the peaks are keyed by the
    process's command line; multiprocessing's helpers (the fork server, the
    resource tracker) are left out. Each process's peak is its own:
    a worker's DataLoader processes are counted apart from it.

    Args:
        interval: seconds between readings.
    """

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self._seen: dict[int, tuple[str, int]] = {}  # pid -> (its latest title, its peak)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_until_stopped, daemon=True,
                                        name="downpour-memory")

    def __enter__(self) -> RoleMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10 * self.interval + 5)

    @property
    def peaks(self) -> dict[str, int]:
        """Each process's peak resident set in bytes, by ``"<title> [<pid>]"``."""
        return {f"{title} [{pid}]": peak for pid, (title, peak) in self._seen.items()}

    def _sample_until_stopped(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        """Read every descendant's peak now."""
        for pid, title in _descendants(os.getpid()):
            peak = _high_water_mark(pid)
            if peak is not None:  # else it ended between the listing and the reading
                # A role read before it set its title is the same process as after.
                self._seen[pid] = (title, max(peak, self._seen.get(pid, ("", 0))[1]))


def _descendants(root: int) -> list[tuple[int, str]]:
    parents: dict[int, int] = {}
    titles: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        parents[int(entry.name)] = int(stat[stat.rfind(")") + 2:].split()[1])
        titles[int(entry.name)] = cmdline.strip()
    found, frontier = [], [root]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent:
                frontier.append(child)
                if "resource_tracker" in titles[child]:
                    continue
                if ("multiprocessing.forkserver" in titles[child]
                        and "multiprocessing.forkserver" not in titles.get(parent, "")):
                    continue  # the fork server itself; the roles it forks are kept
                found.append((child, titles[child]))
    return found
