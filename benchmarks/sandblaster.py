"""Sandblaster on L2-regularised logistic regression: against scipy, against a straggler, against model size.

Three tables, on MNIST from ../shared/data (the first ``--examples`` training examples):

1. every method (L-BFGS, accelerated gradient descent, CG with both betas) against
   ``scipy.optimize.minimize(method="L-BFGS-B")`` on the same objective: the
   objective reached, iterations, gradient passes, wall time;
2. the mean time of a gradient pass without a straggler, with worker 1 ten times
   slower (``--slow-worker 1:10``) and backup portions, and with it but without them;
3. what the coordinator received per iteration for the logistic model and an MLP
   about 13 times larger: it does not grow with the model.

    .venv/bin/python benchmarks/sandblaster.py [--examples 10000] [--workers 4] [--servers 2] [--l2 1e-3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import scipy.optimize
import torch
from rich.console import Console
from rich.table import Table
from threadpoolctl import threadpool_limits

import downpour as dp
from downpour.flat import FlatParams
from downpour.strategies.sandblaster import Sandblaster

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))
from tests.integration.strategies.logistic import objective  # noqa: E402  (the tests' float64 objective)


def end_event(result) -> dict:
    return next(e for e in reversed(result.history) if e.get("event") == "end")


def run(data, args, *, model: str = "logistic", slow: dict | None = None, **options):
    strategy = Sandblaster(l2=args.l2, **options)
    started = time.perf_counter()
    result = dp.train(model=model, data=data, strategy=strategy, workers=args.workers, servers=args.servers,
                      faults=dp.Faults(slow=slow or {}), save=False)
    return result, end_event(result), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--l2", type=float, default=1e-3)
    args = parser.parse_args()
    data = dp.data.load("mnist", data_dir=DATA).subset(np.arange(args.examples))
    f, numel = objective(data, args.l2)
    console = Console()

    started = time.perf_counter()
    with threadpool_limits(1):
        reference = scipy.optimize.minimize(f, np.zeros(numel), jac=True, method="L-BFGS-B")
    scipy_seconds = time.perf_counter() - started
    table = Table(title=f"L2-regularised logistic regression, MNIST[:{args.examples}], l2 {args.l2:g}, "
                        f"{args.workers} workers, {args.servers} shards (torch {torch.__version__})")
    for column in ("method", "objective", "vs scipy", "iterations", "gradient passes", "seconds"):
        table.add_column(column, justify="right")
    table.add_row("scipy L-BFGS-B (one process)", f"{reference.fun:.8f}", "", str(reference.nit),
                  str(reference.nfev), f"{scipy_seconds:.1f}")
    for method, beta in (("lbfgs", "fr"), ("agd", "fr"), ("cg", "fr"), ("cg", "hs")):
        result, end, seconds = run(data, args, method=method, beta=beta, max_iterations=1000)
        reached = f(FlatParams(result.model).params.double().numpy())[0]
        label = f"sandblaster {method}" + (f" ({beta})" if method == "cg" else "")
        table.add_row(label, f"{reached:.8f}", f"{(reached - reference.fun) / reference.fun:+.1e}",
                      str(end["run/iterations"]), str(end["batch/passes"]), f"{end['run/seconds']:.1f}")
    console.print(table)

    table = Table(title="a gradient pass against a straggler (worker 1 ten times slower), L-BFGS, 10 iterations")
    for column in ("run", "pass (mean)", "vs no straggler", "backup portions"):
        table.add_column(column, justify="right")
    baseline = None
    for label, slow, backups in (("no straggler", None, True), ("straggler, backups", {1: 10.0}, True),
                                 ("straggler, no backups", {1: 10.0}, False)):
        result, end, _ = run(data, args, slow=slow, backup_portions=backups, max_iterations=10, ftol=0, gtol=0)
        taken = sum(max([e.get("sandblaster/backups", 0) for e in result.history
                         if e.get("role") == "worker" and e.get("rank") == r] or [0]) for r in range(args.workers))
        seconds = end["batch/pass_seconds_mean"]
        baseline = baseline or seconds
        goal = " (goal <= 2x)" if slow and backups else ""
        table.add_row(label, f"{seconds * 1e3:.0f} ms", f"{seconds / baseline:.2f}x{goal}", str(taken))
    console.print(table)

    table = Table(title="what the coordinator receives per iteration (L-BFGS, memory 10, 10 iterations)")
    for column in ("model", "parameters", "model bytes", "received / iteration"):
        table.add_column(column, justify="right")
    for model in ("logistic", "mlp"):
        result, end, _ = run(data, args, model=model, max_iterations=10, ftol=0, gtol=0)
        params = sum(p.numel() for p in result.model.parameters())
        table.add_row(model, f"{params:,}", f"{4 * params:,}", f"{end['coordinator/bytes_per_iteration']:,.0f}")
    console.print(table)


if __name__ == "__main__":
    main()
