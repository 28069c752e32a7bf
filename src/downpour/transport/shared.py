"""Shared memory for the tensor bytes when a client runs on its server's host.

Through gRPC a 100 MB tensor is copied into messages, through the kernel's
socket buffers and out again; through a shared segment it is copied once on
each side. A session is one client's segment on one server: the server
creates it (a file in ``/dev/shm``, mode 0600, named at random, sized for a
float32 copy of the shard) when the client's ``Hello`` asks, and the client
maps it and removes its name at once, so nothing is left in ``/dev/shm``
while the session lives, however either side ends. Each call names the
session and a sequence number above the session's last; gRPC carries that
and the header, the segment the bytes.

The server trusts nothing in the segment: it reads only its own mapping,
within bounds it computes from a validated header, and copies the bytes
before checking them (see :meth:`PushAssembly.feed_region`). A session
serves one call at a time; a call that finds it busy is refused, so a
forged call can neither race a real one nor replay an old one. Only this
user's processes can open a segment (mode 0600) while it has a name, and
those could read either process's memory anyway; a server killed between a
client's Hello and its mapping leaves that one segment behind.

Linux only (``/dev/shm``); elsewhere every client uses the network.
"""

from __future__ import annotations

import ipaddress
import logging
import mmap
import os
import re
import secrets
import stat
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
import torch

from downpour.transport import codec
from downpour.transport.assembly import Reject

if TYPE_CHECKING:
    from downpour.transport.local import LocalLine

logger = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"

SHARED_MIN_BYTES = 64 << 10
"""Payloads smaller than this travel through gRPC even in a session whose server offers no Unix
socket: a copy into a message costs less than a session call's bookkeeping through gRPC. Through
the socket a session carries payloads of any size (a 4 KB round trip is then ~0.1 ms)."""

MAX_SESSIONS = 64
"""Sessions one server keeps at a time; later clients use the network."""

_NAME = re.compile(r"downpour-[0-9a-f]{32}")


def available() -> bool:
    """Whether this host has POSIX shared memory where :class:`Segment` keeps it."""
    return os.path.isdir(SHM_DIR)


def host_of(address: str) -> str | None:
    """The host of a gRPC target (for another connection to the same host); None for a Unix
    socket.

    Example:
        >>> host_of("10.0.0.2:7"), host_of("[::1]:7"), host_of("dns:///node-3:50051")
        ('10.0.0.2', '::1', 'node-3')
    """
    if address.startswith(("unix:", "unix-abstract:")):
        return None
    target = address.removeprefix("dns:///").removeprefix("ipv4:").removeprefix("ipv6:")
    if target.startswith("["):
        return target[1 : target.find("]")]
    if target.count(":") == 1:
        return target.split(":", 1)[0]
    return target


