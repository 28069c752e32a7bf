"""Assembling a tensor from its chunks, checking each as it arrives, both ways.

On the server, :class:`PushAssembly`: nothing of a push reaches the shard
until the whole of it has arrived and matched its header; a chunk that
breaks the header's promises (order, count, length) is refused on arrival,
so a forged stream never makes the server hold more than one shard's worth
of bytes. On the client, :func:`read_pull` holds a pull's answer to the same
promises before it returns a tensor.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import torch

from downpour.compress import MalformedPayload
from downpour.flat import SparseUpdate
from downpour.transport import codec
from downpour.transport import downpour_pb2 as pb
from downpour.transport.codec import Malformed, PushFrame, TensorFrame
from downpour.transport.payload import as_update, from_bytes, max_payload_bytes

KINDS = {pb.GRADIENT: "gradient", pb.DELTA: "delta"}


class Reject(Exception):
    """Refuse the current call with ``reason`` (a RejectCode name)."""

    def __init__(
        self, reason: str, message: str, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT
    ):
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.code = code


class BufferPool:
    """Reused float32 receive buffers of one shard's size.

    A fresh 100 MB buffer per push costs tens of milliseconds in page faults
    alone; a handful kept around costs none.
    """

    def __init__(self, numel: int, keep: int = 2) -> None:
        self._numel, self._keep = numel, keep
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()

    def get(self) -> np.ndarray:
        with self._lock:
            if self._free:
                return self._free.pop()
        return np.empty(self._numel, dtype=np.float32)

    def put(self, buffer: np.ndarray) -> None:
        with self._lock:
            if len(self._free) < self._keep:
                self._free.append(buffer)


class PushAssembly:
    """Checks a push stream chunk by chunk and assembles the update it carries.

    Nothing of a push is kept beyond the shard's size: a chunk that would
    overflow what the header announced is refused on arrival.
    """

    def __init__(self, shard_id: int, size: int, pool: BufferPool) -> None:
        self._shard_id, self._size, self._pool = shard_id, size, pool
        self.header: pb.PushHeader | None = None
        self._received = 0
        self._values: np.ndarray | None = None  # the values' bytes, as uint8
        self._indices: np.ndarray | None = None
        self._values_at = self._indices_at = 0
        self._pooled: np.ndarray | None = None

    def feed(self, frame: PushFrame | Malformed) -> None:
        """Check and take the next chunk of a stream (or the only one of a unary push)."""
        if isinstance(frame, Malformed):
            raise Reject("MALFORMED", frame.reason)
        if self.header is None:
            self._start(frame)
        elif frame.header is not None:
            raise Reject(
                "BAD_HEADER", f"chunk {frame.seq} carries a second header; only chunk 0 may"
            )
        self._take(frame)

    def feed_region(self, header: pb.PushHeader, region: memoryview) -> None:
        """Take a whole push whose bytes lie in ``region`` (a shared-memory segment).

        The header is checked as a stream's first chunk is, and decides how
        many bytes to read: the values from the start of the region, the
        indices (sparse) right after. Those bytes are copied before anything
        checks them, so a peer that rewrites the segment meanwhile cannot slip
        unchecked values past the shard.
        """
        self._start(PushFrame(0, header, region[:0], region[:0]))
        assert self._values is not None
        values = len(self._values)
        indices = 0 if self._indices is None else len(self._indices)
        if values + indices > len(region):
            raise Reject(
                "BAD_LENGTH",
                f"the header announces {values + indices} bytes, "
                f"the shared segment holds {len(region)}",
            )
        self._take(PushFrame(0, None, region[:values], region[values : values + indices]))

    def _take(self, frame: PushFrame) -> None:
        header = self.header
        assert header is not None
        if self._received >= header.num_chunks:
            raise Reject(
                "BAD_CHUNK_COUNT", f"the header announced {header.num_chunks} chunks, more arrived"
            )
        if frame.seq != self._received:
            raise Reject(
                "BAD_CHUNK_ORDER", f"chunk {frame.seq} arrived where chunk {self._received} was due"
            )
        self._values_at = self._copy(frame.values, self._values, self._values_at, "values")
        if self._indices is None:
            if len(frame.indices):
                raise Reject("BAD_ENCODING", f"chunk {frame.seq} of a DENSE push carries indices")
        else:
            self._indices_at = self._copy(frame.indices, self._indices, self._indices_at, "indices")
        self._received += 1

    def _copy(self, payload: memoryview, target: np.ndarray, at: int, what: str) -> int:
        end = at + len(payload)
        if end > len(target):
            raise Reject(
                "BAD_LENGTH",
                f"{what} exceed the {len(target)} bytes the header announced "
                f"(chunk {self._received} brings them to {end})",
            )
        if len(payload):
            target[at:end] = np.frombuffer(payload, dtype=np.uint8)
        return end

    def _start(self, frame: PushFrame) -> None:
        header = frame.header
        if header is None:
            raise Reject("BAD_HEADER", f"the first chunk (seq {frame.seq}) carries no header")
        if header.shard_id != self._shard_id:
            raise Reject(
                "BAD_SHARD",
                f"this server holds shard {self._shard_id}, "
                f"the push is for shard {header.shard_id}",
            )
        if header.kind not in KINDS:
            raise Reject("BAD_KIND", f"unknown update kind {header.kind}; send GRADIENT or DELTA")
        if header.encoding not in (pb.DENSE, pb.SPARSE, pb.COMPRESSED):
            raise Reject(
                "BAD_ENCODING",
                f"unknown encoding {header.encoding}; send DENSE, SPARSE or COMPRESSED",
            )
        if list(header.shape) != [self._size]:
            raise Reject(
                "BAD_LENGTH",
                f"update shape {list(header.shape)} does not match shard {self._shard_id} of "
                f"{self._size} elements",
            )
        if header.num_chunks < 1:
            raise Reject("BAD_CHUNK_COUNT", "the header announces no chunks; send at least one")
        if header.encoding == pb.COMPRESSED:
            self._start_compressed(header)
            return
        if header.dtype not in codec.VALUE_DTYPES:
            raise Reject(
                "BAD_DTYPE",
                f"values must be FLOAT32 or FLOAT16, got {codec.dtype_name(header.dtype)}",
            )
        sparse = header.encoding == pb.SPARSE
        if sparse and header.index_dtype not in codec.INDEX_DTYPES:
            raise Reject(
                "BAD_DTYPE",
                "sparse indices must be INT32 or INT64, "
                f"got {codec.dtype_name(header.index_dtype)}",
            )
        if sparse and header.nnz > self._size:
            raise Reject(
                "BAD_LENGTH", f"nnz {header.nnz} exceeds the shard's {self._size} elements"
            )
        count = header.nnz if sparse else self._size
        value_size = codec.NUMPY_DTYPES[header.dtype].itemsize
        if not sparse and header.dtype == pb.FLOAT32:
            self._pooled = self._pool.get()
            self._values = self._pooled.view(np.uint8)
        else:
            self._values = np.empty(count * value_size, dtype=np.uint8)
        if sparse:
            self._indices = np.empty(
                count * codec.NUMPY_DTYPES[header.index_dtype].itemsize, np.uint8
            )
        self.header = header

    def finish(self) -> tuple[pb.PushHeader, torch.Tensor | SparseUpdate]:
        """The header and the update, once the stream has ended; checks it was complete."""
        header = self.header
        if header is None:
            raise Reject("BAD_CHUNK_COUNT", "the push stream carried no chunks")
        if self._received != header.num_chunks:
            raise Reject(
                "BAD_CHUNK_COUNT",
                f"the push stream ended after {self._received} of {header.num_chunks} chunks",
            )
        assert self._values is not None
        if self._values_at != len(self._values):
            raise Reject(
                "BAD_LENGTH",
                f"values carried {self._values_at} of the {len(self._values)} bytes announced",
            )
        if header.encoding == pb.COMPRESSED:
            return header, self._decompress()
        values = _as_float32(self._values, header.dtype)
        if self._indices is None:
            return header, values
        if self._indices_at != len(self._indices):
            raise Reject(
                "BAD_LENGTH",
                f"indices carried {self._indices_at} of the {len(self._indices)} bytes announced",
            )
        indices = torch.from_numpy(self._indices.view(codec.NUMPY_DTYPES[header.index_dtype]))
        return header, SparseUpdate(indices.to(torch.int64), values, self._size)

    def _start_compressed(self, header: pb.PushHeader) -> None:
        """A compressed push: ``payload_bytes`` of a ``Compressed`` message in the values."""
        limit = max_payload_bytes(self._size)
        if not 0 < header.payload_bytes <= limit:
            raise Reject(
                "BAD_LENGTH",
                f"a compressed push of {header.payload_bytes} bytes; a payload for "
                f"{self._size} elements takes 1 to {limit}",
            )
        self._values = np.empty(header.payload_bytes, dtype=np.uint8)
        self.header = header

    def _decompress(self) -> torch.Tensor | SparseUpdate:
        assert self._values is not None
        try:
            payload = from_bytes(self._values.tobytes(), expected_size=self._size)
        except MalformedPayload as error:
            raise Reject("BAD_PAYLOAD", str(error)) from None
        return as_update(payload)

    def release(self) -> None:
        if self._pooled is not None:
            self._pool.put(self._pooled)
            self._pooled = None


def _as_float32(raw: np.ndarray, wire_dtype: int) -> torch.Tensor:
    values = torch.from_numpy(raw.view(codec.NUMPY_DTYPES[wire_dtype]))
    return values if wire_dtype == pb.FLOAT32 else values.to(torch.float32)


# -- the client's side -------------------------------------------------------


class Violation(Exception):
    """An answer of the server's that breaks the protocol (the client raises a TransportError)."""


