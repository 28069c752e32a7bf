"""The contract between the transport and whatever it serves.

The transport hosts a shard without importing :mod:`downpour.server` (layers
point one way: the server sits above the transport). It needs only what
:class:`Shard` lists; ``downpour.server.ServerShard`` is the implementation.
The types here carry no gRPC, so the server can use them freely.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, Literal, NamedTuple, Protocol, TypeVar

import torch

from downpour.errors import TransportError
from downpour.flat import SparseUpdate

UpdateKind = Literal["gradient", "delta"]
UPDATE_KINDS: tuple[str, ...] = ("gradient", "delta")

# Reject reasons, the names of the RejectCode enum in downpour.proto.
RejectReason = Literal[
    "BAD_TOKEN",
    "BAD_SHARD",
    "BAD_HEADER",
    "BAD_LENGTH",
    "BAD_DTYPE",
    "BAD_CHUNK_ORDER",
    "BAD_CHUNK_COUNT",
    "BAD_INDEX",
    "NON_FINITE",
    "STALE",
    "BAD_VERSION",
    "BAD_KIND",
    "BAD_ENCODING",
    "BAD_REQUEST",
    "MALFORMED",
    "TIMEOUT",
    "SHUTTING_DOWN",
    "BAD_SESSION",
]

T = TypeVar("T")


class PushResult(NamedTuple):
    """What became of one pushed update.

    ``applied``: the update reached the parameters during the push (for a
    synchronous policy, only the push that completes a round says so; the
    others are pending). ``dropped``: the policy discarded it. ``staleness``:
    the shard's version at arrival minus the version the update was computed
    on. ``version``: the shard's version after the push.
    """

    applied: bool
    dropped: bool
    staleness: int
    version: int


class InvalidUpdate(ValueError):
    """A pushed update the shard refuses before touching anything.

    ``reason`` names the RejectCode the transport answers with.

    Example:
        >>> InvalidUpdate("NON_FINITE", "the update holds 2 NaN or infinite values").reason
        'NON_FINITE'
    """

    def __init__(self, reason: RejectReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Refused(TransportError):
    """A remote call the peer refused; ``reason`` is its RejectCode name.

    ``status`` is the gRPC status name (``"INVALID_ARGUMENT"``,
    ``"UNAUTHENTICATED"``, ...), kept as a string so callers need no gRPC.
    """

    def __init__(self, reason: str, message: str, status: str = "") -> None:
        super().__init__(f"{reason}: {message}" if reason else message)
        self.reason = reason
        self.status = status
        self.detail = message


class Shard(Protocol):
    """What the transport needs of a shard (``downpour.server.ServerShard`` is one).

    Every method is called from many gRPC threads at once.
    """

    @property
    def shard_id(self) -> int: ...

    @property
    def size(self) -> int: ...

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
        """``encode(version, read_only_view)`` under the shard's lock.

        Waits (at most ``timeout`` s, else ``TimeoutError``) until the version
        reaches ``wait_version``; returns None when the version is not greater
        than ``newer_than``. With a ``key``, the result is memoized until the
        shard next changes, so many pulls of one version encode it once.
        """
        ...

    def push(
        self,
        worker: int,
        version: int,
        update: torch.Tensor | SparseUpdate,
        *,
        kind: UpdateKind = "gradient",
        portion: int | None = None,
    ) -> PushResult:
        """Offer an update; raises :class:`InvalidUpdate` or ``StaleUpdate``.

        The shard must not keep a reference to ``update`` after returning: the
        transport reuses its buffer.
        """
        ...

    def status(self) -> dict[str, Any]: ...
