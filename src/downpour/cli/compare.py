"""``downpour compare``: several strategies on one workload, side by side."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path


def _workers(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--workers expects counts such as 4 or 1,2,4, got {text!r}") from None
    if not counts or any(c < 1 for c in counts):
        raise ValueError(f"--workers expects positive counts such as 4 or 1,2,4, got {text!r}")
    return counts


def _compare(args: argparse.Namespace) -> int:
    import downpour as dp
    from downpour.cli import _merged_options, _parse_faults, refuse_other_strategies
    from downpour.compare import compare, show
    from downpour.errors import choose
    from downpour.strategies import STRATEGIES

    o = _merged_options(args)
    names = [n.strip() for n in args.strategies.split(",") if n.strip()]
    if not names:
        raise ValueError("--strategies needs at least one strategy, e.g. sync,downpour")
    for name in names:
        choose("strategy", name, STRATEGIES)
    refuse_other_strategies(o, args, names, f"which --strategies {','.join(names)} does not name")
    strategies = [dp.strategies.get(name, **o.get(name, {})) for name in names]
    optimizer = dp.optim(o["optimizer"], lr=o["lr"], schedule=o["schedule"],
                         warmup_steps=o["warmup_steps"])
    comparison = compare(
        strategies=strategies, model=o["model"],
        data=dp.data.load(o["dataset"], data_dir=o["data_dir"]), workers=_workers(args.workers),
        servers=o["servers"], optimizer=optimizer, epochs=o["epochs"], batch_size=o["batch_size"],
        max_steps=o["max_steps"], target_accuracy=o["target_accuracy"],
        budget_seconds=args.budget_seconds, eval_every=o["eval_every"], seed=o["seed"],
        faults=_parse_faults(o["slow_worker"], o["kill_worker"]), out_dir=args.out_dir,
        tensorboard=o["tensorboard"], progress=not args.quiet, cluster=o["cluster"],
        command=shlex.join(["downpour", *sys.argv[1:]]) if sys.argv[1:] else "downpour compare",
    )
    show(comparison)
    print(f"comparison directory: {comparison.path}")
    print(f"report: {comparison.path / 'report.html'}")
    return 0


def report_comparison(directory: Path, *, as_json: bool = False) -> int:
    """Rebuild a comparison's table, figures and page from its runs' event logs."""
    from downpour.metrics.report import print_table, write_comparison_report

    saved = json.loads((directory / "comparison.json").read_text(encoding="utf-8"))
    meta = {k: v for k, v in saved.items() if k not in ("runs", "rows")}
    summary = write_comparison_report(directory, [Path(p) for p in saved["runs"]], meta)
    if as_json:
        print(json.dumps(summary["rows"], indent=2))
    else:
        print_table(summary["rows"], title=f"comparison · {directory}")
        print(f"report: {directory / 'report.html'}")
    return 0


def add_compare_command(sub) -> None:
    from downpour.cli import STRATEGY_USAGE, _add_train_flags

    p = sub.add_parser(
        "compare", help="run several strategies on one workload and report them side by side",
        usage=STRATEGY_USAGE,
        description="Train each strategy on the same workload (data, partitions, model, seed, "
                    "evaluation schedule), one after another, and write a comparison directory "
                    "with every run, a summary table, figures and report.html. Each strategy takes "
                    "its own options, namespaced by its name: --downpour.push-every 4 "
                    "--sync.backup 1.")
    p.add_argument("--strategies", required=True, metavar="NAME,...",
                   help="strategies to compare, e.g. sync,downpour,allreduce")
    p.add_argument("--workers", default="4", metavar="N[,N...]",
                   help="worker count, or several to sweep (adds speedup over single) (default 4)")
    p.add_argument("--budget-seconds", type=float, help="stop each run after this many seconds")
    p.add_argument("--out-dir", help="comparison directory (default runs/<id>-compare)")
    _add_train_flags(p, compare=True)
    p.set_defaults(func=_compare)