def read_pull(
    frames: Iterator[TensorFrame | Malformed],
    out: torch.Tensor | None,
    shard_id: int,
    size: int | None = None,
) -> tuple[int, torch.Tensor] | None:
    """``(version, out)`` from a pull's chunks, or None for a "not newer" answer.

    Checks the header (shard, dtype, a 1-D shape of ``size`` elements when
    known) and every chunk (order, count, length) as :class:`PushAssembly`
    does on the server; raises :class:`Violation` where they fail, and
    ``ValueError`` for an ``out`` of the wrong kind.
    """
    first = next(frames, None)
    header = _first_header(first, shard_id)
    if header.not_newer:
        return None
    if header.dtype not in codec.VALUE_DTYPES or len(header.shape) != 1:
        raise Violation(
            f"a pull answered with {codec.dtype_name(header.dtype)}{list(header.shape)}"
        )
    numel = header.shape[0]
    if numel < 0 or (size is not None and numel != size):
        raise Violation(f"a pull answered with {numel} elements, the shard has {size}")
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
            raise Violation(frame.reason)
        if frame.seq != seq or seq >= header.num_chunks:
            raise Violation(f"chunk {frame.seq} arrived where {seq} of {header.num_chunks} was due")
        end = at + len(frame.data)
        if end > len(target):
            raise Violation(f"a pull carried more than the {len(target)} bytes announced")
        target[at:end] = np.frombuffer(frame.data, dtype=np.uint8)
        at, seq = end, seq + 1
        frame = next(frames, None)
    if seq != header.num_chunks or at != len(target):
        raise Violation(
            f"a pull ended after {seq} of {header.num_chunks} chunks, {at} of {len(target)} bytes"
        )
    if staging is not None:
        out.detach().copy_(torch.from_numpy(staging.view(codec.NUMPY_DTYPES[header.dtype])))
    return header.version, out


def _first_header(first: TensorFrame | Malformed | None, shard_id: int) -> pb.TensorHeader:
    if first is None:
        raise Violation("a pull answered with no chunks")
    if isinstance(first, Malformed):
        raise Violation(first.reason)
    if first.header is None or first.seq != 0:
        raise Violation("a pull's first chunk carried no header")
    if first.header.shard_id != shard_id:
        raise Violation(f"the server holds shard {first.header.shard_id}, not {shard_id}")
    return first.header


def region_frame(header: pb.TensorHeader, region: memoryview) -> TensorFrame:
    """A shared-memory pull's answer as the one chunk :func:`read_pull` checks like any other.

    The data is the part of ``region`` the header describes; when the header
    is bad or asks for more than the region holds, a shorter slice, which
    :func:`read_pull` then refuses.
    """
    dtype = codec.NUMPY_DTYPES.get(header.dtype)
    size = 0
    if dtype is not None and len(header.shape) == 1 and header.shape[0] > 0:
        size = min(header.shape[0] * dtype.itemsize, len(region))
    return TensorFrame(0, header, region[:size])
