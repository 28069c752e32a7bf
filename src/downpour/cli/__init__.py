"""The ``downpour`` command line: a thin layer over :mod:`downpour.api`.

Strings exist only here; they are resolved to configs and factories at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from downpour.errors import DownpourError

log = logging.getLogger("downpour")

# Flags of `downpour train` and their defaults (None: unset). The config file
# (TOML) may set any of these by the same name, with dashes or underscores.
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


def _strategy_fields() -> dict[str, tuple[type, Any, set[str]]]:
    """Every strategy option across the registry: name -> (type, default, strategies using it)."""
    from downpour.strategies import STRATEGIES

    fields: dict[str, tuple[type, Any, set[str]]] = {}
    for name, cls in STRATEGIES.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in fields:
                fields[f.name][2].add(name)
            else:
                fields[f.name] = (hints[f.name], f.default, {name})
    return fields


def _arg_type(annotation: Any) -> dict[str, Any]:
    """argparse keywords for a dataclass field's annotation (int, float, str, bool, Literal, X | None)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _arg_type(inner[0]) if len(inner) == 1 else {"type": str}
    if origin is typing.Literal:
        choices = typing.get_args(annotation)
        return {"type": type(choices[0]), "choices": choices}
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if annotation in (int, float, str):
        return {"type": annotation}
    return {"type": str}


def _add_train_flags(p: argparse.ArgumentParser, *, compare: bool = False) -> None:
    from downpour.data import DATASETS
    from downpour.models import MODELS
    from downpour.optim import OPTIMIZERS, SCHEDULES
    from downpour.strategies import STRATEGIES

    d = TRAIN_DEFAULTS
    p.add_argument("--config", type=Path, metavar="FILE", help="TOML file of flag values (flags given here win)")
    if not compare:
        p.add_argument("--strategy", help=f"one of: {', '.join(sorted(STRATEGIES))} (default {d['strategy']})")
    p.add_argument("--dataset", help=f"one of: {', '.join(sorted(DATASETS))} (default {d['dataset']})")
    p.add_argument("--data-dir", help="dataset folder (default: $DOWNPOUR_DATA, then the user cache)")
    p.add_argument("--model", help=f"one of: {', '.join(sorted(MODELS))} (default {d['model']})")
    p.add_argument("--optimizer", help=f"one of: {', '.join(sorted(OPTIMIZERS))} (default {d['optimizer']})")
    p.add_argument("--lr", type=float, help=f"learning rate (default {d['lr']})")
    p.add_argument("--schedule", help=f"learning-rate schedule, one of: {', '.join(sorted(SCHEDULES))}")
    p.add_argument("--warmup-steps", type=int, help="linear learning-rate warm-up steps (default 0)")
    p.add_argument("--batch-size", type=int, help=f"mini-batch size per worker (default {d['batch_size']})")
    p.add_argument("--epochs", type=float, help=f"passes over the training data (default {d['epochs']:g})")
    p.add_argument("--max-steps", type=int, help="stop after this many steps per worker")
    p.add_argument("--target-accuracy", type=float, help="stop once test accuracy reaches this (0..1)")
    p.add_argument("--eval-every", type=int, help="steps between evaluations (default: ten per run)")
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
                       help="SIGKILL a server shard SECONDS into training; it restarts from its checkpoint "
                            "(repeatable)")
        p.add_argument("--restart-workers", action="store_true", default=None,
                       help="restart a worker that dies; it rejoins where it left off (allreduce and local-sgd "
                            "re-form their group with it)")
        p.add_argument("--checkpoint-every", metavar="N|Ss",
                       help="shards checkpoint every N versions or S seconds (e.g. 200, 30s) into <run>/checkpoints")
        p.add_argument("--resume", metavar="RUN_DIR",
                       help="continue the stopped run in RUN_DIR from its checkpoints (its own flags are reused)")
    p.add_argument("--tensorboard", action="store_true", default=None,
                   help="also write metrics as TensorBoard event files in <run>/tensorboard")
    p.add_argument("--cluster", metavar="local|ray|ray:ADDRESS",
                   help="where roles run: processes on this machine (default), a local Ray, or a Ray cluster")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    if compare:
        return
    group = p.add_argument_group("strategy options (each applies to the strategies named)")
    for name, (annotation, default, users) in sorted(_strategy_fields().items()):
        flag = "--" + name.replace("_", "-")
        shown = "" if default is dataclasses.MISSING else f" (default {default})"
        group.add_argument(flag, dest=f"strategy.{name}", default=None, **_arg_type(annotation),
                           help=f"[{', '.join(sorted(users))}]{shown}")


def _parse_faults(slow: list[str], kill: list[str], kill_server: list[str] = ()):
    from downpour.strategies import Faults

    def pairs(items: list[str], sep: str, flag: str) -> dict[int, float]:
        out = {}
        for item in items:
            rank, _, value = item.partition(sep)
            try:
                out[int(rank)] = float(value)
            except ValueError:
                raise ValueError(f"{flag} expects RANK{sep}NUMBER (e.g. 1{sep}5), got {item!r}") from None
        return out

    return Faults(slow=pairs(slow, ":", "--slow-worker"), kill=pairs(kill, "@", "--kill-worker"),
                  kill_server=pairs(list(kill_server), "@", "--kill-server"))


