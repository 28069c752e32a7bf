"""The ``downpour`` command line: a thin layer over :mod:`downpour.api`.

Strings exist only here; they are resolved to configs and factories at once.
General options are plain flags (``--lr 0.01``) derived from the fields of
:class:`downpour.run.RunConfig`, which holds their types, defaults and help;
a strategy's options are derived from its config dataclass and namespaced by
the strategy (``--downpour.push-every 4``), the same on every command. A TOML
config file (``--config FILE``) uses the same names: general options at the
top, a table per strategy (``[downpour]`` / ``push_every = 4``); flags win
over the file.
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
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from downpour.errors import DownpourError

if TYPE_CHECKING:
    from downpour.run import RunConfig
    from downpour.run.config import Option
    from downpour.strategies import Faults, Strategy

log = logging.getLogger("downpour")

# Staged faults in the command line's own notation: flag -> (metavar, help, the Faults fields it
# sets). The config file takes them by the same names, as lists (kill_worker = ["1@step=200"]).
FAULT_FLAGS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "slow_worker": ("RANK:FACTOR", "make worker RANK's steps FACTOR times slower (repeatable)",
                    ("slow",)),
    "kill_worker": ("RANK@SECONDS|RANK@step=N",
                    "SIGKILL worker RANK SECONDS into training (1@3.5 or 1@3s), or as it reaches "
                    "step N (1@step=200); repeatable", ("kill", "kill_at_step")),
    "kill_server": ("SHARD@SECONDS|SHARD@version=N", "SIGKILL server shard SHARD SECONDS into training (1@5 or "
                    "1@5s), or right after the update that takes it to version N "
                    "(1@version=450); it restarts from its checkpoint (repeatable)",
                    ("kill_server", "kill_server_at_version")),
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
    from downpour.run.config import field_docs, plain
    from downpour.strategies import STRATEGIES

    for name, cls in STRATEGIES.items():
        if only is not None and name not in only:
            continue
        docs = field_docs(cls)
        summary = plain(inspect.cleandoc(cls.__doc__ or "").partition("\n")[0]) or None
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


def general_options() -> dict[str, Option]:
    """The run's options that a flag and a config-file key set, by name (``batch_size``)."""
    from downpour.run.config import options

    return {name: option for name, option in options().items() if option.flag}


def option_defaults() -> dict[str, Any]:
    """Every general option of the command line and the config file, with its default.

    All of them come from :class:`downpour.run.RunConfig`: the strategy's name,
    its options (``lr``: 0.05), and the staged faults (none).
    """
    from downpour.run import RunConfig

    return {"strategy": RunConfig().strategy.name,
            **{name: option.default for name, option in general_options().items()},
            **{name: [] for name in FAULT_FLAGS}}


def _option_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _option_kind(option: Option) -> dict[str, Any]:
    """argparse keywords for a general option: its field's type, a bool a switch."""
    kind = {"type": option.meta["type"]} if "type" in option.meta else _arg_type(option.annotation)
    assert kind is not None, f"option {option.name!r} has no command-line type"
    if kind["type"] is bool:
        # A switch that is on by default is turned off: --no-X (see add_option_flags).
        return {"action": "store_false" if option.default is True else "store_true"}
    return {**kind, **({"metavar": option.meta["metavar"]} if "metavar" in option.meta else {})}


def _option_help(text: str, default: Any, choices: Iterable[str] | None) -> str:
    parts = [text.rstrip(".")]
    if choices is not None:
        parts.append(f"one of: {', '.join(sorted(choices))}")
    shown = "" if default is None or isinstance(default, bool) else f" (default: {_shown(default)})"
    return ("; ".join(filter(None, parts)) + shown).replace("%", "%%")


