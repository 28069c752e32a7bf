"""``local-sgd``: parameter averaging — local SGD, post-local SGD, one-shot averaging,
ensembles and federated averaging.

- Local SGD (Stich, "Local SGD Converges Fast and Communicates Little", ICLR
  2019): every worker takes ``average_every`` (k) steps on its own shard with
  its own optimizer, then the workers' parameters are averaged with one
  allreduce. k = 1 is synchronous SGD (for SGD and momentum: the average of
  the workers' steps is the step with the averaged gradient).
- Post-local SGD (Lin et al., "Don't Use Large Mini-Batches, Use Local SGD",
  ICLR 2020): the first ``sync_warmup_steps`` steps average after every step,
  local SGD follows.
- One-shot averaging (Zinkevich et al., "Parallelized Stochastic Gradient
  Descent", NIPS 2010): k = 0 trains every worker independently and averages
  the models once, at the end; with ``ensemble`` the W models are kept
  instead and their softmax outputs averaged (a model ensemble), and the
  averaged model's accuracy is reported beside the ensemble's.
- Federated averaging (McMahan et al., "Communication-Efficient Learning of
  Deep Networks from Decentralized Data", AISTATS 2017): with
  ``clients_per_round`` m, each round a seeded sample of m of the W workers
  (the same on every worker) takes the k local steps, and the average is
  weighted by the sampled workers' example counts. The other workers skip the
  round's steps but still join its allreduce with weight 0: one fixed group,
  where sampling a subgroup would need every rank to build a new group (a new
  rendezvous and set of connections) per distinct sample. On one host this
  costs the idle workers' share of the ring, which the byte counters include.
  Non-iid shards come from ``partition="dirichlet"`` and ``alpha``.

Each averaging is one allreduce of the flat parameters with two more values:
the worker's weight and its stop flag, so that the workers stop at the same
round when the coordinator asks. The run is a whole number of rounds: local
SGD drops the steps left over after the last full round of an epoch.
"""

from __future__ import annotations

import copy
import itertools
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn

from downpour.compress import Stream, compression_counters, parse
from downpour.data.partition import SCHEMES
from downpour.errors import check_range, choose
from downpour.flat import encode_buffers
from downpour.models.evaluate import evaluate_data
from downpour.strategies.base import Job, Strategy
from downpour.strategies.collective import (
    BACKENDS,
    Backend,
    CollectivePlan,
    CollectiveWorker,
    check_lockstep_optimizer,
)
from downpour.strategies.plan import Session
from downpour.transport.payload import from_bytes, to_bytes


