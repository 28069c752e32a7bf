"""One parameter-server shard: a slice of the flat vector and the optimizer that moves it."""

from __future__ import annotations

import collections
import copy
import math
import threading
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import numpy as np
import torch

from downpour.errors import StaleUpdate, check_range
from downpour.flat import ShardRange, SparseUpdate
from downpour.server import vectors
from downpour.server.policy import ApplyAtOnce, Push, Step, SumPortions, UpdatePolicy
from downpour.transport.protocol import UPDATE_KINDS, InvalidUpdate, PushResult, UpdateKind

T = TypeVar("T")
OptimizerFactory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]


class ServerShard:
    """The range ``[start, stop)`` of the flat parameter vector, updated by a server-side optimizer.

    Workers pull the slice and push gradients (run through ``optimizer``) or
    deltas (added as they are), dense or sparse. Every applied update advances
    the version by one; the :class:`UpdatePolicy` decides when a push is
    applied (at once, in synchronous rounds, or within a staleness bound).
    Thread-safe: the gRPC service calls it from many threads.

    Args:
        params: the initial values of the slice (copied; float32, any shape).
        shard: which range of the flat vector this is; default the whole vector.
        optimizer: builds the server-side optimizer over ``[slice]``, e.g.
            ``lambda ps: torch.optim.Adagrad(ps, lr=0.05)``. Without one the
            shard takes only ``kind="delta"`` updates.
        policy: :class:`ApplyAtOnce` (default), :class:`Synchronous` or
            :class:`BoundedStaleness`.
        ema_decay: keep an exponential moving average of the parameters with
            this decay per update (served by :meth:`average`); None: none.

    Example:
        >>> shard = ServerShard(torch.zeros(4), optimizer=lambda ps: torch.optim.SGD(ps, lr=0.5))
        >>> shard.push(worker=0, version=0, update=torch.ones(4))
        PushResult(applied=True, dropped=False, staleness=0, version=1)
        >>> shard.pull()
        (1, tensor([-0.5000, -0.5000, -0.5000, -0.5000]))
    """

    def __init__(
        self,
        params: torch.Tensor,
        *,
        shard: ShardRange | None = None,
        optimizer: OptimizerFactory | None = None,
        policy: UpdatePolicy | None = None,
        ema_decay: float | None = None,
    ) -> None:
        if not isinstance(params, torch.Tensor):
            raise TypeError(f"params must be a torch.Tensor, got {type(params).__name__}")
        if params.dtype != torch.float32:
            raise TypeError(f"params must be float32, got {params.dtype}; convert with .float()")
        numel = params.numel()
        if numel == 0:
            raise ValueError("a shard must hold at least one parameter")
        self._range = shard if shard is not None else ShardRange(0, 0, numel)
        if self._range.size != numel:
            raise ValueError(
                f"shard {self._range.shard} spans [{self._range.start}, {self._range.stop}) "
                f"({self._range.size} elements) but params has {numel}"
            )
        if ema_decay is not None:
            check_range("ema_decay", ema_decay, 0.0, 1.0, low_open=True)
        self._param = params.detach().reshape(-1).to("cpu", copy=True).requires_grad_(True)
        self._optimizer = optimizer([self._param]) if optimizer is not None else None
        if self._optimizer is not None and not isinstance(self._optimizer, torch.optim.Optimizer):
            raise TypeError(
                "optimizer must build a torch.optim.Optimizer, "
                f"got {type(self._optimizer).__name__}"
            )
        self._policy: UpdatePolicy = policy if policy is not None else ApplyAtOnce()
        self._policy_state = self._policy.init(numel)
        self._ema_decay = ema_decay
        self._average = self._param.detach().clone() if ema_decay is not None else None
        self._cond = threading.Condition(threading.Lock())
        self._version = 0
        self._memo: dict[Hashable, Any] = {}
        self._vectors: dict[str, torch.Tensor] = {}  # the coordinator's (Sandblaster)
        self._pushes = self._pulls = self._applied = self._dropped = 0
        self._refused = self._folded = self._updates = 0
        self._staleness: collections.Counter[int] = collections.Counter()
        self._observer: Callable[[int, Callable[[], dict[str, Any]]], None] | None = None

    # -- identity --------------------------------------------------------

    @property
    def shard_id(self) -> int:
        return self._range.shard

    @property
    def range(self) -> ShardRange:
        return self._range

    @property
    def start(self) -> int:
        return self._range.start

    @property
    def stop(self) -> int:
        return self._range.stop

    @property
    def size(self) -> int:
        return self._range.size

    @property
    def policy(self) -> UpdatePolicy:
        return self._policy

    @property
    def version(self) -> int:
        with self._cond:
            return self._version

    # -- reading ---------------------------------------------------------

    def snapshot(
        self,
        encode: Callable[[int, torch.Tensor], T],
        *,
        newer_than: int | None = None,
        wait_version: int | None = None,
        timeout: float = 60.0,
        average: bool = False,
        key: Hashable | None = None,
    ) -> T | None:
        """Run ``encode(version, view)`` under the lock and return its result.

        ``view`` is the live slice (or its moving average): read it, copy it,
        never keep or modify it, and do not call back into the shard (the
        lock is held). This lets the transport serialize straight from the
        parameters with one copy. Waits until the version reaches
        ``wait_version`` (``TimeoutError`` after ``timeout`` s); returns None
        when the version is not greater than ``newer_than``. Given a ``key``,
        the result is memoized until the shard next changes.
        """
        check_range("timeout", timeout, 0.0)
        if average and self._average is None:
            raise ValueError(
                f"shard {self.shard_id} keeps no moving average; build it with ema_decay=0.99 (say)"
            )
        with self._cond:
            if wait_version is not None and not self._cond.wait_for(
                lambda: self._version >= wait_version, timeout
            ):
                raise TimeoutError(
                    f"shard {self.shard_id} did not reach version {wait_version} within "
                    f"{timeout:g} s (it is at {self._version})"
                )
            self._pulls += 1
            if newer_than is not None and self._version <= newer_than:
                return None
            memo_key = (key, average)
            if key is not None and memo_key in self._memo:
                return self._memo[memo_key]
            source = self._average if average else self._param.detach()
            result = encode(self._version, source)
            if key is not None:
                self._memo[memo_key] = result
            return result

    def pull(
        self,
        newer_than: int | None = None,
        wait_version: int | None = None,
        timeout: float = 60.0,
        *,
        average: bool = False,
    ) -> tuple[int, torch.Tensor] | None:
        """``(version, copy of the slice)``, or None when not newer than ``newer_than``.

        With ``wait_version``, first wait up to ``timeout`` s for the version
        to reach it (``TimeoutError`` if it does not). ``average=True`` returns
        the moving average instead of the parameters.
        """
        return self.snapshot(
            lambda version, view: (version, view.clone()),
            newer_than=newer_than,
            wait_version=wait_version,
            timeout=timeout,
            average=average,
        )

    def average(self) -> torch.Tensor:
        """A copy of the exponential moving average of the parameters (for evaluation)."""
        result = self.pull(average=True)
        assert result is not None
        return result[1]

    # -- writing ---------------------------------------------------------

    def push(
        self,
        worker: int,
        version: int,
        update: torch.Tensor | SparseUpdate,
        *,
        kind: UpdateKind = "gradient",
        portion: int | None = None,
    ) -> PushResult:
        """Offer an update computed on ``version``; the policy decides what happens to it.

        ``portion`` names the part of a Sandblaster pass a partial gradient covers.

        Raises:
            InvalidUpdate: (a ``ValueError``) wrong length, dtype, index,
                non-finite values, a version the shard has not reached, or a
                gradient for a shard without optimizer. Nothing is changed.
            StaleUpdate: the policy refuses an update this stale (pull again).
        """
        self._check(worker, version, update, kind)
        with self._cond:
            if version > self._version:
                raise InvalidUpdate(
                    "BAD_VERSION",
                    f"worker {worker} pushed an update computed on version {version}, "
                    f"but shard {self.shard_id} is only at version {self._version}",
                )
            staleness = self._version - version
            push = Push(worker, version, staleness, update, kind, portion)
            try:
                verdict = self._policy.offer(push, self._policy_state)
            except StaleUpdate:
                self._pushes += 1
                self._refused += 1
                raise
            self._pushes += 1
            if verdict.outcome == "dropped":
                self._dropped += 1
            if verdict.folded:
                self._folded += 1
            if verdict.step is not None:
                self._apply(verdict.step)
            return PushResult(
                applied=verdict.step is not None,
                dropped=verdict.outcome == "dropped",
                staleness=staleness,
                version=self._version,
            )

    def vector_ops(self, ops: list[vectors.Op]) -> tuple[list[float], int]:
        """Run Sandblaster's vector ops (see :mod:`downpour.server.vectors`) atomically.

        Returns this shard's part of each dot product, in order, and the
        version after the call. Writing ``"x"`` (the parameters) advances the
        version, wakes waiting pulls and, under :class:`SumPortions`, clears
        the batch gradient ``"g"`` for the next pass, once the call's ops have run.

        Raises:
            InvalidUpdate: a bad op, name or value; nothing is changed.

        Example:
            >>> shard = ServerShard(torch.ones(3), policy=SumPortions())
            >>> shard.vector_ops([vectors.copy("d", "x"), vectors.scale("d", 2.0), vectors.dot("d", "x")])
            ([6.0], 0)
        """
        with self._cond:
            known = {vectors.PARAMS, *self._vectors} | ({vectors.GRADIENT} if self._sums else set())
            writes_params = vectors.check_ops(ops, known)
            values = vectors.run_ops(ops, self._vectors, self.size, self._vector)
            if writes_params:
                self._version += 1
                self._updates += 1
                if self._sums:
                    self._policy_state.reset()
                if self._average is not None:
                    assert self._ema_decay is not None
                    self._average.lerp_(self._param.detach(), 1.0 - self._ema_decay)
                self._memo.clear()
                self._cond.notify_all()
            return values, self._version

    @property
    def _sums(self) -> bool:
        return isinstance(self._policy, SumPortions)

    def _vector(self, name: str) -> torch.Tensor:
        if name == vectors.PARAMS:
            return self._param.detach()
        if name == vectors.GRADIENT and self._sums:
            return self._policy_state.total
        return self._vectors[name]

    def _check(
        self, worker: int, version: int, update: torch.Tensor | SparseUpdate, kind: str
    ) -> None:
        if kind not in UPDATE_KINDS:
            raise InvalidUpdate(
                "BAD_KIND",
                f"unknown update kind {kind!r}; choose one of: {', '.join(UPDATE_KINDS)}",
            )
        if kind == "gradient" and self._optimizer is None:
            raise InvalidUpdate(
                "BAD_KIND",
                f"shard {self.shard_id} has no optimizer, so it takes only kind='delta' updates; "
                "give ServerShard(optimizer=...) to push gradients",
            )
        if isinstance(worker, bool) or not isinstance(worker, int) or worker < 0:
            raise InvalidUpdate("BAD_REQUEST", f"worker must be an int >= 0, got {worker!r}")
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise InvalidUpdate("BAD_VERSION", f"version must be an int >= 0, got {version!r}")
        if isinstance(update, SparseUpdate):
            values = self._check_sparse(update)
        elif isinstance(update, torch.Tensor):
            if update.dtype != torch.float32:
                raise InvalidUpdate("BAD_DTYPE", f"updates must be float32, got {update.dtype}")
            if update.numel() != self.size:
                raise InvalidUpdate(
                    "BAD_LENGTH",
                    f"update has {update.numel()} elements, "
                    f"shard {self.shard_id} holds {self.size}",
                )
            values = update
        else:
            raise TypeError(
                f"update must be a torch.Tensor or SparseUpdate, got {type(update).__name__}"
            )
        if values.device.type != "cpu":
            raise InvalidUpdate("BAD_REQUEST", f"updates must be on the CPU, got {values.device}")
        # A sum is finite only if every term is (an infinity stays infinite, or
        # meets its opposite and turns NaN, and NaN stays NaN), and summing
        # reads the update once with no temporary: ~6.5 ms per 100 MB, half of
        # numpy's isfinite (itself 15x torch's). Only a sum that is not finite,
        # which finite values that overflow can also make, needs the count.
        if math.isfinite(float(values.detach().sum())):
            return
        array = values.detach().numpy()
        bad = int(array.size - np.isfinite(array).sum())
        if bad:
            raise InvalidUpdate("NON_FINITE", f"the update holds {bad} NaN or infinite values")

    def _check_sparse(self, update: SparseUpdate) -> torch.Tensor:
        indices, values = update.indices, update.values
        if update.size != self.size:
            raise InvalidUpdate(
                "BAD_LENGTH",
                f"sparse update is for a vector of {update.size}, "
                f"shard {self.shard_id} holds {self.size}",
            )
        if indices.dtype not in (torch.int32, torch.int64) or values.dtype != torch.float32:
            raise InvalidUpdate(
                "BAD_DTYPE",
                f"sparse updates need int32/int64 indices and float32 values, "
                f"got {indices.dtype} and {values.dtype}",
            )
        if indices.dim() != 1 or values.dim() != 1 or indices.numel() != values.numel():
            raise InvalidUpdate(
                "BAD_LENGTH",
                f"sparse update needs 1-D indices and values of one length, "
                f"got shapes {tuple(indices.shape)} and {tuple(values.shape)}",
            )
        if indices.numel():
            low, high = int(indices.min()), int(indices.max())
            if low < 0 or high >= self.size:
                raise InvalidUpdate(
                    "BAD_INDEX",
                    f"sparse indices must lie in [0, {self.size}), "
                    f"got indices from {low} to {high}",
                )
            if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
                raise InvalidUpdate("BAD_INDEX", "sparse indices must be strictly increasing")
        return values

    def _apply(self, step: Step) -> None:
        """Apply one step under the lock; advance the version; wake waiting pulls."""
        update, scale = step.update, step.lr_scale
        param = self._param.detach()
        if step.kind == "delta":
            if isinstance(update, SparseUpdate):
                param.index_add_(0, update.indices, update.values, alpha=scale)
            else:
                param.add_(update.reshape(-1), alpha=scale)
        else:
            assert self._optimizer is not None
            lr = _plain_sgd_lr(self._optimizer)
            if lr is not None:
                # Plain SGD is p -= lr * g, which is what SGD.step computes too,
                # minus ~100 us of bookkeeping per call (a third of a small
                # push); sparse, it touches only the pushed coordinates.
                if isinstance(update, SparseUpdate):
                    param.index_add_(0, update.indices, update.values, alpha=-lr * scale)
                else:
                    param.add_(update.reshape(-1), alpha=-lr * scale)
            else:
                grad = update.to_dense() if isinstance(update, SparseUpdate) else update.reshape(-1)
                with _scaled_lr(self._optimizer, scale):
                    self._param.grad = grad
                    try:
                        self._optimizer.step()
                    finally:
                        self._param.grad = None
        self._version += 1
        self._updates += 1
        self._applied += len(step.staleness)
        self._staleness.update(step.staleness)
        if self._average is not None:
            assert self._ema_decay is not None
            self._average.lerp_(param, 1.0 - self._ema_decay)
        self._memo.clear()
        self._cond.notify_all()
        if self._observer is not None:
            self._observer(self._version, self._state)

    # -- bookkeeping -----------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Counters: ``pushes == applied + dropped + refused + pending`` at all times.

        ``staleness`` maps a staleness to the number of applied pushes that had it.
        """
        with self._cond:
            return {
                "shard": self.shard_id,
                "start": self.start,
                "stop": self.stop,
                "version": self._version,
                "policy": repr(self._policy),
                "pushes": self._pushes,
                "pulls": self._pulls,
                "applied": self._applied,
                "dropped": self._dropped,
                "refused": self._refused,
                "folded": self._folded,
                "pending": self._policy.pending(self._policy_state),
                "updates": self._updates,
                "staleness": dict(sorted(self._staleness.items())),
                "has_average": self._average is not None,
            }

    def state_dict(self) -> dict[str, Any]:
        """The slice, its moving average, the optimizer state and the version (for checkpoints).

        A synchronous round in progress is not saved: after a restore it starts over.
        """
        with self._cond:
            return self._state()

    def _state(self) -> dict[str, Any]:
        """:meth:`state_dict`'s copy; the caller holds the lock."""
        return {
            "shard": self.shard_id,
            "start": self.start,
            "stop": self.stop,
            "version": self._version,
            "params": self._param.detach().clone(),
            "average": None if self._average is None else self._average.clone(),
            # Optimizer.state_dict() hands out the live state tensors; a
            # checkpoint must not change when training goes on.
            "optimizer": None
            if self._optimizer is None
            else copy.deepcopy(self._optimizer.state_dict()),
        }

    def observe(self, observer: Callable[[int, Callable[[], dict[str, Any]]], None] | None) -> None:
        """Call ``observer(version, state)`` after every applied update, under the shard's lock.

        ``state()`` copies :meth:`state_dict` consistently with that version
        (checkpoints every N versions take it); the observer must be quick.
        """
        self._observer = observer

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved; the range must match."""
        if (state["start"], state["stop"]) != (self.start, self.stop):
            raise ValueError(
                f"checkpoint holds [{state['start']}, {state['stop']}), "
                f"this shard is [{self.start}, {self.stop})"
            )
        params = state["params"]
        if params.dtype != torch.float32 or params.numel() != self.size:
            raise ValueError(
                f"checkpoint params are {params.dtype}[{params.numel()}], need float32[{self.size}]"
            )
        if (state["optimizer"] is None) != (self._optimizer is None):
            raise ValueError("checkpoint and shard disagree on whether there is an optimizer")
        with self._cond:
            self._param.detach().copy_(params.reshape(-1))
            if self._average is not None:
                saved = state.get("average")
                self._average.copy_(
                    saved.reshape(-1) if saved is not None else self._param.detach()
                )
            if self._optimizer is not None:
                self._optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
            self._version = int(state["version"])
            self._policy_state = self._policy.init(self.size)
            self._memo.clear()
            self._cond.notify_all()

    def __repr__(self) -> str:
        return (
            f"ServerShard(shard={self.shard_id}, range=[{self.start}, {self.stop}), "
            f"version={self.version}, policy={self._policy!r})"
        )


def _plain_sgd_lr(optimizer: torch.optim.Optimizer) -> float | None:
    """The learning rate if ``optimizer`` is stateless SGD (an update is just ``-lr * grad``)."""
    if type(optimizer) is not torch.optim.SGD or len(optimizer.param_groups) != 1:
        return None
    group = optimizer.param_groups[0]
    if (
        group["momentum"] != 0
        or group["weight_decay"] != 0
        or group.get("maximize")
    ):
        return None
    return float(group["lr"])


@contextmanager
def _scaled_lr(optimizer: torch.optim.Optimizer, scale: float) -> Iterator[None]:
    # Scaling the learning rate, not the gradient, is right for every
    # optimizer: Adam or Adagrad normalize the gradient, so scaling it would
    # do almost nothing.
    if scale == 1.0:
        yield
        return
    saved = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * scale
    try:
        yield
    finally:
        for group, lr in zip(optimizer.param_groups, saved):
            group["lr"] = lr
