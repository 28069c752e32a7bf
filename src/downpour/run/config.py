"""The one configuration tree of a run: :class:`RunConfig`.

Every setting of a run lives here once, with its default, its description and
its check. :func:`downpour.train` and :func:`downpour.compare` build a
RunConfig from their keyword arguments; the command line derives its general
flags (``--batch-size``), their defaults and their ``--help`` from the fields;
a TOML config file and a run's ``config.json`` use the same names
(``batch_size = 32``). An option is named after its field (``batch_size``),
a field called ``name`` after its section (``--model``, ``--optimizer``).

A strategy does not read every option: what it does not read it declares
(:attr:`Strategy.ignores <downpour.strategies.Strategy>`, with what to use
instead), and an option set to anything but its default for such a strategy
is an error that names the strategy, the option and the fix.

Example:
    >>> config = RunConfig(length=LengthConfig(epochs=2), strategy=Downpour(push_every=4))
    >>> config.value("epochs"), RunConfig.of(config, lr=0.1).optimizer.lr
    (2, 0.1)
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import typing
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from downpour.checkpoint import Checkpointing
from downpour.cluster import parse_cluster
from downpour.data import DATASETS, dataset_options
from downpour.data import load as load_dataset
from downpour.errors import check_range
from downpour.models import MODELS
from downpour.models.evaluate import TASKS, Target, Task
from downpour.optim import OPTIMIZERS, SCHEDULES, OptimSpec, optim
from downpour.run.coordinator import Scoring
from downpour.strategies import STRATEGIES, Faults, Job, Single, Strategy

__all__ = [
    "CheckpointConfig",
    "ClusterConfig",
    "DataConfig",
    "EvaluationConfig",
    "LengthConfig",
    "ModelConfig",
    "Option",
    "OutputConfig",
    "RunConfig",
    "field_docs",
    "leaves",
    "options",
    "plain",
    "refuse_unread",
    "unread",
]


def _check_number(name: str, value: Any, kind: type) -> None:
    """A user's number, not a string or a bool (which would compare oddly or pass as 1)."""
    allowed = int if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, allowed):
        raise TypeError(f"{name} must be {'an integer' if kind is int else 'a number'}, "
                        f"got {value!r}")