def add_option_flags(parser: argparse.ArgumentParser, only: Collection[str] | None = None, *,
                     exclude: Collection[str] = (), defaults: bool = False,
                     aliases: Mapping[str, Collection[str]] | None = None) -> None:
    """Add a flag for each general option of the run (``--batch-size``), in RunConfig's order.

    A flag takes its field's type (a bool is a switch), and its help is the
    field's description with the choices of its registry and its default. A
    flag not given stays None, so that a config file's value survives, unless
    ``defaults`` (a command without a config file: the hand-started roles).

    Args:
        parser: the command's parser.
        only: just these options (by name, ``"batch_size"``).
        exclude: not these.
        defaults: flags default to their option's default instead of None.
        aliases: more flags for an option (``{"max_seconds": ["--budget-seconds"]}``).
    """
    for name, option in general_options().items():
        if (only is not None and name not in only) or name in exclude:
            continue
        flags = [_option_flag(("no_" if option.default is True else "") + name),
                 *(aliases or {}).get(name, ())]
        parser.add_argument(*flags, dest=name, default=option.default if defaults else None,
                            help=_option_help(option.help, option.default,
                                              option.meta.get("choices")),
                            **_option_kind(option))


def _add_strategy_flag(p: argparse.ArgumentParser) -> None:
    from downpour.strategies import STRATEGIES

    text = "the strategy (its own options are --STRATEGY.OPTION)"
    p.add_argument("--strategy", help=_option_help(text, option_defaults()["strategy"], STRATEGIES))


def _add_fault_flags(p: argparse.ArgumentParser, names: Iterable[str] = tuple(FAULT_FLAGS)) -> None:
    for name in names:
        metavar, text, _ = FAULT_FLAGS[name]
        p.add_argument(_option_flag(name), action="append", metavar=metavar, help=text)


def _checked_value(where: str, kind: dict[str, Any], value: Any) -> Any:
    """A config file's value for an option, checked against the option's type."""
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


def _checked_general(where: str, name: str, value: Any) -> Any:
    """A config file's (or config.json's) value for a general option, checked against its type."""
    if name == "strategy":
        return _checked_value(where, {"type": str}, value)
    if name in FAULT_FLAGS:
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise TypeError(f"{where} must be a list of strings such as "
                            f"[\"{FAULT_FLAGS[name][0]}\"], got {value!r}")
        return value
    option = general_options()[name]
    kind = _arg_type(option.annotation)
    if value is None and option.default is None:  # config.json keeps an unset option as null
        return value
    return value if kind is None else _checked_value(where, kind, value)


