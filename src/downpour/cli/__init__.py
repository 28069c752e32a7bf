"""The ``downpour`` command line: a thin layer over :mod:`downpour.api`.

Strings exist only here; they are resolved to configs and factories at once.
General options are plain flags (``--lr 0.01``); a strategy's options are
derived from its config dataclass and namespaced by the strategy
(``--downpour.push-every 4``), the same on every command. A TOML config file
(``--config FILE``) uses the same names: general options at the top, a table
per strategy (``[downpour]`` / ``push_every = 4``); flags win over the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import logging
import re
import sys
import tomllib
import types
import typing
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from downpour.errors import DownpourError

log = logging.getLogger("downpour")

# General options of `downpour train` and their defaults (None: unset). The config file (TOML) may
# set any of these at its top level by the same name, with dashes or underscores. The hand-started
# roles (`downpour server`, `downpour worker`) take their shared defaults from here too.
TRAIN_DEFAULTS: dict[str, Any] = {
    "strategy": "single",
    "dataset": "mnist",
    "data_dir": None,
    "model": "mlp",
    "optimizer": "sgd",
    "lr": 0.05,
    "schedule": "constant",
    "warmup_steps": 0,
    "batch_size": 64,
    "epochs": 1.0,
    "max_steps": None,
    "target_accuracy": None,
    "eval_every": None,
    "seed": 0,
    "run_dir": None,
    "workers": 1,
    "servers": 1,
    "device": "cpu",
    "slow_worker": [],
    "kill_worker": [],
    "tensorboard": False,
    "cluster": "local",
    "kill_server": [],
    "restart_workers": False,
    "checkpoint_every": None,
}

# The usage line of a command with strategy flags: listing them all would fill the screen.
STRATEGY_USAGE = "%(prog)s [OPTIONS] [--STRATEGY.OPTION VALUE ...]"
_KINDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _arg_type(annotation: Any) -> dict[str, Any] | None:
    """argparse keywords for a field's annotation (int, float, str, bool, Literal, X | None).

    None for any other type: such a field is set from Python only.
    """
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _arg_type(inner[0]) if len(inner) == 1 else None
    if origin is typing.Literal:
        choices = typing.get_args(annotation)
        return {"type": type(choices[0]), "choices": choices}
    if annotation in (int, float, str, bool):
        return {"type": annotation}
    return None


def _options_of(cls: type) -> dict[str, tuple[dict[str, Any], Any]]:
    """A strategy config's options settable from the command line: field -> (kind, default).

    The one source of the flags and of the config file's table for that strategy.
    """
    hints = typing.get_type_hints(cls)
    return {f.name: (kind, f.default) for f in dataclasses.fields(cls)
            if (kind := _arg_type(hints[f.name])) is not None}


def _plain(text: str) -> str:
    """Docstring text for the terminal: no reST roles or literals."""
    return re.sub(r":\w+:`~?([^`]+)`", r"\1", text).replace("``", "")


def _field_docs(cls: type) -> dict[str, str]:
    """Each field's description from a config's Google-style ``Args:`` section."""
    docs: dict[str, str] = {}
    names: list[str] = []
    inside = False
    for line in inspect.cleandoc(cls.__doc__ or "").splitlines():
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
    return {name: _plain(text) for name, text in docs.items()}


def _shown(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:g}" if isinstance(value, float) else str(value)


def _flag(strategy: str, field: str) -> str:
    """A strategy option's flag: ``_flag("sync", "ema_decay")`` is ``--sync.ema-decay``."""
    return f"--{strategy}.{field.replace('_', '-')}"


class _NamespacedBool(argparse.Action):
    """``--STRATEGY.X`` sets a bool option, ``--STRATEGY.no-X`` clears it.

    The negative keeps the strategy's prefix, so that every flag of a strategy
    starts with ``--STRATEGY.`` (argparse's own BooleanOptionalAction would
    make it ``--no-STRATEGY.X``).
    """

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        [flag] = option_strings
        prefix, _, name = flag.rpartition(".")
        super().__init__([flag, f"{prefix}.no-{name}"], dest, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, option_string == self.option_strings[0])

    def format_usage(self) -> str:
        return " | ".join(self.option_strings)


