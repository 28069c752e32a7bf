"""Parameter-server transport against gloo all_reduce, on this machine.

Measures, in one run:
- one parameter-server round (push_all of a dense float32 vector, then
  pull_all of it) through 1 shard and through 4 shards, each shard served by
  its own process (multiprocessing "spawn") on 127.0.0.1, port 0, over each
  path: gRPC alone (streams of chunks), a TCP session (the bytes raw on a
  TCP connection of the session's, as between hosts) and the same-host path
  (shared memory for the bytes, the session's Unix socket for the headers);
- torch.distributed all_reduce (gloo) of the same tensor between 2 processes
  (goal: a parameter-server round is no slower);
- gRPC alone, with no downpour code: the same bytes in the same chunks to a
  spawned server that only counts them, and back from one that only sends a
  chunk it holds (the floor any round through one gRPC stream each way has
  here, with downpour's channel options);
- the push + pull round trip of a 4 KB shard (goal: <= 1 ms), as two calls
  and as one (push_pull), over each path, and a Status call for gRPC's own
  per-call floor on this machine;
- detection: how long a pull waiting on a shard takes to fail once the
  shard's process is frozen (SIGSTOP: only the keepalive pings can tell;
  goal: within --detect-seconds, not at the call's 60 s deadline) or killed
  (SIGKILL: the connection resets at once).

Usage:
    python benchmarks/transport.py                  # 100 MB, 5 rounds, 3 repeats
    python benchmarks/transport.py --mb 25 --rounds 3 --latency-rounds 500
    python benchmarks/transport.py --parts latency --repeats 5
    python benchmarks/transport.py --parts detection --detect-seconds 4

Every measurement is repeated (--repeats, each in fresh processes) and the
table shows the median over all rounds of all repeats, and the best round.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import signal
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Self

import grpc
import torch

from downpour.cluster.ray_nodes import free_port
from downpour.errors import PeerTimeout, PeerUnavailable
from downpour.flat import ShardRange, shard_ranges
from downpour.server import ServerShard
from downpour.transport import ParameterClient, ShardClient, new_token, serve_shard
from downpour.transport import codec
from downpour.transport.channel import CHANNEL_OPTIONS, DETECT_SECONDS
from downpour.transport.service import SERVER_OPTIONS

DEADLINE_S = 60.0  # the waiting pull's own deadline in the detection measurement


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


PATHS = {"grpc": "gRPC streams", "tcp": "TCP session", "shm": "shared memory"}
"""The ways a client may move a tensor: gRPC alone, a TCP session's connection, a segment."""


def ps_round(numel: int, num_shards: int, rounds: int, path: str) -> dict[str, list]:
    """Per-round times of push_all + pull_all over ``path`` (a key of :data:`PATHS`), and the
    bytes each way of one round."""
    vector = torch.randn(numel)
    with Servers(numel, num_shards) as servers:
        client = ParameterClient(
            servers.addresses,
            servers.ranges,
            servers.token,
            timeout=120,
            shared_memory=path == "shm",
            tcp_session=path == "tcp",
        )
        client.wait_ready(60)
        out = torch.empty(numel)
        versions, _ = client.pull_all(out=out)  # warm-up: connections, buffers, segments
        client.push_all(0, versions, vector)
        versions, _ = client.pull_all(out=out)
        if path == "shm":
            assert all(c.uses_shared_memory for c in client.clients), "no shared memory"
        if path == "tcp":
            assert all(c.uses_tcp_session for c in client.clients), "no TCP session"
        wire = client.bytes_sent + client.bytes_received
        shared = client.bytes_shared
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
        wire = (client.bytes_sent + client.bytes_received - wire) / rounds
        shared = (client.bytes_shared - shared) / rounds
        client.close()
    return {"push": push_s, "pull": pull_s, "round": round_s, "wire": [wire], "shared": [shared]}


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


def gloo_all_reduce(numel: int, rounds: int) -> dict[str, list]:
    context = mp.get_context("spawn")
    results, port = context.Queue(), free_port()
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
    return {"round": times}


def _bare_server(ports, stop, chunk: bytes, chunks: int) -> None:
    """A gRPC server of one service of its own: ``Sink`` counts a stream's bytes, ``Source``
    streams ``chunks`` copies of ``chunk``; nothing is parsed or copied in Python."""

    def sink(requests, context):
        return sum(len(request) for request in requests).to_bytes(8, "little")

    def source(request, context):
        for _ in range(chunks):
            yield chunk

    server = grpc.server(ThreadPoolExecutor(4), options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bare.Bare", {
        "Sink": grpc.stream_unary_rpc_method_handler(sink),
        "Source": grpc.unary_stream_rpc_method_handler(source),
    }),))
    ports.put(server.add_insecure_port("127.0.0.1:0"))
    server.start()
    stop.wait()
    server.stop(grace=None)


