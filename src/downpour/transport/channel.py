"""A client's gRPC channel to one server: its options, counted stubs, and errors translated.

Everything here is gRPC; :class:`~downpour.transport.ShardClient` above it
decides which call to make and never lets a gRPC type out.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError

from downpour.errors import PeerTimeout, PeerUnavailable, StaleUpdate, TransportError
from downpour.transport import codec
from downpour.transport import downpour_pb2 as pb
from downpour.transport.protocol import Refused
from downpour.transport.security import Security

T = TypeVar("T")

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", codec.MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", codec.MAX_MESSAGE_BYTES),
    # Retries would buffer every request message; a failed push is the caller's to redo.
    ("grpc.enable_retries", 0),
    # Read server streams on the calling thread: about half the latency of a small pull.
    ("SingleThreadedUnaryStream", 1),
    # Keep the connection up between rounds (a reconnect costs milliseconds); the
    # server permits these pings. Their period is set per channel (keepalive_options).
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]

# How soon a client notices a peer that went silent (a frozen process, a host
# gone from the network) even in the middle of a long call: it pings every
# half of this and gives up when a ping goes unanswered for the other half.
# A peer that died outright refuses the connection, which is noticed at once.
DETECT_SECONDS = 10.0
# The shortest ping period a server accepts (service.SERVER_OPTIONS permits it).
MIN_PING_MS = 2_000


def keepalive_options(detect_seconds: float) -> list[tuple[str, int]]:
    """Channel options that notice a silent peer within ``detect_seconds`` (at least 4 s)."""
    half_ms = max(MIN_PING_MS, int(detect_seconds * 500))
    # gRPC gives up on an unanswered ping after ping_timeout_ms (a minute unless set).
    return [("grpc.keepalive_time_ms", half_ms), ("grpc.keepalive_timeout_ms", half_ms),
            ("grpc.http2.ping_timeout_ms", half_ms)]


class Counters:
    """Bytes and calls of one client; gRPC's threads update them, hence the lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.bytes_sent = self.bytes_received = self.pushes = self.pulls = 0
        self.bytes_shared_sent = self.bytes_shared_received = 0

    def sent(self, serialize: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
        def counted(message: Any) -> bytes:
            data = serialize(message)
            with self._lock:
                self.bytes_sent += len(data)
            return data

        return counted

    def received(self, parse: Callable[[bytes], T]) -> Callable[[bytes], T]:
        def counted(data: bytes) -> T:
            with self._lock:
                self.bytes_received += len(data)
            return parse(data)

        return counted

    def count(self, what: str, amount: int = 1) -> None:
        with self._lock:
            setattr(self, what, getattr(self, what) + amount)


def _identity(data: bytes) -> bytes:
    return data


class Stubs:
    """A channel to ``address`` and every method of the service on it, each counting its bytes.

    Bulk messages use the hand-written codecs of :mod:`codec`; requests
    given as ``bytes`` are sent as they are.
    """

    def __init__(self, address: str, security: Security, detect_seconds: float = DETECT_SECONDS) -> None:
        options = CHANNEL_OPTIONS + keepalive_options(detect_seconds) + security.channel_options()
        credentials = security.channel_credentials()
        if credentials is None:
            self.channel = grpc.insecure_channel(
                address, options=options, compression=grpc.Compression.NoCompression
            )
        else:
            self.channel = grpc.secure_channel(
                address, credentials, options=options, compression=grpc.Compression.NoCompression
            )
        self.counters = counters = Counters()

        def unary(method: str, serialize, parse):
            return self.channel.unary_unary(
                method,
                request_serializer=counters.sent(serialize),
                response_deserializer=counters.received(parse),
            )

        self.pull = self.channel.unary_stream(
            codec.PULL,
            request_serializer=counters.sent(pb.PullRequest.SerializeToString),
            response_deserializer=counters.received(codec.parse_tensor_chunk),
        )
        self.push = self.channel.stream_unary(
            codec.PUSH,
            request_serializer=counters.sent(_identity),
            response_deserializer=counters.received(pb.PushReply.FromString),
        )
        self.pull_small = unary(
            codec.PULL_SMALL, pb.PullRequest.SerializeToString, codec.parse_tensor_chunk
        )
        self.push_small = unary(codec.PUSH_SMALL, _identity, pb.PushReply.FromString)
        self.push_pull = unary(codec.PUSH_PULL, _identity, pb.PushPullReply.FromString)
        self.hello = unary(codec.HELLO, pb.HelloRequest.SerializeToString, pb.HelloReply.FromString)
        self.pull_shared = unary(
            codec.PULL_SHARED, pb.SharedPullRequest.SerializeToString, pb.SharedPullReply.FromString
        )
        self.push_shared = unary(
            codec.PUSH_SHARED, pb.SharedPushRequest.SerializeToString, pb.PushReply.FromString
        )
        self.push_pull_shared = unary(
            codec.PUSH_PULL_SHARED,
            pb.SharedPushPullRequest.SerializeToString,
            pb.SharedPushPullReply.FromString,
        )
        self.goodbye = unary(
            codec.GOODBYE, pb.GoodbyeRequest.SerializeToString, pb.GoodbyeReply.FromString
        )
        self.status = unary(
            codec.STATUS, pb.StatusRequest.SerializeToString, pb.StatusReply.FromString
        )
        self.shutdown = unary(
            codec.SHUTDOWN, pb.ShutdownRequest.SerializeToString, pb.ShutdownReply.FromString
        )

        self.vector_ops = unary(
            codec.VECTOR_OPS, pb.VectorOpsRequest.SerializeToString, pb.VectorOpsReply.FromString
        )

    def close(self) -> None:
        self.channel.close()


def translate(error: grpc.RpcError, peer: str, where: str, what: str, seconds: float) -> Exception:
    """A failed call as downpour's error: ``PeerTimeout``, ``StaleUpdate``, ``Refused`` or
    ``TransportError``; ``where`` names the shard and address, ``what`` the call."""
    code = error.code() if hasattr(error, "code") else None
    details = error.details() if hasattr(error, "details") else str(error)
    return failure(code, reject_of(error), details, peer, where, what, seconds)


def failure(
    code: grpc.StatusCode | None,
    reject: pb.Reject | None,
    details: str,
    peer: str,
    where: str,
    what: str,
    seconds: float,
) -> Exception:
    """What :func:`translate` makes of a call that ended with ``code`` and, if refused, ``reject``
    (a call through a session's Unix socket ends the same way, see :mod:`.local`)."""
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return PeerTimeout(peer, seconds, what)
    if reject is not None:
        reason = (
            pb.RejectCode.Name(reject.code)
            if reject.code in pb.RejectCode.values()
            else str(reject.code)
        )
        if reason == "STALE":
            return StaleUpdate(reject.message)
        return Refused(reason, f"{where}: {reject.message}", code.name if code else "")
    if code == grpc.StatusCode.UNAVAILABLE:
        return PeerUnavailable(peer, f"{where} is unavailable: {details}")
    name = code.name if code is not None else "UNKNOWN"
    return TransportError(f"{where} did not {what}: {name}: {details}")


def reject_of(error: grpc.RpcError) -> pb.Reject | None:
    """The ``Reject`` a refused call carried in its trailing metadata, if any."""
    trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == codec.REJECT_KEY:
            try:
                return pb.Reject.FromString(value)
            except DecodeError:  # a garbled detail is no reason to hide the error itself
                return None
    return None
