"""All shards of the parameter vector behind one client: concurrent pulls and pushes."""

from __future__ import annotations

import itertools
from functools import partial
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import Any, Self, TypeVar

import torch

from downpour.errors import PeerUnavailable
from downpour.flat import ShardRange, SparseUpdate
from downpour.transport import codec
from downpour.transport.channel import DETECT_SECONDS
from downpour.transport.client import ShardClient, SharedMemory
from downpour.transport.protocol import PushResult, Refused, UpdateKind
from downpour.transport.security import Security

T = TypeVar("T")


class ParameterClient:
    """All shards of the parameter vector: pulls and pushes them concurrently.

    Args:
        addresses: one ``host:port`` per shard, in shard order.
        ranges: the shards' ranges (``downpour.flat.shard_ranges``), in order,
            contiguous from 0.
        token: the run's token.
        security, timeout, chunk_bytes, shared_memory, detect_seconds, tcp_session: as for
            :class:`ShardClient`
            (by default shards on 127.0.0.1 move tensors through shared memory).
        recover: when a shard is unreachable, ``recover(shard, error)``
            returns the address it came back at (or raises): the client
            reconnects there and repeats the call. A push computed on a version
            the restarted shard has not reached (its updates since the last
            checkpoint are lost) is applied as computed on the shard's version.

    Example:
        >>> params = ParameterClient(addresses, shard_ranges(numel, 2), token)  # doctest: +SKIP
        >>> versions, vector = params.pull_all()  # doctest: +SKIP
        >>> params.push_all(worker=0, versions=versions, update=grad)  # doctest: +SKIP
    """

    def __init__(
        self,
        addresses: Sequence[str],
        ranges: Sequence[ShardRange],
        token: str,
        *,
        security: Security | None = None,
        timeout: float = 30.0,
        chunk_bytes: int = codec.CHUNK_BYTES,
        shared_memory: SharedMemory = "auto",
        recover: Callable[[int, PeerUnavailable], str] | None = None,
        detect_seconds: float = DETECT_SECONDS,
        tcp_session: bool = True,
    ) -> None:
        if len(addresses) != len(ranges) or not ranges:
            raise ValueError(
                f"need one address per shard range, got {len(addresses)} and {len(ranges)}"
            )
        position = 0
        for index, shard in enumerate(ranges):
            if shard.shard != index or shard.start != position or shard.stop <= shard.start:
                raise ValueError(
                    f"shard ranges must be contiguous from 0 and in order; got {list(ranges)}"
                )
            position = shard.stop
        self.ranges = list(ranges)
        self.numel = position
        self._connect = partial(ShardClient, token=token, security=security, timeout=timeout,
                                chunk_bytes=chunk_bytes, shared_memory=shared_memory,
                                detect_seconds=detect_seconds, tcp_session=tcp_session)
        self.clients = [self._connect(address, shard_id=shard.shard) for address, shard in zip(addresses, ranges)]
        self._recover = recover
        self.reconnections = 0
        self._retired = [0] * 6  # traffic counters of clients replaced by reconnections
        self._pool = futures.ThreadPoolExecutor(
            max(1, len(ranges) - 1), thread_name_prefix="downpour-ps-client"
        )

    def _each(self, call: Callable[[int], T]) -> list[T]:
        """``call(shard)`` for every shard, concurrently; the last runs on this thread.

        Waits for all before raising the first error, so no call outlives this.
        A shard that is unreachable is recovered (see ``recover``) and called again.
        """
        if self._recover is not None:
            call = self._surviving(call)
        pending = [self._pool.submit(call, shard) for shard in range(len(self.clients) - 1)]
        results: list[Any] = []
        first_error: BaseException | None = None
        try:
            last = call(len(self.clients) - 1)
        except BaseException as error:  # noqa: BLE001 - re-raised below, after the others finish
            last, first_error = None, error
        for future in pending:
            try:
                results.append(future.result())
            except BaseException as error:  # noqa: BLE001
                results.append(None)
                first_error = first_error or error
        if first_error is not None:
            raise first_error
        results.append(last)
        return results

    def _surviving(self, call: Callable[[int], T]) -> Callable[[int], T]:
        def guarded(shard: int) -> T:
            while True:
                try:
                    return call(shard)
                except PeerUnavailable as error:
                    assert self._recover is not None
                    self.reconnect(shard, self._recover(shard, error))

        return guarded

    def reconnect(self, shard: int, address: str) -> None:
        """Talk to ``shard`` at ``address`` from now on (it restarted there)."""
        old = self.clients[shard]
        self._retired = [a + b for a, b in zip(self._retired, _traffic(old))]
        self.clients[shard] = self._connect(address, shard_id=shard)
        self.reconnections += 1
        old.close()

    def _restamped(self, shard: int, version: int, error: Refused, timeout: float | None) -> int | None:
        """The version to push again with when a restarted shard refused ``version`` as from its future."""
        if self._recover is None or error.reason != "BAD_VERSION":
            return None
        current = int(self.clients[shard].status(timeout)["version"])
        return current if current < version else None

    def pull_all(
        self,
        *,
        wait_versions: Sequence[int] | None = None,
        newer_than: Sequence[int] | None = None,
        average: bool = False,
        half: bool = False,
        out: torch.Tensor | None = None,
        timeout: float | None = None,
    ) -> tuple[list[int], torch.Tensor]:
        """``(versions, vector)``: every shard pulled concurrently into one flat float32 vector.

        With ``newer_than`` (one version per shard) a shard that has nothing
        newer leaves its part of ``out`` as it was (so ``out`` is required)
        and reports the version given.
        """
        if out is None and newer_than is not None:
            raise ValueError("newer_than needs out=, the vector that keeps the parts not pulled")
        out = self._out(out)
        flat = out.detach().reshape(-1)
        self._check_versions(wait_versions=wait_versions, newer_than=newer_than)

        def pull(shard: int) -> int:
            part = self.ranges[shard]
            result = self.clients[shard].pull(
                newer_than=None if newer_than is None else newer_than[shard],
                wait_version=None if wait_versions is None else wait_versions[shard],
                average=average,
                half=half,
                out=flat[part.start : part.stop],
                timeout=timeout,
            )
            if result is None:
                assert newer_than is not None
                return newer_than[shard]
            return result[0]

        return self._each(pull), out

    def push_all(
        self,
        worker: int,
        versions: Sequence[int],
        update: torch.Tensor | SparseUpdate | list,
        *,
        kind: UpdateKind = "gradient",
        portion: int | None = None,
        timeout: float | None = None,
    ) -> list[PushResult]:
        """Push each shard its slice of ``update`` concurrently; ``versions`` as pulled.

        A sparse update goes sparse to the shards where that is smaller than
        dense (below about half density) and dense to the others. ``portion``
        names the part of a Sandblaster pass a partial gradient covers.
        """
        self._check_versions(versions=versions)
        parts = self._parts(update)

        def push(shard: int) -> PushResult:
            return self._restamping(shard, int(versions[shard]), timeout, lambda version: (
                self.clients[shard].push(
                    worker, version, parts[shard], kind=kind, portion=portion, timeout=timeout
                )))

        return self._each(push)

    def _restamping(self, shard: int, version: int, timeout: float | None,
                    call: Callable[[int], T]) -> T:
        """``call(version)``, once more with the shard's own version if a restarted shard refused it."""
        try:
            return call(version)
        except Refused as error:
            restamped = self._restamped(shard, version, error, timeout)
            if restamped is None:
                raise
            return call(restamped)

    def push_pull_all(
        self,
        worker: int,
        versions: Sequence[int],
        update: torch.Tensor | SparseUpdate | list,
        *,
        kind: UpdateKind = "gradient",
        wait_versions: Sequence[int] | None = None,
        average: bool = False,
        half: bool = False,
        out: torch.Tensor | None = None,
        timeout: float | None = None,
    ) -> tuple[list[PushResult], list[int], torch.Tensor]:
        """:meth:`push_all`, then :meth:`pull_all`: ``(results, versions, vector)``.

        Each shard pulls right after its own push, with :meth:`ShardClient.push_pull`:
        one call per shard where the tensors are small.
        """
        self._check_versions(versions=versions, wait_versions=wait_versions)
        parts = self._parts(update)
        out = self._out(out)
        flat = out.detach().reshape(-1)

        def push_pull(shard: int) -> tuple[PushResult, int, torch.Tensor]:
            part = self.ranges[shard]
            return self._restamping(shard, int(versions[shard]), timeout, lambda version: (
                self.clients[shard].push_pull(
                    worker,
                    version,
                    parts[shard],
                    kind=kind,
                    wait_version=None if wait_versions is None else wait_versions[shard],
                    average=average,
                    half=half,
                    out=flat[part.start : part.stop],
                    timeout=timeout,
                )))

        trips = self._each(push_pull)
        return [trip[0] for trip in trips], [trip[1] for trip in trips], out

    def _out(self, out: torch.Tensor | None) -> torch.Tensor:
        if out is None:
            return torch.empty(self.numel, dtype=torch.float32)
        if out.dtype != torch.float32 or out.numel() != self.numel or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous float32 tensor of {self.numel} elements")
        return out

    def _check_versions(self, **given: Sequence[int] | None) -> None:
        for name, versions in given.items():
            if versions is not None and len(versions) != len(self.clients):
                raise ValueError(
                    f"{name} needs one version per shard ({len(self.clients)}), got {len(versions)}"
                )

    def _parts(self, update: torch.Tensor | SparseUpdate | list) -> list:
        """Each shard's part of ``update`` (sparse ones sparse only where that is smaller).

        A list is taken as the parts themselves, one per shard: compressed
        payloads are made per shard, each by that shard's compressor state.
        """
        if isinstance(update, list):
            if len(update) != len(self.ranges):
                raise ValueError(
                    f"update parts must be one per shard ({len(self.ranges)}), got {len(update)}"
                )
            return update
        if isinstance(update, SparseUpdate):
            return _split_sparse(update, self.ranges)
        if isinstance(update, torch.Tensor):
            flat = update.detach().reshape(-1)
            if flat.numel() != self.numel:
                raise ValueError(f"update has {flat.numel()} elements, the parameters {self.numel}")
            return [flat[r.start : r.stop] for r in self.ranges]
        raise TypeError(
            f"update must be a torch.Tensor or SparseUpdate, got {type(update).__name__}"
        )

    def vector_ops_all(self, ops: list[tuple], timeout: float | None = None) -> tuple[list[float], list[int]]:
        """Run vector ops on every shard concurrently: the dot products summed over shards, and the versions."""
        replies = self._each(lambda shard: self.clients[shard].vector_ops(ops, timeout=timeout))
        values = [sum(parts) for parts in zip(*(r[0] for r in replies))]
        return values, [r[1] for r in replies]

    def status_all(self, timeout: float | None = None) -> list[dict[str, Any]]:
        return self._each(lambda shard: self.clients[shard].status(timeout))

    def shutdown_all(self, reason: str = "", timeout: float | None = None) -> None:
        self._each(lambda shard: self.clients[shard].shutdown(reason, timeout))

    def wait_ready(self, timeout: float | None = None) -> None:
        self._each(lambda shard: self.clients[shard].wait_ready(timeout))

    @property
    def bytes_sent(self) -> int:
        return self._retired[0] + sum(client.bytes_sent for client in self.clients)

    @property
    def bytes_received(self) -> int:
        return self._retired[1] + sum(client.bytes_received for client in self.clients)

    @property
    def bytes_shared_sent(self) -> int:
        """Tensor bytes pushed through shared memory (not in :attr:`bytes_sent`)."""
        return self._retired[2] + sum(client.bytes_shared_sent for client in self.clients)

    @property
    def bytes_shared_received(self) -> int:
        """Tensor bytes pulled through shared memory (not in :attr:`bytes_received`)."""
        return self._retired[3] + sum(client.bytes_shared_received for client in self.clients)

    @property
    def bytes_shared(self) -> int:
        return self.bytes_shared_sent + self.bytes_shared_received

    @property
    def pushes(self) -> int:
        return self._retired[4] + sum(client.pushes for client in self.clients)

    @property
    def pulls(self) -> int:
        return self._retired[5] + sum(client.pulls for client in self.clients)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for client in self.clients:
            client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _traffic(client: ShardClient) -> list[int]:
    return [client.bytes_sent, client.bytes_received, client.bytes_shared_sent,
            client.bytes_shared_received, client.pushes, client.pulls]


