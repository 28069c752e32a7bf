"""``downpour.train``: the one entry point of the library."""

from __future__ import annotations

import dataclasses
import logging
import platform
import shutil
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from downpour import data as data_lib
from downpour import models
from downpour import strategies
from downpour.checkpoint import Checkpointing
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
from downpour.metrics.sinks import read_events
from downpour.optim import OptimSpec
from downpour.run import Coordinator, RunConfig
from downpour.run.coordinator import refuse_streamed
from downpour.strategies import Faults, Strategy

log = logging.getLogger(__name__)


def _model_name(model: Callable[[], nn.Module]) -> str:
    return getattr(model, "__qualname__", type(model).__name__)


def _resolve_model(model: str | Callable[[], nn.Module], dataset: Dataset,
                   options: dict[str, float]) -> tuple[Callable[[], nn.Module], str]:
    if isinstance(model, str):
        # Built once here, so that a bad name or option fails before any role starts.
        models.build(model, dataset.input_shape, dataset.num_outputs, **options)
        return partial(models.build, model, dataset.input_shape, dataset.num_outputs,
                       **options), model
    if callable(model):
        if options:
            raise ValueError(f"{', '.join(options)} set the options of a model given by name; "
                             "a factory builds its model itself (pass them to it instead)")
        return model, _model_name(model)
    raise TypeError(f"model must be a model name or a factory returning an nn.Module, "
                    f"got {type(model).__name__}")


def _resolve_data(data: Any, config: RunConfig) -> Any:
    """The run's dataset: loaded by name, or the user's (a pair of torch Datasets is wrapped)."""
    if isinstance(data, (str, _Unset)):
        data = config.data.load()
    elif isinstance(data, tuple):
        if len(data) != 2:
            raise TypeError(f"data=(train, test) takes two torch Datasets, got {len(data)} items")
        data = data_lib.from_torch(*data)
    if not isinstance(data, (Dataset, data_lib.StreamedDataset)):
        raise TypeError("data must be a dataset name, a downpour.data.Dataset, "
                        "downpour.data.from_torch(train, test), or a (train, test) pair of torch "
                        f"Datasets; got {type(data).__name__}")
    workers = config.data.loader_workers
    if data.streamed:
        if workers != data.loader_workers and workers != 0:
            data = dataclasses.replace(data, loader_workers=workers)
    elif workers:
        raise ValueError(f"loader_workers={workers} is for a streamed dataset; {data.name!r} is "
                         "held in memory (it is read with no DataLoader)")
    task = config.evaluation.task
    if task == "classification" and data.num_classes is None:
        raise ValueError(f"{data.name!r} has targets that are not class indices; set task= "
                         "'regression' or 'multilabel'")
    if task == "multilabel" and not data.streamed:
        raise ValueError("the multilabel task needs (N, labels) targets, and an in-memory Dataset "
                         "holds one class label per example; wrap a torch Dataset with "
                         "downpour.data.from_torch")
    return data


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


class _Unset:
    """The default of a keyword not given: the RunConfig (or ``config``) decides."""

    def __repr__(self) -> str:
        return "<from RunConfig>"


UNSET: Any = _Unset()

# train()'s keywords that are not run options: what it trains and how this call reports.
_NOT_OPTIONS = frozenset({"model", "data", "loss", "save", "progress", "options", "config"})

DataArg = Dataset | data_lib.StreamedDataset | tuple[Any, Any] | str


