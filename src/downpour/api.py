"""``downpour.train``: the one entry point of the library."""

from __future__ import annotations

import dataclasses
import logging
import platform
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from downpour import data as data_lib
from downpour import models
from downpour import strategies
from downpour.checkpoint import Checkpointing
from downpour.cluster import parse_cluster
from downpour.data import Dataset
from downpour.metrics import (
    MemorySink,
    Metrics,
    ProgressSink,
    RunDir,
    TensorBoardSink,
    TrainResult,
    plot_run,
    summarize,
)
from downpour.optim import OptimSpec, optim
from downpour.run import Coordinator
from downpour.strategies import Faults, Job, Strategy

log = logging.getLogger(__name__)


def _resolve_model(model: str | Callable[[], nn.Module], dataset: Dataset) -> tuple[Callable[[], nn.Module], str]:
    if isinstance(model, str):
        models.build(model, dataset.input_shape, dataset.num_classes)  # validates the name early
        return partial(models.build, model, dataset.input_shape, dataset.num_classes), model
    if callable(model):
        return model, getattr(model, "__qualname__", type(model).__name__)
    raise TypeError(f"model must be a model name or a factory returning an nn.Module, got {type(model).__name__}")


def _describe(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {"name": getattr(value, "name", type(value).__name__)}
        out.update({f.name: _describe(getattr(value, f.name)) for f in dataclasses.fields(value)})
        return out
    if isinstance(value, dict):
        return {str(k): _describe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_describe(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return getattr(value, "__qualname__", repr(value))


def train(
    *,
    model: str | Callable[[], nn.Module],
    data: Dataset | str,
    strategy: Strategy | str = "single",
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    optimizer: OptimSpec | None = None,
    workers: int = 1,
    servers: int = 1,
    epochs: float = 1.0,
    batch_size: int = 64,
    max_steps: int | None = None,
    target_accuracy: float | None = None,
    eval_every: int | None = None,
    max_seconds: float | None = None,
    seed: int = 0,
    device: str = "cpu",
    faults: Faults | None = None,
    run_dir: str | Path | None = None,
    runs_root: str | Path = "runs",
    save: bool = True,
    progress: bool = False,
    tensorboard: bool = False,
    data_dir: str | Path | None = None,
    cluster: Any = None,
    checkpoint_every: str | int | None = None,
    restart_workers: bool = False,
    resume: bool = False,
    options: dict[str, Any] | None = None,
) -> TrainResult:
    """Train ``model`` on ``data`` with a distributed ``strategy``.

    Args:
        model: a reference model name (``"mlp"``, ``"cnn"``, ...) or a factory
            returning an ``nn.Module``; every role builds its own copy.
        data: a :class:`downpour.data.Dataset` or a dataset name.
        strategy: a strategy config (``downpour.Single()``, ...) or its name.
        loss: loss on (outputs, labels); defaults to the reference model's
            own loss, else cross-entropy.
        optimizer: ``downpour.optim(name, lr=...)``; defaults to SGD, lr 0.05.
        workers, servers: role counts, for strategies that use them.
        epochs, batch_size, max_steps: how much to train (per worker batch).
        target_accuracy: stop once test accuracy reaches it.
        eval_every: steps between evaluations (default: ten per run).
        max_seconds: stop training after this many seconds (a time budget).
        run_dir: where to write the run (default ``runs/<id>/``).
        save: write the run directory at all.
        progress: show a progress bar.
        tensorboard: also write the metrics as TensorBoard event files in
            ``<run_dir>/tensorboard``.
        cluster: where roles run: ``None`` or ``"local"`` (processes on this
            machine), ``"ray"`` (a local Ray), ``"ray:ADDRESS"`` or a
            :class:`downpour.cluster.ray.RayCluster` (an existing Ray cluster).
        checkpoint_every: server shards checkpoint every N versions (``200``)
            or S seconds (``"30s"``) into ``<run_dir>/checkpoints``, with the
            coordinator's state beside them; a shard that dies restarts from
            there. Staging ``Faults(kill_server=...)`` turns it on (every 100
            versions) when not given.
        restart_workers: restart a worker that dies. Parameter-server
            workers rejoin where their predecessor last reported; allreduce
            and local-sgd re-form their group with the new worker through
            torch's elastic rendezvous, and it takes a survivor's state.
        resume: continue the stopped run in ``run_dir`` from its checkpoints
            (same arguments as the first time).
        options: the command line's options, kept in ``config.json`` so that
            ``downpour train --resume RUN_DIR`` can rebuild the run.

    Returns:
        A :class:`TrainResult` with the model, event history and summary.

    Example:
        >>> import downpour as dp
        >>> result = dp.train(model="logistic", data="digits", epochs=1, save=False)  # doctest: +SKIP
        >>> result.summary["accuracy"] > 0.9  # doctest: +SKIP
        True
    """
    if isinstance(data, str):
        data = data_lib.load(data, data_dir=data_dir)
    if isinstance(strategy, str):
        strategy = strategies.get(strategy)
    factory, model_name = _resolve_model(model, data)
    if loss is None:
        loss = models.default_loss(model) if isinstance(model, str) else torch.nn.functional.cross_entropy
    faults = faults or Faults()
    recovery = checkpoint_every is not None or resume or faults.kill_server
    if recovery and not strategy.recoverable:
        raise ValueError(f"checkpoints, server restarts and --resume are for the parameter-server strategies "
                         f"(downpour, sync); {strategy.name!r} keeps its state in its workers")
    if restart_workers and not strategy.restartable:
        raise ValueError(f"restart_workers is for downpour, sync, allreduce and local-sgd; {strategy.name!r} "
                         "cannot take a restarted worker back")
    if resume and (run_dir is None or not save):
        raise ValueError("resume needs the run_dir of the stopped run (and save=True)")
    job = Job(
        model=factory, loss=loss, data=data, optimizer=optimizer or optim("sgd", lr=0.05),
        workers=workers, servers=servers, epochs=epochs, batch_size=batch_size, max_steps=max_steps,
        target_accuracy=target_accuracy, eval_every=eval_every, max_seconds=max_seconds, seed=seed, device=device,
        faults=faults, cluster=parse_cluster(cluster), restart_workers=restart_workers,
    )
    # The run directory only once the job is known to be valid.
    if not save:
        run = None
    elif resume:
        run = RunDir.reopen(run_dir)
    else:
        run = RunDir.create(run_dir, strategy.name, runs_root)
    scratch = None
    checkpoint = None
    if checkpoint_every is not None or resume or faults.kill_server:
        if run is None:
            scratch = tempfile.TemporaryDirectory(prefix="downpour-checkpoints-")
        folder = Path(scratch.name) if scratch else run.path / "checkpoints"
        checkpoint = Checkpointing.parse(str(checkpoint_every or 100), folder, resume=resume)
        job = dataclasses.replace(job, checkpoint=checkpoint)
    config = {
        "strategy": strategy.name,
        "dataset": data.name,
        "model": model_name,
        "workers": workers,
        "servers": servers if strategy.uses_servers else 0,
        "target_accuracy": target_accuracy,
        "run_dir": str(run.path) if run else None,
        "strategy_config": _describe(strategy),
        "optimizer": _describe(job.optimizer),
        "epochs": epochs,
        "batch_size": batch_size,
        "max_steps": max_steps,
        "eval_every": eval_every,
        "max_seconds": max_seconds,
        "seed": seed,
        "device": device,
        "faults": _describe(job.faults),
        "cluster": _describe_cluster(job.cluster),
        "checkpoint_every": None if checkpoint is None else (checkpoint.every_versions or f"{checkpoint.every_seconds:g}s"),
        "restart_workers": restart_workers,
        "options": options,
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "cpus": torch.get_num_threads()},
    }
    history = MemorySink()
    sinks: list = [history]
    if run:
        if not resume:  # a resumed run keeps its config.json and appends to its events
            run.write_config(config)
        sinks.append(run.events_sink())
    if progress:
        sinks.append(ProgressSink(job.total_steps(), description=strategy.name))
    metrics = Metrics(sinks)
    if tensorboard:
        if run is None:
            raise ValueError("tensorboard=True needs a run directory (save=True)")
        metrics.sinks.append(TensorBoardSink(run.path / "tensorboard", start_time=metrics.start_time))
    try:
        trained = Coordinator(job, metrics).run(strategy)
    finally:
        metrics.close()
        if scratch is not None:
            scratch.cleanup()
    summary = summarize(history.events, config)
    if run:
        run.save_model(trained)
        plot_run(history.events, run.path, title=f"{strategy.name} · {data.name} · {model_name}")
        run.write_summary(summary)
    return TrainResult(model=trained, history=history.events, summary=summary, run_dir=run.path if run else None)


def _describe_cluster(cluster: Any) -> str:
    if cluster is None:
        return "local"
    return "ray" + (f":{cluster.address}" if cluster.address else "")

