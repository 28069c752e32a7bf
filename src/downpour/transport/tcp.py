"""A session's calls through a plain TCP connection, the tensor's bytes raw after the header.

Over the network, gRPC Python puts every chunk of a tensor into a message
and copies it several times on each side: a 100 MB round of push and pull
takes ~2.5 times gloo's allreduce of the same bytes here, with nothing of
downpour's in either process. A TCP session moves the same bytes the way a
shared-memory session does, with the connection in place of the segment:
the server keeps a buffer of its own for the session (sized as a segment
would be), the client sends the push's bytes after the request's header and
the server receives them straight into that buffer, and the pulled tensor
comes back the same way. Every message, handler and check is the
shared-memory session's (see :mod:`.local`); the framing is in
``downpour.proto``.

Credentials: the session key that ``Hello`` gave (only to a caller with the
run's token) binds the connection on its first request, and nothing else is
served on it; with TLS on the server, the connection is TLS with the same
certificates as gRPC's. A connection that breaks ends its session, and a
client that cannot connect uses gRPC.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import struct
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from downpour.errors import TransportError
from downpour.transport.local import MAX_FRAME, METHODS, LocalLine, LocalServer, _receive
from downpour.transport.security import Security

logger = logging.getLogger(__name__)

FIRST_REQUEST_S = 10.0
"""How long a new connection may take to send its first whole request (and its TLS handshake)."""

_REQUEST = struct.Struct("<IBQ")  # message length, method, data length
_ANSWER = struct.Struct("<IBBQ")  # message length, kind, status, data length
_PIECE = 4 << 20  # bytes per send or receive: each must progress within the call's wait


class Closed(Exception):
    """A request that breaks the framing or the session's binding: the connection is closed."""


class Connection:
    """The server's side of one TCP connection: the session it is bound to, its reads."""

    def __init__(self, conn: socket.socket) -> None:
        self._conn = conn
        self.session: bytes | None = None  # the key of the session its first request named

    def fill(self, region: memoryview) -> None:
        """Receive exactly ``len(region)`` bytes into ``region``."""
        receive_into(self._conn, region)


TcpDispatch = Callable[[Connection, int, bytes, int], tuple[int, int, bytes, memoryview]]
"""``(connection, method, request bytes, data length) -> (kind, status, answer, data)``: the
service's handler; it receives the request's data through the connection and raises
:class:`Closed` for a request the connection cannot survive."""


def receive_into(conn: socket.socket, region: memoryview) -> None:
    """Fill ``region`` from ``conn``; ``ConnectionResetError`` if the peer closes first."""
    got, size = 0, len(region)
    while got < size:
        count = conn.recv_into(region[got:], min(size - got, _PIECE))
        if not count:
            raise ConnectionResetError("the peer closed the connection mid-transfer")
        got += count


def send_all(conn: socket.socket, data: memoryview) -> None:
    """``sendall`` in pieces, so that a socket timeout bounds each piece, not the whole."""
    for start in range(0, len(data), _PIECE):
        conn.sendall(data[start : start + _PIECE])


