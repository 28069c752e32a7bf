"""``downpour.compare``: several strategies on the same workload, side by side.

Every strategy trains the same model on the same data, partitions, seed and
evaluation schedule, one after another; the comparison directory holds each
run's directory, ``comparison.json`` (one row per run), the figures and a
self-contained ``report.html``.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from downpour import strategies as strategy_lib
from downpour.api import UNSET, train
from downpour.data import Dataset
from downpour.metrics import TrainResult
from downpour.metrics.report import print_table, write_comparison_report
from downpour.metrics.rundir import new_run_id
from downpour.run import RunConfig
from downpour.run.config import leaves, refuse_unread, unread
from downpour.run.config import options as option_table
from downpour.strategies import Strategy

log = logging.getLogger(__name__)

@dataclass
class Comparison:
    """What :func:`compare` returns: the directory, one row per run, and each run's result."""

    path: Path
    rows: list[dict[str, Any]]
    results: list[TrainResult]

    def row(self, strategy: str, workers: int | None = None) -> dict[str, Any]:
        for row in self.rows:
            if row["strategy"] == strategy and (workers is None or row["workers"] == workers):
                return row
        raise KeyError(f"no run of {strategy!r}" + (f" with {workers} workers" if workers else ""))


def environment() -> dict[str, Any]:
    """The machine a comparison ran on, for the report."""
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpus": os.cpu_count(),
        "torch threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


# What compare sets for each run itself, so the caller may not: option -> what to use instead.
PER_RUN = {"strategy": "strategies", "workers": "workers", "run_dir": "out_dir",
            "resume": "downpour train", "checkpoint_every": "downpour train",
            "restart_workers": "downpour train"}


def compare(
    *,
    strategies: Sequence[Strategy | str],
    model: str | Callable[[], nn.Module] = UNSET,
    data: Dataset | str = UNSET,
    workers: int | Sequence[int] = 4,
    loss=None,
    out_dir: str | Path | None = None,
    progress: bool = False,
    command: str = "",
    budget_seconds: float | None = UNSET,
    **options: Any,
) -> Comparison:
    """Train each strategy on the same workload and report them side by side.

    ``workers`` may be a list: every strategy but ``single`` runs once per
    count, and ``single`` runs once as the baseline that speedups are
    measured against (added when a sweep does not name it). Every other
    keyword is an option of :class:`downpour.run.RunConfig` by name
    (``servers=2``, ``epochs=3``, ``lr=0.1``), or one of its sections
    (``optimizer=dp.optim(...)``, ``faults=dp.Faults(...)``), the same for
    every run; ``budget_seconds`` is ``max_seconds``. A run leaves out what its
    strategy does not read (``servers`` for ``allreduce``, staged faults of
    workers it does not have, any fault for ``single``); an option set that
    no strategy compared reads is an error.

    Example:
        >>> c = compare(strategies=["single", "downpour", "sync"], model="logistic", data="digits",
        ...             workers=2, epochs=1)  # doctest: +SKIP
        >>> c.row("downpour")["accuracy"]  # doctest: +SKIP
    """
    for name, instead in PER_RUN.items():
        if name in options:
            raise TypeError(f"compare sets {name} for each run; use {instead} instead")
    if budget_seconds is not UNSET:
        if "max_seconds" in options:
            raise TypeError("give max_seconds or budget_seconds (the same option), not both")
        options["max_seconds"] = budget_seconds
    for name in ("optimizer", "faults"):  # None has always meant "the default" for these two
        if name in options and options[name] is None:
            del options[name]
    values = leaves(options)
    if isinstance(model, str):
        values["model"] = model
    if isinstance(data, str):
        values["dataset"] = data
    configs = [strategy_lib.get(s) if isinstance(s, str) else s for s in strategies]
    if not configs:
        raise ValueError("compare needs at least one strategy")
    counts = [workers] if isinstance(workers, int) else list(workers)
    if not counts or any(w < 1 for w in counts):
        raise ValueError(f"workers must be positive counts, got {workers!r}")
    if len(counts) > 1 and not any(c.name == "single" for c in configs):
        configs.insert(0, strategy_lib.get("single"))
    table = option_table()
    changed = [name for name, value in values.items() if value != table[name].default]
    refuse_unread(configs, changed, spell=lambda name: table[name].api,
                  spell_field=lambda s, name: f"{type(s).__name__}({name}=...)")
    if isinstance(data, (str, type(UNSET))):
        where = ("dataset", "data_dir", "data_path", "test_path")
        data = RunConfig.of(**{k: values[k] for k in where if k in values}).data.load()
    runs_root = values.pop("runs_root", table["runs_root"].default)
    path = Path(out_dir) if out_dir is not None else Path(runs_root) / new_run_id("compare")
    if (path / "comparison.json").exists():
        raise FileExistsError(f"{path} already holds a comparison; choose another directory")
    path.mkdir(parents=True, exist_ok=True)

    plan = []
    for config in configs:
        for count in ([1] if config.name == "single" else counts):
            plan.append((config, count))
    results, run_dirs = [], []
    for config, count in plan:
        name = f"{config.name}-w{count}"
        dropped = unread(config, changed)
        if dropped:
            log.info("%s runs without %s, which it does not read", name, ", ".join(dropped))
        run = {k: v for k, v in values.items() if k not in dropped}
        for fault in ("faults.slow", "faults.kill", "faults.kill_at_step"):
            if fault in run:  # the faults of workers this run has
                run[fault] = {rank: v for rank, v in run[fault].items() if rank < count}
        run_config = RunConfig.of(strategy=config, workers=count, run_dir=str(path / name), **run)
        results.append(train(config=run_config, model=model, data=data, loss=loss,
                             progress=progress))
        run_dirs.append(Path(name))
    slow, kill, at_step = (values.get(f"faults.{k}", {}) for k in ("slow", "kill", "kill_at_step"))
    staged = ", ".join([f"worker {r} {f:g}x slower" for r, f in slow.items()]
                       + [f"worker {r} killed at {s:g} s" for r, s in kill.items()]
                       + [f"worker {r} killed at step {n}" for r, n in at_step.items()])
    label = getattr(model, "__qualname__", None) or values.get("model") or table["model"].default
    meta = {"title": f"{data.name} · {label}",
            "command": command, "environment": environment(), "staged": staged,
            "target_accuracy": values.get("target_accuracy")}
    summary = write_comparison_report(path, run_dirs, meta)
    return Comparison(path=path, rows=summary["rows"], results=results)


def show(comparison: Comparison) -> None:
    """Print a comparison's table in the terminal."""
    print_table(comparison.rows, title=f"comparison · {comparison.path}")