def add_strategy_flags(parser: argparse.ArgumentParser,
                       only: Mapping[str, Collection[str]] | None = None) -> None:
    """Add a ``--STRATEGY.OPTION`` flag for every field of every registered strategy's config.

    A flag takes its field's type (a ``Literal`` gives its choices, a bool
    gives ``--STRATEGY.X`` / ``--STRATEGY.no-X``) and its help shows the
    field's description and that strategy's own default; each strategy's
    flags form one ``--help`` group ("downpour options"). A flag not given
    stays None (dest ``STRATEGY.FIELD``), so that a config file's value
    survives; :func:`strategy_options` collects the ones given.

    Args:
        parser: the command's parser.
        only: just these strategies and fields, e.g. ``{"sync": ["backup"]}``.

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> add_strategy_flags(parser)
        >>> strategy_options(vars(parser.parse_args(["--downpour.push-every", "4"])))
        {'downpour': {'push_every': 4}}
    """
    from downpour.strategies import STRATEGIES

    for name, cls in STRATEGIES.items():
        if only is not None and name not in only:
            continue
        docs = _field_docs(cls)
        summary = _plain(inspect.cleandoc(cls.__doc__ or "").partition("\n")[0]) or None
        group = parser.add_argument_group(f"{name} options", summary)
        for field, (kind, default) in _options_of(cls).items():
            if only is not None and field not in only[name]:
                continue
            if kind["type"] is bool:
                kind = {"action": _NamespacedBool}
            elif "choices" not in kind:
                kind = {**kind, "metavar": kind["type"].__name__.upper()}
            shown = "" if default is dataclasses.MISSING else f"(default: {_shown(default)})"
            text = " ".join(filter(None, [docs.get(field), shown])).replace("%", "%%")
            group.add_argument(_flag(name, field), dest=f"{name}.{field}", default=None,
                               help=text, **kind)


def strategy_options(values: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The strategy flags given in parsed ``values``, by strategy (``{"downpour": {...}}``)."""
    options: dict[str, dict[str, Any]] = {}
    for dest, value in values.items():
        strategy, dot, field = dest.partition(".")
        if dot and value is not None:
            options.setdefault(strategy, {})[field] = value
    return options


def refuse_other_strategies(options: Mapping[str, Any], args: argparse.Namespace,
                            chosen: Collection[str], chosen_by: str) -> None:
    """Options for a strategy that will not run are a mistake: name them and where they came from.

    Args:
        options: merged options; a strategy's are under its name.
        args: the parsed command line (its flags and ``--config``).
        chosen: the strategies that run.
        chosen_by: how they were chosen, for the message ("but --strategy is 'sync'").
    """
    from downpour.strategies import STRATEGIES

    flags = strategy_options(vars(args))
    for strategy in sorted(options.keys() & (STRATEGIES.keys() - set(chosen))):
        config = getattr(args, "config", None)
        where = [_flag(strategy, field) if field in flags.get(strategy, {})
                 else f"[{strategy}] {field}" + (f" in config file {config}" if config else "")
                 for field in options[strategy]]
        raise ValueError(f"{', '.join(where)} {'is' if len(where) == 1 else 'are'} for strategy "
                         f"{strategy!r}, {chosen_by}; drop {'it' if len(where) == 1 else 'them'}")


def _checked_value(where: str, kind: dict[str, Any], value: Any) -> Any:
    """A config file's value for a strategy option, checked against the option's type."""
    if "choices" in kind:
        if value not in kind["choices"]:
            raise ValueError(f"{where} must be one of {', '.join(map(repr, kind['choices']))}, "
                             f"got {value!r}")
        return value
    expected = kind["type"]
    allowed = (int, float) if expected is float else expected
    if isinstance(value, bool) != (expected is bool) or not isinstance(value, allowed):
        raise TypeError(f"{where} must be {_KINDS[expected]}, got {value!r}")
    return float(value) if expected is float else value


def _checked_options(table: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Options in the config file's shape, keys normalized and checked against the registry.

    General options sit at the top level (``lr = 0.01``); a strategy's sit in
    a table named after it (``[downpour]`` / ``push_every = 4``). ``source``
    begins every message ("config file job.toml").
    """
    from downpour.strategies import STRATEGIES

    options: dict[str, Any] = {}
    for key, value in table.items():
        strategy = key.replace("_", "-")
        if isinstance(value, dict) and strategy in STRATEGIES:
            fields = _options_of(STRATEGIES[strategy])
            options[strategy] = {}
            for option, setting in value.items():
                field = option.replace("-", "_")
                if field not in fields:
                    raise ValueError(f"{source}: [{strategy}] has no option {option!r}; "
                                     f"it has: {', '.join(fields)}")
                where = f"{source}: [{strategy}] {field}"
                options[strategy][field] = _checked_value(where, fields[field][0], setting)
            continue
        general = key.replace("-", "_")
        if general in TRAIN_DEFAULTS and not isinstance(value, dict):
            options[general] = value
            continue
        users = [s for s, cls in STRATEGIES.items() if general in _options_of(cls)]
        if isinstance(value, dict):
            problem = (f"unknown table [{key}]; a table holds one strategy's options: "
                       f"{', '.join(f'[{s}]' for s in STRATEGIES)}")
        elif users:
            problem = (f"{key!r} is a strategy option; put it in its strategy's table: "
                       f"{' or '.join(f'[{s}]' for s in users)}")
        else:
            problem = (f"unknown key {key!r}; allowed: {', '.join(sorted(TRAIN_DEFAULTS))}, "
                       "and a table per strategy ([downpour], [sync], ...)")
        raise ValueError(f"{source}: {problem}")
    return options


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    with path.open("rb") as f:
        try:
            table = tomllib.load(f)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"config file {path}: {exc}") from None
    return _checked_options(table, f"config file {path}")


