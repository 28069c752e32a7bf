"""A shared-memory session's calls through a Unix socket instead of gRPC.

A session's segment already carries the tensor bytes; what is left of a
round is its header and gRPC's own cost per call, which on one host is
most of the round: a unary call's round trip is ~440 us here, a Unix
socket's ~6 us, and gRPC's server takes ~0.35 ms of CPU per call. So a
server with sessions also listens on a Unix socket in Linux's abstract
namespace (no file: it goes with the process, however that ends), named
``@downpour-`` and 32 random hex digits, names it in each session's offer, and serves the three
session calls (PushShared, PullShared, PushPullShared) there with the same
messages, handlers and checks as through gRPC. The framing is in
``downpour.proto``: a request is ``length, method, message``; an answer
``length, kind, status, message``, where kind 1 carries a ``Reject`` and
status the gRPC status code that refusal has through gRPC.

The session key in each request is the credential (only a caller with the
run's token got one from Hello), and the server serves connections only
from processes of its own user (``SO_PEERCRED``; others are closed at
once), who could read the segment anyway. A client that cannot connect, or a server that offers no
socket, uses gRPC; a connection that breaks ends the session like a gRPC
call that ends without an answer.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import struct
import threading
from collections.abc import Callable

import grpc
from google.protobuf.message import DecodeError, Message

from downpour.errors import PeerTimeout, PeerUnavailable, TransportError
from downpour.transport import downpour_pb2 as pb
from downpour.transport.channel import Counters, failure

logger = logging.getLogger(__name__)

PUSH_SHARED, PULL_SHARED, PUSH_PULL_SHARED = 1, 2, 3
METHODS = {PUSH_SHARED: "PushShared", PULL_SHARED: "PullShared", PUSH_PULL_SHARED: "PushPullShared"}
REPLY, REJECTED = 0, 1
MAX_FRAME = 64 << 10
"""The longest message either side takes: headers only, the tensors are in the segment."""

_REQUEST = struct.Struct("<IB")
_ANSWER = struct.Struct("<IBB")
_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid
_STATUS = {code.value[0]: code for code in grpc.StatusCode}

Dispatch = Callable[[int, bytes], tuple[int, int, bytes]]
"""``(method, request bytes) -> (kind, status code, answer bytes)``: the service's handler."""


def address(name: str) -> str:
    """The ``bind``/``connect`` address of a socket name: ``@name`` is ``name`` in the abstract
    namespace, anything else a path."""
    return "\0" + name[1:] if name.startswith("@") else name


def _receive(conn: socket.socket, count: int) -> bytes | None:
    """Exactly ``count`` bytes, or None when the peer closed the connection first."""
    chunks, left = [], count
    while left:
        chunk = conn.recv(left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


class LocalServer:
    """The Unix socket of one server's sessions: a thread accepts, a thread per connection serves.

    Args:
        dispatch: runs one call (see :data:`Dispatch`); it must never raise
            for a bad request, only answer with a ``Reject``.
        name: for thread names and logs.

    :class:`~downpour.transport.tcp.TcpServer` is the same server over TCP:
    it overrides how the socket listens (:meth:`_listen`), whom it admits
    (:meth:`_admit`) and the framing (:meth:`_serve`).
    """

    kind = "local"

    def __init__(self, dispatch: Callable, name: str = "shard") -> None:
        self._dispatch = dispatch
        self._name = name
        self._listener = self._listen()
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._closed = False
        self._thread = threading.Thread(
            target=self._accept, name=f"downpour-{name}-{self.kind}", daemon=True
        )
        self._thread.start()

    def _listen(self) -> socket.socket:
        self.path = f"@downpour-{secrets.token_hex(16)}"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(address(self.path))
            listener.listen(64)
        except OSError:
            listener.close()
            raise
        return listener

    def close(self) -> None:
        """Stop accepting and end every connection (their calls fail on the client)."""
        with self._lock:
            self._closed = True
            connections, self._connections = list(self._connections), set()
        for conn in [self._listener, *connections]:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()

    def _admit(self, conn: socket.socket) -> str | None:
        """The peer's name for logs if ``conn`` may be served, else None (it is closed)."""
        pid, uid, _gid = _CREDENTIALS.unpack(
            conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDENTIALS.size)
        )
        if uid != os.getuid():
            logger.warning("%s: refused a local connection from uid %d (pid %d)",
                           self._name, uid, pid)
            return None
        return str(pid)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            peer = self._admit(conn)
            if peer is None:
                conn.close()
                continue
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self._connections.add(conn)
            threading.Thread(
                target=self._serve_and_close, args=(conn,),
                name=f"downpour-{self._name}-{self.kind}-{peer}", daemon=True,
            ).start()

    def _wrap(self, conn: socket.socket) -> socket.socket:
        """The socket to serve ``conn`` through (TLS over it, for TCP)."""
        return conn

    def _serve_and_close(self, conn: socket.socket) -> None:
        served = conn
        try:
            served = self._wrap(conn)
            if served is not conn:
                with self._lock:  # so that close() ends the wrapped one
                    self._connections.discard(conn)
                    self._connections.add(served)
            self._serve(served)
        except OSError as error:
            logger.debug("%s: a %s connection ended: %s", self._name, self.kind, error)
        finally:
            with self._lock:
                self._connections.discard(served)
            served.close()
            conn.close()

    def _serve(self, conn: socket.socket) -> None:
        while (head := _receive(conn, _REQUEST.size)) is not None:
            length, method = _REQUEST.unpack(head)
            if length > MAX_FRAME or method not in METHODS:
                logger.warning("%s: closed a local connection that sent a frame of %d bytes "
                               "for method %d", self._name, length, method)
                return
            payload = _receive(conn, length)
            if payload is None:
                return
            kind, status, answer = self._dispatch(method, payload)
            conn.sendall(_ANSWER.pack(len(answer), kind, status) + answer)


