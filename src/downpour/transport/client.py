"""Parameter-server clients: one shard (:class:`ShardClient`) or all (:class:`ParameterClient`).

Strategies use only these (and :class:`~downpour.transport.Security`); no
gRPC type crosses this boundary. A refused call raises
:class:`~downpour.transport.Refused` (a ``TransportError``) with the server's
message, or ``StaleUpdate`` when the policy finds the update too stale; a
missed deadline raises ``PeerTimeout`` naming the address.

A client picks the cheapest way for each call on its own. On its first call
it asks the server's ``Hello`` for the shard's size and, when the server is on
this host, for a shared-memory session. Then: a tensor goes through the
session's segment, its header through the session's Unix socket (any size)
or, where the server offers none, through gRPC (from ``SHARED_MIN_BYTES``
on); one that fits in a chunk goes as one unary call; anything else as a
stream of chunks. All of them end in the same checks on both sides.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal, Self, TypeVar

import grpc
import numpy as np
import torch

from downpour.compress import PAYLOADS, Payload
from downpour.errors import PeerTimeout, StaleUpdate, TransportError
from downpour.flat import SparseUpdate
from downpour.transport import codec, local
from downpour.transport import downpour_pb2 as pb
from downpour.transport.assembly import Violation, read_pull, region_frame
from downpour.transport.payload import to_bytes
from downpour.transport.channel import DETECT_SECONDS, Stubs, reject_of, translate
from downpour.transport.protocol import UPDATE_KINDS, PushResult, Refused, UpdateKind
from downpour.transport.security import Security
from downpour.transport.tcp import TcpLine
from downpour.transport.shared import (
    SHARED_MIN_BYTES,
    Buffer,
    ClientSession,
    Segment,
    host_of,
    is_loopback,
)
from downpour.transport.shared import available as shared_memory_available

T = TypeVar("T")
SharedMemory = bool | Literal["auto"]

logger = logging.getLogger(__name__)

_KINDS = {"gradient": pb.GRADIENT, "delta": pb.DELTA}
# A session call's reply, its stub's name (through gRPC) and what its failure says it did not do.
_SESSION_METHODS: dict[int, tuple[type, str, str]] = {
    local.PULL_SHARED: (pb.SharedPullReply, "pull_shared", "answer a pull"),
    local.PUSH_SHARED: (pb.PushReply, "push_shared", "answer a push"),
    local.PUSH_PULL_SHARED: (pb.SharedPushPullReply, "push_pull_shared", "answer a push-pull"),
}

_GOODBYE_S = 2.0  # the longest close() waits for the server to end a shared-memory session


class ShardClient:
    """Pull and push one shard of the parameter vector over gRPC.

    Args:
        address: ``host:port`` of the shard's server.
        token: the run's token.
        shard_id: which shard the server must hold (checked on every call).
        security: plaintext (default) or TLS; see :class:`Security`.
        timeout: default deadline of every call, in seconds.
        chunk_bytes: payload bytes per pushed chunk.
        shared_memory: move tensors through shared memory when the server is
            on this host. ``"auto"`` (default): when ``address`` is a loopback
            address and the server offers it, else quietly the network.
            ``True``: whatever the address (a same-host server reached by
            another name), and a ``TransportError`` if the server offers a
            segment this client cannot map (it is on another host).
            ``False``: never. A server may decline (shard under
            ``SHARED_MIN_BYTES``, sessions used up, or turned off); then the
            network it is.
        detect_seconds: a server that goes silent (frozen, or its host cut
            off) fails the call in progress within this many seconds, as
            ``PeerUnavailable``, whatever the call's deadline.
        tcp_session: without shared memory, ask the server for a TCP
            session (see :mod:`downpour.transport.tcp`): tensors of any
            size then travel raw on a TCP connection of their own, at a
            fraction of gRPC's cost, and only pulls that wait for a version
            go through gRPC. A server that offers none, or a connection that
            cannot be made, leaves gRPC alone. False: gRPC alone.

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
        shared_memory: SharedMemory = "auto",
        detect_seconds: float = DETECT_SECONDS,
        tcp_session: bool = True,
    ) -> None:
        if not isinstance(token, str) or not token:
            raise ValueError("token must be a non-empty string (the run's token)")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        if not 1 <= chunk_bytes <= codec.MAX_CHUNK_BYTES:
            raise ValueError(
                f"chunk_bytes must be in [1, {codec.MAX_CHUNK_BYTES}], got {chunk_bytes}"
            )
        if not (shared_memory is True or shared_memory is False or shared_memory == "auto"):
            raise ValueError(f"shared_memory must be 'auto', True or False, got {shared_memory!r}")
        if shared_memory is True and not shared_memory_available():
            raise ValueError(
                "shared_memory=True needs POSIX shared memory in /dev/shm (Linux); "
                "pass shared_memory='auto' or False"
            )
        self.address = address
        self.shard_id = shard_id
        self.timeout = timeout
        self.chunk_bytes = chunk_bytes
        self._metadata = ((codec.TOKEN_KEY, token),)
        self._require_shared = shared_memory is True
        self._want_shared = self._require_shared or (
            shared_memory == "auto" and is_loopback(address) and shared_memory_available()
        )
        self._want_tcp = tcp_session and not self._want_shared and host_of(address) is not None
        self._security = security or Security()
        # What the server's Hello said; set once, on the first call (see _greet).
        self._hello_lock = threading.Lock()
        self._greeted = False
        self._size: int | None = None
        self._server_chunk_bytes = 0
        self._session: ClientSession | None = None
        self._detect_seconds = detect_seconds
        self._rpc = Stubs(address, self._security, detect_seconds)
        self._counters = self._rpc.counters

    # -- counters --------------------------------------------------------

    @property
    def bytes_sent(self) -> int:
        """Serialized bytes of every message sent (what goes on the wire, before HTTP/2 framing).

        Bytes that went through shared memory are not in it; see :attr:`bytes_shared_sent`.
        """
        return self._counters.bytes_sent

    @property
    def bytes_received(self) -> int:
        """Serialized bytes of every message received (shared memory not included)."""
        return self._counters.bytes_received

    @property
    def bytes_shared_sent(self) -> int:
        """Tensor bytes pushed through shared memory instead of the network."""
        return self._counters.bytes_shared_sent

    @property
    def bytes_shared_received(self) -> int:
        """Tensor bytes pulled through shared memory instead of the network."""
        return self._counters.bytes_shared_received

    @property
    def bytes_shared(self) -> int:
        """Tensor bytes moved through shared memory, both ways."""
        return self.bytes_shared_sent + self.bytes_shared_received

    @property
    def pushes(self) -> int:
        return self._counters.pushes

    @property
    def pulls(self) -> int:
        return self._counters.pulls

    @property
    def uses_shared_memory(self) -> bool:
        """Whether the client holds a shared-memory session (known after its first call)."""
        return self._session is not None and not self._session.tcp

    @property
    def uses_tcp_session(self) -> bool:
        """Whether the client holds a TCP session (known after its first call)."""
        return self._session is not None and self._session.tcp

    # -- calls -----------------------------------------------------------

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until the server accepts connections (``PeerTimeout`` after ``timeout`` s)."""
        seconds = self.timeout if timeout is None else timeout
        try:
            grpc.channel_ready_future(self._rpc.channel).result(timeout=seconds)
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
        request = self._pull_request(newer_than, wait_version, average, half)
        self._greet(seconds)
        size = self._pull_bytes(request)
        session = self._session
        waits = request.HasField("wait_version")
        if session is not None and session.carries(size, waits) and session.lock.acquire(False):
            result = self._pull_through(session, request, out, seconds)
        elif 0 <= size <= self._server_chunk_bytes:
            try:
                frame = self._rpc.pull_small(request, timeout=seconds, metadata=self._metadata)
            except grpc.RpcError as error:
                raise self._error(error, "answer a pull", seconds) from None
            result = self._receive(iter([frame]), out)
        else:
            stream = self._rpc.pull(request, timeout=seconds, metadata=self._metadata)
            try:
                result = self._receive(iter(stream), out)
            except grpc.RpcError as error:
                raise self._error(error, "answer a pull", seconds) from None
            finally:
                stream.cancel()  # a no-op once the stream has ended; frees it if we stopped early
        self._counters.count("pulls")
        return result

    def _pull_request(
        self, newer_than: int | None, wait_version: int | None, average: bool, half: bool
    ) -> pb.PullRequest:
        wire_dtype = pb.FLOAT16 if half else pb.FLOAT32
        request = pb.PullRequest(shard_id=self.shard_id, average=average, dtype=wire_dtype)
        if newer_than is not None:
            request.newer_than = newer_than
        if wait_version is not None:
            request.wait_version = wait_version
        return request

    def _pull_bytes(self, request: pb.PullRequest) -> int:
        """The payload bytes a pull brings; -1 while the shard's size is unknown."""
        if self._size is None:
            return -1
        return self._size * codec.NUMPY_DTYPES[request.dtype].itemsize

    def _pull_through(
        self,
        session: ClientSession,
        request: pb.PullRequest,
        out: torch.Tensor | None,
        seconds: float,
    ) -> tuple[int, torch.Tensor] | None:
        """A pull into the session's segment; ``session.lock`` is held, and released here."""
        with self._shared_call(session, _SESSION_METHODS[local.PULL_SHARED][2], seconds) as seq:
            reply = self._session_call(
                session,
                local.PULL_SHARED,
                pb.SharedPullRequest(session=session.key, seq=seq, request=request),
                request.HasField("wait_version"),
                seconds,
            )
            if reply.seq != seq:
                raise self._violation(f"a shared pull answered seq {reply.seq} to seq {seq}")
            frame = region_frame(reply.header, session.region())
            result = self._receive(iter([frame]), out)
            self._count_shared(session, "bytes_shared_received", len(frame.data))
            return result

    def _receive(self, frames: Iterator, out: torch.Tensor | None):
        """``read_pull`` of the answer; a broken promise of the server's is a TransportError."""
        try:
            return read_pull(frames, out, self.shard_id, self._size)
        except Violation as violation:
            raise self._violation(str(violation)) from None

    def push(
        self,
        worker: int,
        version: int,
        update: torch.Tensor | SparseUpdate | Payload,
        *,
        kind: UpdateKind = "gradient",
        portion: int | None = None,
        timeout: float | None = None,
    ) -> PushResult:
        """Push an update computed on ``version``: dense (float32 or float16) or sparse.

        A float16 tensor (or sparse values) travels as float16 and is
        widened on the server. Sparse indices travel as int32 when they fit.
        A compressed payload (:mod:`downpour.compress`, made for this shard's
        slice) travels as its ``Compressed`` message, ``payload.nbytes`` long.
        """
        header, values, indices = self._encode_push(worker, version, update, kind)
        if portion is not None:
            header.portion = portion
        seconds = self.timeout if timeout is None else timeout
        self._greet(seconds)
        return self._send_push(header, values, indices, seconds)

    def _send_push(
        self,
        header: pb.PushHeader,
        values: np.ndarray,
        indices: np.ndarray | None,
        seconds: float,
    ) -> PushResult:
        """An encoded push by the cheapest way: shared memory, one unary call, or a stream."""
        size = values.nbytes + (0 if indices is None else indices.nbytes)
        session = self._session
        if session is not None and session.carries(size) and session.lock.acquire(False):
            reply = self._push_through(session, header, values, indices, seconds)
        else:
            frames = codec.push_frames(header, values, indices, self.chunk_bytes)
            small = header.num_chunks == 1 and self._size is not None
            try:
                if small:
                    reply = self._rpc.push_small(
                        next(frames), timeout=seconds, metadata=self._metadata
                    )
                else:
                    reply = self._rpc.push(frames, timeout=seconds, metadata=self._metadata)
            except grpc.RpcError as error:
                raise self._error(error, "answer a push", seconds) from None
        self._counters.count("pushes")
        return PushResult(reply.applied, reply.dropped, reply.staleness, reply.version)

    def push_pull(
        self,
        worker: int,
        version: int,
        update: torch.Tensor | SparseUpdate | Payload,
        *,
        kind: UpdateKind = "gradient",
        wait_version: int | None = None,
        average: bool = False,
        half: bool = False,
        out: torch.Tensor | None = None,
        timeout: float | None = None,
    ) -> tuple[PushResult, int, torch.Tensor]:
        """Push an update, then pull the shard as it is after it: ``(result, version, params)``.

        What :meth:`push` then :meth:`pull` do, for the price of one call
        when both tensors are small (each fits in one chunk) or go through a
        shared-memory session (both fit in its segment): a worker's round
        trip is then bounded by one call of gRPC's, not two. Otherwise they
        go as a push and a pull, each by its own cheapest way. The
        pull is checked before the push is offered, so a refused call has
        changed nothing; a refused push raises as :meth:`push` does.

        Example:
            >>> result, version, params = client.push_pull(0, version, grad)  # doctest: +SKIP
        """
        header, values, indices = self._encode_push(worker, version, update, kind)
        seconds = self.timeout if timeout is None else timeout
        request = self._pull_request(None, wait_version, average, half)
        self._greet(seconds)
        pushed = values.nbytes + (0 if indices is None else indices.nbytes)
        pulled = self._pull_bytes(request)
        small = 0 <= pulled <= self._server_chunk_bytes
        session = self._session
        if session is not None:
            small = small and max(pushed, pulled) < SHARED_MIN_BYTES
        if (
            session is not None
            and session.carries(max(pushed, pulled), wait_version is not None)
            and session.lock.acquire(False)
        ):
            return self._push_pull_through(session, header, values, indices, request, out, seconds)
        frames = codec.push_frames(header, values, indices, self.chunk_bytes)
        if not small or header.num_chunks != 1:
            result = self._send_push(header, values, indices, seconds)  # encoded once, above
            pulled_back = self.pull(
                wait_version=wait_version, average=average, half=half, out=out, timeout=timeout
            )
            assert pulled_back is not None
            return result, *pulled_back
        message = codec.push_pull_request(next(frames), request)
        try:
            reply = self._rpc.push_pull(message, timeout=seconds, metadata=self._metadata)
        except grpc.RpcError as error:
            raise self._error(error, "answer a push-pull", seconds) from None
        self._counters.count("pushes")
        if not reply.HasField("pull"):
            raise self._violation("a push-pull answered with no pull")
        pulled_back = self._receive(iter([codec.tensor_frame_of(reply.pull)]), out)
        if pulled_back is None:
            raise self._violation("a push-pull answered 'not newer' to a plain pull")
        self._counters.count("pulls")
        push = reply.push
        return PushResult(push.applied, push.dropped, push.staleness, push.version), *pulled_back

    def _encode_push(
        self, worker: int, version: int, update: torch.Tensor | SparseUpdate | Payload, kind: str
    ) -> tuple[pb.PushHeader, np.ndarray, np.ndarray | None]:
        """The header of a push and its values (and indices) as little-endian arrays."""
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
        if isinstance(update, PAYLOADS):
            values = np.frombuffer(to_bytes(update), dtype=np.uint8)
            header.encoding = pb.COMPRESSED
            header.shape.append(update.size)
            header.payload_bytes = values.size
            return header, values, None
        values, indices = codec.update_arrays(update, header)
        return header, values, indices

    def _push_through(
        self,
        session: ClientSession,
        header: pb.PushHeader,
        values: np.ndarray,
        indices: np.ndarray | None,
        seconds: float,
    ) -> pb.PushReply:
        """A push from the session's segment; ``session.lock`` is held, and released here."""
        with self._shared_call(session, _SESSION_METHODS[local.PUSH_SHARED][2], seconds) as seq:
            size = session.write(values, indices)
            header.num_chunks = 1
            reply = self._session_call(
                session,
                local.PUSH_SHARED,
                pb.SharedPushRequest(session=session.key, seq=seq, header=header),
                False,
                seconds,
            )
            self._count_shared(session, "bytes_shared_sent", size)
            return reply

    def _push_pull_through(
        self,
        session: ClientSession,
        header: pb.PushHeader,
        values: np.ndarray,
        indices: np.ndarray | None,
        request: pb.PullRequest,
        out: torch.Tensor | None,
        seconds: float,
    ) -> tuple[PushResult, int, torch.Tensor]:
        """A push from, and a pull into, the session's segment in one call; ``session.lock`` is
        held, and released here."""
        with self._shared_call(session, _SESSION_METHODS[local.PUSH_PULL_SHARED][2], seconds) as seq:
            size = session.write(values, indices)
            header.num_chunks = 1
            reply = self._session_call(
                session,
                local.PUSH_PULL_SHARED,
                pb.SharedPushPullRequest(session=session.key, seq=seq, push=header, pull=request),
                request.HasField("wait_version"),
                seconds,
            )
            self._count_shared(session, "bytes_shared_sent", size)
            self._counters.count("pushes")
            if reply.seq != seq:
                raise self._violation(f"a shared push-pull answered seq {reply.seq} to seq {seq}")
            if reply.pull.not_newer:
                raise self._violation("a push-pull answered 'not newer' to a plain pull")
            frame = region_frame(reply.pull, session.region())
            pulled = self._receive(iter([frame]), out)
            assert pulled is not None
            self._count_shared(session, "bytes_shared_received", len(frame.data))
            self._counters.count("pulls")
            push = reply.push
            return PushResult(push.applied, push.dropped, push.staleness, push.version), *pulled

    @contextmanager
    def _shared_call(self, session: ClientSession, what: str, seconds: float) -> Iterator[int]:
        """One call through ``session`` (whose lock the caller took): its seq; errors mapped.

        A call that ends without the server's answer (deadline, cancellation,
        lost connection) may still be reading or writing the segment on the
        server, so the session is dropped (a later call asks for a fresh one)
        rather than reused under the server's feet.
        """
        clean = True
        try:
            yield session.next_seq()
        except grpc.RpcError as error:
            clean = reject_of(error) is not None
            raise self._error(error, what, seconds) from None
        except (StaleUpdate, Refused):
            raise  # the server answered: the session is as it left it
        except TransportError:
            clean = False  # a local call without an answer, or a broken answer
            raise
        finally:
            session.lock.release()
            if not clean:
                self._drop(session)

    def _count_shared(self, session: ClientSession, what: str, size: int) -> None:
        """Tensor bytes moved through a segment; a TCP session's went on the wire, and its line
        counted them as sent or received."""
        if not session.tcp:
            self._counters.count(what, size)

    def _session_call(
        self, session: ClientSession, method: int, request: Any, waits: bool, seconds: float
    ) -> Any:
        """A session call through its socket when it has one (and the call's pull does not wait
        for a version), else through gRPC."""
        reply, stub, what = _SESSION_METHODS[method]
        if session.line is not None and not waits:
            return session.call(method, request, reply, seconds, what)
        return getattr(self._rpc, stub)(request, timeout=seconds, metadata=self._metadata)

    # -- the first call's Hello ------------------------------------------

    def _greet(self, seconds: float) -> None:
        """Ask the server's Hello for the shard's size and a shared-memory session, once."""
        if self._greeted:
            return
        with self._hello_lock:
            if self._greeted:
                return
            request = pb.HelloRequest(
                shard_id=self.shard_id,
                shared_memory=self._want_shared,
                tcp_session=self._want_tcp,
            )
            try:
                reply = self._rpc.hello(request, timeout=seconds, metadata=self._metadata)
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise self._error(error, "answer a hello", seconds) from None
                reply = None  # a server older than Hello: streams only
            if reply is not None:
                if reply.shard_id != self.shard_id or reply.size < 1:
                    raise self._violation(
                        f"hello answered for shard {reply.shard_id} of {reply.size} elements"
                    )
                self._size, self._server_chunk_bytes = reply.size, reply.chunk_bytes
                if reply.HasField("segment"):
                    self._session = self._attach(reply.segment, seconds)
            self._greeted = True

    def _attach(self, offer: pb.SharedSegment, seconds: float) -> ClientSession | None:
        assert self._size is not None
        if offer.port and not offer.name:
            return self._attach_tcp(offer, seconds)
        try:
            if offer.size < self._size * 4:
                raise ValueError(f"{offer.size} bytes cannot hold {self._size} float32 values")
            segment = Segment.attach(offer.name, offer.size)
        except (OSError, ValueError) as error:
            self._say_goodbye(offer.session, seconds)
            if self._require_shared:
                raise TransportError(
                    f"cannot map the shared memory of shard {self.shard_id} at {self.address} "
                    f"({error}); is the server on another host? "
                    "Pass shared_memory='auto' to use the network then"
                ) from None
            logger.info(
                "no shared memory with shard %d at %s: %s", self.shard_id, self.address, error
            )
            return None
        segment.unlink()  # mapped on both sides now; nothing needs the name
        line = None
        if offer.socket:
            where = f"shard {self.shard_id} at {self.address}"
            try:
                line = local.LocalLine(
                    offer.socket,
                    peer=self.address,
                    where=where,
                    timeout=seconds,
                    detect_seconds=self._detect_seconds,
                    counters=self._counters,
                )
            except OSError as error:
                logger.info("%s: no local socket (%s); its session goes through gRPC", where, error)
        return ClientSession(offer.session, segment, line)

    def _attach_tcp(self, offer: pb.SharedSegment, seconds: float) -> ClientSession | None:
        """The TCP session the server offered, or None (gRPC then) if its port cannot be
        reached or the offer cannot hold the shard."""
        assert self._size is not None
        host = host_of(self.address)
        where = f"shard {self.shard_id} at {self.address}"
        try:
            if not self._want_tcp or host is None:
                raise ValueError("no TCP session was asked for")
            if not self._size * 4 <= offer.size <= self._size * 8:
                raise ValueError(f"a buffer of {offer.size} bytes for {self._size} values")
            line = TcpLine(
                host,
                offer.port,
                security=self._security,
                peer=self.address,
                where=where,
                timeout=seconds,
                detect_seconds=self._detect_seconds,
                counters=self._counters,
            )
        except (OSError, ValueError) as error:
            logger.info("%s: no TCP session (%s); gRPC it is", where, error)
            self._say_goodbye(offer.session, seconds)
            return None
        return ClientSession(offer.session, Buffer(offer.size), line)

    def _drop(self, session: ClientSession) -> None:
        """Stop using ``session``; the next call asks Hello for a fresh one."""
        with self._hello_lock:
            if self._session is session:
                self._session, self._greeted = None, False
        self._say_goodbye(session.key, self.timeout)
        session.close()

    def _say_goodbye(self, key: bytes, seconds: float) -> None:
        try:
            self._rpc.goodbye(
                pb.GoodbyeRequest(session=key),
                timeout=min(seconds, _GOODBYE_S),
                metadata=self._metadata,
            )
        except grpc.RpcError as error:  # the server ends every session when it stops anyway
            logger.debug("shard %d at %s: goodbye failed: %s", self.shard_id, self.address, error)

    def status(self, timeout: float | None = None) -> dict[str, Any]:
        """The shard's counters, as ``ServerShard.status()`` returns them."""
        seconds = self.timeout if timeout is None else timeout
        try:
            reply = self._rpc.status(
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

    def vector_ops(self, ops: list[tuple], timeout: float | None = None) -> tuple[list[float], int]:
        """Run Sandblaster's vector ops on the shard (see :mod:`downpour.server.vectors`).

        Returns this shard's part of each dot product and its version after the call.
        """
        seconds = self.timeout if timeout is None else timeout
        request = pb.VectorOpsRequest(shard_id=self.shard_id, ops=[_vector_op(op) for op in ops])
        try:
            reply = self._rpc.vector_ops(request, timeout=seconds, metadata=self._metadata)
        except grpc.RpcError as error:
            raise self._error(error, "run vector ops", seconds) from None
        return list(reply.values), reply.version

    def shutdown(self, reason: str = "", timeout: float | None = None) -> None:
        """Ask the server's owner to shut it down (sets its ``shutdown_requested``)."""
        seconds = self.timeout if timeout is None else timeout
        try:
            self._rpc.shutdown(
                pb.ShutdownRequest(reason=reason), timeout=seconds, metadata=self._metadata
            )
        except grpc.RpcError as error:
            raise self._error(error, "answer a shutdown request", seconds) from None

    def close(self) -> None:
        """End the shared-memory session (if any) and close the channel."""
        with self._hello_lock:
            session, self._session = self._session, None
        if session is not None:
            self._say_goodbye(session.key, self.timeout)
            session.close()
        self._rpc.close()

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
        return translate(
            error, self.address, f"shard {self.shard_id} at {self.address}", what, seconds
        )


def _vector_op(op: tuple) -> pb.VectorOp:
    """An op tuple of :mod:`downpour.server.vectors` as its message."""
    code, *args = op
    message = pb.VectorOp(code=pb.VectorOp.Code.Value(code.upper()))
    if code == "dot":
        message.a, message.b = args
    else:
        message.dst = args[0]
        for arg in args[1:]:
            if isinstance(arg, float):
                message.alpha = arg
            else:
                message.a = arg
    return message