def _add_train_flags(p: argparse.ArgumentParser, *, compare: bool = False) -> None:
    from downpour.data import DATASETS
    from downpour.models import MODELS
    from downpour.optim import OPTIMIZERS, SCHEDULES
    from downpour.strategies import STRATEGIES

    d = TRAIN_DEFAULTS
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="TOML file of options: general ones at the top, a [STRATEGY] table for "
                        "each strategy's (flags given here win)")
    if not compare:
        p.add_argument("--strategy",
                       help=f"one of: {', '.join(sorted(STRATEGIES))} (default {d['strategy']})")
    p.add_argument("--dataset",
                   help=f"one of: {', '.join(sorted(DATASETS))} (default {d['dataset']})")
    p.add_argument("--data-dir",
                   help="dataset folder (default: $DOWNPOUR_DATA, then the user cache)")
    p.add_argument("--model", help=f"one of: {', '.join(sorted(MODELS))} (default {d['model']})")
    p.add_argument("--optimizer",
                   help=f"one of: {', '.join(sorted(OPTIMIZERS))} (default {d['optimizer']})")
    p.add_argument("--lr", type=float, help=f"learning rate (default {d['lr']})")
    p.add_argument("--schedule",
                   help=f"learning-rate schedule, one of: {', '.join(sorted(SCHEDULES))}")
    p.add_argument("--warmup-steps", type=int,
                   help="linear learning-rate warm-up steps (default 0)")
    p.add_argument("--batch-size", type=int,
                   help=f"mini-batch size per worker (default {d['batch_size']})")
    p.add_argument("--epochs", type=float,
                   help=f"passes over the training data (default {d['epochs']:g})")
    p.add_argument("--max-steps", type=int, help="stop after this many steps per worker")
    p.add_argument("--target-accuracy", type=float,
                   help="stop once test accuracy reaches this (0..1)")
    p.add_argument("--eval-every", type=int,
                   help="steps between evaluations (default: ten per run)")
    p.add_argument("--seed", type=int, help=f"random seed (default {d['seed']})")
    if not compare:
        p.add_argument("--run-dir", help="run directory (default runs/<id>)")
        p.add_argument("--workers", type=int, help=f"worker count (default {d['workers']})")
    p.add_argument("--servers", type=int, help=f"parameter-server shards (default {d['servers']})")
    p.add_argument("--device", help="cpu or cuda (default cpu)")
    p.add_argument("--slow-worker", action="append", metavar="RANK:FACTOR",
                   help="make a worker's steps FACTOR times slower (repeatable)")
    p.add_argument("--kill-worker", action="append", metavar="RANK@SECONDS",
                   help="SIGKILL a worker SECONDS into training (repeatable)")
    if not compare:
        p.add_argument("--kill-server", action="append", metavar="SHARD@SECONDS",
                       help="SIGKILL a server shard SECONDS into training; it restarts from its "
                            "checkpoint (repeatable)")
        p.add_argument("--restart-workers", action="store_true", default=None,
                       help="restart a worker that dies; it rejoins where it left off (allreduce "
                            "and local-sgd re-form their group with it)")
        p.add_argument("--checkpoint-every", metavar="N|Ss",
                       help="shards checkpoint every N versions or S seconds (e.g. 200, 30s) into "
                            "<run>/checkpoints")
        p.add_argument("--resume", metavar="RUN_DIR",
                       help="continue the stopped run in RUN_DIR from its checkpoints (its own "
                            "options are reused)")
    p.add_argument("--tensorboard", action="store_true", default=None,
                   help="also write metrics as TensorBoard event files in <run>/tensorboard")
    p.add_argument("--cluster", metavar="local|ray|ray:ADDRESS",
                   help="where roles run: processes on this machine (default), a local Ray, or a "
                        "Ray cluster")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_strategy_flags(p)