def is_loopback(address: str) -> bool:
    """Whether a gRPC target names this host: a loopback IP, ``localhost`` or a Unix socket.

    Example:
        >>> is_loopback("127.0.0.1:50051"), is_loopback("[::1]:7"), is_loopback("10.0.0.2:7")
        (True, True, False)
    """
    host = host_of(address)
    if host is None or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Segment:
    """A file in ``/dev/shm`` mapped into this process; ``view`` is its bytes."""

    def __init__(self, name: str, memory: mmap.mmap) -> None:
        self.name = name
        self.size = len(memory)
        self._memory = memory
        self.view = memoryview(memory)

    @classmethod
    def create(cls, size: int) -> Segment:
        """A fresh segment of ``size`` bytes with a random name, its pages reserved.

        Reserving up front (``posix_fallocate``) turns a full ``/dev/shm`` into
        an ``OSError`` here rather than a ``SIGBUS`` on some later write.
        """
        if size < 1:
            raise ValueError(f"a segment needs at least 1 byte, got {size}")
        name = f"downpour-{secrets.token_hex(16)}"
        path = os.path.join(SHM_DIR, name)
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(path, flags, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
            memory = mmap.mmap(fd, size)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        return cls(name, memory)

    @classmethod
    def attach(cls, name: str, size: int) -> Segment:
        """Map the segment a server created; refuses any other file.

        The name must be one :meth:`create` makes (no path can hide in it),
        and the file must be a regular file of exactly ``size`` bytes, owned
        by this user and private to it.
        """
        if not _NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not the name of a downpour segment")
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            info = os.fstat(fd)
            if (
                not stat.S_ISREG(info.st_mode)
                or info.st_uid != os.getuid()
                or info.st_mode & 0o077
                or info.st_size != size
                or size < 1
            ):
                raise ValueError(
                    f"segment {name} is not a private regular file of {size} bytes owned by us"
                )
            memory = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        return cls(name, memory)

    def unlink(self) -> None:
        """Remove the name (the mappings stay valid); a no-op once removed."""
        _unlink(self.name)

    def close(self) -> None:
        """Unmap, unless a view of the bytes is still alive (then it unmaps with the last one)."""
        try:
            self.view.release()
            self._memory.close()
        except BufferError:
            logger.debug("segment %s still has views; it is unmapped when they go", self.name)

    def __repr__(self) -> str:
        return f"Segment({self.name!r}, size={self.size})"


class Buffer:
    """A TCP session's bytes: memory of this process's own, in a segment's shape.

    The pages are taken as they are first written; the memory goes with the last reference to
    it, so a call still receiving into it when its session ends cannot write freed memory.
    """

    name = ""

    def __init__(self, size: int) -> None:
        self.size = size
        self._array = np.empty(size, dtype=np.uint8)
        self.view = memoryview(self._array)

    def unlink(self) -> None:
        pass

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"Buffer({self.size} bytes)"


def _unlink(name: str) -> None:
    try:
        os.unlink(os.path.join(SHM_DIR, name))
    except FileNotFoundError:
        pass


def write_tensor(region: memoryview, view: torch.Tensor, wire_dtype: int) -> int:
    """Copy the 1-D ``view`` into the start of ``region`` as ``wire_dtype``; the bytes written."""
    dtype = codec.NUMPY_DTYPES[wire_dtype]
    count = view.numel()
    if count * dtype.itemsize > len(region):
        raise Reject(
            "BAD_LENGTH", f"{count} elements do not fit the {len(region)} bytes of the segment"
        )
    target = torch.from_numpy(np.frombuffer(region, dtype=dtype, count=count))
    target.copy_(view.detach().reshape(-1))
    return count * dtype.itemsize


# -- the server's side -------------------------------------------------------


class _Session:
    """One client's segment (or, for a TCP session, buffer) on the server; serves one call at a
    time."""

    def __init__(self, segment: Segment | Buffer) -> None:
        self.segment = segment
        self.tcp = isinstance(segment, Buffer)
        self.owner: object | None = None  # a TCP session's connection, once its first call came
        self.seq = 0
        self._lock = threading.Lock()  # guards the two flags below, held only briefly
        self._busy = self._closed = False
        self._named = True

    def begin(self, seq: int) -> memoryview:
        with self._lock:
            if self._closed:
                raise Reject("BAD_SESSION", "the session has ended; ask Hello for another")
            if self._busy:
                raise Reject("BAD_SESSION", "the session is serving another call; one at a time")
            if seq <= self.seq:
                raise Reject(
                    "BAD_SESSION",
                    f"sequence number {seq} is not above the session's last, {self.seq}",
                )
            self._busy, self.seq = True, seq
            named, self._named = self._named, False
        if named:  # the client has mapped the segment by now: its name can go
            self.segment.unlink()
        return self.segment.view

    def end(self) -> None:
        with self._lock:
            self._busy = False
            close = self._closed
        if close:
            self.segment.close()

    def close(self) -> None:
        """Free the segment now if no call holds it, else when that call ends."""
        self.segment.unlink()
        with self._lock:
            self._closed = True
            close = not self._busy
        if close:
            self.segment.close()


class ServerSessions:
    """The shared-memory sessions of one server, each holding one client's segment.

    Args:
        segment_bytes: the size of every segment (a float32 copy of the shard).
        max_sessions: how many may exist at once; beyond, :meth:`open` says no.
    """

    def __init__(self, segment_bytes: int, max_sessions: int = MAX_SESSIONS) -> None:
        self.segment_bytes = segment_bytes
        self.max_sessions = max_sessions
        self._sessions: dict[bytes, _Session] = {}
        self._lock = threading.Lock()
        self._opening = 0
        self._closed = False
        # Names not yet removed by their client are removed at exit at the latest.
        self._names: set[str] = set()
        self._finalizer = weakref.finalize(self, _unlink_all, self._names)

    def open(self, tcp: bool = False) -> tuple[bytes, Segment | Buffer] | None:
        """A new session and its segment (a :class:`Buffer` for a TCP session), or None when none
        can be had (logged)."""
        what = "TCP" if tcp else "shared-memory"
        with self._lock:
            if self._closed or len(self._sessions) + self._opening >= self.max_sessions:
                logger.warning(
                    "no %s session for a new client: all %d in use", what, self.max_sessions
                )
                return None
            self._opening += 1  # holds a place while the segment is made, outside the lock
        try:
            segment = Buffer(self.segment_bytes) if tcp else Segment.create(self.segment_bytes)
        except (OSError, MemoryError) as error:
            logger.warning("no %s session for a new client: %s", what, error)
            return None
        finally:
            with self._lock:
                self._opening -= 1
        key = secrets.token_bytes(16)
        with self._lock:
            if not self._closed:
                self._sessions[key] = _Session(segment)
                if not tcp:
                    self._names.add(segment.name)
                return key, segment
        segment.unlink()  # the server stopped meanwhile
        segment.close()
        return None

    def claim(self, key: bytes, owner: object) -> memoryview | None:
        """Bind a TCP session to the connection ``owner`` (its first call): the session's buffer,
        or None when there is no such TCP session or another connection holds it."""
        with self._lock:
            session = self._sessions.get(bytes(key))
            if session is None or not session.tcp or session.owner not in (None, owner):
                return None
            session.owner = owner
            return session.segment.view

    @contextmanager
    def use(self, key: bytes, seq: int, tcp: bool = False) -> Iterator[memoryview]:
        """The session's segment for one call; refuses unknown or busy sessions and old seqs, and
        a TCP session's calls except through its connection (``tcp``), which only fills it."""
        with self._lock:
            session = self._sessions.get(bytes(key))
        if session is None:
            raise Reject("BAD_SESSION", "no such session; ask Hello for one")
        if session.tcp != tcp:
            raise Reject(
                "BAD_SESSION",
                "a TCP session's calls come through its TCP connection"
                if session.tcp else "a shared-memory session's calls do not come through TCP",
            )
        region = session.begin(seq)
        try:
            yield region
        finally:
            del region
            session.end()

    def close(self, key: bytes) -> bool:
        """End one session; whether it existed."""
        with self._lock:
            session = self._sessions.pop(bytes(key), None)
        if session is None:
            return False
        if not session.tcp:
            self._names.discard(session.segment.name)
        session.close()
        return True

    def close_all(self) -> None:
        """End every session and refuse new ones (the server is stopping)."""
        with self._lock:
            self._closed = True
            sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            session.close()
        self._names.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)