def _split_sparse(
    update: SparseUpdate, ranges: Sequence[ShardRange]
) -> list[torch.Tensor | SparseUpdate]:
    """Each shard's part of a sparse update: sparse where smaller than dense, else dense."""
    numel = ranges[-1].stop
    if update.size != numel:
        raise ValueError(
            f"sparse update is for a vector of {update.size}, the parameters have {numel}"
        )
    indices, values = update.indices.reshape(-1), update.values.reshape(-1)
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= numel):
        raise ValueError(f"sparse update has indices outside [0, {numel})")
    if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
        order = torch.argsort(indices)
        indices, values = indices[order], values[order]
    starts = torch.tensor([r.start for r in ranges] + [numel], dtype=indices.dtype)
    bounds = torch.searchsorted(indices, starts).tolist()
    value_size = values.element_size()
    parts: list[torch.Tensor | SparseUpdate] = []
    for shard, (low, high) in zip(ranges, itertools.pairwise(bounds)):
        local = indices[low:high] - shard.start
        index_size = 4 if shard.size < 2**31 else 8
        if (high - low) * (value_size + index_size) < shard.size * value_size:
            parts.append(SparseUpdate(local, values[low:high], shard.size))
        else:
            dense = torch.zeros(shard.size, dtype=values.dtype)
            dense[local] = values[low:high]
            parts.append(dense)
    return parts