def _parse_faults(slow: list[str], kill: list[str], kill_server: list[str] = ()):
    from downpour.strategies import Faults

    def pairs(items: list[str], sep: str, flag: str) -> dict[int, float]:
        out = {}
        for item in items:
            rank, _, value = item.partition(sep)
            try:
                out[int(rank)] = float(value)
            except ValueError:
                raise ValueError(f"{flag} expects RANK{sep}NUMBER (e.g. 1{sep}5), "
                                 f"got {item!r}") from None
        return out

    return Faults(slow=pairs(slow, ":", "--slow-worker"), kill=pairs(kill, "@", "--kill-worker"),
                  kill_server=pairs(list(kill_server), "@", "--kill-server"))


def _merged_options(args: argparse.Namespace) -> dict[str, Any]:
    """Defaults, then the config file, then flags given on the command line.

    The result has the config file's shape, general options at the top and a
    strategy's under its name (``{"strategy": "downpour", ..., "downpour":
    {"push_every": 4}}``), and is kept so in the run's ``config.json``.
    """
    from downpour.strategies import STRATEGIES

    assert not STRATEGIES.keys() & TRAIN_DEFAULTS.keys(), "a strategy named like an option"
    given = {key: value for key, value in vars(args).items() if value is not None}
    layers = [_read_config(args.config)] if args.config is not None else []
    layers += [{k: v for k, v in given.items() if k in TRAIN_DEFAULTS}, strategy_options(given)]
    options = dict(TRAIN_DEFAULTS)
    for layer in layers:
        for key, value in layer.items():
            options[key] = {**options.get(key, {}), **value} if key in STRATEGIES else value
    return options


def _given_flags(args: argparse.Namespace) -> list[str]:
    """The option flags given on the command line (general and strategy ones, and --config)."""
    flags = []
    for key, value in sorted(vars(args).items()):
        if value is None:
            continue
        if "." in key:
            flags.append(_flag(*key.split(".", 1)))
        elif key in TRAIN_DEFAULTS or key == "config":
            flags.append("--" + key.replace("_", "-"))
    return flags


