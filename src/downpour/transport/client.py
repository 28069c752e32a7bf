"""Parameter-server clients: one shard (:class:`ShardClient`) or all (:class:`ParameterClient`).

Strategies use only these (and :class:`~downpour.transport.Security`); no
gRPC type crosses this boundary. A refused call raises
:class:`~downpour.transport.Refused` (a ``TransportError``) with the server's
message, or ``StaleUpdate`` when the policy finds the update too stale; a
missed deadline raises ``PeerTimeout`` naming the address.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Self, TypeVar

import grpc
import numpy as np
import torch
from google.protobuf.message import DecodeError

from downpour.errors import PeerTimeout, StaleUpdate, TransportError
from downpour.flat import SparseUpdate
from downpour.transport import codec
from downpour.transport import downpour_pb2 as pb
from downpour.transport.codec import Malformed, TensorFrame
from downpour.transport.protocol import UPDATE_KINDS, PushResult, Refused, UpdateKind
from downpour.transport.security import Security

T = TypeVar("T")

_KINDS = {"gradient": pb.GRADIENT, "delta": pb.DELTA}

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", codec.MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", codec.MAX_MESSAGE_BYTES),
    # Retries would buffer every request message; a failed push is the caller's to redo.
    ("grpc.enable_retries", 0),
    # Read server streams on the calling thread: about half the latency of a small pull.
    ("SingleThreadedUnaryStream", 1),
]


class _Counters:
    """Bytes and calls of one client; gRPC's threads update them, hence the lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.bytes_sent = self.bytes_received = self.pushes = self.pulls = 0

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

    def count(self, what: str) -> None:
        with self._lock:
            setattr(self, what, getattr(self, what) + 1)


def _identity(data: bytes) -> bytes:
    return data


