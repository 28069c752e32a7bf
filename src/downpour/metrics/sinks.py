"""Sinks that receive metric events, and the fan-out that feeds them."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

Event = dict[str, Any]


@runtime_checkable
class Sink(Protocol):
    """Receives events: flat dicts with ``time``, ``role``, ``rank``, ``step`` and metric keys."""

    def write(self, event: Event) -> None: ...

    def close(self) -> None: ...


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _jsonable(value.item())
    return value


class JsonlSink:
    """Appends one JSON object per event to a file (the run's ``events.jsonl``).

    Lines are buffered and flushed every ``flush_every`` events and on close,
    so logging every step costs little.
    """

    def __init__(self, path: str | Path, *, flush_every: int = 50) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        self._flush_every = flush_every
        self._pending = 0

    def write(self, event: Event) -> None:
        line = json.dumps({k: _jsonable(v) for k, v in event.items()}, separators=(",", ":"))
        self._file.write(line + "\n")
        self._pending += 1
        if self._pending >= self._flush_every:
            self._file.flush()
            self._pending = 0

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


class MemorySink:
    """Keeps events in a list (tests, and the history of a TrainResult)."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def write(self, event: Event) -> None:
        self.events.append(event)

    def close(self) -> None:
        pass


class ProgressSink:
    """Progress as the run goes: steps (or the strategy's own unit), loss, accuracy, samples/s.

    The total and its unit come from the coordinator's ``start`` event
    (``progress/total``, ``progress/unit``); the count from every worker's
    ``worker/steps`` (or the coordinator's ``progress/step``). Samples per
    second are the summary's: samples so far over the time since the start
    mark, and at the end exactly the summary's figure. On a terminal it is a
    rich progress bar; elsewhere (a log file, CI) a plain line every
    ``interval`` seconds and one at the end, never cut columns.
    """

    def __init__(self, total_steps: int | None, description: str = "training", *,
                 terminal: bool | None = None, interval: float = 5.0, stream: Any = None) -> None:
        import sys

        self.stream = stream if stream is not None else sys.stderr
        self.terminal = self.stream.isatty() if terminal is None else terminal
        self.description, self.total, self.unit, self.interval = description, total_steps, "steps", interval
        self.completed, self.loss, self.acc, self.rate = 0, "-", "-", "-"
        self.loss_label = "loss"
        self._start: float | None = None
        self._last_line = -math.inf
        self._worker_steps: dict[int, int] = {}
        self._worker_samples: dict[int, int] = {}
        # The bar appears with the run's start mark, not before: a refused run draws none.
        self._progress = None

    def _bar(self, total: int | None) -> tuple[Any, Any]:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}"),
            TextColumn("{task.fields[label]} {task.fields[loss]}"),
            TextColumn("acc {task.fields[acc]}"),
            TextColumn("{task.fields[rate]} samples/s"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(file=self.stream),
            transient=False,
        )
        task = progress.add_task(self.description, total=total, loss="-", acc="-", rate="-", unit=self.unit,
                                 label=self.loss_label)
        progress.start()
        return progress, task

    def write(self, event: Event) -> None:
        now = float(event.get("time", 0.0))
        if event.get("event") == "start":
            self._start = now
            if self.terminal and self._progress is None:
                self._progress, self._task = self._bar(event.get("progress/total") or self.total)
            if event.get("progress/total"):
                self.total = int(event["progress/total"])
            self.unit = event.get("progress/unit", self.unit)
        for key, label in (("train/loss", "loss"), ("train/objective", "objective")):
            if isinstance(event.get(key), (int, float)):
                self.loss, self.loss_label = f"{event[key]:.4f}", label
        if isinstance(event.get("eval/accuracy"), (int, float)):
            self.acc = f"{event['eval/accuracy']:.4f}"
        if event.get("role") == "worker" and "worker/steps" in event:
            self._worker_samples[event["rank"]] = event.get("worker/samples", 0)
            if self.unit == "steps":
                self._worker_steps[event["rank"]] = event["worker/steps"]
                self.completed = sum(self._worker_steps.values())
        elif event.get("role", "coordinator") == "coordinator" and "progress/step" in event:
            self.completed = int(event["progress/step"])
        samples = event.get("progress/samples", sum(self._worker_samples.values()))
        if self._start is not None and now > self._start and samples:
            self.rate = f"{samples / (now - self._start):,.0f}"
        if event.get("event") == "end":
            self.completed = int(event.get("run/steps", self.completed))
            if self.unit != "steps":
                self.completed = int(event.get("run/iterations") or event.get("progress/step") or self.completed)
            train = event.get("run/train_seconds")
            if train:
                self.rate = f"{event.get('run/samples', 0) / train:,.0f}"
            if self.total is not None and self.completed > self.total:
                self.total = self.completed  # a run that took more than planned ends full, not past the end
        if self._start is not None:
            self._show(now, final=event.get("event") == "end")

    def _show(self, now: float, *, final: bool = False) -> None:
        if self._progress is not None:
            self._progress.update(self._task, total=self.total, completed=self.completed, loss=self.loss,
                                  acc=self.acc, rate=self.rate, unit=self.unit, label=self.loss_label)
            return
        if not final and now - self._last_line < self.interval:
            return
        self._last_line = now
        total = f"/{self.total}" if self.total else ""
        print(f"{self.description}: {self.unit} {self.completed}{total}, {self.loss_label} {self.loss}, "
              f"acc {self.acc}, {self.rate} samples/s, {now:.1f} s", file=self.stream, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()


class TensorBoardSink:
    """Writes every numeric metric as a TensorBoard scalar (torch's ``SummaryWriter``).

    Tags are ``<role><rank>/<key>`` for workers and servers and ``<key>`` for
    the coordinator, so one run's roles appear side by side. Needs the
    ``tensorboard`` package (``pip install downpour-sgd[tensorboard]``).
    """

    def __init__(self, log_dir: str | Path, start_time: float | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # the writer needs the tensorboard package
            raise ImportError("--tensorboard needs the tensorboard package: pip install tensorboard") from exc
        self._writer = SummaryWriter(log_dir=str(log_dir))
        self._start = time.time() if start_time is None else start_time

    def write(self, event: Event) -> None:
        role = event.get("role", "coordinator")
        prefix = "" if role == "coordinator" else f"{role}{event.get('rank', 0)}/"
        step = int(event.get("step", 0))
        walltime = self._start + float(event.get("time", 0.0))
        for key, value in event.items():
            if key in ("time", "role", "rank", "step") or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)) and math.isfinite(value):
                self._writer.add_scalar(prefix + key, value, step, walltime=walltime)

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()