def _resumed_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options a run was started with, from its ``config.json``, for ``--resume``."""
    run_dir = Path(args.resume)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"--resume {run_dir}: no run there (no config.json)")
    # The run's own options, but for where the data is (the folder may have moved since).
    given = [flag for flag in _given_flags(args) if flag != "--data-dir"]
    if given:
        raise ValueError(f"--resume takes the run's own options; drop {', '.join(given)}")
    stored = json.loads(config_path.read_text(encoding="utf-8")).get("options")
    if not stored:
        raise ValueError(f"--resume {run_dir}: the run was not started by `downpour train`, "
                         "so its options are unknown")
    legacy = stored.pop("strategy_options", None)  # a run started before options were namespaced
    if legacy:
        stored.setdefault(stored["strategy"], legacy)
    options = {**TRAIN_DEFAULTS, **_checked_options(stored, f"--resume {run_dir}: config.json")}
    # A staged kill belongs to the first attempt; the resumed run checkpoints as the first did.
    return {**options, "run_dir": str(run_dir), "kill_worker": [], "kill_server": [],
            "checkpoint_every": options.get("checkpoint_every") or 100,
            "data_dir": args.data_dir or options.get("data_dir")}


def _train(args: argparse.Namespace) -> int:
    import downpour as dp
    from downpour.errors import choose
    from downpour.strategies import STRATEGIES

    o = _resumed_options(args) if args.resume else _merged_options(args)
    choose("strategy", o["strategy"], STRATEGIES)
    refuse_other_strategies(o, args, [o["strategy"]], f"but --strategy is {o['strategy']!r}")
    strategy = dp.strategies.get(o["strategy"], **o.get(o["strategy"], {}))
    data = dp.data.load(o["dataset"], data_dir=o["data_dir"])
    optimizer = dp.optim(o["optimizer"], lr=o["lr"], schedule=o["schedule"],
                         warmup_steps=o["warmup_steps"])
    result = dp.train(
        model=o["model"], data=data, strategy=strategy, optimizer=optimizer,
        workers=o["workers"], servers=o["servers"], epochs=o["epochs"], batch_size=o["batch_size"],
        max_steps=o["max_steps"], target_accuracy=o["target_accuracy"], eval_every=o["eval_every"],
        seed=o["seed"], device=o["device"],
        faults=_parse_faults(o["slow_worker"], o["kill_worker"], o["kill_server"]),
        run_dir=o["run_dir"], progress=not args.quiet, tensorboard=o["tensorboard"],
        cluster=o["cluster"], checkpoint_every=o["checkpoint_every"],
        restart_workers=o["restart_workers"], resume=bool(args.resume), options=o,
    )
    print_summary(result.summary)
    print(f"run directory: {result.run_dir}")
    return 0


def print_summary(summary: dict[str, Any]) -> None:
    """The summary as a two-column table in the terminal."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="summary", show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value")
    for key, value in summary.items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    Console().print(table)


def _report(args: argparse.Namespace) -> int:
    from downpour.metrics import RunDir, plot_run, read_events, summarize

    if (Path(args.run_dir) / "comparison.json").is_file():
        from downpour.cli.compare import report_comparison

        return report_comparison(Path(args.run_dir), as_json=args.json)
    run = RunDir(args.run_dir)
    if not (run.path / RunDir.EVENTS).is_file():
        raise FileNotFoundError(f"{run.path} is not a run directory: no {RunDir.EVENTS} in it")
    events = list(read_events(run.path / RunDir.EVENTS))
    config = run.read_config() if (run.path / RunDir.CONFIG).is_file() else {}
    config["run_dir"] = str(run.path)
    title = f"{config.get('strategy', '')} · {config.get('dataset', '')}"
    paths = plot_run(events, run.path, title=title)
    summary = summarize(events, config)
    run.write_summary(summary)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_summary(summary)
        for path in paths:
            print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="downpour",
        description="Distributed SGD training: Downpour, synchronous parameter servers, allreduce, "
        "Hogwild!, parameter averaging and more, compared on your workload.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="train a model with a strategy and write a run directory",
                           usage=STRATEGY_USAGE,
                           description="Train a model with a distributed strategy; writes "
                                       "runs/<id>/. A strategy's options are namespaced: "
                                       "--downpour.push-every 4.")
    _add_train_flags(train)
    train.set_defaults(func=_train)

    from downpour.cli.compare import add_compare_command

    add_compare_command(sub)

    report = sub.add_parser(
        "report", help="rebuild a run's or a comparison's plots and summary from event logs",
        description="Re-render plots and summary.json of a run, or the figures, table and "
                    "report.html of a comparison, from the event logs alone.")
    report.add_argument("run_dir", metavar="DIR",
                        help="a run directory (runs/<id>) or a comparison directory")
    report.add_argument("--json", action="store_true", help="print the summary as JSON")
    report.set_defaults(func=_report)

    from downpour.cli.roles import add_role_commands

    add_role_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("downpour: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, DownpourError) as exc:
        if args.debug:
            raise
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"downpour: error: {message}", file=sys.stderr)
        return 2