def bare_grpc_round(numel: int, rounds: int) -> dict[str, list]:
    """``numel`` float32 values' bytes, in downpour's chunks, up one gRPC stream and down one."""
    chunk_bytes = codec.CHUNK_BYTES
    chunks = -(-numel * 4 // chunk_bytes)
    chunk = os.urandom(chunk_bytes)
    context = mp.get_context("spawn")
    ports, stop = context.Queue(), context.Event()
    process = context.Process(target=_bare_server, args=(ports, stop, chunk, chunks), daemon=True)
    process.start()
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{ports.get(timeout=120)}",
                                        options=CHANNEL_OPTIONS)
        sink = channel.stream_unary("/bare.Bare/Sink")
        source = channel.unary_stream("/bare.Bare/Source")
        push_s, pull_s = [], []
        for attempt in range(rounds + 1):  # the first warms the connection up
            start = time.perf_counter()
            sink(iter([chunk] * chunks), timeout=120)
            middle = time.perf_counter()
            received = sum(len(message) for message in source(b"", timeout=120))
            end = time.perf_counter()
            assert received == chunks * chunk_bytes
            if attempt:
                push_s.append(middle - start)
                pull_s.append(end - middle)
        channel.close()
    finally:
        stop.set()
        process.join(timeout=10)
        if process.is_alive():
            process.kill()
    return {"push": push_s, "pull": pull_s, "round": [a + b for a, b in zip(push_s, pull_s)]}


def small_round_trip(rounds: int, path: str) -> dict[str, list]:
    """A 4 KB shard: push + pull (two calls), push_pull (one), and a Status call.

    The three alternate within each round, so load on the machine hits them alike. Over the
    network each is a unary gRPC call; through a session its header takes the session's socket.
    """
    numel = 1024  # 4 KB of float32
    update = torch.randn(numel)
    out = torch.empty(numel)
    with Servers(numel, 1) as servers:
        client = ShardClient(
            servers.addresses[0],
            servers.token,
            0,
            timeout=30,
            shared_memory=path == "shm",
            tcp_session=path == "tcp",
        )
        client.wait_ready(60)
        version = 0
        for _ in range(100):
            version = client.push(0, version, update).version
            client.pull(out=out)
            version = client.push_pull(0, version, update, out=out)[1]
        times, pushes, pulls, push_pulls, floor = [], [], [], [], []
        for _ in range(rounds):
            start = time.perf_counter()
            version = client.push(0, version, update).version
            middle = time.perf_counter()
            client.pull(out=out)
            end = time.perf_counter()
            version = client.push_pull(0, version, update, out=out)[1]
            combined = time.perf_counter()
            client.status()  # a unary call with no tensor: gRPC's own floor here
            floor.append(time.perf_counter() - combined)
            push_pulls.append(combined - end)
            times.append(end - start)
            pushes.append(middle - start)
            pulls.append(end - middle)
        client.close()
    return {"round": times, "push": pushes, "pull": pulls, "push_pull": push_pulls, "floor": floor}


def detection(fault: str, detect_seconds: float) -> float | None:
    """Seconds from ``fault`` (a signal's name) striking a shard's process to the failure of a pull
    waiting on it; None when the pull ran out its deadline instead (the fault went unnoticed)."""
    context = mp.get_context("spawn")
    ports, stop, token = context.Queue(), context.Event(), new_token()
    process = context.Process(
        target=_serve, args=(shard_ranges(8, 1)[0], token, ports, stop), daemon=True
    )
    process.start()
    try:
        _, port = ports.get(timeout=120)
        client = ShardClient(
            f"127.0.0.1:{port}",
            token,
            0,
            timeout=DEADLINE_S,
            detect_seconds=detect_seconds,
            shared_memory=False,
        )
        client.wait_ready(60)
        client.pull()  # connected; the next pull waits for a version that never comes
        struck: list[float] = []

        def strike() -> None:
            struck.append(time.perf_counter())
            os.kill(process.pid, getattr(signal, fault))

        timer = threading.Timer(0.5, strike)  # the pull below is waiting on the shard by then
        timer.start()
        try:
            client.pull(wait_version=10**6)
        except PeerUnavailable:
            return time.perf_counter() - struck[0] if struck else None
        except PeerTimeout:
            return None
        finally:
            timer.cancel()
            client.close()
        raise AssertionError("the pull returned a version that never came")
    finally:
        process.kill()  # SIGKILL ends a stopped process too
        process.join()


def detection_rows(detect_seconds: float, repeats: int) -> list[tuple[str, list, str]]:
    """A frozen and a killed shard under a waiting pull: time to the failed call, each ``repeats`` times."""
    rows = []
    for fault, what in (("SIGSTOP", "frozen"), ("SIGKILL", "killed")):
        measured = [detection(fault, detect_seconds) for _ in range(repeats)]
        times = [t for t in measured if t is not None]
        missed = len(measured) - len(times)
        notes = (
            f"pings every {detect_seconds / 2:g} s, {detect_seconds / 2:g} s to answer "
            f"(goal: within {detect_seconds:g} s, not at the {DEADLINE_S:g} s deadline)"
        )
        if missed:
            notes += f"; {missed} of {len(measured)} ran out the deadline"
        rows.append((f"{what} shard ({fault}): a waiting pull fails after", times or [DEADLINE_S], notes))
    return rows