class Metrics:
    """The one place roles log through: stamps events and fans them out to sinks.

    Example:
        >>> sink = MemorySink()
        >>> metrics = Metrics([sink], role="worker", rank=1)
        >>> metrics.log(10, {"train/loss": 0.5})
        >>> sink.events[0]["role"], sink.events[0]["train/loss"]
        ('worker', 0.5)
    """

    def __init__(
        self,
        sinks: Iterable[Sink] = (),
        *,
        role: str = "coordinator",
        rank: int = 0,
        start_time: float | None = None,
    ) -> None:
        self.sinks = list(sinks)
        self.role = role
        self.rank = rank
        self.start_time = time.time() if start_time is None else start_time

    def elapsed(self) -> float:
        return time.time() - self.start_time

    def log(self, step: int, values: dict[str, Any], *, role: str | None = None, rank: int | None = None) -> None:
        event: Event = {
            "time": round(self.elapsed(), 6),
            "role": self.role if role is None else role,
            "rank": self.rank if rank is None else rank,
            "step": int(step),
        }
        event.update(values)
        self.forward(event)

    def forward(self, event: Event) -> None:
        """Pass an already stamped event (say, from a remote role) to every sink."""
        for sink in self.sinks:
            sink.write(event)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def read_events(path: str | Path) -> Iterator[Event]:
    """Yield the events of an ``events.jsonl`` file; a malformed line raises ValueError with its number."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no event log at {path}")
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: malformed event line: {exc.msg}") from None
