"""Tensors to and from chunk messages, with as few copies as the wire allows.

The bulk messages, ``TensorChunk`` and ``PushChunk``, are written and read
here by hand in protobuf's wire format instead of through the generated
classes: building a message from a slice of a tensor, then serializing it,
copies every byte twice, and parsing copies the payload once more. Here a
chunk is one ``bytes.join`` of a few header bytes and a ``memoryview`` of the
tensor, and a received payload is a ``memoryview`` into gRPC's buffer that
``numpy.frombuffer`` reads in place. The bytes are exactly what protobuf
writes, so the generated stub still talks to both ends (tests forge messages
with it), and every parse checks bounds: a malformed message becomes a
:class:`Malformed` value that the service refuses, never an exception inside
gRPC.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch
from google.protobuf.message import DecodeError

from downpour.flat import SparseUpdate
from downpour.transport import downpour_pb2 as pb

CHUNK_BYTES = 1 << 20
"""Default payload bytes per chunk."""

MAX_MESSAGE_BYTES = 2 << 20
"""gRPC's message limit on both ends: modestly above a chunk plus its header."""

MAX_CHUNK_BYTES = MAX_MESSAGE_BYTES - (64 << 10)
"""The largest payload per chunk a client may ask for (room left for the header)."""

TOKEN_KEY = "downpour-token"
REJECT_KEY = "downpour-reject-bin"

SERVICE = "downpour.v1.ParameterServer"
PULL = f"/{SERVICE}/Pull"
PUSH = f"/{SERVICE}/Push"
PULL_SMALL = f"/{SERVICE}/PullSmall"
PUSH_SMALL = f"/{SERVICE}/PushSmall"
PUSH_PULL = f"/{SERVICE}/PushPull"
HELLO = f"/{SERVICE}/Hello"
PULL_SHARED = f"/{SERVICE}/PullShared"
PUSH_SHARED = f"/{SERVICE}/PushShared"
PUSH_PULL_SHARED = f"/{SERVICE}/PushPullShared"
GOODBYE = f"/{SERVICE}/Goodbye"
STATUS = f"/{SERVICE}/Status"
SHUTDOWN = f"/{SERVICE}/Shutdown"
VECTOR_OPS = f"/{SERVICE}/VectorOps"

# Wire dtype -> little-endian numpy dtype, and the torch dtypes they carry.
NUMPY_DTYPES: dict[int, np.dtype] = {
    pb.FLOAT32: np.dtype("<f4"),
    pb.FLOAT16: np.dtype("<f2"),
    pb.INT32: np.dtype("<i4"),
    pb.INT64: np.dtype("<i8"),
}
VALUE_DTYPES = (pb.FLOAT32, pb.FLOAT16)
INDEX_DTYPES = (pb.INT32, pb.INT64)
TORCH_TO_WIRE = {
    torch.float32: pb.FLOAT32,
    torch.float16: pb.FLOAT16,
    torch.int32: pb.INT32,
    torch.int64: pb.INT64,
}
WIRE_TO_TORCH = {wire: dtype for dtype, wire in TORCH_TO_WIRE.items()}

_LEN = 2  # protobuf wire type of length-delimited fields
_U64 = (1 << 64) - 1


def dtype_name(wire: int) -> str:
    """The proto name of a wire dtype, or the number if unknown."""
    try:
        return pb.DType.Name(wire)
    except ValueError:
        return str(wire)


# -- writing ---------------------------------------------------------------


_ONE_BYTE = [bytes((value,)) for value in range(0x80)]  # tags, seqs, short lengths


def varint(value: int) -> bytes:
    """Protobuf's base-128 varint of a non-negative int (negative: two's complement, 10 bytes)."""
    if 0 <= value < 0x80:  # most of them, on the path of every small call
        return _ONE_BYTE[value]
    value &= _U64
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number: int, payload) -> list:
    """The parts of one length-delimited field: tag, length, payload."""
    return [_ONE_BYTE[number << 3 | _LEN], varint(len(payload)), payload]


def _byte_view(array: np.ndarray) -> memoryview:
    return memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