def tail(values: list) -> str:
    ordered = sorted(values)
    return (
        f"mean {statistics.fmean(ordered) * 1e3:.2f} ms, "
        f"p99 {ordered[int(0.99 * (len(ordered) - 1))] * 1e3:.2f} ms"
    )


def repeated(measure, repeats: int) -> dict[str, list]:
    """``measure()`` run ``repeats`` times (fresh processes each), its lists joined."""
    joined: dict[str, list] = {}
    for _ in range(repeats):
        for key, values in measure().items():
            joined.setdefault(key, []).extend(values)
    return joined


def median(values: list) -> float:
    return statistics.median(values)


def bandwidth_rows(numel: int, rounds: int, repeats: int) -> list[tuple[str, list, str]]:
    """gloo all_reduce, then a parameter-server round over each path, 1 and 4 shards."""
    megabytes = numel * 4 / 1e6
    g = repeated(lambda: gloo_all_reduce(numel, rounds), repeats)
    notes = f"{megabytes / median(g['round']) / 1e3:.2f} GB/s algbw"
    rows = [("gloo all_reduce, 2 processes", g["round"], notes)]
    b = repeated(lambda: bare_grpc_round(numel, rounds), repeats)
    notes = (f"push {median(b['push']) * 1e3:.0f} ms, pull {median(b['pull']) * 1e3:.0f} ms, "
             f"{median(b['round']) / median(g['round']):.2f}x gloo: no downpour code in it")
    rows.append(("gRPC alone, 1 stream each way", b["round"], notes))
    for path in PATHS:
        for shards in (1, 4):
            r = repeated(lambda s=shards, p=path: ps_round(numel, s, rounds, p), repeats)
            name = f"parameter server, {shards} shard{'s' if shards > 1 else ''}, {PATHS[path]}"
            ratio = median(r["round"]) / median(g["round"])
            notes = (
                f"push {median(r['push']) * 1e3:.0f} ms, pull {median(r['pull']) * 1e3:.0f} ms, "
                f"{ratio:.2f}x gloo; each way: network {median(r['wire']) / 2e6:.3g} MB, "
                f"shm {median(r['shared']) / 2e6:.3g} MB"
            )
            rows.append((name, r["round"], notes))
    return rows


def latency_rows(rounds: int, repeats: int) -> list[tuple[str, list, str]]:
    """A 4 KB shard's round trip as two calls and as one, over gRPC and through a session's
    socket, and gRPC's floor beside them."""
    rows = []
    for path, label in (("grpc", "gRPC"), ("tcp", "TCP session"), ("shm", "session socket")):
        s = repeated(lambda p=path: small_round_trip(rounds, p), repeats)
        notes = (
            f"push {median(s['push']) * 1e3:.2f} ms, pull {median(s['pull']) * 1e3:.2f} ms, "
            f"{tail(s['round'])} (goal <= 1 ms)"
        )
        rows.append((f"4 KB shard, {label}: push + pull (2 calls)", s["round"], notes))
        notes = f"push and pull in one call; {tail(s['push_pull'])} (goal <= 1 ms)"
        rows.append((f"4 KB shard, {label}: push_pull (1 call)", s["push_pull"], notes))
    notes = "one unary call carrying no tensor: the per-call floor of gRPC Python here"
    rows.append(("Status call (same server)", s["floor"], notes))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mb", type=float, default=100.0, help="vector size in MB (1e6 bytes)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per repeat")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per measurement")
    parser.add_argument("--latency-rounds", type=int, default=1000)
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=["bandwidth", "latency", "detection"],
        default=["bandwidth", "latency", "detection"],
        help="which measurements to run (default: all)",
    )
    parser.add_argument(
        "--detect-seconds",
        type=float,
        default=DETECT_SECONDS,
        help="the clients' detection window in the detection measurement (default: the library's)",
    )
    args = parser.parse_args()
    numel = int(args.mb * 1e6) // 4
    print(
        f"# {numel * 4 / 1e6:.0f} MB float32 vector; {args.repeats} repeats x {args.rounds} "
        f"rounds, {args.repeats} x {args.latency_rounds} small rounds; "
        f"{os.cpu_count()} CPUs; torch {torch.__version__}"
    )
    rows = []
    if "bandwidth" in args.parts:
        rows += bandwidth_rows(numel, args.rounds, args.repeats)
    if "latency" in args.parts:
        rows += latency_rows(args.latency_rounds, args.repeats)
    if "detection" in args.parts:
        rows += detection_rows(args.detect_seconds, args.repeats)
    width = max(len(row[0]) for row in rows)
    print(f"{'measurement':<{width}}  {'median':>10}  {'best':>10}  notes")
    for name, times, notes in rows:
        print(
            f"{name:<{width}}  {median(times) * 1e3:>8.2f}ms  {min(times) * 1e3:>8.2f}ms  {notes}"
        )


if __name__ == "__main__":
    main()
