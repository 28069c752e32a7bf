"""Gradient compression: what it costs in CPU against what it saves on the wire.

For each compressor spec, a gradient-like float32 vector goes the whole way a
compressed push goes: ``encode`` (with the compressor's state: error
feedback's or threshold's residual), ``to_bytes``, ``from_bytes`` (every
check a receiver makes) and ``decode``. The gradient of each step is a fixed
heavy-tailed "true gradient" (0.01 x Student-t with 3 degrees of freedom) plus
fresh N(0, 0.01^2) noise, so residuals accumulate as in training; each spec
runs --warmup steps first, then --repeats timed steps, and the table shows
medians. torch runs on one thread unless --threads says otherwise.

Columns: compression ratio (float32 bytes / payload bytes), share of entries
sent, encode and receive (bytes -> parse and check -> decode) time, their sum
per MiB of float32 input, and the wire time saved by sending the payload
instead of the float32 vector at 1 Gb/s and at this host's TCP loopback speed
(measured: 64 MiB through a 127.0.0.1 socket). "pays" says whether the saving
exceeds the CPU time spent (sender's plus receiver's).

Usage:
    python benchmarks/compress.py                       # 4M floats, 5 timed steps
    python benchmarks/compress.py --numel 1000000 --repeats 9
    python benchmarks/compress.py --specs none topk:0.001,entropy --threads 0
"""

from __future__ import annotations

import argparse
import socket
import statistics
import threading
import time

import torch

from downpour.compress import parse
from downpour.transport.payload import from_bytes, to_bytes

SPECS = [
    "none",
    "fp16",
    "topk:0.01",
    "topk:0.01,fp16,entropy",
    "topk:0.001,entropy",
    "threshold:tau=0.2",
    "threshold:tau=0.2,entropy",
    "onebit",
    "onebit:chunk=4096",
]
GIGABIT = 1e9 / 8  # bytes per second
MIB = 1 << 20


def loopback_bandwidth(nbytes: int = 64 * MIB, repeats: int = 3) -> float:
    """Bytes per second through a TCP socket on 127.0.0.1 (best of ``repeats``)."""
    data = memoryview(bytes(nbytes))
    best = float("inf")
    with socket.create_server(("127.0.0.1", 0)) as server:
        sender = socket.create_connection(server.getsockname())
        receiver, _ = server.accept()

        def receive() -> None:
            buffer = memoryview(bytearray(MIB))
            for _ in range(repeats):
                left = nbytes
                while left:
                    left -= receiver.recv_into(buffer, min(left, MIB))
                receiver.sendall(b"k")

        thread = threading.Thread(target=receive)
        thread.start()
        for _ in range(repeats):
            start = time.perf_counter()
            sender.sendall(data)
            sender.recv(1)
            best = min(best, time.perf_counter() - start)
        thread.join()
        sender.close()
        receiver.close()
    return nbytes / best


def gradients(numel: int, seed: int = 0):
    """An endless stream of gradient-like vectors: a fixed heavy-tailed mean plus noise."""
    generator = torch.Generator().manual_seed(seed)
    chi2 = torch.randn(3, numel, generator=generator).pow(2).sum(0)
    mean = 0.01 * torch.randn(numel, generator=generator) / (chi2 / 3).sqrt()  # Student-t(3)
    while True:
        yield mean + 0.01 * torch.randn(numel, generator=generator)


def measure(spec: str, numel: int, warmup: int, repeats: int) -> dict[str, float]:
    """Median encode and receive times, payload bytes and entries sent, over ``repeats`` steps."""
    compressor = parse(spec)
    stream = gradients(numel)
    state = compressor.init(next(stream))
    encode_s, receive_s, nbytes, sent = [], [], [], []
    for step in range(warmup + repeats):
        x = next(stream)
        start = time.perf_counter()
        payload, state = compressor.encode(x, state)
        middle = time.perf_counter()
        data = to_bytes(payload)
        decoded = compressor.decode(from_bytes(data, expected_size=numel))
        end = time.perf_counter()
        if step >= warmup:
            encode_s.append(middle - start)
            receive_s.append(end - middle)
            nbytes.append(len(data))
            sent.append(getattr(payload, "nnz", numel) / numel)
        del decoded
    return {
        "encode": statistics.median(encode_s),
        "receive": statistics.median(receive_s),
        "nbytes": statistics.median(nbytes),
        "sent": statistics.median(sent),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--numel", type=int, default=4 << 20, help="vector length (float32)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per spec")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per spec")
    parser.add_argument("--specs", nargs="+", default=SPECS, help="compressor specs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        # A worker shares its host's cores with the others, and small tensors
        # spend longer waking a busy thread pool than computing.
        torch.set_num_threads(args.threads)

    from rich.console import Console
    from rich.table import Table

    loopback = loopback_bandwidth()
    raw = 4 * args.numel
    table = Table(
        title=(
            f"compression of {args.numel:,} float32 ({raw / MIB:.0f} MiB), median of "
            f"{args.repeats} steps after {args.warmup}; loopback {loopback * 8 / 1e9:.1f} Gb/s; "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads"
        )
    )
    for column in ("spec", "ratio", "sent", "encode ms", "receive ms", "ms/MiB"):
        table.add_column(column, justify="left" if column == "spec" else "right")
    for speed in ("1 Gb/s", "loopback"):
        table.add_column(f"saved @{speed} ms", justify="right")
        table.add_column("pays", justify="center")
    for spec in args.specs:
        result = measure(spec, args.numel, args.warmup, args.repeats)
        cpu = result["encode"] + result["receive"]
        row = [
            spec,
            f"{raw / result['nbytes']:.1f}x",
            f"{result['sent']:.2%}",
            f"{result['encode'] * 1e3:.1f}",
            f"{result['receive'] * 1e3:.1f}",
            f"{cpu * 1e3 / (raw / MIB):.2f}",
        ]
        for bandwidth in (GIGABIT, loopback):
            saved = (raw - result["nbytes"]) / bandwidth
            row += [f"{saved * 1e3:.1f}", "yes" if saved > cpu else "no"]
        table.add_row(*row)
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