def _merged_options(args: argparse.Namespace) -> dict[str, Any]:
    """Defaults, then the config file, then flags given on the command line."""
    options = dict(TRAIN_DEFAULTS)
    strategy_options: dict[str, Any] = {}
    if args.config is not None:
        if not args.config.is_file():
            raise FileNotFoundError(f"config file {args.config} does not exist")
        with args.config.open("rb") as f:
            try:
                table = tomllib.load(f)
            except tomllib.TOMLDecodeError as exc:
                raise ValueError(f"config file {args.config}: {exc}") from None
        known = set(TRAIN_DEFAULTS) | set(_strategy_fields())
        for key, value in table.items():
            key = key.replace("-", "_")
            if key not in known:
                raise ValueError(f"config file {args.config}: unknown key {key!r}; allowed: {', '.join(sorted(known))}")
            (options if key in TRAIN_DEFAULTS else strategy_options)[key] = value
    for key, value in vars(args).items():
        if value is None:
            continue
        if key.startswith("strategy."):
            strategy_options[key.removeprefix("strategy.")] = value
        elif key in TRAIN_DEFAULTS:
            options[key] = value
    options["strategy_options"] = strategy_options
    return options


def _resumed_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options a run was started with, from its ``config.json``, to resume it with ``--resume``."""
    run_dir = Path(args.resume)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"--resume {run_dir}: no run there (no config.json)")
    # The run's own options, but for where the data is (the folder may have moved since).
    given = sorted(key for key, value in vars(args).items() if value is not None
                   and (key in TRAIN_DEFAULTS or key.startswith("strategy.") or key == "config")
                   and key != "data_dir")
    if given:
        flags = ", ".join("--" + g.removeprefix("strategy.").replace("_", "-") for g in given)
        raise ValueError(f"--resume takes the run's own options; drop {flags}")
    options = json.loads(config_path.read_text(encoding="utf-8")).get("options")
    if not options:
        raise ValueError(f"--resume {run_dir}: the run was not started by `downpour train`, so its options are unknown")
    # A staged kill belongs to the first attempt; the resumed run checkpoints as the first did.
    return {**options, "run_dir": str(run_dir), "kill_worker": [], "kill_server": [],
            "checkpoint_every": options.get("checkpoint_every") or 100,
            "data_dir": args.data_dir or options.get("data_dir")}


def _train(args: argparse.Namespace) -> int:
    import downpour as dp
    from downpour.errors import choose
    from downpour.strategies import STRATEGIES

    if getattr(args, "resume", None):
        o = _resumed_options(args)
    else:
        o = _merged_options(args)
    choose("strategy", o["strategy"], STRATEGIES)
    allowed = {f.name for f in dataclasses.fields(STRATEGIES[o["strategy"]])}
    stray = sorted(set(o["strategy_options"]) - allowed)
    if stray:
        flags = ", ".join("--" + s.replace("_", "-") for s in stray)
        raise ValueError(f"{flags} does not apply to strategy {o['strategy']!r}")
    strategy = dp.strategies.get(o["strategy"], **o["strategy_options"])
    data = dp.data.load(o["dataset"], data_dir=o["data_dir"])
    optimizer = dp.optim(o["optimizer"], lr=o["lr"], schedule=o["schedule"], warmup_steps=o["warmup_steps"])
    result = dp.train(
        model=o["model"], data=data, strategy=strategy, optimizer=optimizer,
        workers=o["workers"], servers=o["servers"], epochs=o["epochs"], batch_size=o["batch_size"],
        max_steps=o["max_steps"], target_accuracy=o["target_accuracy"], eval_every=o["eval_every"],
        seed=o["seed"], device=o["device"],
        faults=_parse_faults(o["slow_worker"], o["kill_worker"], o["kill_server"]),
        run_dir=o["run_dir"], progress=not args.quiet, tensorboard=o["tensorboard"], cluster=o["cluster"],
        checkpoint_every=o["checkpoint_every"], restart_workers=o["restart_workers"],
        resume=bool(getattr(args, "resume", None)), options=o,
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
    paths = plot_run(events, run.path, title=f"{config.get('strategy', '')} · {config.get('dataset', '')}")
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
                           description="Train a model with a distributed strategy; writes runs/<id>/.")
    _add_train_flags(train)
    train.set_defaults(func=_train)

    from downpour.cli.compare import add_compare_command

    add_compare_command(sub)

    report = sub.add_parser("report", help="rebuild a run's or a comparison's plots and summary from event logs",
                            description="Re-render plots and summary.json of a run, or the figures, table and "
                                        "report.html of a comparison, from the event logs alone.")
    report.add_argument("run_dir", metavar="DIR", help="a run directory (runs/<id>) or a comparison directory")
    report.add_argument("--json", action="store_true", help="print the summary as JSON")
    report.set_defaults(func=_report)

    from downpour.cli.roles import add_role_commands

    add_role_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "compare":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.strategy_extras = extra
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

