"""Compressed payloads to and from the ``Compressed`` message of downpour.proto.

The only place a :mod:`downpour.compress` payload becomes bytes. Reading is
where a forged or corrupt payload is stopped: :func:`from_bytes` refuses, with
:class:`~downpour.compress.MalformedPayload` naming the problem, bytes that do
not parse, an unknown kind, a size other than the receiver's, counts and byte
lengths that disagree, indices out of range or out of order, bit arrays of the
wrong length, non-finite values. The declared size is checked against the
expected one before anything is allocated for it, and coded indices inflate
to at most 5 bytes per index, so a payload cannot make the receiver allocate
more than a few times its own length plus the vector it expects. Reading is
pure: nothing is applied, and a refused payload leaves no trace.

Example:
    >>> import torch
    >>> from downpour import compress
    >>> payload = compress.Dense(torch.ones(3))
    >>> data = to_bytes(payload)
    >>> len(data) == payload.nbytes
    True
    >>> from_bytes(data, expected_size=3).to_dense()
    tensor([1., 1., 1.])
    >>> try:
    ...     from_bytes(data, expected_size=4)
    ... except compress.MalformedPayload as error:
    ...     print(error)
    malformed dense payload: size mismatch: it is for a vector of 3 elements, expected 4
"""

from __future__ import annotations

import numpy as np
import torch
from google.protobuf.message import DecodeError

from downpour.compress import CodedIndices, Dense, MalformedPayload, OneBit, Payload, Signs, Sparse
from downpour.compress import decode_indices
from downpour.compress.payloads import check_size, unpack_bits
from downpour.flat import SparseUpdate
from downpour.transport import downpour_pb2 as pb
from downpour.transport.codec import NUMPY_DTYPES, TORCH_TO_WIRE, VALUE_DTYPES, dtype_name

# -- writing ---------------------------------------------------------------


def _bytes(values: torch.Tensor) -> bytes:
    array = values.detach().cpu().contiguous().numpy()
    return array.astype(NUMPY_DTYPES[TORCH_TO_WIRE[values.dtype]], copy=False).tobytes()


def _set_indices(message: pb.Compressed.Indices, indices: torch.Tensor | CodedIndices) -> None:
    if isinstance(indices, CodedIndices):
        message.deflated = indices.data
    else:
        message.raw = _bytes(indices.to(torch.int32))


def payload_to_proto(payload: Payload) -> pb.Compressed:
    """The ``Compressed`` message of a payload."""
    message = pb.Compressed()
    if isinstance(payload, Dense):
        message.dense.dtype = TORCH_TO_WIRE[payload.values.dtype]
        message.dense.values = _bytes(payload.values)
    elif isinstance(payload, Sparse):
        sparse = message.sparse
        sparse.size, sparse.nnz = payload.size, payload.nnz
        sparse.dtype = TORCH_TO_WIRE[payload.values.dtype]
        _set_indices(sparse.indices, payload.indices)
        sparse.values = _bytes(payload.values)
    elif isinstance(payload, Signs):
        signs = message.signs
        signs.size, signs.nnz, signs.tau = payload.size, payload.nnz, payload.tau
        _set_indices(signs.indices, payload.indices)
        signs.negative = payload.negative
    elif isinstance(payload, OneBit):
        onebit = message.onebit
        onebit.size, onebit.chunk, onebit.bits = payload.size, payload.chunk, payload.bits
        onebit.dtype = TORCH_TO_WIRE[payload.positive.dtype]
        onebit.positive, onebit.negative = _bytes(payload.positive), _bytes(payload.negative)
    else:
        raise TypeError(f"not a compressed payload: {type(payload).__name__}")
    return message


def to_bytes(payload: Payload) -> bytes:
    """The serialized ``Compressed`` message of a payload: ``payload.nbytes`` bytes."""
    return payload_to_proto(payload).SerializeToString()


# -- reading ---------------------------------------------------------------


def _fail(kind: str, problem: str) -> MalformedPayload:
    return MalformedPayload(f"malformed {kind} payload: {problem}")


def _array(kind: str, what: str, data: bytes, wire_dtype: int, count: int) -> torch.Tensor:
    """``count`` elements of ``wire_dtype`` from ``data``, as a tensor of its own."""
    dtype = NUMPY_DTYPES[wire_dtype]
    if len(data) != count * dtype.itemsize:
        raise _fail(
            kind,
            f"wrong count: {what} has {len(data)} bytes, expected {count} x {dtype.itemsize}",
        )
    return torch.from_numpy(np.frombuffer(data, dtype).astype(dtype.newbyteorder("=")))


def _value_dtype(kind: str, wire_dtype: int) -> int:
    if wire_dtype not in VALUE_DTYPES:
        raise _fail(kind, f"values must be FLOAT32 or FLOAT16, got {dtype_name(wire_dtype)}")
    return wire_dtype


