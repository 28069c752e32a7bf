"""``downpour.compare``: several strategies on the same workload, side by side.

Every strategy trains the same model on the same data, partitions, seed and
evaluation schedule, one after another; the comparison directory holds each
run's directory, ``comparison.json`` (one row per run), the figures and a
self-contained ``report.html``.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from downpour import data as data_lib
from downpour import strategies as strategy_lib
from downpour.api import train
from downpour.data import Dataset
from downpour.metrics import TrainResult
from downpour.metrics.report import print_table, write_comparison_report
from downpour.metrics.rundir import new_run_id
from downpour.optim import OptimSpec
from downpour.strategies import Faults, Strategy


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


def compare(
    *,
    strategies: Sequence[Strategy | str],
    model: str | Callable[[], nn.Module],
    data: Dataset | str,
    workers: int | Sequence[int] = 4,
    servers: int = 1,
    loss=None,
    optimizer: OptimSpec | None = None,
    epochs: float = 1.0,
    batch_size: int = 64,
    max_steps: int | None = None,
    target_accuracy: float | None = None,
    budget_seconds: float | None = None,
    eval_every: int | None = None,
    seed: int = 0,
    faults: Faults | None = None,
    out_dir: str | Path | None = None,
    runs_root: str | Path = "runs",
    tensorboard: bool = False,
    progress: bool = False,
    command: str = "",
    data_dir: str | Path | None = None,
    cluster=None,
) -> Comparison:
    """Train each strategy on the same workload and report them side by side.

    ``workers`` may be a list: every strategy but ``single`` runs once per
    count, and ``single`` runs once as the baseline that speedups are
    measured against (added when a sweep does not name it). Staged
    ``faults`` reach every strategy that has that worker.

    Example:
        >>> c = compare(strategies=["single", "downpour", "sync"], model="logistic", data="digits",
        ...             workers=2, epochs=1)  # doctest: +SKIP
        >>> c.row("downpour")["accuracy"]  # doctest: +SKIP
    """
    if isinstance(data, str):
        data = data_lib.load(data, data_dir=data_dir)
    configs = [strategy_lib.get(s) if isinstance(s, str) else s for s in strategies]
    if not configs:
        raise ValueError("compare needs at least one strategy")
    counts = [workers] if isinstance(workers, int) else list(workers)
    if not counts or any(w < 1 for w in counts):
        raise ValueError(f"workers must be positive counts, got {workers!r}")
    if len(counts) > 1 and not any(c.name == "single" for c in configs):
        configs.insert(0, strategy_lib.get("single"))
    faults = faults or Faults()
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
        run_faults = Faults(slow={r: f for r, f in faults.slow.items() if r < count},
                            kill={r: s for r, s in faults.kill.items() if r < count})
        if config.name == "single":
            run_faults = Faults()
        name = f"{config.name}-w{count}"
        result = train(model=model, data=data, strategy=config, loss=loss, optimizer=optimizer, workers=count,
                       servers=servers, epochs=epochs, batch_size=batch_size, max_steps=max_steps,
                       target_accuracy=target_accuracy, max_seconds=budget_seconds, eval_every=eval_every,
                       seed=seed, faults=run_faults, run_dir=path / name, progress=progress,
                       tensorboard=tensorboard, cluster=cluster)
        results.append(result)
        run_dirs.append(Path(name))
    staged = ", ".join([f"worker {r} {f:g}x slower" for r, f in faults.slow.items()]
                       + [f"worker {r} killed at {s:g} s" for r, s in faults.kill.items()])
    meta = {"title": f"{data.name} · {getattr(model, '__qualname__', model)}", "command": command,
            "environment": environment(), "staged": staged, "target_accuracy": target_accuracy}
    summary = write_comparison_report(path, run_dirs, meta)
    return Comparison(path=path, rows=summary["rows"], results=results)


def show(comparison: Comparison) -> None:
    """Print a comparison's table in the terminal."""
    print_table(comparison.rows, title=f"comparison · {comparison.path}")