def train(
    *,
    model: str | Callable[[], nn.Module] = UNSET,
    data: DataArg = UNSET,
    strategy: Strategy | str = UNSET,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    l2: float | None = UNSET,
    bias_lr: float | None = UNSET,
    optimizer: OptimSpec | None = UNSET,
    workers: int = UNSET,
    servers: int = UNSET,
    epochs: float = UNSET,
    batch_size: int = UNSET,
    max_steps: int | None = UNSET,
    target_accuracy: float | None = UNSET,
    eval_every: int | None = UNSET,
    task: str = UNSET,
    top_k: int | None = UNSET,
    metric: Callable[[torch.Tensor, torch.Tensor], dict[str, float]] | None = UNSET,
    target_metric: str | None = UNSET,
    eval_samples: int | None = UNSET,
    loader_workers: int = UNSET,
    max_seconds: float | None = UNSET,
    seed: int = UNSET,
    device: str = UNSET,
    shared_memory: bool = UNSET,
    faults: Faults | None = UNSET,
    run_dir: str | Path | None = UNSET,
    runs_root: str | Path = UNSET,
    save: bool = True,
    progress: bool = False,
    tensorboard: bool = UNSET,
    data_dir: str | Path | None = UNSET,
    data_path: str | Path | None = UNSET,
    test_path: str | Path | None = UNSET,
    cluster: Any = UNSET,
    checkpoint_every: str | int | None = UNSET,
    restart_workers: bool = UNSET,
    resume: bool = UNSET,
    options: dict[str, Any] | None = None,
    config: RunConfig | None = None,
) -> TrainResult:
    """Train ``model`` on ``data`` with a distributed ``strategy``.

    Every keyword but ``model``, ``data``, ``loss``, ``save``, ``progress`` and
    ``options`` is an option of :class:`downpour.run.RunConfig`, which holds its
    default and its description; one not given takes ``config``'s value (or the
    default). A strategy that does not read an option that is set (``epochs``
    for ``sandblaster``, ``servers`` for ``hogwild``) is an error naming both.

    Args:
        model: a reference model name (``"mlp"``, ``"cnn"``, ...) or a factory
            returning an ``nn.Module``; every role builds its own copy.
        data: a dataset name, a :class:`downpour.data.Dataset` (in memory), a
            streamed one (:func:`downpour.data.from_torch`), or a ``(train, test)``
            pair of map-style ``torch.utils.data.Dataset`` (wrapped by ``from_torch``).
        strategy: a strategy config (``downpour.Single()``, ...) or its name.
        l2, bias_lr: a linear model's L2 strength and its bias's share of each SGD step
            (:class:`downpour.models.linear.LinearModel`), for a model given by name.
        loss: loss on (outputs, labels); defaults to the reference model's
            own loss, else the task's (cross-entropy, MSE, binary cross-entropy).
        optimizer: ``downpour.optim(name, lr=...)``.
        workers, servers: role counts.
        epochs, batch_size, max_steps: how much to train (per worker batch).
        target_accuracy: stop once test accuracy reaches it.
        eval_every: steps between evaluations (default: ten per run).
        task: ``"classification"``, ``"regression"`` or ``"multilabel"``.
        top_k: also report the top-k accuracy.
        metric: a function ``(outputs, targets) -> dict[str, float]`` whose values
            are logged with every evaluation (``eval/user/<name>``) and in the summary.
        target_metric: stop once an evaluation meets ``"mse<=0.01"`` (any score).
        eval_samples: evaluate on a seeded subset of this many test examples.
        loader_workers: DataLoader processes per worker for a streamed dataset.
        max_seconds: stop training after this many seconds (a time budget).
        shared_memory: roles on one host move tensors through shared memory
            (``False``: every tensor crosses TCP, as between hosts).
        run_dir: where to write the run (default ``runs/<id>/``).
        save: write the run directory at all.
        progress: show a progress bar.
        tensorboard: also write the metrics as TensorBoard event files in
            ``<run_dir>/tensorboard``.
        cluster: where roles run: ``"local"`` (processes on this machine),
            ``"ray"`` (a local Ray), ``"ray:ADDRESS"`` or a
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
        config: the whole configuration at once; the keywords above override it.

    Returns:
        A :class:`TrainResult` with the model, event history and summary.

    Example:
        >>> import downpour as dp
        >>> result = dp.train(model="logistic", data="digits", save=False)  # doctest: +SKIP
        >>> result.summary["accuracy"] > 0.9  # doctest: +SKIP
        True
        >>> config = RunConfig.of(dataset="digits", model="logistic", workers=2, strategy=dp.Sync())
        >>> dp.train(config=config, save=False)  # doctest: +SKIP
    """
    given = {name: value for name, value in locals().items()
             if name not in _NOT_OPTIONS and value is not UNSET}
    for name in ("optimizer", "faults"):  # None has always meant "the default" for these two
        if given.get(name, UNSET) is None:
            del given[name]
    if isinstance(given.get("strategy"), str):
        given["strategy"] = strategies.get(given["strategy"])
    if model is not UNSET:
        given["model"] = model if isinstance(model, str) else _model_name(model)
    if data is not UNSET:
        given["dataset"] = data if isinstance(data, str) else getattr(data, "name", "torch")
    config = RunConfig.of(config, **given)
    if config.checkpoint.resume and not save:
        raise ValueError("resume needs the run_dir of the stopped run (and save=True)")
    data = _resolve_data(data, config)
    refuse_streamed(config.strategy, data)
    # A model given by name is the config's (the keyword's, if given); a factory is used as it is.
    named = config.model.name if isinstance(model, (str, _Unset)) else model
    factory, model_name = _resolve_model(named, data, config.model.options())
    if loss is None:
        task_loss = config.evaluation.scoring().task.loss
        named_loss = isinstance(named, str) and task_loss is F.cross_entropy
        loss = models.default_loss(named) if named_loss else task_loss
    strategy, faults, checkpoint_every = config.strategy, config.faults, config.checkpoint.every
    resume, run_dir = config.checkpoint.resume, config.output.run_dir
    job = config.job(model=factory, loss=loss, data=data)
    # The run directory only once the job is known to be valid.
    if not save:
        run = None
    elif resume:
        run = RunDir.reopen(run_dir)
    else:
        run = RunDir.create(run_dir, strategy.name, config.output.runs_root)
    scratch = None
    checkpoint = None
    if checkpoint_every is not None or resume or faults.kill_server or faults.kill_server_at_version:
        if run is None:
            scratch = tempfile.TemporaryDirectory(prefix="downpour-checkpoints-")
        folder = Path(scratch.name) if scratch else run.path / "checkpoints"
        checkpoint = Checkpointing.parse(str(checkpoint_every or 100), folder, resume=resume)
        job = dataclasses.replace(job, checkpoint=checkpoint)
    description = {
        "strategy": strategy.name,
        "dataset": data.name,
        "model": model_name,
        "workers": job.workers,
        "servers": job.servers if strategy.uses_servers else 0,
        "target_accuracy": job.target_accuracy,
        "target_metric": config.evaluation.target_metric,
        "task": config.evaluation.task,
        "eval_samples": config.evaluation.eval_samples,
        "run_dir": str(run.path) if run else None,
        "strategy_config": _describe(strategy),
        "optimizer": _describe(job.optimizer),
        "epochs": job.epochs,
        "batch_size": job.batch_size,
        "max_steps": job.max_steps,
        "eval_every": job.eval_every,
        "max_seconds": job.max_seconds,
        "seed": job.seed,
        "device": job.device,
        "faults": _describe(job.faults),
        "cluster": _describe_cluster(job.cluster),
        "checkpoint_every": None if checkpoint is None
        else (checkpoint.every_versions or f"{checkpoint.every_seconds:g}s"),
        "restart_workers": job.restart_workers,
        "options": options,
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "cpus": torch.get_num_threads()},
    }
    history = MemorySink()
    sinks: list = [history]
    if run:
        if not resume:  # a resumed run keeps its config.json and appends to its events
            run.write_config(description)
        sinks.append(run.events_sink())
    if progress:
        sinks.append(ProgressSink(job.total_steps(), description=strategy.name))
    metrics = Metrics(sinks)
    if config.output.tensorboard:
        if run is None:
            raise ValueError("tensorboard=True needs a run directory (save=True)")
        metrics.sinks.append(TensorBoardSink(run.path / "tensorboard",
                                             start_time=metrics.start_time))
    trained = None
    try:
        trained = Coordinator(job, metrics, scoring=config.evaluation.scoring()).run(strategy)
    finally:
        metrics.close()
        if scratch is not None:
            scratch.cleanup()
        if trained is None and run is not None and not resume and not history.events:
            # Refused before anything ran (a strategy's own check of the job): nothing to keep.
            shutil.rmtree(run.path, ignore_errors=True)
    # A resumed run's summary covers every attempt: its event log holds them all.
    events = list(read_events(run.path / RunDir.EVENTS)) if resume else history.events
    summary = summarize(events, description)
    if run:
        run.save_model(trained)
        plot_run(history.events, run.path, title=f"{strategy.name} · {data.name} · {model_name}")
        run.write_summary(summary)
    return TrainResult(model=trained, history=history.events, summary=summary,
                       run_dir=run.path if run else None)


def _describe_cluster(cluster: Any) -> str:
    if cluster is None:
        return "local"
    return "ray" + (f":{cluster.address}" if cluster.address else "")