class LocalLine:
    """A client's connection to a server's session socket: one call at a time.

    Errors are downpour's, as :func:`downpour.transport.channel.translate`
    makes them of gRPC's: ``StaleUpdate`` and ``Refused`` for a refusal,
    ``PeerTimeout`` past the call's deadline, ``PeerUnavailable`` for a
    connection lost or a server silent for ``detect_seconds``. Given
    ``counters``, the bytes of each message sent and received add to them.
    """

    kind = "local"

    def __init__(self, path: str, *, peer: str, where: str, timeout: float,
                 detect_seconds: float, counters: Counters | None = None) -> None:
        self.peer, self.where = peer, where
        self._detect = detect_seconds
        self._counters = counters
        self._conn = self._connect(path, timeout)

    def _connect(self, path: str, timeout: float) -> socket.socket:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.settimeout(timeout)
        try:
            conn.connect(address(path))
        except OSError:
            conn.close()
            raise
        return conn

    def call(self, method: int, request: Message, reply_type: type[Message], seconds: float,
             what: str, **data) -> Message:
        """Send ``request`` to ``method`` and wait up to ``seconds`` for its answer."""
        body = request.SerializeToString()
        wait = min(seconds, self._detect)
        try:
            self._conn.settimeout(wait)
            kind, status, answer = self._exchange(method, body, **data)
        except TimeoutError:
            if wait < seconds:
                raise PeerUnavailable(
                    self.peer, f"{self.where} is unavailable: no answer to a {self.kind} call "
                    f"within {wait:g} s (frozen?)") from None
            raise PeerTimeout(self.peer, seconds, what) from None
        except OSError as error:
            raise PeerUnavailable(self.peer, f"{self.where} is unavailable: {error}") from None
        try:
            if kind == REJECTED:
                code = _STATUS.get(status, grpc.StatusCode.UNKNOWN)
                reject = pb.Reject.FromString(answer)
                raise failure(code, reject, reject.message, self.peer, self.where, what, seconds)
            if kind != REPLY:
                raise TransportError(f"{self.where} broke the protocol: an answer of kind {kind}")
            return reply_type.FromString(answer)
        except DecodeError as error:
            raise TransportError(
                f"{self.where} broke the protocol: an answer that does not parse: {error}"
            ) from None

    def _exchange(self, method: int, body: bytes) -> tuple[int, int, bytes]:
        """One request out and its answer back: ``(kind, status, answer bytes)``."""
        self._conn.sendall(_REQUEST.pack(len(body), method) + body)
        head = self._receive(_ANSWER.size)
        length, kind, status = _ANSWER.unpack(head)
        answer = self._answer(length)
        self._count(len(body), len(answer))
        return kind, status, answer

    def _receive(self, count: int) -> bytes:
        data = _receive(self._conn, count)
        if data is None:
            raise ConnectionResetError("the server closed the connection")
        return data

    def _answer(self, length: int) -> bytes:
        if length > MAX_FRAME:
            raise TransportError(f"{self.where} broke the protocol: an answer of {length} bytes")
        return self._receive(length) if length else b""

    def _count(self, sent: int, received: int) -> None:
        if self._counters is not None:  # the bytes of the messages, as gRPC's are counted
            self._counters.count("bytes_sent", sent)
            self._counters.count("bytes_received", received)

    def close(self) -> None:
        self._conn.close()
