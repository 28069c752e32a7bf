"""The gRPC service that puts one shard on the network, and the server that runs it.

Every call is authenticated with the run's token and every message is
checked before anything reaches the shard: a push is assembled and
validated whole (header, chunk order and count, lengths, dtypes) and the
shard then checks its contents (indices, finite values, version) before it
changes anything. A refused call ends with INVALID_ARGUMENT (or
UNAUTHENTICATED, FAILED_PRECONDITION for STALE, DEADLINE_EXCEEDED for a
version not reached in time), details that start with the RejectCode name,
and a serialized ``Reject`` in the trailing metadata.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent import futures
from typing import Self

import grpc
import torch

from downpour.errors import StaleUpdate, TransportError
from downpour.transport import codec
from downpour.transport import downpour_pb2 as pb
from downpour.transport.assembly import KINDS, BufferPool, PushAssembly, Reject
from downpour.transport.codec import Malformed, PushFrame
from downpour.transport.protocol import InvalidUpdate, Shard
from downpour.transport.security import Security

logger = logging.getLogger(__name__)

_WAIT_SLICE_S = 0.25  # how often a waiting pull checks for cancellation and shutdown


class ShardService:
    """The ``downpour.v1.ParameterServer`` service over one shard.

    Args:
        shard: what to serve (a :class:`~downpour.server.ServerShard`).
        token: the run's secret; every call must carry it.
        chunk_bytes: payload bytes per chunk of a pull.
        max_wait: the longest a ``wait_version`` pull waits, whatever its deadline.
    """

    def __init__(
        self,
        shard: Shard,
        *,
        token: str,
        chunk_bytes: int = codec.CHUNK_BYTES,
        max_wait: float = 300.0,
    ) -> None:
        if not isinstance(token, str) or not token:
            raise ValueError(
                "token must be a non-empty string; make one with downpour.transport.new_token()"
            )
        if not 1 <= chunk_bytes <= codec.MAX_CHUNK_BYTES:
            raise ValueError(
                f"chunk_bytes must be in [1, {codec.MAX_CHUNK_BYTES}], got {chunk_bytes}"
            )
        self.shard = shard
        self._token = token.encode()
        self._chunk_bytes = chunk_bytes
        self._max_wait = max_wait
        self._pool = BufferPool(shard.size)
        self.shutdown_requested = threading.Event()
        self.stopping = threading.Event()

    def handler(self) -> grpc.GenericRpcHandler:
        """The method handlers, with the hand-written codecs of :mod:`codec` for bulk messages."""
        identity = None  # pre-serialized frames go out as they are
        handlers = {
            "Pull": grpc.unary_stream_rpc_method_handler(
                self.Pull, codec.tolerant(pb.PullRequest.FromString), identity
            ),
            "Push": grpc.stream_unary_rpc_method_handler(
                self.Push, codec.parse_push_chunk, pb.PushReply.SerializeToString
            ),
            "Status": grpc.unary_unary_rpc_method_handler(
                self.Status,
                codec.tolerant(pb.StatusRequest.FromString),
                pb.StatusReply.SerializeToString,
            ),
            "Shutdown": grpc.unary_unary_rpc_method_handler(
                self.Shutdown,
                codec.tolerant(pb.ShutdownRequest.FromString),
                pb.ShutdownReply.SerializeToString,
            ),
        }
        return grpc.method_handlers_generic_handler(codec.SERVICE, handlers)

    # -- checks ----------------------------------------------------------

    def _authenticate(self, context: grpc.ServicerContext) -> None:
        given = next(
            (value for key, value in context.invocation_metadata() if key == codec.TOKEN_KEY), None
        )
        if given is None:
            raise Reject(
                "BAD_TOKEN",
                f"no {codec.TOKEN_KEY} metadata: every call must carry the run's token",
                grpc.StatusCode.UNAUTHENTICATED,
            )
        given_bytes = given.encode() if isinstance(given, str) else bytes(given)
        if not hmac.compare_digest(given_bytes, self._token):
            raise Reject("BAD_TOKEN", "wrong token for this run", grpc.StatusCode.UNAUTHENTICATED)

    def _check_shard(self, shard_id: int) -> None:
        if shard_id != self.shard.shard_id:
            raise Reject(
                "BAD_SHARD", f"this server holds shard {self.shard.shard_id}, not shard {shard_id}"
            )

    def _refuse(self, context: grpc.ServicerContext, reject: Reject) -> None:
        logger.info(
            "refused a call to shard %d: %s: %s", self.shard.shard_id, reject.reason, reject.message
        )
        detail = pb.Reject(code=pb.RejectCode.Value(reject.reason), message=reject.message)
        context.set_trailing_metadata(((codec.REJECT_KEY, detail.SerializeToString()),))
        context.abort(reject.code, f"{reject.reason}: {reject.message}")

    def _guarded(self, context: grpc.ServicerContext, call):
        """Run ``call()`` after authenticating; turn every refusal into a typed gRPC error."""
        try:
            self._authenticate(context)
            if self.stopping.is_set():
                raise Reject("SHUTTING_DOWN", "the server is stopping", grpc.StatusCode.UNAVAILABLE)
            return call()
        except Reject as reject:
            self._refuse(context, reject)
        except InvalidUpdate as error:
            self._refuse(context, Reject(error.reason, str(error)))
        except StaleUpdate as error:
            self._refuse(context, Reject("STALE", str(error), grpc.StatusCode.FAILED_PRECONDITION))
        except (ValueError, TypeError) as error:
            self._refuse(context, Reject("BAD_REQUEST", str(error)))

    # -- methods ---------------------------------------------------------

    def Pull(
        self, request: pb.PullRequest | Malformed, context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        return self._guarded(context, lambda: iter(self._pull(request, context)))

    def _pull(
        self, request: pb.PullRequest | Malformed, context: grpc.ServicerContext
    ) -> list[bytes]:
        if isinstance(request, Malformed):
            raise Reject("MALFORMED", request.reason)
        self._check_shard(request.shard_id)
        wire_dtype = request.dtype or pb.FLOAT32
        if wire_dtype not in codec.VALUE_DTYPES:
            raise Reject(
                "BAD_DTYPE", f"pulls come as FLOAT32 or FLOAT16, not {codec.dtype_name(wire_dtype)}"
            )
        newer_than = request.newer_than if request.HasField("newer_than") else None
        wait_version = request.wait_version if request.HasField("wait_version") else None
        shard_id, chunk_bytes = self.shard.shard_id, self._chunk_bytes

        def encode(version: int, view: torch.Tensor) -> list[bytes]:
            return codec.tensor_frames(shard_id, version, view, wire_dtype, chunk_bytes)

        remaining = context.time_remaining()
        budget = self._max_wait if remaining is None else min(remaining, self._max_wait)
        deadline = time.monotonic() + budget
        while True:
            left = max(0.0, deadline - time.monotonic())
            try:
                frames = self.shard.snapshot(
                    encode,
                    newer_than=newer_than,
                    wait_version=wait_version,
                    timeout=min(_WAIT_SLICE_S, left),
                    average=request.average,
                    key=("frames", wire_dtype, chunk_bytes),
                )
                break
            except TimeoutError:
                if self.stopping.is_set():
                    raise Reject(
                        "SHUTTING_DOWN", "the server is stopping", grpc.StatusCode.UNAVAILABLE
                    ) from None
                if left <= 0 or not context.is_active():
                    raise Reject(
                        "TIMEOUT",
                        f"shard {shard_id} did not reach version {wait_version} "
                        f"within {budget:.3g} s",
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                    ) from None
        if frames is None:
            return [codec.not_newer_frame(shard_id, newer_than if newer_than is not None else 0)]
        return frames

    def Push(
        self, frames: Iterable[PushFrame | Malformed], context: grpc.ServicerContext
    ) -> pb.PushReply:
        return self._guarded(context, lambda: self._push(frames))

    def _push(self, frames: Iterable[PushFrame | Malformed]) -> pb.PushReply:
        assembly = PushAssembly(self.shard.shard_id, self.shard.size, self._pool)
        try:
            for frame in frames:
                assembly.feed(frame)
            header, update = assembly.finish()
            result = self.shard.push(header.worker, header.version, update, kind=KINDS[header.kind])
        finally:
            assembly.release()
        return pb.PushReply(
            applied=result.applied,
            dropped=result.dropped,
            staleness=result.staleness,
            version=result.version,
        )

    def Status(
        self, request: pb.StatusRequest | Malformed, context: grpc.ServicerContext
    ) -> pb.StatusReply:
        return self._guarded(context, lambda: self._status(request))

    def _status(self, request: pb.StatusRequest | Malformed) -> pb.StatusReply:
        if isinstance(request, Malformed):
            raise Reject("MALFORMED", request.reason)
        self._check_shard(request.shard_id)
        status = self.shard.status()
        return pb.StatusReply(
            shard_id=status["shard"],
            start=status["start"],
            stop=status["stop"],
            version=status["version"],
            policy=status["policy"],
            pushes=status["pushes"],
            pulls=status["pulls"],
            applied=status["applied"],
            dropped=status["dropped"],
            refused=status["refused"],
            folded=status["folded"],
            pending=status["pending"],
            updates=status["updates"],
            staleness=status["staleness"],
            has_average=status["has_average"],
        )

    def Shutdown(
        self, request: pb.ShutdownRequest | Malformed, context: grpc.ServicerContext
    ) -> pb.ShutdownReply:
        return self._guarded(context, lambda: self._shutdown(request))

    def _shutdown(self, request: pb.ShutdownRequest | Malformed) -> pb.ShutdownReply:
        if isinstance(request, Malformed):
            raise Reject("MALFORMED", request.reason)
        logger.info(
            "shard %d asked to shut down: %s", self.shard.shard_id, request.reason or "(no reason)"
        )
        self.shutdown_requested.set()
        return pb.ShutdownReply()


SERVER_OPTIONS = [
    ("grpc.max_send_message_length", codec.MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", codec.MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
]


class ShardServer:
    """A running gRPC server for one shard (what :func:`serve_shard` returns).

    ``port`` and ``address`` say where it listens; ``shutdown_requested`` is
    set by the Shutdown RPC, for the owner to act on. Usable as a context
    manager that stops it.
    """

    def __init__(
        self,
        shard: Shard,
        *,
        token: str,
        host: str = "127.0.0.1",
        port: int = 0,
        security: Security | None = None,
        max_workers: int = 16,
        chunk_bytes: int = codec.CHUNK_BYTES,
        max_wait: float = 300.0,
    ) -> None:
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        self.service = ShardService(shard, token=token, chunk_bytes=chunk_bytes, max_wait=max_wait)
        security = security or Security()
        self._server = grpc.server(
            futures.ThreadPoolExecutor(
                max_workers, thread_name_prefix=f"downpour-shard{shard.shard_id}"
            ),
            options=SERVER_OPTIONS,
            compression=grpc.Compression.NoCompression,
        )
        self._server.add_generic_rpc_handlers((self.service.handler(),))
        bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        credentials = security.server_credentials()
        try:
            if credentials is None:
                self.port = self._server.add_insecure_port(bind)
            else:
                self.port = self._server.add_secure_port(bind, credentials)
        except RuntimeError as error:
            raise TransportError(f"cannot listen on {bind}: {error}") from None
        if self.port == 0:
            raise TransportError(f"cannot listen on {bind}")
        self.host = host
        self.address = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"
        self.tls = security.tls
        self._server.start()
        logger.info(
            "shard %d serving on %s%s", shard.shard_id, self.address, " (TLS)" if self.tls else ""
        )

    @property
    def shutdown_requested(self) -> threading.Event:
        return self.service.shutdown_requested

    def stop(self, grace: float | None = 1.0) -> None:
        """Stop: refuse new calls, end waiting pulls, cancel the rest after ``grace`` s."""
        self.service.stopping.set()
        self._server.stop(grace).wait()

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        """Block until the server stops (True) or ``timeout`` s pass (False)."""
        timed_out = self._server.wait_for_termination(timeout)  # gRPC answers "timed out?"
        return not timed_out

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.stop(grace=None)

    def __repr__(self) -> str:
        shard = self.service.shard.shard_id
        return f"ShardServer(shard={shard}, address={self.address!r}, tls={self.tls})"


def serve_shard(
    shard: Shard,
    *,
    token: str,
    host: str = "127.0.0.1",
    port: int = 0,
    security: Security | None = None,
    max_workers: int = 16,
    chunk_bytes: int = codec.CHUNK_BYTES,
    max_wait: float = 300.0,
) -> ShardServer:
    """Serve ``shard`` over gRPC on ``host:port`` (port 0: a free one, see ``.port``).

    Binds 127.0.0.1 unless told otherwise. ``max_workers`` bounds concurrent
    calls; each pull waiting for a version holds one, so give at least the
    number of workers plus a few.

    Example:
        >>> from downpour.server import ServerShard
        >>> server = serve_shard(ServerShard(torch.zeros(8)), token="secret")
        >>> server.address.startswith("127.0.0.1:")
        True
        >>> server.stop()
    """
    return ShardServer(
        shard,
        token=token,
        host=host,
        port=port,
        security=security,
        max_workers=max_workers,
        chunk_bytes=chunk_bytes,
        max_wait=max_wait,
    )
