"""``decentralized``: asynchronous decentralized SGD with compressed updates.

No parameter server: every peer holds a whole replica, trains it on its own
shard, and sends the change it made to the other peers, compressed (Strom,
"Scalable Distributed DNN Training Using Commodity GPU Cloud Computing",
Interspeech 2015: updates quantized to +-tau with the rest kept in a
residual, indices entropy-coded), over gRPC; each peer adds what it receives
to its own replica as it arrives, without waiting for anyone.

A peer keeps, for every other peer, the changes it has not sent it yet and
one compressor state (threshold's residual, or error feedback): with
``fanout`` f it sends to f peers chosen at random each round, and a peer not
chosen gets the accumulated change the next time it is. So every change
reaches every replica eventually, and replicas differ only by what is still
in flight or in residuals; the coordinator reports the largest distance
between two replicas as the run goes, and evaluates the average replica and
one replica at the end.

Every replica moves by the sum of all peers' changes, so W peers take W
times a single process's step: a learning rate of about 1/W of the single
process's is the place to start (compression, which holds large changes
back in the residual, tolerates more).

Each peer serves its replica with the parameter server's own shard and
service (a ``DELTA`` push adds a change as is), so authentication, message
checks and compressed payloads are those of :mod:`downpour.transport`.
Peers find each other through a ``torch.distributed`` TCP store the
coordinator serves.
"""

from __future__ import annotations

import itertools
import random
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn

from downpour.compress import Stream, compression_counters, parse
from downpour.errors import TransportError, check_range
from downpour.server import ApplyAtOnce, ServerShard
from downpour.flat import combine_buffers_
from downpour.models.evaluate import evaluate_data
from downpour.strategies.base import Job, Strategy
from downpour.strategies.plan import Session
from downpour.strategies.worker import Worker, WorkerGroupPlan, decode_params_, load_snapshot_
from downpour.transport import ShardClient, new_token, serve_shard

# Sends a peer may have in flight before its training loop waits for the oldest.
_IN_FLIGHT_PER_PEER = 2