def tensor_frames(
    shard_id: int, version: int, view: torch.Tensor, wire_dtype: int, chunk_bytes: int = CHUNK_BYTES
) -> list[bytes]:
    """Serialized ``TensorChunk`` messages carrying ``view`` (1-D) as ``wire_dtype``.

    One copy of the data: from ``view`` straight into the frames.
    """
    source = view.detach().reshape(-1)
    target = WIRE_TO_TORCH[wire_dtype]
    if source.dtype != target:
        source = source.to(target)
    data = _byte_view(source.numpy())
    itemsize = NUMPY_DTYPES[wire_dtype].itemsize
    step = max(itemsize, chunk_bytes // itemsize * itemsize)
    starts = range(0, len(data), step) if len(data) else range(1)
    header = pb.TensorHeader(
        shard_id=shard_id,
        version=version,
        dtype=wire_dtype,
        shape=[source.numel()],
        num_chunks=len(starts),
    ).SerializeToString()
    frames = []
    for seq, start in enumerate(starts):
        parts = [b"\x08", varint(seq)]
        if seq == 0:
            parts += _field(2, header)
        parts += _field(3, data[start : start + step])
        frames.append(b"".join(parts))
    return frames


def not_newer_frame(shard_id: int, version: int) -> bytes:
    """The single ``TensorChunk`` that answers a pull with nothing newer."""
    header = pb.TensorHeader(shard_id=shard_id, version=version, not_newer=True, num_chunks=1)
    return pb.TensorChunk(seq=0, header=header).SerializeToString()


def push_pull_request(frame: bytes, pull: pb.PullRequest) -> bytes:
    """A serialized ``PushPullRequest`` of a serialized ``PushChunk`` and a pull request."""
    return b"".join([*_field(1, frame), *_field(2, pull.SerializeToString())])


def push_pull_reply(push: pb.PushReply, frame: bytes) -> bytes:
    """A serialized ``PushPullReply`` of a push's reply and a serialized ``TensorChunk``."""
    return b"".join([*_field(1, push.SerializeToString()), *_field(2, frame)])


def push_frames(
    header: pb.PushHeader,
    values: np.ndarray,
    indices: np.ndarray | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> Iterator[bytes]:
    """Serialized ``PushChunk`` messages for one update; sets ``header.num_chunks``.

    Dense: ``values`` split into chunks of ``chunk_bytes``. Sparse: aligned
    runs of ``(index, value)`` pairs, both fields in every chunk. Frames are
    made lazily, as gRPC sends them.
    """
    value_bytes = _byte_view(values)
    value_size = values.dtype.itemsize
    if indices is None:
        per_chunk = max(1, chunk_bytes // value_size)
        count = values.size
    else:
        index_bytes = _byte_view(indices)
        per_chunk = max(1, chunk_bytes // (value_size + indices.dtype.itemsize))
        count = indices.size
    num_chunks = max(1, -(-count // per_chunk))
    header.num_chunks = num_chunks
    header_field = _field(2, header.SerializeToString())

    def frames() -> Iterator[bytes]:
        for seq in range(num_chunks):
            low, high = seq * per_chunk, min(count, (seq + 1) * per_chunk)
            parts = [b"\x08", varint(seq)]
            if seq == 0:
                parts += header_field
            parts += _field(3, value_bytes[low * value_size : high * value_size])
            if indices is not None:
                size = indices.dtype.itemsize
                parts += _field(4, index_bytes[low * size : high * size])
            yield b"".join(parts)

    return frames()


def update_arrays(
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
        header.dtype = TORCH_TO_WIRE[update.values.dtype]
        header.index_dtype = TORCH_TO_WIRE[indices.dtype]
        header.shape.append(update.size)
        header.nnz = indices.numel()
        return values, indices.cpu().contiguous().numpy()
    if not isinstance(update, torch.Tensor):
        raise TypeError(
            f"update must be a torch.Tensor or SparseUpdate, got {type(update).__name__}"
        )
    values = _value_array(update)
    header.encoding = pb.DENSE
    header.dtype = TORCH_TO_WIRE[update.dtype]
    header.shape.append(values.size)
    return values, None


def _value_array(values: torch.Tensor) -> np.ndarray:
    if values.dtype not in (torch.float32, torch.float16):
        raise TypeError(f"update values must be float32 or float16, got {values.dtype}")
    header_dtype = TORCH_TO_WIRE[values.dtype]
    array = values.detach().reshape(-1).cpu().contiguous().numpy()
    return array.astype(NUMPY_DTYPES[header_dtype], copy=False)


# -- reading ---------------------------------------------------------------


class Malformed(NamedTuple):
    """Bytes that do not parse as the expected message, and why."""

    reason: str


class TensorFrame(NamedTuple):
    seq: int
    header: pb.TensorHeader | None
    data: memoryview


class PushFrame(NamedTuple):
    seq: int
    header: pb.PushHeader | None
    values: memoryview
    indices: memoryview


class _BadWire(Exception):
    pass


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    end = len(buf)
    while True:
        if pos >= end:
            raise _BadWire("a varint runs past the end of the message")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result & _U64, pos
        shift += 7
        if shift >= 70:
            raise _BadWire("a varint is longer than 10 bytes")


def _fields(buf: memoryview) -> Iterator[tuple[int, int, object]]:
    """``(field number, wire type, value)`` of every field; LEN values are memoryviews."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _read_varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise _BadWire("field number 0")
        if wire_type == 0:
            value, pos = _read_varint(buf, pos)
        elif wire_type == _LEN:
            length, pos = _read_varint(buf, pos)
            if length > end - pos:
                raise _BadWire(f"field {number} claims {length} bytes, {end - pos} are left")
            value, pos = buf[pos : pos + length], pos + length
        elif wire_type in (1, 5):
            pos += 8 if wire_type == 1 else 4
            if pos > end:
                raise _BadWire(f"field {number} runs past the end of the message")
            value = None
        else:
            raise _BadWire(f"unsupported wire type {wire_type} in field {number}")
        yield number, wire_type, value


def _parse(data: bytes, layout: dict[int, str], header_cls):
    """Scalar field 1 (``seq``), sub-message field 2 (the header) and byte fields per ``layout``.

    Follows protobuf's rules: the last value of a repeated scalar or bytes
    field wins; repeated occurrences of a sub-message merge (which is what
    parsing their concatenation does); unknown fields are skipped.
    """
    buf = memoryview(data)
    seq, header_parts, blobs = 0, [], {name: buf[:0] for name in layout.values()}
    for number, wire_type, value in _fields(buf):
        if number == 1:
            if wire_type != 0:
                raise _BadWire("seq is not a varint")
            seq = value & 0xFFFFFFFF
        elif number == 2:
            if wire_type != _LEN:
                raise _BadWire("header is not a message")
            header_parts.append(bytes(value))
        elif number in layout:
            if wire_type != _LEN:
                raise _BadWire(f"{layout[number]} is not a bytes field")
            blobs[layout[number]] = value
    header = None
    if header_parts:
        try:
            header = header_cls.FromString(b"".join(header_parts))
        except DecodeError as error:
            raise _BadWire(f"the header does not parse: {error}") from None
    return seq, header, blobs


def parse_tensor_chunk(data: bytes) -> TensorFrame | Malformed:
    """A ``TensorChunk`` whose ``data`` is a view into ``data`` (no copy)."""
    try:
        seq, header, blobs = _parse(data, {3: "data"}, pb.TensorHeader)
    except _BadWire as error:
        return Malformed(f"TensorChunk does not parse: {error}")
    return TensorFrame(seq, header, blobs["data"])


def parse_push_chunk(data: bytes) -> PushFrame | Malformed:
    """A ``PushChunk`` whose ``values`` and ``indices`` are views into ``data`` (no copy)."""
    try:
        seq, header, blobs = _parse(data, {3: "values", 4: "indices"}, pb.PushHeader)
    except _BadWire as error:
        return Malformed(f"PushChunk does not parse: {error}")
    return PushFrame(seq, header, blobs["values"], blobs["indices"])


def push_frame_of(chunk: pb.PushChunk) -> PushFrame:
    """A parsed ``PushChunk`` message as the frame the assembly takes."""
    header = chunk.header if chunk.HasField("header") else None
    return PushFrame(chunk.seq, header, memoryview(chunk.values), memoryview(chunk.indices))


def tensor_frame_of(chunk: pb.TensorChunk) -> TensorFrame:
    """A parsed ``TensorChunk`` message as the frame a client reads."""
    header = chunk.header if chunk.HasField("header") else None
    return TensorFrame(chunk.seq, header, memoryview(chunk.data))


def tolerant(parse):
    """Wrap a generated ``FromString``: bad bytes yield :class:`Malformed`, not an exception."""

    def parse_or_malformed(data: bytes):
        try:
            return parse(data)
        except DecodeError as error:
            return Malformed(f"message does not parse: {error}")

    return parse_or_malformed
