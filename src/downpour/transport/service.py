"""The gRPC service that puts one shard on the network, and the server that runs it.

Every call is authenticated with the run's token and every message is
checked before anything reaches the shard: a push is assembled and
validated whole (header, chunk order and count, lengths, dtypes) and the
shard then checks its contents (indices, finite values, version) before it
changes anything. The three ways a push arrives (a stream of chunks, one
chunk in a unary call, a header naming a shared-memory session) go through
the same :class:`PushAssembly` and the same shard checks; the three ways a
pull leaves go through the same request checks and snapshot. A refused call ends with INVALID_ARGUMENT (or
UNAUTHENTICATED, FAILED_PRECONDITION for STALE, DEADLINE_EXCEEDED for a
version not reached in time), details that start with the RejectCode name,
and a serialized ``Reject`` in the trailing metadata.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from typing import Any, Self, TypeVar

import grpc
import torch
from google.protobuf.message import Message

from downpour.errors import StaleUpdate, TransportError
from downpour.transport import codec, local, tcp
from downpour.transport import downpour_pb2 as pb
from downpour.transport.assembly import KINDS, BufferPool, PushAssembly, Reject
from downpour.transport.codec import Malformed, PushFrame
from downpour.transport.protocol import InvalidUpdate, Shard
from downpour.transport.security import Security
from downpour.transport.shared import (
    MAX_SESSIONS,
    SHARED_MIN_BYTES,
    ServerSessions,
    write_tensor,
)
from downpour.transport.shared import available as shared_memory_available

T = TypeVar("T")

logger = logging.getLogger(__name__)

_WAIT_SLICE_S = 0.25  # how often a waiting pull checks for cancellation and shutdown

MAX_REJECT_BYTES = 1024
"""The most bytes of a refusal's message sent back. It travels twice in the trailing
metadata (the status details, percent-encoded, and the Reject), which gRPC caps at
16 KiB; a message quoting a forged field (a 20 KB vector name, a shape of 3000
numbers) would otherwise reach the client as RESOURCE_EXHAUSTED, "Stream removed",
without its reason."""


class ShardService:
    """The ``downpour.v1.ParameterServer`` service over one shard.

    Args:
        shard: what to serve (a :class:`~downpour.server.ServerShard`).
        token: the run's secret; every call must carry it.
        chunk_bytes: payload bytes per chunk of a pull.
        max_wait: the longest a ``wait_version`` pull waits, whatever its deadline.
        shared_memory: offer shared-memory sessions to clients that ask
            (only clients on this host can use them; Linux only).
        max_sessions: how many shared-memory sessions may exist at once.
    """

    def __init__(
        self,
        shard: Shard,
        *,
        token: str,
        chunk_bytes: int = codec.CHUNK_BYTES,
        max_wait: float = 300.0,
        shared_memory: bool = True,
        max_sessions: int = MAX_SESSIONS,
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
        if max_sessions < 0:
            raise ValueError(f"max_sessions must be >= 0, got {max_sessions}")
        self._pool = BufferPool(shard.size)
        segment_bytes = shard.size * 4  # room for a float32 copy of the shard
        # Through the Unix socket even a small shard's rounds are cheaper in a session than
        # through gRPC; without one, a shard too small to send anything through a segment gets none.
        self._shared = bool(shared_memory and max_sessions and shared_memory_available())
        # Made now, offered once listen_tcp has a port: TCP sessions need no shared memory.
        self.sessions = ServerSessions(segment_bytes, max_sessions) if max_sessions else None
        # A socket call's parser (tolerant, as gRPC's) and handler, for both sockets: a handler
        # takes the bytes a TCP connection filled the session with (None: the Unix socket's).
        self._local_methods = {
            local.PUSH_SHARED: (codec.tolerant(pb.SharedPushRequest.FromString), self._push_shared),
            local.PULL_SHARED: (
                codec.tolerant(pb.SharedPullRequest.FromString), self._pull_shared_local
            ),
            local.PUSH_PULL_SHARED: (
                codec.tolerant(pb.SharedPushPullRequest.FromString), self._push_pull_shared_local
            ),
        }
        self.local: local.LocalServer | None = None
        if self._shared:
            try:
                self.local = local.LocalServer(self.local_call, name=f"shard{shard.shard_id}")
            except OSError as error:  # sessions still work, through gRPC
                logger.warning("shard %d: no Unix socket for its sessions: %s", shard.shard_id, error)
                if segment_bytes < SHARED_MIN_BYTES:
                    self._shared = False
        self.tcp: tcp.TcpServer | None = None
        self.shutdown_requested = threading.Event()
        self.stopping = threading.Event()

    def handler(self) -> grpc.GenericRpcHandler:
        """The method handlers, with the hand-written codecs of :mod:`codec` for bulk messages."""
        identity = None  # pre-serialized frames go out as they are

        def unary(method, request: type, reply: type | None):
            serialize = reply.SerializeToString if reply is not None else identity
            return grpc.unary_unary_rpc_method_handler(
                method, codec.tolerant(request.FromString), serialize
            )

        handlers = {
            "Pull": grpc.unary_stream_rpc_method_handler(
                self.Pull, codec.tolerant(pb.PullRequest.FromString), identity
            ),
            "Push": grpc.stream_unary_rpc_method_handler(
                self.Push, codec.parse_push_chunk, pb.PushReply.SerializeToString
            ),
            "PullSmall": unary(self.PullSmall, pb.PullRequest, None),
            "PushSmall": grpc.unary_unary_rpc_method_handler(
                self.PushSmall, codec.parse_push_chunk, pb.PushReply.SerializeToString
            ),
            "PushPull": unary(self.PushPull, pb.PushPullRequest, None),
            "Hello": unary(self.Hello, pb.HelloRequest, pb.HelloReply),
            "PullShared": unary(self.PullShared, pb.SharedPullRequest, pb.SharedPullReply),
            "PushShared": unary(self.PushShared, pb.SharedPushRequest, pb.PushReply),
            "PushPullShared": unary(
                self.PushPullShared, pb.SharedPushPullRequest, pb.SharedPushPullReply
            ),
            "Goodbye": unary(self.Goodbye, pb.GoodbyeRequest, pb.GoodbyeReply),
            "Status": unary(self.Status, pb.StatusRequest, pb.StatusReply),
            "Shutdown": unary(self.Shutdown, pb.ShutdownRequest, pb.ShutdownReply),
            "VectorOps": unary(self.VectorOps, pb.VectorOpsRequest, pb.VectorOpsReply),
        }
        return grpc.method_handlers_generic_handler(codec.SERVICE, handlers)

    def listen_tcp(self, host: str, security: Security) -> None:
        """Offer TCP sessions from now on, on a free port of ``host`` (``self.tcp.port``); a port
        that cannot be had is logged, and clients then use gRPC."""
        if self.sessions is None:
            return
        try:
            self.tcp = tcp.TcpServer(
                self.tcp_call, host, security, self._end_tcp, name=f"shard{self.shard.shard_id}"
            )
        except OSError as error:
            logger.warning("shard %d: no TCP port for its sessions: %s", self.shard.shard_id, error)

    def close(self) -> None:
        """End every session (their segments go with them)."""
        for server in (self.local, self.tcp):
            if server is not None:
                server.close()
        if self.sessions is not None:
            self.sessions.close_all()

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
        detail = self._detail(reject)
        context.set_trailing_metadata(((codec.REJECT_KEY, detail.SerializeToString()),))
        context.abort(reject.code, f"{reject.reason}: {detail.message}")

    def _detail(self, reject: Reject) -> pb.Reject:
        """The refusal's ``Reject`` message (logged), its message clipped."""
        message = _clip(reject.message)
        logger.info(
            "refused a call to shard %d: %s: %s", self.shard.shard_id, reject.reason, message
        )
        return pb.Reject(code=pb.RejectCode.Value(reject.reason), message=message)

    def _guarded(self, context: grpc.ServicerContext, call):
        """Run ``call()`` after authenticating; turn every refusal into a typed gRPC error."""
        try:
            self._authenticate(context)
            return self._checked(call)
        except Reject as reject:
            self._refuse(context, reject)

    def _checked(self, call: Callable[[], T]) -> T:
        """``call()`` unless the server is stopping; every refusal raised as a :class:`Reject`."""
        try:
            if self.stopping.is_set():
                raise Reject("SHUTTING_DOWN", "the server is stopping", grpc.StatusCode.UNAVAILABLE)
            return call()
        except Reject:
            raise
        except InvalidUpdate as error:
            raise Reject(error.reason, str(error)) from None
        except StaleUpdate as error:
            raise Reject("STALE", str(error), grpc.StatusCode.FAILED_PRECONDITION) from None
        except (ValueError, TypeError) as error:
            raise Reject("BAD_REQUEST", str(error)) from None

    def local_call(self, method: int, payload: bytes) -> tuple[int, int, bytes]:
        """One session call through the Unix socket (:mod:`.local`): the same handlers and
        checks as through gRPC; the session key stands for the token."""
        parse, handler = self._local_methods[method]
        request = parse(payload)
        kind, status, answer, _ = self._answer(lambda: handler(request))
        return kind, status, answer

    def _answer(self, call: Callable[[], Message]) -> tuple[int, int, bytes, Message | None]:
        """A socket call's ``(kind, status, answer bytes, reply)``: ``call()``'s reply, or the
        Reject of its refusal (reply None)."""
        try:
            reply = self._checked(call)
        except Reject as reject:
            detail = self._detail(reject)
            return local.REJECTED, reject.code.value[0], detail.SerializeToString(), None
        return local.REPLY, 0, reply.SerializeToString(), reply

    def tcp_call(
        self, line: tcp.Connection, method: int, payload: bytes, data: int
    ) -> tuple[int, int, bytes, memoryview]:
        """One session call through a TCP connection (:mod:`.tcp`): the session's buffer filled
        with the request's ``data`` bytes from ``line``, then the same handlers and checks as
        the other two ways; the answer, and the bytes of the buffer it describes."""
        assert self.sessions is not None
        parse, handler = self._local_methods[method]
        request = parse(payload)
        key = None if isinstance(request, Malformed) else bytes(request.session)
        if line.session is None:
            if key is None:
                raise tcp.Closed("its first request does not parse")
            line.session = key
        elif key is not None and key != line.session:
            raise tcp.Closed("a request for another session than its first's")
        buffer = self.sessions.claim(line.session, line)
        if buffer is None:
            raise tcp.Closed("no TCP session of this server's is its, or its session has ended")
        if data > len(buffer):
            raise tcp.Closed(f"{data} bytes of data for a session of {len(buffer)}")
        line.fill(buffer[:data])
        kind, status, answer, reply = self._answer(lambda: handler(request, data))
        header = getattr(reply, "header", None) or getattr(reply, "pull", None)
        return kind, status, answer, buffer[: _tensor_bytes(header)]

    def _end_tcp(self, line: tcp.Connection) -> None:
        """A TCP connection ended: so does its session (if it was its)."""
        assert self.sessions is not None and line.session is not None
        if self.sessions.claim(line.session, line) is not None:
            self.sessions.close(line.session)

    def _pull_shared_local(
        self, request: pb.SharedPullRequest | Malformed, pushed: int | None = None
    ) -> pb.SharedPullReply:
        if not isinstance(request, Malformed):
            _no_wait(request.request)
        return self._pull_shared(request, _LOCAL_CALL, over_tcp=pushed is not None)

    def _push_pull_shared_local(
        self, request: pb.SharedPushPullRequest | Malformed, pushed: int | None = None
    ) -> pb.SharedPushPullReply:
        if not isinstance(request, Malformed):
            _no_wait(request.pull)
        return self._push_pull_shared(request, _LOCAL_CALL, pushed)

    # -- methods ---------------------------------------------------------

    def Pull(
        self, request: pb.PullRequest | Malformed, context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        return self._guarded(context, lambda: iter(self._pull_frames(request, context)))

    def PullSmall(
        self, request: pb.PullRequest | Malformed, context: grpc.ServicerContext
    ) -> bytes:
        return self._guarded(context, lambda: self._pull_small(request, context))

    def PullShared(
        self, request: pb.SharedPullRequest | Malformed, context: grpc.ServicerContext
    ) -> pb.SharedPullReply:
        return self._guarded(context, lambda: self._pull_shared(request, context))

    def _pull(
        self,
        request: pb.PullRequest | Malformed,
        context: grpc.ServicerContext,
        encode: Callable[[int, torch.Tensor, int], T],
        key: tuple | None = None,
    ) -> T | None:
        """``encode(version, view, wire_dtype)`` once the request is checked and any wait is
        over, or None when the shard has nothing newer. ``key`` memoizes it (see ``snapshot``).
        """
        wire_dtype = self._check_pull(request)
        assert not isinstance(request, Malformed)
        newer_than = request.newer_than if request.HasField("newer_than") else None
        wait_version = request.wait_version if request.HasField("wait_version") else None
        shard_id = self.shard.shard_id

        def encode_as_asked(version: int, view: torch.Tensor) -> T:
            return encode(version, view, wire_dtype)

        remaining = context.time_remaining()
        budget = self._max_wait if remaining is None else min(remaining, self._max_wait)
        deadline = time.monotonic() + budget
        while True:
            left = max(0.0, deadline - time.monotonic())
            try:
                return self.shard.snapshot(
                    encode_as_asked,
                    newer_than=newer_than,
                    wait_version=wait_version,
                    timeout=min(_WAIT_SLICE_S, left),
                    average=request.average,
                    key=None if key is None else (*key, wire_dtype),
                )
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

    def _pull_frames(
        self, request: pb.PullRequest | Malformed, context: grpc.ServicerContext
    ) -> list[bytes]:
        shard_id, chunk_bytes = self.shard.shard_id, self._chunk_bytes

        def encode(version: int, view: torch.Tensor, wire_dtype: int) -> list[bytes]:
            return codec.tensor_frames(shard_id, version, view, wire_dtype, chunk_bytes)

        frames = self._pull(request, context, encode, key=("frames", chunk_bytes))
        if frames is None:
            assert not isinstance(request, Malformed)
            return [codec.not_newer_frame(shard_id, _newer_than(request))]
        return frames

    def _check_pull(self, request: pb.PullRequest | Malformed) -> int:
        """The wire dtype of a well-formed pull request for this shard."""
        if isinstance(request, Malformed):
            raise Reject("MALFORMED", request.reason)
        self._check_shard(request.shard_id)
        wire_dtype = request.dtype or pb.FLOAT32
        if wire_dtype not in codec.VALUE_DTYPES:
            raise Reject(
                "BAD_DTYPE", f"pulls come as FLOAT32 or FLOAT16, not {codec.dtype_name(wire_dtype)}"
            )
        return wire_dtype

    def _check_small(self, wire_dtype: int) -> None:
        size = self.shard.size * codec.NUMPY_DTYPES[wire_dtype].itemsize
        if size > self._chunk_bytes:
            raise Reject(
                "BAD_LENGTH",
                f"shard {self.shard.shard_id} of {self.shard.size} elements does not fit in "
                f"one chunk of {self._chunk_bytes} bytes; use Pull",
            )

    def _pull_small(
        self, request: pb.PullRequest | Malformed, context: grpc.ServicerContext
    ) -> bytes:
        self._check_small(self._check_pull(request))  # before the snapshot counts a pull
        frames = self._pull_frames(request, context)
        assert len(frames) == 1
        return frames[0]

    def _pull_shared(
        self,
        request: pb.SharedPullRequest | Malformed,
        context: grpc.ServicerContext,
        over_tcp: bool = False,
    ) -> pb.SharedPullReply:
        if isinstance(request, Malformed):
            raise Reject("MALFORMED", request.reason)
        with self._session(request.session, request.seq, over_tcp) as region:
            header = self._pull_into(region, request.request, context)
        return pb.SharedPullReply(seq=request.seq, header=header)

    def _pull_into(
        self, region: memoryview, request: pb.PullRequest, context: grpc.ServicerContext
    ) -> pb.TensorHeader:
        """A pull written to the start of a session's ``region``: the header that describes it."""
        shard_id = self.shard.shard_id

        def encode(version: int, view: torch.Tensor, wire_dtype: int) -> pb.TensorHeader:
            write_tensor(region, view, wire_dtype)
            return pb.TensorHeader(
                shard_id=shard_id,
                version=version,
                dtype=wire_dtype,
                shape=[view.numel()],
                num_chunks=1,
            )

        header = self._pull(request, context, encode)
        if header is None:
            header = pb.TensorHeader(
                shard_id=shard_id,
                version=_newer_than(request),
                not_newer=True,
                num_chunks=1,
            )
        return header

    def Push(
        self, frames: Iterable[PushFrame | Malformed], context: grpc.ServicerContext
    ) -> pb.PushReply:
        def feed_all(assembly: PushAssembly) -> None:
            for frame in frames:
                assembly.feed(frame)

        return self._guarded(context, lambda: self._push(feed_all))

    def PushSmall(
        self, frame: PushFrame | Malformed, context: grpc.ServicerContext
    ) -> pb.PushReply:
        return self._guarded(context, lambda: self._push(lambda assembly: assembly.feed(frame)))

    def PushPull(
        self, request: pb.PushPullRequest | Malformed, context: grpc.ServicerContext
    ) -> bytes:
        return self._guarded(context, lambda: self._push_pull(request, context))

    def _push_pull(
        self, request: pb.PushPullRequest | Malformed, context: grpc.ServicerContext
    ) -> bytes:
        if isinstance(request, Malformed):
            raise Reject("MALFORMED", request.reason)
        self._check_small(self._check_push_pull(request.pull))
        frame = codec.push_frame_of(request.push)
        reply = self._push(lambda assembly: assembly.feed(frame))
        return codec.push_pull_reply(reply, self._pull_small(request.pull, context))

    def _check_push_pull(self, pull: pb.PullRequest) -> int:
        """Everything the pull of a push-pull could refuse, refused before the push changes the
        shard (so a refused call has changed nothing): its wire dtype."""
        wire_dtype = self._check_pull(pull)
        if pull.average and not self.shard.status()["has_average"]:
            raise Reject(
                "BAD_REQUEST", f"shard {self.shard.shard_id} keeps no moving average to pull"
            )
        return wire_dtype

    def PushShared(
        self, request: pb.SharedPushRequest | Malformed, context: grpc.ServicerContext
    ) -> pb.PushReply:
        return self._guarded(context, lambda: self._push_shared(request))

    def _push_shared(
        self, request: pb.SharedPushRequest | Malformed, pushed: int | None = None
    ) -> pb.PushReply:
        """A push from a session's segment; ``pushed``: the bytes a TCP connection filled."""
        if isinstance(request, Malformed):
            raise Reject("MALFORMED", request.reason)
        if not request.HasField("header"):
            raise Reject("BAD_HEADER", "a shared-memory push carries no header")
        with self._session(request.session, request.seq, pushed is not None) as region:
            held = region if pushed is None else region[:pushed]
            return self._push(lambda assembly: assembly.feed_region(request.header, held))

    def PushPullShared(
        self, request: pb.SharedPushPullRequest | Malformed, context: grpc.ServicerContext
    ) -> pb.SharedPushPullReply:
        return self._guarded(context, lambda: self._push_pull_shared(request, context))

    def _push_pull_shared(
        self,
        request: pb.SharedPushPullRequest | Malformed,
        context: grpc.ServicerContext,
        pushed: int | None = None,
    ) -> pb.SharedPushPullReply:
        if isinstance(request, Malformed):
            raise Reject("MALFORMED", request.reason)
        if not request.HasField("push"):
            raise Reject("BAD_HEADER", "a shared-memory push-pull carries no push header")
        self._check_push_pull(request.pull)
        with self._session(request.session, request.seq, pushed is not None) as region:
            held = region if pushed is None else region[:pushed]
            # feed_region copies the push's bytes out before the pull overwrites them
            reply = self._push(lambda assembly: assembly.feed_region(request.push, held))
            header = self._pull_into(region, request.pull, context)
        return pb.SharedPushPullReply(seq=request.seq, push=reply, pull=header)

    def _push(self, feed: Callable[[PushAssembly], None]) -> pb.PushReply:
        """Assemble a push with ``feed``, check it whole, then offer it to the shard."""
        assembly = PushAssembly(self.shard.shard_id, self.shard.size, self._pool)
        try:
            feed(assembly)
            header, update = assembly.finish()
            portion = header.portion if header.HasField("portion") else None
            result = self.shard.push(
                header.worker, header.version, update, kind=KINDS[header.kind], portion=portion
            )
        finally:
            assembly.release()
        return pb.PushReply(
            applied=result.applied,
            dropped=result.dropped,
            staleness=result.staleness,
            version=result.version,
        )

    def _session(self, key: bytes, seq: int, over_tcp: bool = False):
        if self.sessions is None:
            raise Reject("BAD_SESSION", "this server offers no sessions")
        return self.sessions.use(key, seq, over_tcp)

    def Hello(
        self, request: pb.HelloRequest | Malformed, context: grpc.ServicerContext
    ) -> pb.HelloReply:
        return self._guarded(context, lambda: self._hello(request))

    def _hello(self, request: pb.HelloRequest | Malformed) -> pb.HelloReply:
        if isinstance(request, Malformed):
            raise Reject("MALFORMED", request.reason)
        self._check_shard(request.shard_id)
        reply = pb.HelloReply(
            shard_id=self.shard.shard_id, size=self.shard.size, chunk_bytes=self._chunk_bytes
        )
        if request.tcp_session and not request.shared_memory and self.tcp is not None:
            assert self.sessions is not None
            opened = self.sessions.open(tcp=True)
            if opened is not None:
                key, buffer = opened
                reply.segment.CopyFrom(
                    pb.SharedSegment(session=key, size=buffer.size, port=self.tcp.port)
                )
        elif request.shared_memory and self._shared and self.sessions is not None:
            opened = self.sessions.open()
            if opened is not None:
                key, segment = opened
                reply.segment.CopyFrom(
                    pb.SharedSegment(
                        session=key,
                        name=segment.name,
                        size=segment.size,
                        socket="" if self.local is None else self.local.path,
                    )
                )
        return reply

    def Goodbye(
        self, request: pb.GoodbyeRequest | Malformed, context: grpc.ServicerContext
    ) -> pb.GoodbyeReply:
        return self._guarded(context, lambda: self._goodbye(request))

    def _goodbye(self, request: pb.GoodbyeRequest | Malformed) -> pb.GoodbyeReply:
        if isinstance(request, Malformed):
            raise Reject("MALFORMED", request.reason)
        if self.sessions is not None:
            self.sessions.close(request.session)  # ending an ended session is no error
        return pb.GoodbyeReply()

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

    def VectorOps(
        self, request: pb.VectorOpsRequest | Malformed, context: grpc.ServicerContext
    ) -> pb.VectorOpsReply:
        return self._guarded(context, lambda: self._vector_ops(request))

    def _vector_ops(self, request: pb.VectorOpsRequest | Malformed) -> pb.VectorOpsReply:
        if isinstance(request, Malformed):
            raise Reject("MALFORMED", request.reason)
        self._check_shard(request.shard_id)
        run = getattr(self.shard, "vector_ops", None)
        if run is None:
            raise Reject("BAD_REQUEST", f"shard {self.shard.shard_id} keeps no vectors")
        values, version = run([_vector_op(op) for op in request.ops])
        return pb.VectorOpsReply(values=values, version=version)

    def _shutdown(self, request: pb.ShutdownRequest | Malformed) -> pb.ShutdownReply:
        if isinstance(request, Malformed):
            raise Reject("MALFORMED", request.reason)
        logger.info(
            "shard %d asked to shut down: %s", self.shard.shard_id, request.reason or "(no reason)"
        )
        self.shutdown_requested.set()
        return pb.ShutdownReply()


def _vector_op(op: pb.VectorOp) -> tuple[Any, ...]:
    """A ``VectorOp`` message as the tuple :mod:`downpour.server.vectors` checks and runs."""
    code = pb.VectorOp.Code.Name(op.code) if op.code in pb.VectorOp.Code.values() else str(op.code)
    operands = {
        "ZERO": (op.dst,),
        "COPY": (op.dst, op.a),
        "SCALE": (op.dst, op.alpha),
        "AXPY": (op.dst, op.alpha, op.a),
        "DOT": (op.a, op.b),
        "DROP": (op.dst,),
    }.get(code)
    if operands is None:
        raise Reject("BAD_REQUEST", f"unknown vector op code {code}")
    return (code.lower(), *operands)


def _clip(message: str, limit: int = MAX_REJECT_BYTES) -> str:
    """``message`` cut to at most ``limit`` bytes of UTF-8 (marked with "..." where cut)."""
    data = message.encode()
    if len(data) <= limit:
        return message
    return data[: limit - 3].decode(errors="ignore") + "..."


def _newer_than(request: pb.PullRequest) -> int:
    return request.newer_than if request.HasField("newer_than") else 0


SERVER_OPTIONS = [
    ("grpc.max_send_message_length", codec.MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", codec.MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
    # Let clients keep their connections alive with pings (see channel.keepalive_options),
    # so a worker idle between rounds pays no reconnect and a dead peer is noticed.
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 2_000),  # channel.MIN_PING_MS
]


def _tensor_bytes(header: pb.TensorHeader | None) -> int:
    """The bytes of the tensor a session's pull header describes (0: none)."""
    if header is None or header.not_newer or len(header.shape) != 1:
        return 0
    return header.shape[0] * codec.NUMPY_DTYPES[header.dtype].itemsize


def _no_wait(pull: pb.PullRequest) -> None:
    if pull.HasField("wait_version"):
        raise Reject("BAD_REQUEST", "a pull that waits for a version goes through gRPC, not the socket")


class _LocalCall:
    """What the handlers ask of a gRPC context, for a call through the Unix socket: it has no
    deadline (its pulls never wait) and stays active."""

    def time_remaining(self) -> None:
        return None

    def is_active(self) -> bool:
        return True


_LOCAL_CALL = _LocalCall()


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
        shared_memory: bool = True,
        max_sessions: int = MAX_SESSIONS,
        tcp_sessions: bool = True,
    ) -> None:
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        self.service = ShardService(
            shard,
            token=token,
            chunk_bytes=chunk_bytes,
            max_wait=max_wait,
            shared_memory=shared_memory,
            max_sessions=max_sessions,
        )
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
            self.service.close()
            raise TransportError(f"cannot listen on {bind}: {error}") from None
        if self.port == 0:
            self.service.close()
            raise TransportError(f"cannot listen on {bind}")
        self.host = host
        self.address = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"
        self.tls = security.tls
        if tcp_sessions:
            self.service.listen_tcp(host, security)
        self._server.start()
        logger.info(
            "shard %d serving on %s%s", shard.shard_id, self.address, " (TLS)" if self.tls else ""
        )

    @property
    def shutdown_requested(self) -> threading.Event:
        return self.service.shutdown_requested

    def stop(self, grace: float | None = 1.0) -> None:
        """Stop: refuse new calls, end waiting pulls, cancel the rest after ``grace`` s.

        Then ends every shared-memory session, so no segment outlives the server.
        """
        self.service.stopping.set()
        try:
            self._server.stop(grace).wait()
        finally:
            self.service.close()

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
    shared_memory: bool = True,
    max_sessions: int = MAX_SESSIONS,
    tcp_sessions: bool = True,
) -> ShardServer:
    """Serve ``shard`` over gRPC on ``host:port`` (port 0: a free one, see ``.port``).

    Binds 127.0.0.1 unless told otherwise. ``max_workers`` bounds concurrent
    calls; each pull waiting for a version holds one, so give at least the
    number of workers plus a few. With ``shared_memory`` (the default) a
    client on this host may ask for a shared-memory session (at most
    ``max_sessions`` at once), through which tensors skip the network stack;
    every other client, and every client when it is off, uses gRPC alone.
    With ``tcp_sessions`` (the default) those clients may instead ask for a TCP session: their
    tensors travel raw on a TCP connection of their own (a port of ``host``'s, named in the
    session's offer; see :mod:`downpour.transport.tcp`).

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
        shared_memory=shared_memory,
        max_sessions=max_sessions,
        tcp_sessions=tcp_sessions,
    )