def _check_text(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise TypeError(f"{name} must be a non-empty string, got {value!r}")


def _as_path_text(config: Any, name: str) -> None:
    """Keep a folder given as a ``Path`` as text, so that configs compare and print alike."""
    value = getattr(config, name)
    if isinstance(value, Path):
        object.__setattr__(config, name, str(value))
    elif value is not None and not isinstance(value, str):
        raise TypeError(f"{name} must be a folder path, got {value!r}")


def _check_optional(name: str, value: Any, kind: type, low: float, *,
                    low_open: bool = False) -> None:
    if value is not None:
        _check_number(name, value, kind)
        check_range(name, value, low, low_open=low_open)


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """The training data.

    Args:
        dataset: the dataset, by name.
        data_dir: the dataset folder (default: $DOWNPOUR_DATA, then the user cache).
        data_path: the user's own data: the training file of an svmlight dataset, the
            folder of an imagefolder one.
        test_path: the test file of an svmlight dataset (default: a seeded fifth of the
            training file's rows, held back).
        loader_workers: DataLoader worker processes each worker reads a streamed
            dataset through (0: in the worker's own process).
    """

    dataset: str = field(default="mnist", metadata={"choices": DATASETS, "api": "data"})
    data_dir: str | None = None
    data_path: str | None = None
    test_path: str | None = None
    loader_workers: int = 0

    def __post_init__(self) -> None:
        _check_text("dataset", self.dataset)
        for name in ("data_dir", "data_path", "test_path"):
            _as_path_text(self, name)
        _check_number("loader_workers", self.loader_workers, int)
        check_range("loader_workers", self.loader_workers, 0, 64)

    def load(self) -> Any:
        """The dataset, loaded by name, from ``data_path`` and ``test_path`` where they are given.

        A path given to a dataset that reads no such file is an error naming its flag.

        Example:
            >>> DataConfig(dataset="digits", data_path="train.svm").load()
            Traceback (most recent call last):
            ...
            ValueError: --data-path: dataset 'digits' reads no file of yours; \
the ones that do: imagefolder, svmlight
        """
        files = {"path": self.data_path, "test_path": self.test_path}
        for key, flag in (("path", "--data-path"), ("test_path", "--test-path")):
            if files[key] is not None and key not in dataset_options(self.dataset):
                takers = sorted(name for name in DATASETS if key in dataset_options(name))
                raise ValueError(f"{flag}: dataset {self.dataset!r} reads no file of yours; "
                                 f"the ones that do: {', '.join(takers)}")
        given = {key: value for key, value in files.items() if value is not None}
        return load_dataset(self.dataset, data_dir=self.data_dir, **given)


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The model every role builds.

    Args:
        name: the model, by name (``train`` also takes a factory; it is named by its qualname).
        l2: a linear model's L2 strength, lambda of 0.5 lambda ||W||^2 (default: the model's
            own, 1e-4 for the SVMs and logistic regression).
        bias_lr: a linear model's bias step as a share of the learning rate (default 1;
            scikit-learn's SGDClassifier takes 0.01 on sparse data).
    """

    name: str = field(default="mlp", metadata={"choices": MODELS})
    l2: float | None = None
    bias_lr: float | None = None

    def __post_init__(self) -> None:
        _check_text("model", self.name)
        for name in ("l2", "bias_lr"):  # their range is the model's to check (models.build)
            if getattr(self, name) is not None:
                _check_number(name, getattr(self, name), float)

    def options(self) -> dict[str, float]:
        """The model's options that are set, as :func:`downpour.models.build` takes them.

        Example:
            >>> ModelConfig(name="svm", l2=1e-5).options()
            {'l2': 1e-05}
        """
        return {name: float(getattr(self, name)) for name in ("l2", "bias_lr")
                if getattr(self, name) is not None}


@dataclass(frozen=True, kw_only=True)
class LengthConfig:
    """How long each worker trains; the first limit reached ends training.

    Args:
        epochs: passes over the training data.
        batch_size: mini-batch size per worker.
        max_steps: stop after this many steps per worker.
        max_seconds: stop training after this many seconds (a time budget).
    """

    epochs: float = 1.0
    batch_size: int = 64
    max_steps: int | None = None
    max_seconds: float | None = None

    def __post_init__(self) -> None:
        _check_number("epochs", self.epochs, float)
        check_range("epochs", self.epochs, 0.0, low_open=True)
        _check_number("batch_size", self.batch_size, int)
        check_range("batch_size", self.batch_size, 1)
        _check_optional("max_steps", self.max_steps, int, 1)
        _check_optional("max_seconds", self.max_seconds, float, 0.0, low_open=True)


@dataclass(frozen=True, kw_only=True)
class EvaluationConfig:
    """When the model is evaluated, how it is scored, and the score that ends training.

    Args:
        eval_every: steps between evaluations (default: ten per run).
        target_accuracy: stop once test accuracy reaches this (0..1).
        task: what the model predicts: classification (accuracy), regression (MSE, MAE,
            R2) or multilabel (per-label F1).
        top_k: also report the top-k accuracy (classification).
        metric: a function (outputs, targets) -> dict[str, float] over the test set whose
            values are reported beside the task's own (eval/user/NAME); from Python only.
        target_metric: stop once an evaluation meets NAME<=VALUE or NAME>=VALUE, e.g.
            mse<=0.01, r2>=0.9, f1_macro>=0.8 (a metric's own NAME too).
        eval_samples: evaluate on a seeded subset of this many test examples.
    """

    eval_every: int | None = None
    target_accuracy: float | None = None
    task: Literal["classification", "regression", "multilabel"] = field(
        default="classification", metadata={"choices": TASKS})
    top_k: int | None = None
    metric: Callable[..., Any] | None = field(default=None, metadata={"flag": False})
    target_metric: str | None = field(default=None, metadata={"metavar": "NAME<=VALUE"})
    eval_samples: int | None = None

    def __post_init__(self) -> None:
        _check_optional("eval_every", self.eval_every, int, 1)
        if self.target_accuracy is not None:
            _check_number("target_accuracy", self.target_accuracy, float)
            check_range("target_accuracy", self.target_accuracy, 0.0, 1.0)
        _check_optional("top_k", self.top_k, int, 1)
        _check_optional("eval_samples", self.eval_samples, int, 1)
        Task(kind=self.task, top_k=self.top_k, metric=self.metric)  # checks each, naming it
        if self.target_metric is not None:
            Target.parse(self.target_metric)
        if self.target_accuracy is not None and self.task != "classification":
            raise ValueError(f"target_accuracy is for classification; for the {self.task} task "
                             "use target_metric (e.g. 'mse<=0.01')")

    def scoring(self) -> Scoring:
        """How the coordinator scores the model (:class:`downpour.run.coordinator.Scoring`)."""
        target = None if self.target_metric is None else Target.parse(self.target_metric)
        return Scoring(task=Task(kind=self.task, top_k=self.top_k, metric=self.metric),
                       target=target, samples=self.eval_samples)


@dataclass(frozen=True, kw_only=True)
class ClusterConfig:
    """Where the roles run, and how many.

    Args:
        workers: worker count.
        servers: parameter-server shards.
        spec: where roles run: processes on this machine (local), a local Ray (ray), or
            a Ray cluster (ray:ADDRESS, or a RayCluster from Python).
        device: cpu or cuda.
        shared_memory: roles on one host move tensors through shared memory (off, with
            --no-shared-memory, every tensor crosses TCP as it would between hosts).
    """

    workers: int = 1
    servers: int = 1
    spec: Any = field(default="local", metadata={"option": "cluster", "type": str,
                                                  "metavar": "local|ray|ray:ADDRESS"})
    device: str = "cpu"
    shared_memory: bool = True

    def __post_init__(self) -> None:
        _check_number("workers", self.workers, int)
        check_range("workers", self.workers, 1, 4096)
        _check_number("servers", self.servers, int)
        check_range("servers", self.servers, 1, 1024)
        if self.spec is None:
            object.__setattr__(self, "spec", "local")
        parse_cluster(self.spec)  # a bad spec fails here, naming it
        _check_text("device", self.device)


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """Checkpoints and restarts.

    Args:
        every: server shards checkpoint every N versions (200) or S seconds (30s) into
            <run>/checkpoints, and a shard that dies restarts from there.
        restart_workers: restart a worker that dies; it rejoins where it left off
            (allreduce and local-sgd re-form their group with it).
        resume: continue the stopped run in run_dir from its checkpoints.
    """

    every: int | str | None = field(default=None, metadata={"option": "checkpoint_every",
                                                            "type": str, "metavar": "N|Ss"})
    restart_workers: bool = False
    resume: bool = field(default=False, metadata={"flag": False})  # the CLI's --resume RUN_DIR

    def __post_init__(self) -> None:
        if self.every is not None:
            if isinstance(self.every, bool) or not isinstance(self.every, (int, str)):
                raise TypeError(f"checkpoint_every must be N (versions) or 'Ss' (seconds), "
                                f"got {self.every!r}")
            Checkpointing.parse(str(self.every), Path("."))  # the format, checked now
        for name in ("restart_workers", "resume"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")


@dataclass(frozen=True, kw_only=True)
class OutputConfig:
    """What the run writes.

    Args:
        run_dir: the run directory (default runs/<id>).
        runs_root: where run directories go when run_dir is not given.
        tensorboard: also write metrics as TensorBoard event files in <run>/tensorboard.
    """

    run_dir: str | None = None
    runs_root: str = field(default="runs", metadata={"flag": False})
    tensorboard: bool = False

    def __post_init__(self) -> None:
        _as_path_text(self, "run_dir")
        _as_path_text(self, "runs_root")
        if not isinstance(self.tensorboard, bool):
            raise TypeError(f"tensorboard must be True or False, got {self.tensorboard!r}")


def _default_optimizer() -> OptimSpec:
    return optim("sgd", lr=0.05)


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Everything a run is configured by, one section per concern, defaults included.

    Args:
        data: the training data.
        model: the model every role builds.
        optimizer: the optimizer every role builds (see downpour.optim); on the parameter
            servers for downpour and sync.
        length: how long each worker trains.
        evaluation: when the model is evaluated.
        cluster: where the roles run, and how many.
        faults: stragglers and failures to stage (see downpour.Faults).
        checkpoint: checkpoints and restarts.
        output: what the run writes.
        seed: random seed of the initial parameters, the data order and the partitions.
        strategy: the strategy and its own options, e.g. Downpour(push_every=4).

    Example:
        >>> RunConfig(cluster=ClusterConfig(workers=4), strategy=Downpour()).cluster.workers
        4
        >>> RunConfig(strategy=Sandblaster(), length=LengthConfig(epochs=3))
        Traceback (most recent call last):
        ValueError: strategy 'sandblaster' does not read epochs (a batch method counts ...
    """

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    # A foreign section: its options (and their help) are named here; its other fields are set
    # from Python only (``dp.optim("sgd", momentum=0.9)``).
    optimizer: OptimSpec = field(default_factory=_default_optimizer, metadata={
        "options": {"name": "optimizer", "lr": "lr", "schedule": "schedule",
                    "warmup_steps": "warmup_steps"},
        "help": {"name": "the optimizer (on the parameter servers for downpour and sync)",
                 "lr": "learning rate", "schedule": "learning-rate schedule",
                 "warmup_steps": "linear learning-rate warm-up steps"},
        "choices": {"name": OPTIMIZERS, "schedule": SCHEDULES},
    })
    length: LengthConfig = field(default_factory=LengthConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    # Set from Python as a Faults; the command line has its own notation for them
    # (--kill-worker 1@step=200), so none is a flag by its field's name.
    faults: Faults = field(default_factory=Faults, metadata={"options": {}})
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    seed: int = 0
    strategy: Strategy = field(default_factory=Single, metadata={"flag": False})

    def __post_init__(self) -> None:
        for name, kind in _sections().items():
            if not isinstance(getattr(self, name), kind):
                raise TypeError(f"{name} must be a {kind.__name__}, got {getattr(self, name)!r}")
        _check_number("seed", self.seed, int)
        if not callable(getattr(self.strategy, "plan", None)):
            raise TypeError("strategy must be a strategy's config, e.g. downpour.Downpour(); "
                            f"got {self.strategy!r}")
        self._check_recovery()
        refuse_unread([self.strategy], self.changed(), spell=lambda name: options()[name].api,
                      spell_field=_api_field)

    def _check_recovery(self) -> None:
        strategy, checkpoint = self.strategy, self.checkpoint
        if (checkpoint.every is not None or checkpoint.resume or self.faults.kill_server
                or self.faults.kill_server_at_version) \
                and not strategy.recoverable:
            raise ValueError(f"checkpoints, server restarts and --resume are for the "
                             f"parameter-server strategies ({', '.join(_having('recoverable'))}); "
                             f"{strategy.name!r} keeps its state in its workers")
        if checkpoint.restart_workers and not strategy.restartable:
            raise ValueError(f"restart_workers is for {_and(_having('restartable'))}; "
                             f"{strategy.name!r} cannot take a restarted worker back")
        if checkpoint.resume and self.output.run_dir is None:
            raise ValueError("resume needs the run_dir of the stopped run")

    def value(self, name: str) -> Any:
        """The value of option ``name`` (``"lr"``, ``"batch_size"``, ``"faults.kill"``)."""
        option = _option(name)
        owner = self if option.section is None else getattr(self, option.section)
        return getattr(owner, option.field)

    def changed(self) -> list[str]:
        """The options whose value is not their default (the strategy aside)."""
        return [name for name, option in options().items()
                if name != "strategy" and self.value(name) != option.default]

    @classmethod
    def of(cls, base: RunConfig | None = None, /, **values: Any) -> RunConfig:
        """``base`` (default: every default) with options set by name.

        A whole section may be given by its name (``optimizer=dp.optim(...)``,
        ``faults=Faults(...)``); every other name is an option's.

        Example:
            >>> config = RunConfig.of(workers=4, strategy=Downpour(), optimizer="adam", lr=1e-3)
            >>> config.optimizer.name, config.cluster.workers
            ('adam', 4)
        """
        base = cls() if base is None else base
        by_section: dict[str | None, dict[str, Any]] = {}
        for name, value in leaves(values).items():
            option = _option(name)
            by_section.setdefault(option.section, {})[option.field] = value
        top = by_section.pop(None, {})
        # A section's fields change together: an optimizer's name and options are checked as one.
        sections = {name: dataclasses.replace(getattr(base, name), **fields)
                    for name, fields in by_section.items()}
        return dataclasses.replace(base, **sections, **top)

    def job(self, *, model: Callable[[], Any], loss: Callable[..., Any], data: Any) -> Job:
        """The workload the strategy plans: this config with the model factory, loss and data."""
        return Job(
            model=model, loss=loss, data=data, optimizer=self.optimizer,
            workers=self.cluster.workers, servers=self.cluster.servers,
            epochs=self.length.epochs, batch_size=self.length.batch_size,
            max_steps=self.length.max_steps, max_seconds=self.length.max_seconds,
            target_accuracy=self.evaluation.target_accuracy, eval_every=self.evaluation.eval_every,
            seed=self.seed, device=self.cluster.device, faults=self.faults,
            cluster=parse_cluster(self.cluster.spec),
            restart_workers=self.checkpoint.restart_workers,
            shared_memory=self.cluster.shared_memory,
        )


@dataclass(frozen=True)
class Option:
    """One setting of the tree, by the name the API, the flags and the config file share.

    Attributes:
        name: ``"batch_size"`` (flag ``--batch-size``); a field set from Python only is named
            ``"section.field"`` (``"optimizer.gamma"``).
        section: the RunConfig section holding it (``"length"``), None for a top-level field.
        field: its field in that section.
        annotation: the field's type.
        default: its default.
        help: its description, for ``--help``.
        api: the ``downpour.train`` keyword that sets it (``"optimizer"`` for ``lr``).
        flag: whether the command line and the config file set it by this name.
        meta: hints for the command line: ``choices`` (a registry), ``type``, ``metavar``.
    """

    name: str
    section: str | None
    field: str
    annotation: Any
    default: Any
    help: str
    api: str
    flag: bool
    meta: Mapping[str, Any]


@functools.cache
def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(RunConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(RunConfig)
            if dataclasses.is_dataclass(hints[f.name])}


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


@functools.cache
def options() -> dict[str, Option]:
    """Every option of :class:`RunConfig`, in field order, by name.

    Example:
        >>> options()["batch_size"].section, options()["batch_size"].default
        ('length', 64)
    """
    found: dict[str, Option] = {}

    def add(option: Option) -> None:
        assert option.name not in found, f"two options named {option.name!r}"
        found[option.name] = option

    hints, docs = typing.get_type_hints(RunConfig), field_docs(RunConfig)
    for top in dataclasses.fields(RunConfig):
        kind = hints[top.name]
        if top.name not in _sections():
            add(Option(top.name, None, top.name, kind, _default(top), docs.get(top.name, ""),
                       top.name, top.metadata.get("flag", True), top.metadata))
            continue
        default, inner = _default(top), typing.get_type_hints(kind)
        named = top.metadata.get("options")  # a foreign section names its options here
        own_docs = field_docs(kind)
        for sub in dataclasses.fields(kind):
            if named is not None:
                name = named.get(sub.name, f"{top.name}.{sub.name}")
                meta = {"choices": top.metadata.get("choices", {}).get(sub.name)}
                text = top.metadata.get("help", {}).get(sub.name, "")
                api, flag = top.name, sub.name in named
            else:
                name = sub.metadata.get("option", top.name if sub.name == "name" else sub.name)
                meta, text = sub.metadata, own_docs.get(sub.name, "")
                api, flag = sub.metadata.get("api", name), sub.metadata.get("flag", True)
            add(Option(name, top.name, sub.name, inner[sub.name], getattr(default, sub.name),
                       text, api, flag, meta))
    return found


def _option(name: str) -> Option:
    table = options()
    if name not in table:
        raise TypeError(f"unknown run option {name!r}; the options are: {', '.join(table)}")
    return table[name]


def leaves(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` by option name: a whole section given by its name becomes its options.

    Example:
        >>> leaves({"optimizer": optim("adam", lr=0.01), "epochs": 2})["lr"]
        0.01
    """
    sections, out = _sections(), {}
    whole = {name for name, value in values.items()
             if name in sections and isinstance(value, sections[name])}
    for name in whole:
        for option in options().values():
            if option.section == name:
                out[option.name] = getattr(values[name], option.field)
    for name, value in values.items():
        if name not in whole:
            out[_option(name).name] = value
    return out


def unread(strategy: Strategy, names: Iterable[str]) -> dict[str, str]:
    """The options among ``names`` that ``strategy`` does not read, each with its hint.

    A strategy declares them in ``ignores`` (a key may be a section: ``"optimizer"``
    stands for all of its options); one with no parameter servers does not read
    ``servers``, one that takes no workers ``workers``. A hint may name the strategy's
    own options in braces (``"use {max_iterations}"``). Checkpoints, server kills and
    ``resume`` need a ``recoverable`` strategy, ``restart_workers`` a ``restartable`` one.

    Example:
        >>> unread(Single(), ["servers", "lr"])
        {'servers': 'it has no parameter servers'}
    """
    found = {}
    for name in names:
        option = _option(name)
        hint = strategy.ignores.get(name) or strategy.ignores.get(option.section or "")
        if hint is None and name == "servers" and not strategy.uses_servers:
            hint = "it has no parameter servers"
        if hint is None and name == "workers" and not strategy.takes_workers:
            hint = "it trains in this process, with no workers"
        if hint is None and name in _RECOVERY and not strategy.recoverable:
            hint = (f"it keeps its state in its workers; checkpoints and server restarts are "
                    f"for the parameter-server strategies ({', '.join(_having('recoverable'))})")
        if hint is None and name == "restart_workers" and not strategy.restartable:
            hint = f"it cannot take a restarted worker back (only {_and(_having('restartable'))})"
        if hint is not None:
            found[name] = hint
    return found


# The options that need a strategy whose state lives on its shards (Strategy.recoverable).
_RECOVERY = ("checkpoint_every", "resume", "faults.kill_server", "faults.kill_server_at_version")


class _Fields(dict):
    """A hint's ``{field}`` placeholders, spelled for where the user set the option."""

    def __init__(self, spell: Callable[[str], str]) -> None:
        super().__init__()
        self.spell = spell

    def __missing__(self, key: str) -> str:
        return self.spell(key)


def _api_field(strategy: Strategy, name: str) -> str:
    return f"{type(strategy).__name__}({name}=...)"


def refuse_unread(strategies: Sequence[Strategy], names: Collection[str], *,
                  spell: Callable[[str], str],
                  spell_field: Callable[[Strategy, str], str]) -> None:
    """Raise ValueError for the options among ``names`` that none of ``strategies`` reads.

    The message names the strategy, each option as the user set it (``spell``:
    ``"--lr"`` on the command line, ``"optimizer"`` in Python) and what to use
    instead, with the strategy's own options spelled by ``spell_field``.
    """
    hints = {s.name: unread(s, names) for s in strategies}
    nowhere = [name for name in names if all(name in hints[s.name] for s in strategies)]
    if not nowhere:
        return
    groups: dict[str, list[str]] = {}  # a hint and the options it answers
    for name in nowhere:
        text = "; ".join(
            (f"{s.name!r}: " if len(strategies) > 1 else "")
            + hints[s.name][name].format_map(_Fields(functools.partial(spell_field, s)))
            for s in strategies)
        spelled = groups.setdefault(text, [])
        if spell(name) not in spelled:
            spelled.append(spell(name))
    count = sum(len(spelled) for spelled in groups.values())
    listed = ", ".join(f"{_and(spelled)} ({text})" for text, spelled in groups.items())
    who = (f"strategy {strategies[0].name!r} does not read" if len(strategies) == 1 else
           f"none of the strategies compared ({', '.join(s.name for s in strategies)}) reads")
    raise ValueError(f"{who} {listed}; drop {'it' if count == 1 else 'them'}")


def _and(words: Sequence[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def _having(capability: str) -> list[str]:
    """The registered strategies that declare ``capability`` (``"recoverable"``)."""
    return [name for name, cls in STRATEGIES.items() if getattr(cls, capability)]


def plain(text: str) -> str:
    """Docstring text for the terminal: no reST roles or literals."""
    return re.sub(r":\w+:`~?([^`]+)`", r"\1", text).replace("``", "")


def field_docs(owner: Any) -> dict[str, str]:
    """Each field's description from a class's (or function's) Google-style ``Args:`` section.

    Example:
        >>> field_docs(LengthConfig)["batch_size"]
        'mini-batch size per worker.'
    """
    docs: dict[str, str] = {}
    names: list[str] = []
    inside = False
    for line in inspect.cleandoc(owner.__doc__ or "").splitlines():
        if line.strip() in ("Args:", "Attributes:"):
            names, inside = [], True
            continue
        if line and not line[0].isspace():
            inside = False  # the next section
        if not inside:
            continue
        # "    name: text", "    name (type): text" or "    a, b, c: text shared by all three"
        match = re.match(r" {4}(\w+(?:, \w+)*)(?: \([^)]*\))?: (.*)", line)
        if match:
            names = match[1].split(", ")
            docs.update(dict.fromkeys(names, match[2]))
        elif line.strip():
            for name in names:
                docs[name] += " " + line.strip()
    return {name: plain(text) for name, text in docs.items()}

