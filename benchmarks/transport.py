"""Parameter-server transport against gloo all_reduce, on this machine.

Measures, in one run:
- one parameter-server round (push_all of a dense float32 vector, then
  pull_all of it) through 1 shard and through 4 shards, each shard served by
  its own process (multiprocessing "spawn") on 127.0.0.1, port 0;
- torch.distributed all_reduce (gloo) of the same tensor between 2 processes;
- the push + pull round trip of a 4 KB shard (goal: <= 1 ms).

Usage:
    python benchmarks/transport.py                  # 100 MB, 5 rounds
    python benchmarks/transport.py --mb 25 --rounds 3 --latency-rounds 500

Prints a table; the figures are per round (median and best of the rounds).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import statistics
import time
from typing import Self

import torch

from downpour.flat import ShardRange, shard_ranges
from downpour.server import ServerShard
from downpour.transport import ParameterClient, ShardClient, new_token, serve_shard


def _serve(shard: ShardRange, token: str, ports, stop) -> None:
    torch.set_num_threads(1)
    server_shard = ServerShard(
        torch.zeros(shard.size), shard=shard, optimizer=lambda ps: torch.optim.SGD(ps, lr=1e-3)
    )
    server = serve_shard(server_shard, token=token, port=0)
    ports.put((shard.shard, server.port))
    stop.wait()
    server.stop(grace=None)


class Servers:
    """One spawned process per shard; a context manager that reaps them."""

    def __init__(self, numel: int, num_shards: int) -> None:
        self.ranges = shard_ranges(numel, num_shards)
        self.token = new_token()
        context = mp.get_context("spawn")
        ports, self._stop = context.Queue(), context.Event()
        self._processes = [
            context.Process(target=_serve, args=(r, self.token, ports, self._stop), daemon=True)
            for r in self.ranges
        ]
        for process in self._processes:
            process.start()
        found = dict(ports.get(timeout=120) for _ in self.ranges)
        self.addresses = [f"127.0.0.1:{found[r.shard]}" for r in self.ranges]

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for process in self._processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()


def ps_round(numel: int, num_shards: int, rounds: int) -> dict[str, float]:
    vector = torch.randn(numel)
    with Servers(numel, num_shards) as servers:
        client = ParameterClient(servers.addresses, servers.ranges, servers.token, timeout=120)
        client.wait_ready(60)
        out = torch.empty(numel)
        versions, _ = client.pull_all(out=out)  # warm-up: connections, buffers
        client.push_all(0, versions, vector)
        versions, _ = client.pull_all(out=out)
        sent, received = client.bytes_sent, client.bytes_received
        push_s, pull_s, round_s = [], [], []
        for _ in range(rounds):
            start = time.perf_counter()
            client.push_all(0, versions, vector)
            middle = time.perf_counter()
            versions, _ = client.pull_all(out=out)
            end = time.perf_counter()
            push_s.append(middle - start)
            pull_s.append(end - middle)
            round_s.append(end - start)
        wire = (client.bytes_sent - sent + client.bytes_received - received) / rounds
        client.close()
    return {
        "push": statistics.median(push_s),
        "pull": statistics.median(pull_s),
        "round": statistics.median(round_s),
        "best": min(round_s),
        "wire_bytes": wire,  # per round, both directions
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _gloo(rank: int, port: int, numel: int, rounds: int, results) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    tensor = torch.randn(numel)
    dist.all_reduce(tensor)  # warm-up
    times = []
    for _ in range(rounds):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(tensor)
        times.append(time.perf_counter() - start)
    if rank == 0:
        results.put(times)
    dist.destroy_process_group()


def gloo_all_reduce(numel: int, rounds: int) -> dict[str, float]:
    context = mp.get_context("spawn")
    results, port = context.Queue(), _free_port()
    processes = [
        context.Process(target=_gloo, args=(rank, port, numel, rounds, results))
        for rank in range(2)
    ]
    for process in processes:
        process.start()
    times = results.get(timeout=600)
    for process in processes:
        process.join(timeout=60)
        if process.is_alive():
            process.kill()
    return {"round": statistics.median(times), "best": min(times)}


def small_round_trip(rounds: int) -> dict[str, float]:
    numel = 1024  # 4 KB of float32
    update = torch.randn(numel)
    with Servers(numel, 1) as servers:
        client = ShardClient(servers.addresses[0], servers.token, 0, timeout=30)
        client.wait_ready(60)
        version = 0
        for _ in range(100):
            version = client.push(0, version, update).version
            client.pull()
        times, pushes, pulls, floor = [], [], [], []
        for _ in range(rounds):
            start = time.perf_counter()
            version = client.push(0, version, update).version
            middle = time.perf_counter()
            client.pull()
            end = time.perf_counter()
            client.status()  # a unary call with no tensor: gRPC's own floor here
            floor.append(time.perf_counter() - end)
            times.append(end - start)
            pushes.append(middle - start)
            pulls.append(end - middle)
        client.close()
    times.sort()
    return {
        "median": statistics.median(times),
        "mean": statistics.fmean(times),
        "p99": times[int(0.99 * (len(times) - 1))],
        "best": times[0],
        "push": statistics.median(pushes),
        "pull": statistics.median(pulls),
        "floor": statistics.median(floor),
        "floor_best": min(floor),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mb", type=float, default=100.0, help="vector size in MB (1e6 bytes)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--latency-rounds", type=int, default=1000)
    args = parser.parse_args()
    numel = int(args.mb * 1e6) // 4
    megabytes = numel * 4 / 1e6
    print(
        f"# {megabytes:.0f} MB float32 vector, {args.rounds} rounds; "
        f"{os.cpu_count()} CPUs; torch {torch.__version__}"
    )
    rows = []
    for shards in (1, 4):
        r = ps_round(numel, shards, args.rounds)
        name = f"parameter server, {shards} shard{'s' if shards > 1 else ''}: push + pull"
        notes = (
            f"push {r['push'] * 1e3:.0f} ms, pull {r['pull'] * 1e3:.0f} ms, "
            f"{2 * megabytes / r['round'] / 1e3:.2f} GB/s, "
            f"wire {r['wire_bytes'] / 1e6 / 2:.1f} MB each way"
        )
        rows.append((name, r["round"], r["best"], notes))
    g = gloo_all_reduce(numel, args.rounds)
    notes = f"{megabytes / g['round'] / 1e3:.2f} GB/s algbw"
    rows.append(("gloo all_reduce, 2 processes", g["round"], g["best"], notes))
    s = small_round_trip(args.latency_rounds)
    notes = (
        f"push {s['push'] * 1e3:.2f} ms, pull {s['pull'] * 1e3:.2f} ms, "
        f"mean {s['mean'] * 1e3:.2f} ms, p99 {s['p99'] * 1e3:.2f} ms (goal <= 1 ms)"
    )
    rows.append(("4 KB shard: push + pull round trip", s["median"], s["best"], notes))
    notes = "one unary call carrying no tensor: the per-call floor of gRPC Python here"
    rows.append(("Status call (same server)", s["floor"], s["floor_best"], notes))
    width = max(len(row[0]) for row in rows)
    print(f"{'measurement':<{width}}  {'median':>10}  {'best':>10}  notes")
    for name, median, best, notes in rows:
        print(f"{name:<{width}}  {median * 1e3:>8.2f}ms  {best * 1e3:>8.2f}ms  {notes}")


if __name__ == "__main__":
    main()
