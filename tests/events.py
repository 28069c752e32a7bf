"""Reading a run's events in a test: a run directory's ``events.jsonl``, each worker's reports."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

Event = dict[str, Any]


def read(run_dir: str | Path) -> list[Event]:
    """The events of ``run_dir``'s ``events.jsonl`` (``run_dir`` may name the file itself).

    A run still writing may have a last line not yet whole: it is left out,
    so a test can poll a live run's log. A missing log reads as no events.

    Example:
        >>> read("/nonexistent/run")
        []
    """
    path = Path(run_dir)
    if path.is_dir() or not path.name.endswith(".jsonl"):
        path = path / "events.jsonl"
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")
    # The text after the last newline is a line still being written (or nothing).
    return [json.loads(line) for line in lines[:-1] if line.strip()]


def last_reports(events: Iterable[Event], key: str) -> dict[int, Event]:
    """Each worker's last event that carries ``key``, by rank (events carry role and rank)."""
    last: dict[int, Event] = {}
    for event in events:
        if event.get("role") == "worker" and key in event:
            last[event["rank"]] = event
    return last


def per_rank(events: Iterable[Event], key: str) -> dict[int, Any]:
    """Each worker's last report of ``key``, by rank: its own count, where ``key`` is a counter."""
    return {rank: event[key] for rank, event in last_reports(events, key).items()}


def summed(events: Iterable[Event], key: str) -> Any:
    """A cumulative counter summed over every role's last report of it, as the summary sums bytes."""
    last: dict[tuple[str, int], Any] = {}
    for event in events:
        if event.get(key) is not None:
            last[event["role"], event["rank"]] = event[key]
    return sum(last.values())
