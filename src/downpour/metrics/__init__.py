"""Metrics: one sink interface with hierarchical keys, evaluation, summaries, plots.

Keys are hierarchical (``train/loss``, ``eval/accuracy``, ``comm/bytes_sent``,
``ps/staleness``). Every role writes events through a :class:`Sink`; the run's
event log (``events.jsonl``) is the single source from which summaries and
plots are rebuilt.
"""

from downpour.models.evaluate import evaluate
from downpour.metrics.plots import plot_run
from downpour.metrics.rundir import RunDir, new_run_id
from downpour.metrics.sinks import (
    JsonlSink,
    MemorySink,
    Metrics,
    ProgressSink,
    Sink,
    TensorBoardSink,
    read_events,
)
from downpour.metrics.summary import SUMMARY_KEYS, TrainResult, compression_counters, summarize

__all__ = [
    "SUMMARY_KEYS",
    "JsonlSink",
    "MemorySink",
    "Metrics",
    "ProgressSink",
    "RunDir",
    "Sink",
    "TensorBoardSink",
    "TrainResult",
    "evaluate",
    "new_run_id",
    "plot_run",
    "read_events",
    "compression_counters",
    "summarize",
]
