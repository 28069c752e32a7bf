"""Overhead of ``downpour train --strategy allreduce`` against a plain DDP script.

Same data (MNIST from ../shared/data, iid shards), model, optimizer, batch
size per worker and worker count. The plain script is what one writes by hand:
``torch.multiprocessing.spawn``, a gloo group, ``DistributedDataParallel``, a
loop over the shard, timed between two barriers. downpour's samples/s is the
run's own (training time, evaluation excluded). Both run in this invocation,
alternating, best of ``--repeats``. Prints a table.

    .venv/bin/python benchmarks/allreduce.py [--workers 4] [--steps 500] [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import downpour as dp
from downpour.data import batches
from downpour.models import build, default_loss
from downpour.strategies.allreduce import Allreduce
from downpour.cluster.ray_nodes import free_port

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _plain_worker(rank: int, workers: int, port: int, model_name: str, batch_size: int, steps: int, lr: float,
                  out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=workers, rank=rank,
                            timeout=datetime.timedelta(seconds=600))
    try:
        data = dp.data.load("mnist", data_dir=DATA).shard(rank, workers).train_only()
        torch.manual_seed(0)
        model = DistributedDataParallel(build(model_name, data.input_shape, data.num_classes))
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        loss_fn = default_loss(model_name)
        generator = torch.Generator().manual_seed(rank)
        dist.barrier()  # timed from here, like downpour's run from its start signal: first step included
        started = time.perf_counter()
        done = 0
        while done < steps:
            for x, y in batches(data.x_train, data.y_train, batch_size, generator=generator):
                optimizer.zero_grad()
                loss_fn(model(x), y).backward()
                optimizer.step()
                done += 1
                if done == steps:
                    break
        dist.barrier()
        if rank == 0:
            Path(out).write_text(str(workers * batch_size * steps / (time.perf_counter() - started)))
    finally:
        dist.destroy_process_group()


def plain_ddp(workers: int, model_name: str, batch_size: int, steps: int, lr: float, scratch: Path) -> float:
    out = scratch / "plain.txt"
    mp.spawn(_plain_worker, args=(workers, free_port(), model_name, batch_size, steps, lr, str(out)),
             nprocs=workers)
    return float(out.read_text())


def downpour_allreduce(data, workers: int, model_name: str, batch_size: int, steps: int, lr: float) -> float:
    result = dp.train(model=model_name, data=data, strategy=Allreduce(), optimizer=dp.optim("momentum", lr=lr),
                      workers=workers, batch_size=batch_size, epochs=100, max_steps=steps, eval_every=10 * steps,
                      save=False)
    return result.summary["samples_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="4", help="comma-separated worker counts")
    parser.add_argument("--steps", type=int, default=500, help="steps per worker")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs each")
    parser.add_argument("--models", default="mlp")
    parser.add_argument("--batch-sizes", default="64")
    args = parser.parse_args()
    data = dp.data.load("mnist", data_dir=DATA)
    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / f"downpour-bench-{os.getpid()}"
    scratch.mkdir(parents=True, exist_ok=True)
    rows = []
    for workers in map(int, args.workers.split(",")):
        for model_name in args.models.split(","):
            for batch_size in map(int, args.batch_sizes.split(",")):
                plain, ours = 0.0, 0.0
                for _ in range(args.repeats):  # alternate, so that load on the machine hits both alike
                    plain = max(plain, plain_ddp(workers, model_name, batch_size, args.steps, 0.05, scratch))
                    ours = max(ours, downpour_allreduce(data, workers, model_name, batch_size, args.steps, 0.05))
                rows.append((workers, model_name, batch_size, args.steps, plain, ours, 100 * (plain - ours) / plain))

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"allreduce overhead (torch {torch.__version__}, gloo, {os.cpu_count()} CPUs, "
                        f"1 thread per worker, best of {args.repeats})")
    for column in ("workers", "model", "batch", "steps", "plain DDP samples/s", "downpour samples/s", "overhead"):
        table.add_column(column, justify="right")
    for workers, model_name, batch_size, steps, plain, ours, overhead in rows:
        table.add_row(str(workers), model_name, str(batch_size), str(steps), f"{plain:,.0f}", f"{ours:,.0f}",
                      f"{overhead:+.1f}%")
    Console(width=150).print(table)


if __name__ == "__main__":
    main()
