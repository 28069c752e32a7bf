"""Update policies: when a shard applies what workers push.

Synchronous and asynchronous training use the same :class:`ServerShard`; only
its policy differs (STYLE.md: "sync vs. async is a policy, not a second
component"). A policy is a frozen, keyword-only config with two functions in
the optax manner: ``init(numel) -> state`` and ``offer(push, state) ->
Verdict``. The shard calls ``offer`` under its lock with every push that
passed validation and applies the :class:`Step` the verdict carries, if any.
A policy holds no tensors of its own, so one policy object can configure
many shards.

- :class:`ApplyAtOnce`: Downpour SGD (Dean et al., "Large Scale Distributed
  Deep Networks", NIPS 2012): every push is applied on arrival.
- :class:`Synchronous`: synchronous SGD with backup workers (Chen et al.,
  "Revisiting Distributed Synchronous SGD", 2016): average the first
  ``num_required`` gradients computed on the current version, apply them
  once, drop the rest.
- :class:`SumPortions`: Sandblaster's batch gradient (Dean et al. 2012):
  sum the partial gradients of one pass, each portion once, and apply
  nothing; the coordinator moves the parameters with vector ops.
- :class:`BoundedStaleness`: stale synchronous parallel (Ho et al., "More
  Effective Distributed ML via a Stale Synchronous Parallel Parameter
  Server", NIPS 2013): apply at once, refuse what is too stale.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Protocol

import torch

from downpour.errors import StaleUpdate, check_range, choose
from downpour.flat import SparseUpdate
from downpour.transport.protocol import InvalidUpdate, UpdateKind

Update = torch.Tensor | SparseUpdate
LATE_CHOICES = ("drop", "fold")


class Push(NamedTuple):
    """One validated push, as a policy sees it."""

    worker: int
    version: int  # the version the update was computed on
    staleness: int  # the shard's version at arrival minus ``version``
    update: Update
    kind: UpdateKind
    portion: int | None = None  # Sandblaster: the part of the batch a partial gradient covers


class Step(NamedTuple):
    """An update the shard applies now, advancing its version by one.

    ``update`` may be the pushed tensor itself or the policy's buffer; the
    shard uses it before the next ``offer`` and keeps no reference.
    ``lr_scale`` multiplies the optimizer's learning rate for this step (or a
    delta's size). ``staleness`` lists the staleness of every push it holds.
    """

    update: Update
    kind: UpdateKind
    lr_scale: float
    staleness: tuple[int, ...]


class Verdict(NamedTuple):
    """What became of a push: applied now (with ``step``), pending, or dropped."""

    outcome: Literal["applied", "pending", "dropped"]
    step: Step | None = None
    folded: bool = False


class UpdatePolicy(Protocol):
    """Decides when a shard applies pushed updates (the seam between sync and async).

    ``offer`` may raise :class:`~downpour.errors.StaleUpdate` to refuse a push
    (the worker must pull again) or :class:`InvalidUpdate`; either way it must
    leave ``state`` as it was.
    """

    scale_lr_by_staleness: bool

    def init(self, numel: int) -> Any: ...

    def offer(self, push: Push, state: Any) -> Verdict: ...

    def pending(self, state: Any) -> int:
        """Pushes accepted but not applied yet."""
        ...


def _lr_scale(enabled: bool, staleness: int) -> float:
    # Dividing the step size by the staleness keeps a very late gradient from
    # undoing the progress made since it was computed (Zhang et al.,
    # "Staleness-aware Async-SGD", IJCAI 2016).
    return 1.0 / max(1, staleness) if enabled else 1.0


@dataclass(frozen=True, kw_only=True)
class ApplyAtOnce:
    """Downpour SGD: apply every push when it arrives, however stale.

    Example:
        >>> ApplyAtOnce(scale_lr_by_staleness=True)
        ApplyAtOnce(scale_lr_by_staleness=True)
    """

    scale_lr_by_staleness: bool = False

    def init(self, numel: int) -> None:
        return None

    def offer(self, push: Push, state: None) -> Verdict:
        scale = _lr_scale(self.scale_lr_by_staleness, push.staleness)
        return Verdict("applied", Step(push.update, push.kind, scale, (push.staleness,)))

    def pending(self, state: None) -> int:
        return 0


@dataclass(frozen=True, kw_only=True)
class BoundedStaleness:
    """Stale synchronous parallel: apply at once, refuse pushes staler than ``max_staleness``.

    SSP can be enforced two ways: block a worker's pull until the slowest
    worker is close enough, or refuse the push. This shard keeps one version
    clock, not per-worker clocks, and other workers keep pushing while a pull
    waits, so only refusal guarantees the bound: **every applied push has
    staleness <= max_staleness**, always. A refused push raises
    :class:`~downpour.errors.StaleUpdate` (``STALE`` over gRPC); the worker
    pulls again and recomputes. ``max_staleness=0`` admits only gradients
    computed on the current version.

    Example:
        >>> BoundedStaleness(max_staleness=4).max_staleness
        4
    """

    max_staleness: int
    scale_lr_by_staleness: bool = False

    def __post_init__(self) -> None:
        check_range("max_staleness", self.max_staleness, 0)

    def init(self, numel: int) -> None:
        return None

    def offer(self, push: Push, state: None) -> Verdict:
        if push.staleness > self.max_staleness:
            raise StaleUpdate(
                f"update from worker {push.worker} was computed on version {push.version}, "
                f"{push.staleness} versions ago; this shard applies at most "
                f"{self.max_staleness} versions old (BoundedStaleness): pull and recompute"
            )
        scale = _lr_scale(self.scale_lr_by_staleness, push.staleness)
        return Verdict("applied", Step(push.update, push.kind, scale, (push.staleness,)))

    def pending(self, state: None) -> int:
        return 0


@dataclass
class _Round:
    """The updates collected towards a synchronous step."""

    total: torch.Tensor  # weighted sum of the round's updates
    empty: bool = True
    weight: float = 0.0
    count: int = 0  # on-time pushes
    workers: set[int] = field(default_factory=set)
    kind: UpdateKind | None = None
    folded: list[int] = field(default_factory=list)  # staleness of folded late pushes

    def add_(self, update: Update, alpha: float) -> None:
        # The first update of a round overwrites the buffer, so no round pays
        # for zeroing a dense vector it then fully overwrites.
        if isinstance(update, SparseUpdate):
            if self.empty:
                self.total.zero_()
            self.total.index_add_(0, update.indices, update.values, alpha=alpha)
        elif self.empty:
            self.total.copy_(update.reshape(-1))
            if alpha != 1.0:
                self.total.mul_(alpha)
        else:
            self.total.add_(update.reshape(-1), alpha=alpha)
        self.empty = False
        self.weight += alpha

    def reset(self) -> None:
        self.empty, self.weight, self.count, self.kind = True, 0.0, 0, None
        self.workers.clear()
        self.folded.clear()


@dataclass(frozen=True, kw_only=True)
class Synchronous:
    """Synchronous SGD with backup workers: N of N+b (Chen et al. 2016).

    Updates computed on the current version are collected until
    ``num_required`` distinct workers have pushed; their average is then
    applied once and the version advances, which wakes every worker waiting
    in ``pull(wait_version=...)``. Run N + b workers with
    ``num_required=N``: the b slowest of every round arrive late.

    A late update (computed on an older version, the round's backups
    included) is dropped and counted with ``late="drop"``. With
    ``late="fold"`` it joins the next step with weight ``1 / (1 + staleness)``:
    that step applies ``(sum of on-time updates + sum of w_i * late_i) /
    (num_required + sum of w_i)``, and the shard counts it as folded. A second
    push from one worker for the same version is dropped. The updates of one
    round must all be of one kind. ``scale_lr_by_staleness`` changes nothing
    here: every step is computed on the current version.

    Example:
        >>> Synchronous(num_required=3, late="fold").num_required
        3
    """

    num_required: int
    late: Literal["drop", "fold"] = "drop"
    scale_lr_by_staleness: bool = False

    def __post_init__(self) -> None:
        check_range("num_required", self.num_required, 1)
        choose("late-update handling", self.late, LATE_CHOICES)

    def init(self, numel: int) -> _Round:
        return _Round(total=torch.zeros(numel, dtype=torch.float32))

    def offer(self, push: Push, state: _Round) -> Verdict:
        on_time = push.staleness == 0
        if on_time and push.worker in state.workers:
            return Verdict("dropped")
        if not on_time and self.late == "drop":
            return Verdict("dropped")
        if state.kind is not None and push.kind != state.kind:
            raise InvalidUpdate(
                "BAD_KIND",
                f"this synchronous round collects {state.kind} updates; "
                f"worker {push.worker} pushed a {push.kind}",
            )
        state.kind = push.kind
        if not on_time:
            state.add_(push.update, 1.0 / (1 + push.staleness))
            state.folded.append(push.staleness)
            return Verdict("pending", folded=True)
        state.add_(push.update, 1.0)
        state.count += 1
        state.workers.add(push.worker)
        if state.count < self.num_required:
            return Verdict("pending")
        state.total.div_(state.weight)
        step = Step(state.total, push.kind, 1.0, (0,) * state.count + tuple(state.folded))
        state.reset()
        return Verdict("applied", step)

    def pending(self, state: _Round) -> int:
        return state.count + len(state.folded)


@dataclass
class _Sum:
    """The batch gradient of the current pass: the sum of its portions' partial gradients."""

    total: torch.Tensor
    portions: set[int] = field(default_factory=set)

    def reset(self) -> None:
        self.total.zero_()
        self.portions.clear()


