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
    from downpour.cli import (
        _merged_options,
        _parse_faults,
        general_options,
        refuse_other_strategies,
        refuse_unread_flags,
    )
    from downpour.compare import PER_RUN, compare, show
    from downpour.errors import choose
    from downpour.strategies import STRATEGIES

    o, given = _merged_options(args)
    names = [n.strip() for n in args.strategies.split(",") if n.strip()]
    if not names:
        raise ValueError("--strategies needs at least one strategy, e.g. sync,downpour")
    for name in names:
        choose("strategy", name, STRATEGIES)
    refuse_other_strategies(o, args, names, f"which --strategies {','.join(names)} does not name")
    strategies = [dp.strategies.get(name, **o.get(name, {})) for name in names]
    # Only a config file can hold these here: compare has no flag for them.
    for name in sorted(given & {*PER_RUN, "kill_server"}):
        instead = {"strategy": "--strategies", "workers": "--workers", "run_dir": "--out-dir"}.get(
            name, "downpour train")
        raise ValueError(f"config file {args.config}: compare does not take {name!r}; "
                         f"use {instead}")
    faults = _parse_faults(o["slow_worker"], o["kill_worker"])  # their notation, checked first
    refuse_unread_flags(strategies, given)
    options = {name: o[name] for name in general_options() if name not in PER_RUN}
    comparison = compare(
        strategies=strategies, workers=_workers(args.worker_counts), faults=faults,
        out_dir=args.out_dir,
        progress=not args.quiet,
        command=shlex.join(["downpour", *sys.argv[1:]]) if sys.argv[1:] else "downpour compare",
        **options,
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
    p.add_argument("--workers", dest="worker_counts", default="4", metavar="N[,N...]",
                   help="worker count, or several to sweep (adds speedup over single) (default 4)")
    p.add_argument("--out-dir", help="comparison directory (default runs/<id>-compare)")
    _add_train_flags(p, compare=True)
    p.set_defaults(func=_compare)