def _unlink_all(names: set[str]) -> None:
    for name in list(names):
        _unlink(name)


# -- the client's side -------------------------------------------------------


class ClientSession:
    """A client's end of a session: the mapped segment, the next seq, one call at a time.

    A TCP session's ``segment`` is a :class:`Buffer` of the client's own and its ``line`` a
    :class:`~downpour.transport.tcp.TcpLine`: a push's bytes go out from the caller's arrays
    after the request, and a pull's land in the buffer.
    """

    def __init__(self, key: bytes, segment: Segment | Buffer,
                 line: LocalLine | None = None) -> None:
        self.key = key
        self.segment = segment
        self.line = line  # the server's socket for the session's calls, if it offers one
        self.tcp = isinstance(segment, Buffer)
        self.lock = threading.Lock()
        self._seq = 0
        self._outgoing: tuple[memoryview, ...] = ()

    @property
    def size(self) -> int:
        return self.segment.size

    def carries(self, size: int, waits: bool = False) -> bool:
        """Whether a payload of ``size`` bytes goes through this session: any that fits when its
        calls go through the server's socket, through gRPC only from ``SHARED_MIN_BYTES``; never
        a call whose pull ``waits`` for a version in a TCP session (only gRPC waits)."""
        if waits and self.tcp:
            return False
        smallest = 0 if self.line is not None else SHARED_MIN_BYTES
        return smallest <= size <= self.segment.size

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def write(self, values: np.ndarray, indices: np.ndarray | None) -> int:
        """Copy a push's values (and indices right after) into the segment; the bytes written.

        A TCP session copies nothing: the arrays go out as they are with the call."""
        parts = [values.reshape(-1).view(np.uint8)]
        if indices is not None:
            parts.append(indices.reshape(-1).view(np.uint8))
        if self.tcp:
            self._outgoing = tuple(memoryview(part) for part in parts)
            return sum(part.size for part in parts)
        region = self.segment.view
        end = 0
        for raw in parts:
            np.frombuffer(region, dtype=np.uint8, count=raw.size, offset=end)[:] = raw
            end += raw.size
        return end

    def call(self, method: int, request, reply_type: type, seconds: float, what: str):
        """A call through the session's socket (``line`` must be set)."""
        assert self.line is not None
        if not self.tcp:
            return self.line.call(method, request, reply_type, seconds, what)
        send, self._outgoing = self._outgoing, ()
        return self.line.call(
            method, request, reply_type, seconds, what, send=send, into=self.segment.view
        )

    def region(self) -> memoryview:
        """Where a pull's answer lies: the segment, or what the TCP line received of it."""
        if self.tcp:
            assert self.line is not None
            return self.segment.view[: self.line.received]  # type: ignore[attr-defined]
        return self.segment.view

    def close(self) -> None:
        with self.lock:
            if self.line is not None:
                self.line.close()
            self.segment.close()