@dataclass(frozen=True, kw_only=True)
class SumPortions:
    """Sandblaster's batch gradient: sum each portion's partial gradient once, apply nothing.

    A gradient pass evaluates the parameters of one version, split into
    portions the workers take as they become free; near the end of a pass an
    outstanding portion is also handed to an idle worker (a backup), and the
    first answer counts: a second push of a portion is dropped, as is a push
    computed on another version (a pass the coordinator has moved past). The
    sum is the shard's vector ``"g"``; writing the parameters (``"x"``) with
    a vector op starts a new version and clears it.

    Example:
        >>> SumPortions().pending(SumPortions().init(3))
        0
    """

    scale_lr_by_staleness: bool = False

    def init(self, numel: int) -> _Sum:
        return _Sum(total=torch.zeros(numel, dtype=torch.float32))

    def offer(self, push: Push, state: _Sum) -> Verdict:
        if push.portion is None:
            raise InvalidUpdate("BAD_REQUEST", f"worker {push.worker} pushed a partial gradient with no "
                                "portion; a Sandblaster shard sums portions of a pass")
        if push.kind != "gradient":
            raise InvalidUpdate("BAD_KIND", f"a Sandblaster shard sums gradients; worker {push.worker} "
                                f"pushed a {push.kind}")
        if push.staleness or push.portion in state.portions:
            return Verdict("dropped")
        update = push.update
        if isinstance(update, SparseUpdate):
            state.total.index_add_(0, update.indices, update.values)
        else:
            state.total.add_(update.reshape(-1))
        state.portions.add(push.portion)
        return Verdict("pending")

    def pending(self, state: _Sum) -> int:
        return len(state.portions)