class ShardClient:
    """Pull and push one shard of the parameter vector over gRPC.

    Args:
        address: ``host:port`` of the shard's server.
        token: the run's token.
        shard_id: which shard the server must hold (checked on every call).
        security: plaintext (default) or TLS; see :class:`Security`.
        timeout: default deadline of every call, in seconds.
        chunk_bytes: payload bytes per pushed chunk.

    Example:
        >>> client = ShardClient("127.0.0.1:50051", token, shard_id=0)  # doctest: +SKIP
        >>> version, params = client.pull()  # doctest: +SKIP
        >>> client.push(worker=0, version=version, update=grad)  # doctest: +SKIP
        PushResult(applied=True, dropped=False, staleness=0, version=1)
    """

    def __init__(
        self,
        address: str,
        token: str,
        shard_id: int,
        *,
        security: Security | None = None,
        timeout: float = 30.0,
        chunk_bytes: int = codec.CHUNK_BYTES,
    ) -> None:
        if not isinstance(token, str) or not token:
            raise ValueError("token must be a non-empty string (the run's token)")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        if not 1 <= chunk_bytes <= codec.MAX_CHUNK_BYTES:
            raise ValueError(
                f"chunk_bytes must be in [1, {codec.MAX_CHUNK_BYTES}], got {chunk_bytes}"
            )
        self.address = address
        self.shard_id = shard_id
        self.timeout = timeout
        self.chunk_bytes = chunk_bytes
        self._metadata = ((codec.TOKEN_KEY, token),)
        security = security or Security()
        options = CHANNEL_OPTIONS + security.channel_options()
        credentials = security.channel_credentials()
        if credentials is None:
            self._channel = grpc.insecure_channel(
                address, options=options, compression=grpc.Compression.NoCompression
            )
        else:
            self._channel = grpc.secure_channel(
                address, credentials, options=options, compression=grpc.Compression.NoCompression
            )
        self._counters = counters = _Counters()
        self._pull = self._channel.unary_stream(
            codec.PULL,
            request_serializer=counters.sent(pb.PullRequest.SerializeToString),
            response_deserializer=counters.received(codec.parse_tensor_chunk),
        )
        self._push = self._channel.stream_unary(
            codec.PUSH,
            request_serializer=counters.sent(_identity),
            response_deserializer=counters.received(pb.PushReply.FromString),
        )
        self._status = self._channel.unary_unary(
            codec.STATUS,
            request_serializer=counters.sent(pb.StatusRequest.SerializeToString),
            response_deserializer=counters.received(pb.StatusReply.FromString),
        )
        self._shutdown = self._channel.unary_unary(
            codec.SHUTDOWN,
            request_serializer=counters.sent(pb.ShutdownRequest.SerializeToString),
            response_deserializer=counters.received(pb.ShutdownReply.FromString),
        )

    # -- counters --------------------------------------------------------

    @property
    def bytes_sent(self) -> int:
        """Serialized bytes of every message sent (what goes on the wire, before HTTP/2 framing)."""
        return self._counters.bytes_sent

    @property
    def bytes_received(self) -> int:
        return self._counters.bytes_received

    @property
    def pushes(self) -> int:
        return self._counters.pushes

    @property
    def pulls(self) -> int:
        return self._counters.pulls

    # -- calls -----------------------------------------------------------

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until the server accepts connections (``PeerTimeout`` after ``timeout`` s)."""
        seconds = self.timeout if timeout is None else timeout
        try:
            grpc.channel_ready_future(self._channel).result(timeout=seconds)
        except grpc.FutureTimeoutError:
            raise PeerTimeout(self.address, seconds, "accept a connection") from None

    def pull(
        self,
        newer_than: int | None = None,
        wait_version: int | None = None,
        *,
        average: bool = False,
        half: bool = False,
        out: torch.Tensor | None = None,
        timeout: float | None = None,
    ) -> tuple[int, torch.Tensor] | None:
        """``(version, parameters)`` of the shard, or None when not newer than ``newer_than``.

        Args:
            newer_than: return None unless the shard's version is greater.
            wait_version: wait until the shard reaches this version (sync
                rounds); the call's deadline bounds the wait.
            average: the moving average of the parameters instead.
            half: transfer as float16 (half the bytes); returned as float32.
            out: a contiguous float32 tensor of the shard's size to fill in
                place (saves an allocation); returned.
            timeout: deadline in seconds (default: the client's).
        """
        seconds = self.timeout if timeout is None else timeout
        request = pb.PullRequest(
            shard_id=self.shard_id, average=average, dtype=pb.FLOAT16 if half else pb.FLOAT32
        )
        if newer_than is not None:
            request.newer_than = newer_than
        if wait_version is not None:
            request.wait_version = wait_version
        stream = self._pull(request, timeout=seconds, metadata=self._metadata)
        try:
            result = self._receive(iter(stream), out)
        except grpc.RpcError as error:
            raise self._error(error, "answer a pull", seconds) from None
        finally:
            stream.cancel()  # a no-op once the stream has ended; frees it if we stopped early
        self._counters.count("pulls")
        return result

    def _receive(self, frames, out: torch.Tensor | None) -> tuple[int, torch.Tensor] | None:
        first = next(frames, None)
        header = self._first_header(first)
        if header.not_newer:
            return None
        if header.dtype not in codec.VALUE_DTYPES or len(header.shape) != 1:
            raise self._violation(
                f"a pull answered with {codec.dtype_name(header.dtype)}{list(header.shape)}"
            )
        numel = header.shape[0]
        if out is None:
            out = torch.empty(numel, dtype=torch.float32)
        elif out.dtype != torch.float32 or out.numel() != numel or not out.is_contiguous():
            raise ValueError(
                f"out must be a contiguous float32 tensor of {numel} elements, "
                f"got {out.dtype}[{out.numel()}] (contiguous: {out.is_contiguous()})"
            )
        staging = None
        if header.dtype == pb.FLOAT32:
            target = out.detach().numpy().reshape(-1).view(np.uint8)
        else:
            staging = np.empty(numel * codec.NUMPY_DTYPES[header.dtype].itemsize, dtype=np.uint8)
            target = staging
        at = 0
        seq = 0
        frame: Any = first
        while frame is not None:
            if isinstance(frame, Malformed):
                raise self._violation(frame.reason)
            if frame.seq != seq or seq >= header.num_chunks:
                raise self._violation(
                    f"chunk {frame.seq} arrived where {seq} of {header.num_chunks} was due"
                )
            end = at + len(frame.data)
            if end > len(target):
                raise self._violation(f"a pull carried more than the {len(target)} bytes announced")
            target[at:end] = np.frombuffer(frame.data, dtype=np.uint8)
            at, seq = end, seq + 1
            frame = next(frames, None)
        if seq != header.num_chunks or at != len(target):
            raise self._violation(
                f"a pull ended after {seq} of {header.num_chunks} chunks, "
                f"{at} of {len(target)} bytes"
            )
        if staging is not None:
            out.detach().copy_(torch.from_numpy(staging.view(codec.NUMPY_DTYPES[header.dtype])))
        return header.version, out

    def _first_header(self, first: TensorFrame | Malformed | None) -> pb.TensorHeader:
        if first is None:
            raise self._violation("a pull answered with no chunks")
        if isinstance(first, Malformed):
            raise self._violation(first.reason)
        if first.header is None or first.seq != 0:
            raise self._violation("a pull's first chunk carried no header")
        if first.header.shard_id != self.shard_id:
            raise self._violation(
                f"the server holds shard {first.header.shard_id}, not {self.shard_id}"
            )
        return first.header

    def push(
        self,
        worker: int,
        version: int,
        update: torch.Tensor | SparseUpdate,
        *,
        kind: UpdateKind = "gradient",
        timeout: float | None = None,
    ) -> PushResult:
        """Push an update computed on ``version``: dense (float32 or float16) or sparse.

        A float16 tensor (or sparse values) travels as float16 and is
        widened on the server. Sparse indices travel as int32 when they fit.
        """
        if kind not in UPDATE_KINDS:
            raise ValueError(
                f"unknown update kind {kind!r}; choose one of: {', '.join(UPDATE_KINDS)}"
            )
        if isinstance(worker, bool) or not isinstance(worker, int) or worker < 0:
            raise ValueError(f"worker must be an int >= 0, got {worker!r}")
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise ValueError(f"version must be an int >= 0, got {version!r}")
        header = pb.PushHeader(
            shard_id=self.shard_id, worker=worker, version=version, kind=_KINDS[kind]
        )
        values, indices = _wire_arrays(update, header)
        frames = codec.push_frames(header, values, indices, self.chunk_bytes)
        seconds = self.timeout if timeout is None else timeout
        try:
            reply = self._push(frames, timeout=seconds, metadata=self._metadata)
        except grpc.RpcError as error:
            raise self._error(error, "answer a push", seconds) from None
        self._counters.count("pushes")
        return PushResult(reply.applied, reply.dropped, reply.staleness, reply.version)

    def status(self, timeout: float | None = None) -> dict[str, Any]:
        """The shard's counters, as ``ServerShard.status()`` returns them."""
        seconds = self.timeout if timeout is None else timeout
        try:
            reply = self._status(
                pb.StatusRequest(shard_id=self.shard_id), timeout=seconds, metadata=self._metadata
            )
        except grpc.RpcError as error:
            raise self._error(error, "answer a status request", seconds) from None
        return {
            "shard": reply.shard_id,
            "start": reply.start,
            "stop": reply.stop,
            "version": reply.version,
            "policy": reply.policy,
            "pushes": reply.pushes,
            "pulls": reply.pulls,
            "applied": reply.applied,
            "dropped": reply.dropped,
            "refused": reply.refused,
            "folded": reply.folded,
            "pending": reply.pending,
            "updates": reply.updates,
            "staleness": dict(sorted(reply.staleness.items())),
            "has_average": reply.has_average,
        }

    def shutdown(self, reason: str = "", timeout: float | None = None) -> None:
        """Ask the server's owner to shut it down (sets its ``shutdown_requested``)."""
        seconds = self.timeout if timeout is None else timeout
        try:
            self._shutdown(
                pb.ShutdownRequest(reason=reason), timeout=seconds, metadata=self._metadata
            )
        except grpc.RpcError as error:
            raise self._error(error, "answer a shutdown request", seconds) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ShardClient(address={self.address!r}, shard_id={self.shard_id})"

    # -- errors ----------------------------------------------------------

    def _violation(self, what: str) -> TransportError:
        return TransportError(f"shard {self.shard_id} at {self.address} broke the protocol: {what}")

    def _error(self, error: grpc.RpcError, what: str, seconds: float) -> Exception:
        code = error.code() if hasattr(error, "code") else None
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return PeerTimeout(self.address, seconds, what)
        reject = _reject_of(error)
        if reject is not None:
            reason = (
                pb.RejectCode.Name(reject.code)
                if reject.code in pb.RejectCode.values()
                else str(reject.code)
            )
            if reason == "STALE":
                return StaleUpdate(reject.message)
            return Refused(
                reason,
                f"shard {self.shard_id} at {self.address}: {reject.message}",
                code.name if code else "",
            )
        details = error.details() if hasattr(error, "details") else str(error)
        if code == grpc.StatusCode.UNAVAILABLE:
            return TransportError(
                f"shard {self.shard_id} at {self.address} is unavailable: {details}"
            )
        name = code.name if code is not None else "UNKNOWN"
        return TransportError(
            f"shard {self.shard_id} at {self.address} did not {what}: {name}: {details}"
        )


def _reject_of(error: grpc.RpcError) -> pb.Reject | None:
    trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == codec.REJECT_KEY:
            try:
                return pb.Reject.FromString(value)
            except DecodeError:  # a garbled detail is no reason to hide the error itself
                return None
    return None


def _wire_arrays(
    update: torch.Tensor | SparseUpdate, header: pb.PushHeader
) -> tuple[np.ndarray, np.ndarray | None]:
    """Fill the header's layout fields; return the values (and indices) as little-endian arrays."""
    if isinstance(update, SparseUpdate):
        values = _value_array(update.values)
        indices = update.indices.detach().reshape(-1)
        if indices.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"sparse indices must be int32 or int64, got {indices.dtype}")
        if indices.numel() != values.size:
            raise ValueError(
                f"sparse update has {indices.numel()} indices but {values.size} values"
            )
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= update.size):
            # Checked here too: narrowing to int32 below could wrap a bad index into range.
            raise ValueError(f"sparse update has indices outside [0, {update.size})")
        if update.size < 2**31 and indices.dtype == torch.int64:
            indices = indices.to(torch.int32)  # half the index bytes
        header.encoding = pb.SPARSE
        header.dtype = codec.TORCH_TO_WIRE[update.values.dtype]
        header.index_dtype = codec.TORCH_TO_WIRE[indices.dtype]
        header.shape.append(update.size)
        header.nnz = indices.numel()
        return values, indices.cpu().contiguous().numpy()
    if not isinstance(update, torch.Tensor):
        raise TypeError(
            f"update must be a torch.Tensor or SparseUpdate, got {type(update).__name__}"
        )
    values = _value_array(update)
    header.encoding = pb.DENSE
    header.dtype = codec.TORCH_TO_WIRE[update.dtype]
    header.shape.append(values.size)
    return values, None


def _value_array(values: torch.Tensor) -> np.ndarray:
    if values.dtype not in (torch.float32, torch.float16):
        raise TypeError(f"update values must be float32 or float16, got {values.dtype}")
    header_dtype = codec.TORCH_TO_WIRE[values.dtype]
    array = values.detach().reshape(-1).cpu().contiguous().numpy()
    return array.astype(codec.NUMPY_DTYPES[header_dtype], copy=False)