class TcpServer(LocalServer):
    """The TCP listener of one server's sessions, on the gRPC server's host; ``port`` says where.

    Args:
        dispatch: runs one call (see :data:`TcpDispatch`).
        host: the address to bind (the gRPC server's).
        security: TLS for the connections when ``security.tls``.
        on_close: called with each connection that ends (its session ends with it).
        name: for thread names and logs.
    """

    kind = "tcp"

    def __init__(self, dispatch: TcpDispatch, host: str, security: Security,
                 on_close: Callable[[Connection], None], name: str = "shard") -> None:
        self._host = host
        self._context = server_context(security)
        self._on_close = on_close
        super().__init__(dispatch, name)

    def _listen(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.bind((self._host, 0))
            listener.listen(64)
        except OSError:
            listener.close()
            raise
        self.port: int = listener.getsockname()[1]
        return listener

    def _admit(self, conn: socket.socket) -> str | None:
        try:
            host, port, *_ = conn.getpeername()
        except OSError:
            return None
        return f"{host}:{port}"

    def _wrap(self, conn: socket.socket) -> socket.socket:
        conn.settimeout(FIRST_REQUEST_S)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # A client whose host dies sends no FIN: keepalive probes find it within about a minute,
        # and its session (and buffer) goes with the connection.
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
            if hasattr(socket, option):
                conn.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
        if self._context is None:
            return conn
        try:
            return self._context.wrap_socket(conn, server_side=True)
        except ssl.SSLError as error:
            logger.warning("%s: a TCP connection failed its TLS handshake: %s", self._name, error)
            raise

    def _serve(self, conn: socket.socket) -> None:
        line = Connection(conn)
        try:
            while (head := _receive(conn, _REQUEST.size)) is not None:
                length, method, data = _REQUEST.unpack(head)
                if length > MAX_FRAME or method not in METHODS:
                    raise Closed(f"a frame of {length} bytes for method {method}")
                payload = _receive(conn, length)
                if payload is None:
                    return
                kind, status, answer, tail = self._dispatch(line, method, payload, data)
                conn.sendall(_ANSWER.pack(len(answer), kind, status, len(tail)) + answer)
                send_all(conn, tail)
                conn.settimeout(None)  # bound to its session: rounds may be far apart
        except Closed as why:
            logger.warning("%s: closed a TCP connection: %s", self._name, why)
        finally:
            if line.session is not None:
                self._on_close(line)


class TcpLine(LocalLine):
    """A client's TCP connection to a server's session: one call at a time, the data raw.

    ``call`` takes ``send``, the memoryviews whose bytes follow the request,
    and ``into``, the buffer the answer's bytes land at the start of; after
    it, ``received`` is how many did. Errors as :class:`LocalLine`'s.
    """

    kind = "tcp"

    def __init__(self, host: str, port: int, *, security: Security, peer: str, where: str,
                 timeout: float, detect_seconds: float, counters=None) -> None:
        self._host, self._port, self._security = host, port, security
        self.received = 0
        super().__init__(f"{host}:{port}", peer=peer, where=where, timeout=timeout,
                         detect_seconds=detect_seconds, counters=counters)

    def _connect(self, path: str, timeout: float) -> socket.socket:
        conn = socket.create_connection((self._host, self._port), timeout=timeout)
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            context = client_context(self._security)
            if context is not None:
                name = self._security.target_name or self._host
                conn = context.wrap_socket(conn, server_hostname=name)
        except BaseException:
            conn.close()
            raise
        return conn

    def _exchange(self, method: int, body: bytes, send: tuple[memoryview, ...] = (),
                  into: memoryview | None = None) -> tuple[int, int, bytes]:
        data = sum(len(part) for part in send)
        self._conn.sendall(_REQUEST.pack(len(body), method, data) + body)
        for part in send:
            send_all(self._conn, part)
        length, kind, status, tail = _ANSWER.unpack(self._receive(_ANSWER.size))
        answer = self._answer(length)
        room = 0 if into is None else len(into)
        if tail > room:
            raise TransportError(
                f"{self.where} broke the protocol: {tail} bytes of data for a buffer of {room}"
            )
        if tail:
            assert into is not None
            receive_into(self._conn, into[:tail])
        self.received = tail
        self._count(len(body) + data, len(answer) + tail)
        return kind, status, answer


# -- TLS with the gRPC path's certificates ---------------------------------------------


@contextmanager
def _pem_files(*pems: bytes) -> Iterator[list[str]]:
    """The PEM blocks as files readable by this user alone, removed on leaving: ``ssl`` loads a
    certificate and its key only from files."""
    with tempfile.TemporaryDirectory(prefix="downpour-tls-") as folder:
        paths = []
        for number, pem in enumerate(pems):
            path = os.path.join(folder, f"{number}.pem")
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "wb") as file:
                file.write(pem)
            paths.append(path)
        yield paths


def _load_pair(context: ssl.SSLContext, chain: bytes, key: bytes) -> None:
    with _pem_files(chain, key) as (chain_path, key_path):
        context.load_cert_chain(chain_path, key_path)


def server_context(security: Security) -> ssl.SSLContext | None:
    """The server's TLS context (its certificate; clients' too under mutual TLS), or None."""
    if not security.tls:
        return None
    if security.certificate_chain is None or security.private_key is None:
        raise ValueError("a TLS server needs certificate_chain and private_key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_pair(context, security.certificate_chain, security.private_key)
    if security.require_client_auth:
        assert security.root_certificates is not None
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=security.root_certificates.decode())
    return context


def client_context(security: Security) -> ssl.SSLContext | None:
    """The client's TLS context (the roots it trusts, its own certificate if given), or None."""
    if not security.tls:
        return None
    roots = security.root_certificates
    context = ssl.create_default_context(cadata=None if roots is None else roots.decode())
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if security.certificate_chain is not None and security.private_key is not None:
        _load_pair(context, security.certificate_chain, security.private_key)
    return context