class Ensemble(nn.Module):
    """Models whose softmax outputs are averaged.

    ``forward`` returns the log of the averaged probabilities: logits of the
    ensemble (their softmax is the average), so cross-entropy on them is the
    ensemble's log loss and their argmax its prediction. The parameters are
    the members' in order, so the flat vector is the members' vectors end to end.

    Example:
        >>> ensemble = Ensemble([nn.Linear(3, 2), nn.Linear(3, 2)])
        >>> ensemble(torch.zeros(4, 3)).exp().sum(dim=1)
        tensor([1., 1., 1., 1.], grad_fn=<SumBackward1>)
    """

    def __init__(self, members: Iterable[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    @classmethod
    def build(cls, factory: Callable[[], nn.Module], size: int) -> Ensemble:
        """An ensemble of ``size`` models from ``factory``."""
        return cls(factory() for _ in range(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        log_probs = torch.stack([torch.log_softmax(member(x), dim=1) for member in self.members])
        return torch.logsumexp(log_probs, dim=0) - math.log(len(self.members))

    @torch.no_grad()
    def average(self) -> nn.Module:
        """One model whose parameters and floating-point buffers are the members' means."""
        averaged = copy.deepcopy(self.members[0])
        states = [member.state_dict() for member in self.members]
        for key, value in averaged.state_dict().items():
            if value.is_floating_point():
                value.copy_(torch.stack([state[key] for state in states]).mean(dim=0))
        return averaged


def sample_clients(seed: int, round_index: int, num_workers: int, clients_per_round: int) -> list[int]:
    """The workers that train in a federated round: the same on every worker for the same seed.

    Example:
        >>> sample_clients(0, 3, 10, 5) == sample_clients(0, 3, 10, 5)
        True
    """
    rng = np.random.default_rng([seed, round_index])
    return sorted(int(r) for r in rng.choice(num_workers, clients_per_round, replace=False))


def plan_rounds(steps: int, every: int, sync_warmup: int) -> list[int]:
    """Local steps of each round of a local-SGD run of about ``steps`` steps per worker.

    ``sync_warmup`` rounds of one step, then rounds of ``every`` steps (the
    steps left over after the last full round dropped; one shorter round if
    not even one fits), or with ``every`` = 0 one round of all the rest.

    Example:
        >>> plan_rounds(20, 8, 2)
        [1, 1, 8, 8]
    """
    warm = min(sync_warmup, steps)
    rest = steps - warm
    if rest == 0:
        return [1] * warm
    if every == 0 or rest < every:
        return [1] * warm + [rest]
    return [1] * warm + [every] * (rest // every)


@dataclass(kw_only=True)
class LocalSGDWorker(CollectiveWorker):
    """Rounds of local steps, each closed by one (weighted) parameter average, or by a gather for an ensemble."""

    plan: tuple[int, ...]
    clients_per_round: int | None = None
    ensemble: bool = False
    eval_every: int = 10
    compress: str | None = None

    def prepare(self) -> None:
        super().prepare()
        self.round = self.local = 0  # the round under way, and the local steps taken in it
        self.round_ends = list(itertools.accumulate(self.plan))  # schedule steps at each round's end
        self.adopted = False
        if self.compress is not None:
            self.stream = Stream(parse(self.compress))
            self.anchor = self.flat.params.detach().clone()

    def train(self, ctx: Any, stream: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.next_eval = self.eval_every
        self.train_elastic(lambda: self._rounds(ctx))
        if self.run_over:
            return
        if self.ensemble:
            members = self.all_gather(self.flat.params)
            self.count_round()
            # The ensemble's buffers are its members' end to end, as its parameters are.
            buffers = b""
            if self.has_buffers:
                mine = torch.frombuffer(bytearray(encode_buffers(self.replica)), dtype=torch.uint8)
                buffers = self.all_gather(mine).cpu().numpy().tobytes()
            if self.rank == 0:
                self.snapshot(members, final=True, buffers=buffers)
        elif self.rank == 0 or self.elastic:  # an elastic group's rank 0 may be a late replacement
            self.snapshot(final=True)

    def sampled(self, index: int) -> bool:
        """Whether this worker trains in round ``index`` (always, unless federated)."""
        return self.clients_per_round is None or self.rank in sample_clients(
            self.job.seed, index, self.num_workers, self.clients_per_round)

    def _rounds(self, ctx: Any) -> None:
        """The rounds from where this worker is (``round``, ``local``) to the end; each closed by an average."""
        optimizer, scheduler = self.optimizer, self.scheduler
        while self.round < len(self.plan):
            length, last = self.plan[self.round], self.round == len(self.plan) - 1
            sampled = self.sampled(self.round)
            if sampled:
                while self.local < length:
                    self.gradient(*next(self.minibatches))
                    optimizer.step()
                    scheduler.step()
                    self.local += 1
                    self.adopted = False
            else:
                # The learning rate follows the round, as on a server: every
                # sampled client of a round steps with the same one.
                _advance(scheduler, length - self.local)
                self.local = length
            if last and self.ensemble:
                return
            # A replica copied from another member adds nothing of its own to the average.
            weight = 0.0 if self.adopted or not sampled else (
                float(self.job.data.num_train) if self.clients_per_round is not None else 1.0)
            stop = self.average_compressed_(weight, ctx) if self.compress is not None else self.average_(weight, ctx)
            self.average_buffers_(weight)
            self.round, self.local = self.round + 1, 0
            if stop or last:
                return
            # An ensemble's members are evaluated together, at the end.
            done = self.round_ends[self.round - 1]
            if self.rank == 0 and not self.ensemble and done >= self.next_eval:
                self.snapshot()
                self.next_eval = done + self.eval_every

    def position(self) -> tuple[int, ...]:
        return (self.round, self.local)

    def move_to(self, position: tuple[int, ...]) -> None:
        self.round, self.local = position
        # This worker's own steps at that point: the rounds it was sampled in, then the local steps.
        self.steps = sum(length for index, length in enumerate(self.plan[: self.round]) if self.sampled(index))
        self.steps += self.local if self.sampled(self.round) else 0

    def elastic_tensors(self) -> dict[str, torch.Tensor]:
        return {} if self.compress is None else {"anchor": self.anchor}

    def load_elastic_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.compress is not None:
            self.anchor.copy_(tensors["anchor"])

    def average_(self, weight: float, ctx: Any) -> bool:
        """Replace the parameters by the workers' ``weight``-weighted average; True if any worker must stop."""
        n = self.flat.numel
        buffer = torch.empty(n + 2, dtype=torch.float32, device=self.flat.params.device)
        torch.mul(self.flat.params, weight, out=buffer[:n])
        buffer[n] = weight
        buffer[n + 1] = 1.0 if ctx.should_stop() else 0.0
        self.allreduce_(buffer)
        self.count_round()
        if buffer[n] > 0:  # else nobody trained this round (federated: only replacements were sampled)
            self.flat.params.copy_(buffer[:n].div_(buffer[n]))
        return bool(buffer[n + 1] > 0)

    def counters(self) -> dict[str, Any]:
        counters = super().counters()
        if self.compress is not None and hasattr(self, "stream"):
            counters |= compression_counters([self.stream])
        return counters

    def average_compressed_(self, weight: float, ctx: Any) -> bool:
        """Move every replica to the last average plus the weighted mean of the workers' compressed changes.

        Each worker compresses the change it made since the last average
        (what its compressor holds back stays in its residual for the next
        round); the payloads are all-gathered as bytes, so every worker
        decodes the same W payloads and lands on the same parameters. The
        payloads travel padded to the longest one, and are counted so. A
        worker of weight 0 sends no change.
        """
        n = self.flat.numel
        change = (self.flat.params.detach() - self.anchor).cpu() if weight else torch.zeros(n)
        residual = self.stream.state
        try:
            payload = self.stream.encode(change)
            data = torch.frombuffer(bytearray(to_bytes(payload)), dtype=torch.uint8)
            heads = self.all_gather(torch.tensor([data.numel(), int(ctx.should_stop()), int(weight > 0)],
                                                 dtype=torch.int64))
            lengths, stops, weights = heads[0::3].tolist(), heads[1::3], heads[2::3]
            padded = torch.zeros(max(lengths), dtype=torch.uint8)
            padded[: data.numel()] = data
            gathered = self.all_gather(padded).view(self.num_workers, -1).cpu()
        except RuntimeError:
            self.stream.state = residual  # the round is redone in a re-formed group: send this change again
            raise
        self.count_round()
        mean = torch.zeros(n)
        for row, length in zip(gathered, lengths):
            from_bytes(row[:length].numpy().tobytes(), expected_size=n).add_to_(mean)
        self.anchor.add_(mean.div_(max(int(weights.sum()), 1)).to(self.anchor.device))
        self.flat.params.copy_(self.anchor)
        return bool(stops.any())


def _advance(scheduler: torch.optim.lr_scheduler.LRScheduler, steps: int) -> None:
    with warnings.catch_warnings():
        # torch warns when a schedule steps before its optimizer ever has; here that is on purpose.
        warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*", category=UserWarning)
        for _ in range(steps):
            scheduler.step()


@dataclass(frozen=True, kw_only=True)
class LocalSGD(Strategy):
    """Parameter averaging's configuration (local SGD, post-local SGD, one-shot, ensemble, FedAvg).

    The run is one pass over the data by all workers together, as for
    ``allreduce``: ``epochs * num_train / (W * b)`` steps per worker, capped
    by ``max_steps`` and cut to whole rounds. Federated averaging keeps the
    samples the same: ``steps * W / (m * k)`` rounds of k steps by m clients.

    Args:
        average_every: k, local steps between averages; 0 averages once, at the end.
        sync_warmup_steps: steps averaged after every step before local SGD
            starts (post-local SGD).
        ensemble: with k = 0, keep the W models and return their ensemble
            (the averaged model's accuracy is reported beside it).
        clients_per_round: m, workers sampled per round for federated
            averaging (weighted by example counts); None: every worker, unweighted.
        partition: how the training set is split among workers.
        alpha: Dirichlet concentration for ``partition="dirichlet"`` (small: skewed).
        backend: ``"auto"`` (NCCL when every worker has a GPU, else gloo), ``"gloo"`` or ``"nccl"``.
        compress: compress each worker's change between averages (a
            :func:`downpour.compress.parse` spec, with its residual kept for
            the next round); the changes are combined by all-gather.
        log_every: steps between a worker's progress events.

    Example:
        >>> LocalSGD(average_every=8, sync_warmup_steps=50).average_every
        8
    """

    name: ClassVar[str] = "local-sgd"
    restartable: ClassVar[bool] = True  # restart_workers: the group re-forms with the new worker
    buffers: ClassVar[str] = "averaged with the parameters at every average (counters kept)"
    average_every: int = 8
    sync_warmup_steps: int = 0
    ensemble: bool = False
    clients_per_round: int | None = None
    partition: Literal["iid", "label", "dirichlet"] = "iid"
    alpha: float = 0.5
    backend: Backend = "auto"
    compress: str | None = None
    log_every: int = 10

    def __post_init__(self) -> None:
        check_range("average_every", self.average_every, 0)
        if self.compress is not None:
            parse(self.compress)  # a bad spec fails here, naming the problem
            if self.clients_per_round is not None or self.ensemble:
                raise ValueError("compress averages every worker's change with equal weight; it does not "
                                 "combine with clients_per_round (federated averaging) or ensemble")
        check_range("sync_warmup_steps", self.sync_warmup_steps, 0)
        if self.clients_per_round is not None:
            check_range("clients_per_round", self.clients_per_round, 1)
            if self.average_every == 0:
                raise ValueError("clients_per_round (federated averaging) needs average_every >= 1 local steps "
                                 "per round, got average_every=0")
            if self.sync_warmup_steps:
                raise ValueError("sync_warmup_steps is for local SGD; federated averaging (clients_per_round="
                                 f"{self.clients_per_round}) has no synchronous warm-up: set it to 0")
        if self.ensemble and self.average_every != 0:
            raise ValueError("ensemble keeps the W independently trained models, so it needs average_every=0, "
                             f"got average_every={self.average_every}")
        if self.ensemble and self.clients_per_round is not None:
            raise ValueError("ensemble and clients_per_round (federated averaging) do not combine; drop one")
        choose("partition", self.partition, SCHEMES)
        check_range("alpha", self.alpha, 0.0, low_open=True)
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        check_range("log_every", self.log_every, 1)

    def plan(self, job: Job) -> CollectivePlan:
        if self.clients_per_round is not None and self.clients_per_round > job.workers:
            raise ValueError(f"clients_per_round must be in [1, workers={job.workers}], got "
                             f"{self.clients_per_round}; sample at most as many clients as there are workers")
        if self.ensemble and job.restart_workers:
            raise ValueError("an ensemble keeps every worker's own model, which a restarted worker has lost; "
                             "drop restart_workers, or average the models (ensemble=False)")
        check_lockstep_optimizer(job, self.name)
        steps = job.total_steps(job.data.num_train // job.workers)
        if self.clients_per_round is None:
            plan = plan_rounds(steps, self.average_every, self.sync_warmup_steps)
        else:
            rounds = max(1, steps * job.workers // (self.clients_per_round * self.average_every))
            plan = [self.average_every] * rounds
        partition: dict[str, Any] = {"scheme": self.partition}
        if self.partition == "dirichlet":
            partition["alpha"] = self.alpha
        worker = partial(LocalSGDWorker, plan=tuple(plan), total_steps=sum(plan), log_every=self.log_every,
                         clients_per_round=self.clients_per_round, ensemble=self.ensemble, compress=self.compress,
                         eval_every=job.eval_interval(sum(plan)))
        kind = EnsemblePlan if self.ensemble else CollectivePlan
        return kind(job, make_worker=worker, global_steps=sum(plan) * job.workers, backend=self.backend,
                    partition=partition)


class EnsemblePlan(CollectivePlan):
    """Local SGD with ``ensemble``: the coordinator's model is the ensemble of the W replicas.

    Rank 0 hands it the gathered members; the ensemble's and the averaged
    model's test accuracy are reported side by side.
    """

    def build_model(self) -> nn.Module:
        return Ensemble.build(replace(self.job, device="cpu").build_model, self.job.workers)

    def finish(self, session: Session, model: nn.Module) -> dict[str, Any]:
        results: dict[str, Any] = {}
        data = self.job.data
        for label, member in (("ensemble", model), ("averaged", model.average())):
            values = evaluate_data(member, self.job.loss, data)
            results[f"eval/{label}_accuracy"] = values["eval/accuracy"]
            results[f"eval/{label}_loss"] = values["eval/loss"]
        session.metrics.log(session.progress.total_steps, results)
        return {}
