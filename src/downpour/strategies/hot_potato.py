"""``hot-potato``: one set of parameters passed from worker to worker around a ring.

Sequential SGD over data that stays where it is: the parameters (the
"potato") visit the workers in rank order; each trains them on its own shard
for ``steps_per_turn`` steps (default: one pass over its shard) and hands
them to the next worker, so the model sees the whole training set once
every W turns while no worker ever ships examples. Only the holder computes;
the others wait for the potato. This is the incremental ("cyclic")
gradient method over a network: Bertsekas, "Incremental gradient,
subgradient, and proximal methods for convex optimization: a survey" (2011),
and Ram, Nedić, Veeravalli, "Incremental stochastic subgradient
algorithms for convex optimization", SIAM J. Optim. 2009.

A hand-off is a point-to-point ``send``/``recv`` of the flat float32 vector
over gloo between consecutive ranks: W transfers per pass over the data,
``numel * 4`` bytes each, plus a 16-byte header. Each worker keeps its own
optimizer state (momentum, Adam moments); only the parameters travel. The
learning-rate schedule follows the potato's global step. ``max_steps`` caps
the potato's steps over the whole run.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from downpour.errors import check_range
from downpour.flat import decode_buffers_, encode_buffers
from downpour.strategies.base import Job, Strategy
from downpour.strategies.collective import CollectivePlan, CollectiveWorker, check_lockstep_optimizer

# The header sent before the parameters: the turn the potato starts, and the
# turn at which the run stopped early (or -1), so waiting workers learn of it.
_HEADER_BYTES = 2 * 8
_CARRY_ON = -1


@dataclass(kw_only=True)
class HotPotatoWorker(CollectiveWorker):
    """Take turns r, r + W, r + 2W, ...: receive the potato, train, hand it on.

    ``total_steps`` is the potato's step count over the whole run; turn t
    covers its global steps ``[t * steps_per_turn, (t + 1) * steps_per_turn)``.
    A round is one hand-off a worker takes part in, sending or receiving.
    """

    steps_per_turn: int
    eval_every: int

    @property
    def turns(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_turn)

    def train(self, ctx: Any, stream: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self._scheduled = 0
        previous, following = (self.rank - 1) % self.num_workers, (self.rank + 1) % self.num_workers
        for turn in range(self.rank, self.turns, self.num_workers):
            if turn > 0 and self.num_workers > 1:  # a lone worker keeps the potato
                stopped_at = self._receive(previous, turn)
                if stopped_at != _CARRY_ON:
                    self._pass_stop(following, turn, stopped_at)
                    return
            step = turn * self.steps_per_turn
            self._follow_schedule(step)
            last = min(step + self.steps_per_turn, self.total_steps)
            while step < last and not ctx.should_stop():
                x, y = next(stream)
                self.gradient(x, y)
                self.optimizer.step()
                self.scheduler.step()
                self._scheduled += 1
                step += 1
                if step % self.eval_every == 0 and step < self.total_steps:
                    self.snapshot()
            if step < last or turn == self.turns - 1:
                # The potato stops here: hand the coordinator the final parameters.
                self.snapshot(final=True)
                if step < last:
                    self._pass_stop(following, turn, turn)
                return
            if self.num_workers > 1:
                self._send(following, turn + 1, _CARRY_ON, with_params=True)

    def _follow_schedule(self, step: int) -> None:
        """Step this worker's scheduler up to the potato's global ``step`` (other workers' turns included)."""
        with warnings.catch_warnings():
            # A worker's first turn may start before its own optimizer ever stepped.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
            while self._scheduled < step:
                self.scheduler.step()
                self._scheduled += 1

    def _pass_stop(self, following: int, turn: int, stopped_at: int) -> None:
        # Tell the worker of the next turn, unless it is the one that stopped or has no turn left.
        if turn + 1 < self.turns and turn + 1 < stopped_at + self.num_workers:
            self._send(following, turn + 1, stopped_at, with_params=False)

    def _send(self, peer: int, turn: int, stopped_at: int, *, with_params: bool) -> None:
        header = torch.tensor([turn, stopped_at], dtype=torch.int64)
        dist.send(header, peer, group=self.group)
        self.bytes_sent += _HEADER_BYTES
        if with_params:
            params = self.flat.params.detach().to(self.comm_device)
            dist.send(params, peer, group=self.group)
            self.bytes_sent += params.numel() * 4
            if self.has_buffers:  # the potato carries the model's buffers (BatchNorm statistics) too
                buffers = torch.frombuffer(bytearray(encode_buffers(self.model)), dtype=torch.uint8)
                dist.send(buffers, peer, group=self.group)
                self.bytes_sent += buffers.numel()
            self.rounds += 1
            self.pushes += 1

    def _receive(self, peer: int, turn: int) -> int:
        """Wait for the potato of ``turn``; returns the turn the run stopped at, or -1 to carry on."""
        header = torch.zeros(2, dtype=torch.int64)
        dist.recv(header, peer, group=self.group)
        self.bytes_received += _HEADER_BYTES
        if int(header[0]) != turn:
            raise RuntimeError(f"worker {self.rank} expected the parameters of turn {turn}, got turn {int(header[0])}")
        stopped_at = int(header[1])
        if stopped_at == _CARRY_ON:
            params = self.flat.params
            buffer = params if params.device == self.comm_device else torch.empty_like(params, device=self.comm_device)
            dist.recv(buffer, peer, group=self.group)
            if buffer is not params:
                params.copy_(buffer)
            self.bytes_received += buffer.numel() * 4
            if self.has_buffers:
                buffers = torch.empty(len(encode_buffers(self.model)), dtype=torch.uint8)
                dist.recv(buffers, peer, group=self.group)
                decode_buffers_(self.model, buffers.numpy().tobytes())
                self.bytes_received += buffers.numel()
            self.rounds += 1
            self.pulls += 1
        return stopped_at


@dataclass(frozen=True, kw_only=True)
class HotPotato(Strategy):
    """Hot-potato SGD's configuration.

    Args:
        steps_per_turn: k, the steps a worker trains the parameters before
            handing them on; default one pass over its shard.
        handoff_timeout: seconds a worker waits for the parameters (up to
            W - 1 other turns) before giving up.

    Example:
        >>> HotPotato(steps_per_turn=50).steps_per_turn
        50
    """

    name: ClassVar[str] = "hot-potato"
    buffers: ClassVar[str] = "carried with the parameters from worker to worker"
    steps_per_turn: int | None = None
    handoff_timeout: float = 600.0
    log_every: int = 10

    def __post_init__(self) -> None:
        if self.steps_per_turn is not None:
            check_range("steps_per_turn", self.steps_per_turn, 1)
        check_range("handoff_timeout", self.handoff_timeout, 0.0, low_open=True)
        check_range("log_every", self.log_every, 1)

    def plan(self, job: Job) -> CollectivePlan:
        check_lockstep_optimizer(job, self.name)
        shard = math.ceil(job.data.num_train / job.workers)
        per_turn = self.steps_per_turn or job.steps_per_epoch(shard)
        run_steps = job.total_steps()  # the potato's: one epoch is one pass over all shards together
        worker = partial(HotPotatoWorker, steps_per_turn=per_turn, total_steps=run_steps,
                         eval_every=job.eval_interval(run_steps), log_every=self.log_every)
        # A dead worker drops the potato or breaks the ring, so the run ends with it (a collective plan).
        # A collective worker's group times out after ten times its timeout: the hand-off timeout.
        return CollectivePlan(job, make_worker=worker, global_steps=run_steps, backend="gloo",
                              timeout=self.handoff_timeout / 10)
