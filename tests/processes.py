"""Finding the processes a test started."""

from __future__ import annotations

import os
from pathlib import Path


def child_processes(pid: int | None = None) -> list[tuple[int, str]]:
    """Live descendants of ``pid`` (default: this process), except multiprocessing's own helpers.

    The resource tracker and the fork server (which roles are forked from)
    live as long as the process that started them; the roles are what a test
    must not leave behind.
    """
    pid = os.getpid() if pid is None else pid
    parents: dict[int, int] = {}
    names: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if fields[0] == "Z":
            continue
        parents[int(entry.name)] = int(fields[1])
        names[int(entry.name)] = cmdline
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid != parent:
                continue
            frontier.append(child)
            # Roles forked by the fork server share its command line; the server is the one
            # whose parent is not itself a fork server.
            helper = "resource_tracker" in names[child] or (
                "multiprocessing.forkserver" in names[child]
                and "multiprocessing.forkserver" not in names.get(parent, ""))
            if not helper:
                found.append((child, names[child]))
    return found


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