def _checked_options(table: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Options in the config file's shape, keys normalized and checked against the registry.

    General options sit at the top level (``lr = 0.01``); a strategy's sit in
    a table named after it (``[downpour]`` / ``push_every = 4``). ``source``
    begins every message ("config file job.toml").
    """
    from downpour.strategies import STRATEGIES

    general_names = option_defaults()
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
        if general in general_names and not isinstance(value, dict):
            options[general] = _checked_general(f"{source}: {key}", general, value)
            continue
        users = [s for s, cls in STRATEGIES.items() if general in _options_of(cls)]
        if isinstance(value, dict):
            problem = (f"unknown table [{key}]; a table holds one strategy's options: "
                       f"{', '.join(f'[{s}]' for s in STRATEGIES)}")
        elif users:
            problem = (f"{key!r} is a strategy option; put it in its strategy's table: "
                       f"{' or '.join(f'[{s}]' for s in users)}")
        else:
            problem = (f"unknown key {key!r}; allowed: {', '.join(sorted(general_names))}, "
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
    from downpour.compare import PER_RUN

    p.add_argument("--config", type=Path, metavar="FILE",
                   help="TOML file of options: general ones at the top, a [STRATEGY] table for "
                        "each strategy's (flags given here win)")
    if not compare:
        _add_strategy_flag(p)
    add_option_flags(p, exclude=PER_RUN if compare else (),
                     aliases={"max_seconds": ["--budget-seconds"]} if compare else None)
    _add_fault_flags(p, ["slow_worker", "kill_worker"] if compare else FAULT_FLAGS)
    if not compare:
        p.add_argument("--resume", metavar="RUN_DIR",
                       help="continue the stopped run in RUN_DIR from its checkpoints (its own "
                            "options are reused)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_strategy_flags(p)


def _at(item: str, flag: str, what: str, *, steps: bool) -> tuple[int, float | int, bool]:
    """``1@3.5``, ``1@3s`` (seconds) or ``1@step=200`` (a worker) / ``1@version=450`` (a shard):
    (rank, when, at a step or version)."""
    counter = "step" if steps else "version"
    match = re.fullmatch(r"\s*(\d+)\s*@\s*(?:(\d+(?:\.\d*)?|\.\d+)\s*s?|(step|version)\s*=\s*(\d+))\s*",
                         item)
    if match is None or (match[3] is not None and match[3] != counter):
        example = "1@step=200" if steps else "1@version=450"
        raise ValueError(f"{flag} expects {what}@SECONDS (1@3.5 or 1@3s) or {what}@{counter}=N "
                         f"({example}), got {item!r}")
    if match[3] is not None:
        return int(match[1]), int(match[4]), True
    return int(match[1]), float(match[2]), False


def _parse_faults(slow: Iterable[str], kill: Iterable[str],
                  kill_server: Iterable[str] = ()) -> Faults:
    """The staged faults from their flags: ``1:5``, ``1@3.5``/``1@3s``/``1@step=200``, ``0@5``.

    Example:
        >>> _parse_faults([], ["1@step=200", "2@3s"]).kill_at_step
        {1: 200}
    """
    from downpour.strategies import Faults

    slowed: dict[int, float] = {}
    for item in slow:
        rank, _, value = item.partition(":")
        try:
            slowed[int(rank)] = float(value)
        except ValueError:
            raise ValueError(f"--slow-worker expects RANK:NUMBER (e.g. 1:5), "
                             f"got {item!r}") from None
    killed: dict[int, float] = {}
    at_step: dict[int, int] = {}
    for item in kill:
        rank, when, is_step = _at(item, "--kill-worker", "RANK", steps=True)
        if is_step:
            at_step[rank] = int(when)
        else:
            killed[rank] = float(when)
    servers: dict[int, float] = {}
    at_version: dict[int, int] = {}
    for item in kill_server:
        shard, when, is_version = _at(item, "--kill-server", "SHARD", steps=False)
        if is_version:
            at_version[shard] = int(when)
        else:
            servers[shard] = float(when)
    return Faults(slow=slowed, kill=killed, kill_at_step=at_step, kill_server=servers,
                  kill_server_at_version=at_version)


def _merged_options(args: argparse.Namespace) -> tuple[dict[str, Any], set[str]]:
    """Defaults, then the config file, then flags given on the command line.

    The options have the config file's shape, general options at the top and
    a strategy's under its name (``{"strategy": "downpour", ..., "downpour":
    {"push_every": 4}}``), and are kept so in the run's ``config.json``. With
    them, the names of the general options the user gave (by flag or in the file).
    """
    from downpour.strategies import STRATEGIES

    defaults = option_defaults()
    assert not STRATEGIES.keys() & defaults.keys(), "a strategy named like an option"
    given = {key: value for key, value in vars(args).items() if value is not None}
    layers = [_read_config(args.config)] if args.config is not None else []
    layers += [{k: v for k, v in given.items() if k in defaults}, strategy_options(given)]
    options = dict(defaults)
    for layer in layers:
        for key, value in layer.items():
            options[key] = {**options.get(key, {}), **value} if key in STRATEGIES else value
    return options, {key for layer in layers[:-1] for key in layer if key in defaults}


def _given_flags(args: argparse.Namespace) -> list[str]:
    """The option flags given on the command line (general and strategy ones, and --config)."""
    flags = []
    defaults = option_defaults()
    for key, value in sorted(vars(args).items()):
        if value is None:
            continue
        if "." in key:
            flags.append(_flag(*key.split(".", 1)))
        elif key in defaults or key == "config":
            flags.append(_option_flag(key))
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
    options = {**option_defaults(), **_checked_options(stored, f"--resume {run_dir}: config.json")}
    # A staged kill belongs to the first attempt; the resumed run checkpoints as the first did.
    return {**options, "run_dir": str(run_dir), "kill_worker": [], "kill_server": [],
            "checkpoint_every": options.get("checkpoint_every") or 100,
            "data_dir": args.data_dir or options.get("data_dir")}


def refuse_unread_flags(strategies: list[Strategy], given: Collection[str]) -> None:
    """A general option given that none of ``strategies`` reads is an error naming its flag.

    ``given`` holds option names as the command line has them (``"lr"``,
    ``"kill_worker"``); the message spells each as its flag and the strategy's
    own options as theirs (``--sandblaster.max-iterations``).
    """
    from downpour.run.config import refuse_unread

    faults = {f"faults.{field}": flag for flag, (_, _, fields) in FAULT_FLAGS.items()
              for field in fields}
    names = [field for name in given if name != "strategy"
             for field in ([f"faults.{f}" for f in FAULT_FLAGS[name][2]]
                           if name in FAULT_FLAGS else [name])]
    refuse_unread(strategies, names, spell=lambda name: _option_flag(faults.get(name, name)),
                  spell_field=lambda strategy, field: _flag(strategy.name, field))


def run_config(options: Mapping[str, Any], strategy: Strategy, **values: Any) -> RunConfig:
    """The RunConfig of merged command-line ``options`` (in the config file's shape).

    ``values`` set more (``resume=True``, or ``faults`` already parsed).
    """
    from downpour.run import RunConfig

    if "faults" not in values:
        values["faults"] = _parse_faults(options["slow_worker"], options["kill_worker"],
                                         options["kill_server"])
    general = {name: options[name] for name in general_options() if name in options}
    return RunConfig.of(strategy=strategy, **general, **values)


def _train(args: argparse.Namespace) -> int:
    import downpour as dp
    from downpour.errors import choose
    from downpour.strategies import STRATEGIES

    # A resumed run's options were checked when it started; they are all "given" there.
    o, given = (_resumed_options(args), set()) if args.resume else _merged_options(args)
    choose("strategy", o["strategy"], STRATEGIES)
    refuse_other_strategies(o, args, [o["strategy"]], f"but --strategy is {o['strategy']!r}")
    strategy = dp.strategies.get(o["strategy"], **o.get(o["strategy"], {}))
    faults = _parse_faults(o["slow_worker"], o["kill_worker"], o["kill_server"])  # their notation
    refuse_unread_flags([strategy], given)
    config = run_config(o, strategy, faults=faults, resume=bool(args.resume))
    result = dp.train(config=config, progress=not args.quiet, options=o)
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
        # The library's own errors name its fields; the command line's name their flags already.
        if not _raised_here(exc):
            message = in_flags(message, args)
        print(f"downpour: error: {message}", file=sys.stderr)
        return 2


def _raised_here(exc: BaseException) -> bool:
    """Whether ``exc`` was raised by the command line itself (its messages speak of flags and files)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and Path(tb.tb_frame.f_code.co_filename).parent == Path(__file__).parent


def in_flags(message: str, args: argparse.Namespace) -> str:
    """``message`` with the Python names of options in it spelled as the command line's flags.

    The library's errors name the fields of its configs (``set ema_decay``);
    a user of the command line reads ``--downpour.ema-decay``. Only names with
    an underscore are rewritten: a bare word may be plain English.

    Example:
        >>> in_flags("evaluate_average needs a moving average: set ema_decay (e.g. 0.99)",
        ...          argparse.Namespace(strategy="downpour"))
        '--downpour.evaluate-average needs a moving average: set --downpour.ema-decay (e.g. 0.99)'
    """
    from downpour.strategies import STRATEGIES

    chosen = getattr(args, "strategies", None) or getattr(args, "strategy", None) or ""
    names: dict[str, str] = {}
    for option in general_options():
        if "_" in option:
            names[option] = _option_flag(option)
    for strategy in str(chosen).split(","):
        cls = STRATEGIES.get(strategy.strip())
        if cls is not None:
            names |= {f.name: _flag(cls.name, f.name) for f in dataclasses.fields(cls) if "_" in f.name}

    def spell(match: re.Match) -> str:
        return names[match.group(0)]

    if not names:
        return message
    pattern = r"(?<![\w.\-])(" + "|".join(sorted(map(re.escape, names), key=len, reverse=True)) + r")(?![\w\-])"
    return re.sub(pattern, spell, message)

