"""Seed 004's compression table, measured: update size per step and accuracy at equal steps.

The seed reports a 58.4 MB update (fp32) shrinking to 29.2 MB in fp16 and to
0.21 MB quantized at tau = 2 (99.6% less). Here: Downpour on MNIST (from
../shared/data) with an MLP of 784-4096-2770-10, 14.6M parameters (58.4 MB
in float32), 4 workers, 2 server shards, real gRPC on loopback, pushes
compressed per shard (bytes are counted whichever way they went: compressed
pushes over the socket, the large float32 ones through shared memory). Every row trains the same number of steps from the same start;
the table gives bytes pushed per worker step, the fraction of fp32, and
test accuracy after those steps. ``tau`` is in gradient units, so the
seed's tau = 2 (set for its own network and loss) is shown beside a tau
matched to this model's gradient scale.

    .venv/bin/python benchmarks/compression_table.py [--steps 150] [--specs 'none;fp16;...']
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

import downpour as dp
from downpour import models

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HIDDEN = (4096, 2770)
SPECS = "none;fp16;threshold:tau=2,entropy;threshold:tau=0.002,entropy;topk:0.001,fp16,entropy;onebit"
SEED = {"none": "58.4 MB", "fp16": "29.2 MB", "threshold:tau=2,entropy": "0.21 MB (99.6% less)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="steps per worker")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--specs", default=SPECS, help="compress specs, separated by semicolons")
    parser.add_argument("--lr", type=float, default=0.01)
    args = parser.parse_args()

    mnist = dp.data.load("mnist", data_dir=DATA)
    factory = partial(models.build, "mlp", mnist.input_shape, mnist.num_classes, hidden=HIDDEN)
    numel = sum(p.numel() for p in factory().parameters())
    print(f"model: MLP 784-{HIDDEN[0]}-{HIDDEN[1]}-10, {numel / 1e6:.1f}M parameters, "
          f"{4 * numel / 1e6:.1f} MB in float32; {args.workers} workers x {args.steps} steps, batch 32")
    rows = []
    for spec in args.specs.split(";"):
        result = dp.train(model=factory, data=mnist, workers=args.workers, servers=2, batch_size=32,
                          max_steps=args.steps * args.workers, save=False,
                          strategy=dp.Downpour(compress=None if spec == "none" else spec, sparse_push=False),
                          optimizer=dp.optim("momentum", lr=args.lr), progress=False)
        s = result.summary
        per_step = s["bytes_sent"] / max(1, s["steps"])
        rows.append((spec, per_step, s["accuracy"], s["seconds"]))
        print(f"  done {spec}: {per_step / 1e6:.3f} MB/step, accuracy {s['accuracy']:.4f}", flush=True)
    dense = 4 * numel
    print(f"\n{'compression':32} {'MB per step':>12} {'of fp32':>9} {'accuracy':>9} {'seconds':>8}  seed 004")
    for spec, per_step, accuracy, seconds in rows:
        print(f"{spec:32} {per_step / 1e6:12.3f} {per_step / dense:9.2%} {accuracy:9.4f} {seconds:8.1f}  "
              f"{SEED.get(spec, '')}")


if __name__ == "__main__":
    main()