@dataclass(kw_only=True)
class Peer(Worker):
    """One peer: train the replica, apply the changes others send, send them ours."""

    store: tuple[str, int]
    token: str = field(repr=False)
    compress: str | None = None
    fanout: int | None = None
    send_every: int = 1
    snapshot_every: int = 50

    def connect(self) -> None:
        self.optimizer = self.job.optimizer.build_for(self.model)
        # The replica others write into; the model's own parameters are a
        # working copy taken from it at every step.
        self.replica = ServerShard(self.flat.params, policy=ApplyAtOnce())
        self.server = serve_shard(self.replica, host=self.ctx.host, token=self.token, shared_memory=False,
                                  max_workers=self.num_workers + 4)
        host, port = self.store
        self.directory = dist.TCPStore(host, port, is_master=False,
                                       timeout=timedelta(seconds=10 * self.timeout))
        self.directory.set(f"peer/{self.rank}", self.server.address)
        self.peers = [j for j in range(self.num_workers) if j != self.rank]
        self.clients = {j: ShardClient(self.directory.get(f"peer/{j}").decode(), self.token, 0,
                                       timeout=self.timeout, shared_memory=False)
                        for j in self.peers}
        for client in self.clients.values():
            client.wait_ready(timeout=10 * self.timeout)
        spec = self.compress or "none"
        self.streams = {j: Stream(parse(spec)) for j in self.peers}
        self.pending = {j: torch.zeros(self.flat.numel) for j in self.peers}
        self.dead: set[int] = set()
        self.sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"peer{self.rank}-send")
        self.in_flight: deque[tuple[int, Future]] = deque()
        self.chooser = random.Random(self.job.seed * 1009 + self.rank)

    def disconnect(self) -> None:
        if hasattr(self, "sender"):
            self.sender.shutdown(wait=True, cancel_futures=True)
        for client in getattr(self, "clients", {}).values():
            client.close()
        if hasattr(self, "server"):
            self.server.stop(grace=1.0)

    def train(self, ctx: Any, stream: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> None:
        flat = self.flat
        for x, y in stream:
            if self.steps >= self.total_steps or ctx.should_stop():
                break
            version, before = self.replica.pull()
            flat.params.copy_(before)
            self.gradient(x, y)
            self.optimizer.step()
            change = flat.params.detach() - before
            self.replica.push(self.rank, version, change, kind="delta")
            for pending in self.pending.values():
                pending.add_(change)
            if self.steps % self.send_every == 0:
                self._send(self._destinations())
            if self.steps % self.snapshot_every == 0:
                self.snapshot(self.replica.pull()[1])
        # Everything not sent yet goes to everyone; then wait until every live
        # peer has done the same, so the replicas hold the same changes but
        # for the compressors' residuals.
        self._send(self._live())
        self._drain(0)
        self._barrier(ctx)
        self.snapshot(self.replica.pull()[1], final=True)

    def _live(self) -> list[int]:
        return [j for j in self.peers if j not in self.dead]

    def _destinations(self) -> list[int]:
        live = self._live()
        if self.fanout is None or self.fanout >= len(live):
            return live
        return self.chooser.sample(live, self.fanout)

    def _send(self, destinations: list[int]) -> None:
        for j in destinations:
            payload = self.streams[j].encode(self.pending[j])
            self.pending[j].zero_()
            self.in_flight.append((j, self.sender.submit(
                self.clients[j].push, self.rank, 0, payload, kind="delta")))
        self.rounds += 1
        self._drain(_IN_FLIGHT_PER_PEER * max(1, len(self.peers)))

    def _drain(self, keep: int) -> None:
        """Wait for the oldest sends until at most ``keep`` are in flight; a dead peer is left out."""
        while len(self.in_flight) > keep:
            j, future = self.in_flight.popleft()
            try:
                future.result(timeout=2 * self.timeout)
            except TransportError as error:
                if j not in self.dead:
                    self.dead.add(j)
                    self.ctx.metrics.log(self.steps, {"peer/lost": j, "peer/reason": str(error)[:200]})

    def _barrier(self, ctx: Any) -> None:
        self.directory.add("finished", 1)
        deadline = time.monotonic() + 2 * self.timeout
        while time.monotonic() < deadline:
            if self.directory.add("finished", 0) >= self.num_workers - len(self.dead):
                return
            time.sleep(0.05)

    def counters(self) -> dict[str, Any]:
        if not hasattr(self, "clients"):
            return super().counters()
        clients = self.clients.values()
        return {"comm/bytes_sent": sum(c.bytes_sent for c in clients),
                "comm/bytes_received": sum(c.bytes_received for c in clients),
                "comm/pushes": sum(c.pushes for c in clients), "comm/pulls": 0,
                "comm/rounds": self.rounds, **compression_counters(self.streams.values())}


@dataclass(frozen=True, kw_only=True)
class Decentralized(Strategy):
    """Decentralized asynchronous SGD's configuration.

    Args:
        compress: how each peer compresses what it sends (a
            :func:`downpour.compress.parse` spec); ``None`` sends float32.
        fanout: peers each round's change goes to, chosen at random; ``None``: all.
        send_every: local steps between sends.
        snapshot_every: local steps between the replicas the coordinator
            evaluates and measures the distance between.

    Example:
        >>> Decentralized(compress="threshold:tau=0.01,entropy", fanout=2).fanout
        2
    """

    name: ClassVar[str] = "decentralized"
    buffers: ClassVar[str] = "each peer's own; the returned average replica averages them (counters summed)"
    compress: str | None = None
    fanout: int | None = None
    send_every: int = 1
    snapshot_every: int = 50
    log_every: int = 10

    def __post_init__(self) -> None:
        if self.compress is not None:
            parse(self.compress)  # a bad spec fails here, naming the problem
        if self.fanout is not None:
            check_range("fanout", self.fanout, 1)
        check_range("send_every", self.send_every, 1)
        check_range("snapshot_every", self.snapshot_every, 1)

    def plan(self, job: Job) -> DecentralizedPlan:
        if job.workers < 2:
            raise ValueError(f"decentralized needs at least 2 peers (workers), got {job.workers}")
        per_peer = job.total_steps(job.data.num_train // job.workers)
        peer = partial(Peer, token=new_token(), compress=self.compress, fanout=self.fanout,
                       send_every=self.send_every, snapshot_every=self.snapshot_every,
                       log_every=self.log_every, total_steps=per_peer)
        return DecentralizedPlan(job, make_worker=peer, global_steps=per_peer * job.workers)


class DecentralizedPlan(WorkerGroupPlan):
    """The peers, a directory they find each other in, and the coordinator's view of the replicas.

    It measures the distance between the replicas as training goes, and
    returns their average at the end (parameters and buffers alike).
    """

    def open(self, session: Session) -> None:
        # The directory serves the peers' look-ups until the run returns.
        self.directory = dist.TCPStore(session.host, 0, is_master=True, wait_for_workers=False,
                                       timeout=timedelta(seconds=600))
        self.measured: set[tuple[int, ...]] = set()

    def worker_options(self, session: Session, rank: int) -> dict[str, Any]:
        return {"store": (session.host, self.directory.port)}

    def watch(self, session: Session) -> None:
        """Log the largest distance between the live replicas' latest snapshots, once per new set."""
        handles = session.workers
        latest = {h.rank: h.published["params"] for h in handles if h.alive() and "params" in h.published}
        if len(latest) < 2 or len(latest) < sum(h.alive() for h in handles):
            return
        key = tuple(latest[rank][0] for rank in sorted(latest))
        if key in self.measured:
            return
        self.measured.add(key)
        vectors = [_vector(snapshot[1]) for snapshot in latest.values()]
        session.metrics.log(session.progress.total_steps, {"decentralized/max_distance": max_distance(vectors)})

    def combine(self, finals: dict[int, tuple], model: nn.Module, session: Session) -> None:
        """Load the average replica; log one replica's accuracy and the final distance."""
        finals = dict(sorted(finals.items()))
        vectors = {rank: _vector(snapshot[1]) for rank, snapshot in finals.items()}
        first = next(iter(finals))
        load_snapshot_(model, self.flat, finals[first])
        data = self.job.data
        one = evaluate_data(model, self.job.loss, data)
        self.flat.params.copy_(torch.stack(list(vectors.values())).mean(0))
        combine_buffers_(model, [snapshot[2] for snapshot in finals.values() if len(snapshot) > 2])
        session.metrics.log(session.progress.total_steps, {
            "decentralized/replica_accuracy": one["eval/accuracy"], "decentralized/replica_rank": first,
            "decentralized/final_max_distance": max_distance(list(vectors.values()))})


def _vector(payload: bytes) -> torch.Tensor:
    out = torch.empty(len(payload) // 4)
    decode_params_(payload, out)
    return out


def max_distance(vectors: list[torch.Tensor]) -> float:
    """The largest Euclidean distance between two of ``vectors`` (0 for fewer than two)."""
    return max((float(torch.dist(a, b)) for a, b in itertools.combinations(vectors, 2)), default=0.0)
