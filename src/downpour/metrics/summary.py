"""The run summary (``summary.json``) and the result of ``downpour.train``.

The summary is computed from the event log alone, so ``downpour report`` can
rebuild it and scripts can trust its keys. Keep :data:`SUMMARY_KEYS` stable.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from downpour.compress import compression_counters  # noqa: F401  (re-exported: older imports)
from downpour.metrics.sinks import Event

#: Keys every ``summary.json`` holds, whatever the strategy.
SUMMARY_KEYS = (
    "strategy",
    "dataset",
    "model",
    "workers",
    "servers",
    "accuracy",
    "best_accuracy",
    "loss",
    "seconds",
    "samples",
    "samples_per_second",
    "steps",
    "target_accuracy",
    "time_to_target",
    "bytes_sent",
    "bytes_received",
    "pushes",
    "pulls",
    "staleness_mean",
    "staleness_p95",
    "staleness_max",
    "dropped_gradients",
    "rounds",
    "iterations",
    "bytes_raw",
    "bytes_encoded",
    "compression_ratio",
    "restarts",
    "lost_updates",
    "run_dir",
    "eval_seconds",
    "wall_seconds",
    "diverged",
    "attempts",
    "majority_share",
    "balanced_accuracy",
    "degenerate",
    "converged",
    "stop_reason",
    "task",
    "metric",
    "metric_name",
    "best_metric",
    "target_metric",
    "user_metrics",
)

# Counters that roles report cumulatively; the summary adds the last value of each role.
_CUMULATIVE = {
    "bytes_sent": "comm/bytes_sent",
    "bytes_received": "comm/bytes_received",
    "pushes": "comm/pushes",
    "pulls": "comm/pulls",
    "dropped_gradients": "worker/dropped",  # a worker gradient any shard dropped
    # Compressed messages only: their size uncompressed (4 bytes an element) and on the wire.
    "bytes_raw": "comm/raw_bytes",
    "bytes_encoded": "comm/encoded_bytes",
}


def degenerate(evaluation: dict[str, Any]) -> bool:
    """Whether an evaluation is of a model that learnt nothing beyond the class shares.

    It predicts a single class, or its accuracy is within half a point of
    the majority class's share (what always predicting that class scores).

    Example:
        >>> degenerate({"eval/accuracy": 0.9703, "eval/majority_share": 0.9703, "eval/predicted_classes": 1})
        True
    """
    if "eval/majority_share" not in evaluation:
        return False
    return (evaluation.get("eval/predicted_classes", 2) <= 1
            or abs(evaluation["eval/accuracy"] - evaluation["eval/majority_share"]) <= 0.005)


def _last_per_role(events: list[Event], key: str) -> float:
    last: dict[tuple[str, int, int], float] = {}
    for e in events:
        if e.get(key) is not None:  # a restarted worker counts afresh: each process is its own
            last[(e.get("role", ""), e.get("rank", 0), e.get("worker/incarnation", 0))] = e[key]
    return sum(last.values())


def summarize(events: Iterable[Event], config: dict[str, Any]) -> dict[str, Any]:
    """Build the flat summary of a run from its events and resolved configuration.

    ``config`` supplies ``strategy``, ``dataset``, ``model``, ``workers``,
    ``servers``, ``target_accuracy`` and ``run_dir``; everything measured comes
    from the events: the coordinator's ``eval/*`` events and its final
    ``run/*`` event, every role's cumulative ``comm/*`` counters, and every
    ``ps/staleness`` value (one per applied push, or lists of them) and
    ``ps/staleness_counts`` histogram (staleness -> count of applied pushes).
    """
    events = list(events)
    evals = [e for e in events if e.get("eval/accuracy") is not None and e.get("role") == "coordinator"]
    # Every task's evaluations (a regression's have a loss but no accuracy).
    scored = [e for e in events
              if e.get("eval/loss") is not None and e.get("role") == "coordinator"]
    end = next((e for e in reversed(events) if e.get("event") == "end"), {})
    target = config.get("target_accuracy")

    staleness: list[float] = []
    for e in events:
        value = e.get("ps/staleness")
        if isinstance(value, list):
            staleness.extend(value)
        elif value is not None:
            staleness.append(value)
        for stale, count in (e.get("ps/staleness_counts") or {}).items():
            staleness.extend([int(stale)] * int(count))

    # Times count from the coordinator's start mark (training, not process start-up), and on
    # from the attempts before it in a resumed run.
    time_to_target = None
    if target is not None or config.get("target_metric") is not None:
        start, before = 0.0, 0.0
        for e in events:
            if e.get("role", "coordinator") != "coordinator":
                continue
            if e.get("event") == "start":
                start = e["time"]
            elif e.get("event") == "interrupted":
                before += float(e.get("run/seconds", 0.0))
            elif e.get("eval/target_reached") or (target is not None
                                                   and (e.get("eval/accuracy") or -1.0) >= target):
                time_to_target = before + max(0.0, e["time"] - start)
                break

    # The run's training time, the same for every strategy (downpour.run.coordinator): from the
    # start mark to the last worker's end, less evaluations only where they stopped training.
    # A resumed run's log holds every attempt: each interrupted one's time adds to the last one's,
    # while steps and samples are counted on from where the workers were (the last end holds them all).
    attempts = [e for e in events if e.get("event") in ("interrupted", "end")]
    wall_seconds = sum(float(e.get("run/seconds", 0.0)) for e in attempts)
    seconds = sum(float(e.get("run/train_seconds", e.get("run/seconds", 0.0))) for e in attempts)
    eval_seconds = sum(float(e.get("run/eval_seconds", 0.0)) for e in attempts)
    samples = int(end.get("run/samples", 0))
    last_eval = evals[-1] if evals else {}
    last_scored = scored[-1] if scored else {}
    metric_name = last_scored.get("eval/metric_name")
    metric_values = [e["eval/metric"] for e in scored if e.get("eval/metric_name") == metric_name
                     and e.get("eval/metric") is not None]
    summary: dict[str, Any] = {
        "strategy": config.get("strategy"),
        "dataset": config.get("dataset"),
        "model": config.get("model"),
        "workers": config.get("workers", 1),
        "servers": config.get("servers", 0),
        "accuracy": evals[-1]["eval/accuracy"] if evals else None,
        "best_accuracy": max(e["eval/accuracy"] for e in evals) if evals else None,
        "loss": evals[-1].get("eval/loss") if evals else last_scored.get("eval/loss"),
        "seconds": seconds,
        "samples": samples,
        "samples_per_second": samples / seconds if seconds > 0 else 0.0,
        "steps": int(end.get("run/steps", 0)),
        "target_accuracy": target,
        "time_to_target": time_to_target,
        "staleness_mean": float(np.mean(staleness)) if staleness else None,
        "staleness_p95": float(np.percentile(staleness, 95)) if staleness else None,
        "staleness_max": float(np.max(staleness)) if staleness else None,
        "run_dir": config.get("run_dir"),
        "eval_seconds": eval_seconds,
        "wall_seconds": wall_seconds,
        "diverged": bool(end.get("run/diverged", False)),
        "majority_share": last_eval.get("eval/majority_share"),
        "balanced_accuracy": last_eval.get("eval/balanced_accuracy"),
        "degenerate": degenerate(last_eval),
        # Batch and second-order methods: whether they met their tolerance, and why they stopped.
        "converged": end.get("batch/converged"),
        "stop_reason": end.get("batch/stop_reason"),
        "attempts": max(1, sum(1 for e in events if e.get("event") == "start")),
        # Any task: the score that stands for the run (accuracy, mse, f1_macro, a user's), its
        # last and best value (best: the largest, or the smallest for an error: mse, mae, loss).
        "task": config.get("task", "classification"),
        "metric": last_scored.get("eval/metric"),
        "metric_name": metric_name,
        "best_metric": _best(metric_name, metric_values),
        "target_metric": config.get("target_metric"),
        "user_metrics": {key.removeprefix("eval/user/"): value for key, value in last_scored.items()
                         if key.startswith("eval/user/")} or None,
    }
    for name, key in _CUMULATIVE.items():
        summary[name] = int(_last_per_role(events, key))
    # A communication round is one exchange a worker takes part in (a push, an
    # allreduce, a hand-over); the run's count is the most any worker took.
    rounds = [e["comm/rounds"] for e in events if e.get("comm/rounds") is not None]
    summary["rounds"] = int(max(rounds)) if rounds else 0
    # Outer iterations of a batch or example-selection method (sandblaster, dane, boost): the
    # coordinator's count, else the most any role reported; None for the SGD strategies.
    iterations = [e["batch/iterations"] for e in events if e.get("batch/iterations") is not None]
    summary["iterations"] = end.get("run/iterations", max(iterations) if iterations else None)
    # Roles the coordinator restarted, and the server updates their restarts lost (back to a checkpoint).
    summary["restarts"] = sum(1 for e in events if e.get("fault/restarted") is not None)
    summary["lost_updates"] = sum(int(e.get("fault/lost_updates") or 0) for e in events)
    # How many times smaller the compressed messages were than the same messages uncompressed.
    encoded = summary["bytes_encoded"]
    summary["compression_ratio"] = summary["bytes_raw"] / encoded if encoded else None
    return {key: summary[key] for key in SUMMARY_KEYS}


# Scores where smaller is better; every other is taken to grow as the model improves.
_ERRORS = ("mse", "mae", "loss", "rmse", "error")


def _best(name: str | None, values: list[float]) -> float | None:
    if not values or name is None:
        return None
    smaller = name.removeprefix("user/").lower().endswith(_ERRORS)
    return min(values) if smaller else max(values)


@dataclass
class TrainResult:
    """What ``downpour.train`` returns.

    Attributes:
        model: the trained module (final parameters, or their moving average
            where the strategy evaluates that).
        history: every event of the run, oldest first.
        summary: the flat summary also written to ``summary.json``.
        run_dir: the run directory, or None when nothing was written.
    """

    model: nn.Module
    history: list[Event] = field(repr=False)
    summary: dict[str, Any]
    run_dir: Path | None

    @property
    def accuracy(self) -> float | None:
        return self.summary["accuracy"]