def _indices(kind: str, message, nnz: int, size: int) -> torch.Tensor | CodedIndices:
    coding = message.indices.WhichOneof("coding")
    if coding == "raw":
        return _array(kind, "indices", message.indices.raw, pb.INT32, nnz)
    if coding == "deflated":
        data = message.indices.deflated
        try:
            return CodedIndices(data, decode_indices(data, nnz, size))
        except MalformedPayload as error:
            raise _fail(kind, str(error).removeprefix("malformed ")) from None
    raise _fail(kind, "no indices")


def _declared(kind: str, message, expected_size: int) -> tuple[int, int]:
    """The declared size and entry count, checked before anything is allocated."""
    check_size(kind, message.size, expected_size)
    if message.nnz > message.size:
        raise _fail(kind, f"wrong count: {message.nnz} entries in a vector of {message.size}")
    return message.size, message.nnz


def _read(message: pb.Compressed, expected_size: int) -> Payload:
    kind = message.WhichOneof("kind")
    if kind == "dense":
        wire_dtype = _value_dtype(kind, message.dense.dtype)
        itemsize = NUMPY_DTYPES[wire_dtype].itemsize
        count = len(message.dense.values) // itemsize
        check_size(kind, count, expected_size)
        return Dense(_array(kind, "values", message.dense.values, wire_dtype, count))
    if kind == "sparse":
        size, nnz = _declared(kind, message.sparse, expected_size)
        wire_dtype = _value_dtype(kind, message.sparse.dtype)
        indices = _indices(kind, message.sparse, nnz, size)
        return Sparse(size, indices, _array(kind, "values", message.sparse.values, wire_dtype, nnz))
    if kind == "signs":
        size, nnz = _declared(kind, message.signs, expected_size)
        indices = _indices(kind, message.signs, nnz, size)
        return Signs(size, indices, message.signs.negative, message.signs.tau)
    if kind == "onebit":
        onebit = message.onebit
        check_size(kind, onebit.size, expected_size)
        if onebit.chunk < 1:
            raise _fail(kind, f"chunk must be at least 1, got {onebit.chunk}")
        wire_dtype = _value_dtype(kind, onebit.dtype)
        num_chunks = -(-onebit.size // onebit.chunk)
        scales = [
            _array(kind, what, getattr(onebit, what), wire_dtype, num_chunks)
            for what in ("positive", "negative")
        ]
        return OneBit(onebit.size, onebit.chunk, onebit.bits, *scales)
    raise MalformedPayload("malformed payload: no kind, or a kind this version does not know")


def payload_from_proto(message: pb.Compressed, *, expected_size: int) -> Payload:
    """The payload of a ``Compressed`` message for a vector of ``expected_size`` elements.

    Raises:
        MalformedPayload: naming what is wrong; nothing has been applied.
    """
    if expected_size < 0:
        raise ValueError(f"expected_size must be non-negative, got {expected_size}")
    payload = _read(message, expected_size)
    payload.check(expected_size)
    return payload


def from_bytes(data: bytes, *, expected_size: int) -> Payload:
    """The payload serialized in ``data``, for a vector of ``expected_size`` elements.

    Raises:
        MalformedPayload: bytes that do not parse, or a payload that breaks its format.
    """
    try:
        message = pb.Compressed.FromString(data)
    except DecodeError as error:
        raise MalformedPayload(
            f"malformed payload: bytes do not parse as a Compressed message ({error})"
        ) from None
    return payload_from_proto(message, expected_size=expected_size)


# -- applying ----------------------------------------------------------------


def as_update(payload: Payload) -> torch.Tensor | SparseUpdate:
    """What a shard applies for a checked ``payload``: indexed kinds stay sparse, float32 values.

    Example:
        >>> from downpour import compress
        >>> as_update(compress.Dense(torch.ones(2)))
        tensor([1., 1.])
    """
    if isinstance(payload, Sparse):
        return SparseUpdate(payload.positions.long(), payload.values.float(), payload.size)
    if isinstance(payload, Signs):
        negative = unpack_bits(payload.negative, payload.nnz)
        values = torch.where(negative, -payload.tau, payload.tau).float()
        return SparseUpdate(payload.positions.long(), values, payload.size)
    return payload.to_dense().float()


def max_payload_bytes(size: int) -> int:
    """An upper bound on the serialized payload of any kind for a vector of ``size`` elements.

    The largest honest ones are sparse float32 with raw indices and every entry
    chosen (8 bytes an element), and onebit with a chunk of one element (two
    float32 scales an element, and its bit): that, and a few dozen bytes of
    field headers.
    """
    return 8 * size + -(-size // 8) + 64
