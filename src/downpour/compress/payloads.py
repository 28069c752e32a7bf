"""Payloads: the typed values compressors make and receivers decode.

A payload is a frozen value of tensors and packed bits that stands for one
flat float32 vector. It decodes itself (:meth:`to_dense`), adds itself to a
vector in place without a dense copy (:meth:`add_to_`), checks its own
invariants (:meth:`check`, which the transport calls on every received
payload) and reports ``nbytes``, the exact size of the ``Compressed`` message
(``transport/downpour.proto``) protobuf serializes it to. Only
:mod:`downpour.transport.payload` turns payloads into bytes; the sizes here
follow protobuf's encoding rules field by field, and the conformance tests
check them against ``SerializeToString``.

Payloads own their tensors: an encoder never returns one that shares memory
with its input or state, so error feedback may update its residual in place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from downpour.errors import DownpourError


class MalformedPayload(DownpourError, ValueError):
    """A received payload that breaks its format; the message names the problem."""


# The DType enum of downpour.proto, for the value types a payload may hold.
WIRE_DTYPES = {torch.float32: 1, torch.float16: 2}


# -- protobuf sizes ----------------------------------------------------------


def _varint_size(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def _scalar(number: int, value: int) -> int:
    """A varint field; proto3 leaves out zeros."""
    return 0 if value == 0 else _varint_size(number << 3) + _varint_size(value)


def _blob(number: int, length: int, *, present: bool = False) -> int:
    """A bytes or message field; empty is left out unless set in a oneof or a set message."""
    if length == 0 and not present:
        return 0
    return _varint_size(number << 3) + _varint_size(length) + length


def _message(number: int, body: int) -> int:
    """A kind of the ``Compressed`` oneof: always written, even when empty."""
    return _blob(number, body, present=True)


# -- bit arrays --------------------------------------------------------------


def pack_bits(mask: torch.Tensor) -> bytes:
    """One bit per element of a bool tensor, least significant first, padding bits 0."""
    return np.packbits(mask.numpy(), bitorder="little").tobytes()


def unpack_bits(data: bytes, count: int) -> torch.Tensor:
    """The first ``count`` bits of ``data`` as a bool tensor (zeros past its end)."""
    bits = np.unpackbits(np.frombuffer(data, np.uint8), count=count, bitorder="little")
    return torch.from_numpy(bits.view(bool))


# -- checks ------------------------------------------------------------------


def _fail(kind: str, problem: str) -> MalformedPayload:
    return MalformedPayload(f"malformed {kind} payload: {problem}")


def check_size(kind: str, size: int, expected_size: int) -> None:
    """Refuse a payload for a vector of another length than the receiver's."""
    if size != expected_size:
        raise _fail(
            kind, f"size mismatch: it is for a vector of {size} elements, expected {expected_size}"
        )


def _check_count(kind: str, what: str, count: int, expected: int) -> None:
    if count != expected:
        raise _fail(kind, f"wrong count: {count} {what}, expected {expected}")


def _check_finite(kind: str, what: str, values: torch.Tensor) -> None:
    if values.numel() and not bool(torch.isfinite(values).all()):
        raise _fail(kind, f"non-finite {what} (NaN or infinity)")


def _check_dtype(kind: str, what: str, values: torch.Tensor) -> None:
    if values.dtype not in WIRE_DTYPES or values.dim() != 1:
        raise _fail(kind, f"{what} must be a 1-D float32 or float16 tensor, got {values.dtype}")


def _check_bits(kind: str, what: str, data: bytes, count: int) -> None:
    if len(data) != -(-count // 8):
        problem = "truncated" if len(data) < -(-count // 8) else "too long"
        raise _fail(kind, f"{what} bit array {problem}: {len(data)} bytes for {count} bits")
    if count % 8 and data[-1] >> (count % 8):
        raise _fail(kind, f"{what} bit array has padding bits set after bit {count}")


def check_indices(kind: str, indices: torch.Tensor, size: int) -> None:
    """Refuse indices outside ``[0, size)``, or not strictly increasing."""
    if indices.dtype not in (torch.int32, torch.int64) or indices.dim() != 1:
        raise _fail(kind, f"indices must be a 1-D int32 tensor, got {indices.dtype}")
    if not indices.numel():
        return
    low, high = int(indices.min()), int(indices.max())
    if low < 0 or high >= size:
        bad = low if low < 0 else high
        raise _fail(kind, f"index {bad} out of range for a vector of {size}")
    steps = indices[1:] <= indices[:-1]
    if bool(steps.any()):
        at = int(torch.nonzero(steps)[0]) + 1
        raise _fail(
            kind,
            f"indices not strictly increasing: index {int(indices[at])} at position {at} "
            f"follows {int(indices[at - 1])}",
        )


# -- payloads ----------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _Payload:
    """What every payload has and reports, in bytes.

    Each kind also has ``size``, the length of the vector it stands for (a
    field, or for :class:`Dense` a property).
    """

    kind: ClassVar[str]
    number: ClassVar[int]  # its field in the ``Compressed`` oneof

    @property
    def body_nbytes(self) -> int:
        raise NotImplementedError

    def add_to_(self, vector: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """``vector += alpha * decoded`` in place; returns ``vector``."""
        raise NotImplementedError

    def to_dense(self) -> torch.Tensor:
        """The float32 vector it stands for (a new tensor)."""
        return self.add_to_(torch.zeros(self.size))  # type: ignore[attr-defined]

    def _check_target(self, vector: torch.Tensor) -> None:
        if vector.shape != (self.size,):  # type: ignore[attr-defined]
            raise ValueError(
                f"a {self.kind} payload for {self.size} elements "  # type: ignore[attr-defined]
                f"cannot be added to a tensor of shape {tuple(vector.shape)}"
            )

    @property
    def nbytes(self) -> int:
        """Bytes of its serialized ``Compressed`` message, exactly."""
        return _message(self.number, self.body_nbytes)

    @property
    def raw_nbytes(self) -> int:
        """Bytes of the vector it stands for as float32: ``4 * size``."""
        return 4 * self.size  # type: ignore[attr-defined]

    @property
    def ratio(self) -> float:
        """Compression ratio: ``raw_nbytes / nbytes``."""
        return self.raw_nbytes / self.nbytes


@dataclass(frozen=True, eq=False)
class Dense(_Payload):
    """Every element of the vector, as float32 or float16.

    Example:
        >>> Dense(torch.ones(3)).nbytes  # 12 bytes of values, 6 of framing
        18
    """

    values: torch.Tensor

    kind: ClassVar[str] = "dense"
    number: ClassVar[int] = 1

    @property
    def size(self) -> int:
        return self.values.numel()

    @property
    def body_nbytes(self) -> int:
        itemsize = self.values.element_size()
        return _scalar(1, WIRE_DTYPES[self.values.dtype]) + _blob(2, self.size * itemsize)

    def to_dense(self) -> torch.Tensor:
        return self.values.to(torch.float32, copy=True)

    def add_to_(self, vector: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        self._check_target(vector)
        return vector.add_(self.values, alpha=alpha)

    def check(self, expected_size: int) -> None:
        _check_dtype(self.kind, "values", self.values)
        check_size(self.kind, self.size, expected_size)
        _check_finite(self.kind, "values", self.values)


@dataclass(frozen=True, eq=False)
class CodedIndices:
    """Indices coded by :func:`downpour.compress.code_indices`, with the indices they stand for."""

    data: bytes
    indices: torch.Tensor  # int32, strictly increasing


def _positions(indices: torch.Tensor | CodedIndices) -> torch.Tensor:
    return indices.indices if isinstance(indices, CodedIndices) else indices


def _indices_nbytes(number: int, indices: torch.Tensor | CodedIndices) -> int:
    """The ``Indices`` message: raw int32 (field 1) or deflated varints (field 2)."""
    if isinstance(indices, CodedIndices):
        inner = _blob(2, len(indices.data), present=True)
    else:
        inner = _blob(1, 4 * indices.numel(), present=True)
    return _blob(number, inner, present=True)


@dataclass(frozen=True, eq=False)
class _Indexed(_Payload):
    """A payload of chosen entries at strictly increasing ``indices`` of a vector of ``size``."""

    size: int
    indices: torch.Tensor | CodedIndices

    @property
    def positions(self) -> torch.Tensor:
        """The indices as a tensor, decoded if they are coded."""
        return _positions(self.indices)

    @property
    def nnz(self) -> int:
        return self.positions.numel()

    def _index_add_(self, vector: torch.Tensor, values: torch.Tensor, alpha: float) -> torch.Tensor:
        self._check_target(vector)
        return vector.index_add_(0, self.positions.long(), values.to(vector.dtype), alpha=alpha)

    def _check_indices(self, expected_size: int) -> None:
        check_size(self.kind, self.size, expected_size)
        check_indices(self.kind, self.positions, self.size)


@dataclass(frozen=True, eq=False)
class Sparse(_Indexed):
    """Entries ``values`` at ``indices`` of a vector of ``size``; zero elsewhere.

    Example:
        >>> p = Sparse(4, torch.tensor([1, 3], dtype=torch.int32), torch.tensor([2.0, -1.0]))
        >>> p.to_dense()
        tensor([ 0.,  2.,  0., -1.])
    """

    values: torch.Tensor

    kind: ClassVar[str] = "sparse"
    number: ClassVar[int] = 2

    @property
    def body_nbytes(self) -> int:
        itemsize = self.values.element_size()
        return (
            _scalar(1, self.size)
            + _scalar(2, self.nnz)
            + _scalar(3, WIRE_DTYPES[self.values.dtype])
            + _indices_nbytes(4, self.indices)
            + _blob(5, self.values.numel() * itemsize)
        )

    def add_to_(self, vector: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        return self._index_add_(vector, self.values, alpha)

    def check(self, expected_size: int) -> None:
        _check_dtype(self.kind, "values", self.values)
        self._check_indices(expected_size)
        _check_count(self.kind, "values", self.values.numel(), self.nnz)
        _check_finite(self.kind, "values", self.values)


@dataclass(frozen=True, eq=False)
class Signs(_Indexed):
    """Entries of ``+tau`` or ``-tau`` at ``indices``; ``negative`` is a bit per entry.

    Example:
        >>> negative = pack_bits(torch.tensor([False, True]))
        >>> p = Signs(4, torch.tensor([0, 2], dtype=torch.int32), negative, 2.0)
        >>> p.to_dense()
        tensor([ 2.,  0., -2.,  0.])
    """

    negative: bytes
    tau: float

    kind: ClassVar[str] = "signs"
    number: ClassVar[int] = 3

    @property
    def body_nbytes(self) -> int:
        tau = 5 if self.tau != 0 else 0  # a float (fixed32) field with a 1-byte tag
        return (
            _scalar(1, self.size)
            + _scalar(2, self.nnz)
            + tau
            + _indices_nbytes(4, self.indices)
            + _blob(5, len(self.negative))
        )

    def add_to_(self, vector: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        negative = unpack_bits(self.negative, self.nnz)
        return self._index_add_(vector, torch.where(negative, -self.tau, self.tau), alpha)

    def check(self, expected_size: int) -> None:
        if not (math.isfinite(self.tau) and self.tau > 0):
            raise _fail(self.kind, f"tau must be positive and finite, got {self.tau!r}")
        self._check_indices(expected_size)
        _check_bits(self.kind, "negative", self.negative, self.nnz)


@dataclass(frozen=True, eq=False)
class OneBit(_Payload):
    """One bit per element (1 = non-negative) and two reconstruction values per chunk.

    Element ``i`` decodes to ``positive[i // chunk]`` if its bit is set, else
    to ``negative[i // chunk]``.

    Example:
        >>> p = OneBit(3, 2, pack_bits(torch.tensor([True, False, True])),
        ...            torch.tensor([1.0, 3.0]), torch.tensor([-2.0, 0.0]))
        >>> p.to_dense()
        tensor([ 1., -2.,  3.])
    """

    size: int
    chunk: int
    bits: bytes
    positive: torch.Tensor
    negative: torch.Tensor

    kind: ClassVar[str] = "onebit"
    number: ClassVar[int] = 4

    @property
    def num_chunks(self) -> int:
        return -(-self.size // self.chunk)

    @property
    def body_nbytes(self) -> int:
        scales = self.positive.numel() * self.positive.element_size()
        return (
            _scalar(1, self.size)
            + _scalar(2, self.chunk)
            + _scalar(3, WIRE_DTYPES[self.positive.dtype])
            + _blob(4, len(self.bits))
            + _blob(5, scales)
            + _blob(6, scales)
        )

    def add_to_(self, vector: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        self._check_target(vector)
        return vector.add_(self.to_dense(), alpha=alpha)

    def to_dense(self) -> torch.Tensor:
        # One chunk is the whole vector however long it was declared: a forged chunk of
        # 2**32 - 1 in a 2 KB message must not pad the bits out to 4 GiB.
        width = self.chunk if self.num_chunks > 1 else self.size
        bits = unpack_bits(self.bits, self.num_chunks * width)  # padded with zeros
        rows = bits.view(self.num_chunks, width)
        positive, negative = (s.to(torch.float32)[:, None] for s in (self.positive, self.negative))
        return torch.where(rows, positive, negative).view(-1)[: self.size]

    def check(self, expected_size: int) -> None:
        check_size(self.kind, self.size, expected_size)
        if self.chunk < 1:
            raise _fail(self.kind, f"chunk must be at least 1, got {self.chunk}")
        _check_bits(self.kind, "bits", self.bits, self.size)
        for what, scales in (("positive", self.positive), ("negative", self.negative)):
            _check_dtype(self.kind, what, scales)
            _check_count(self.kind, f"{what} scales", scales.numel(), self.num_chunks)
            _check_finite(self.kind, f"{what} scales", scales)
        if self.positive.dtype != self.negative.dtype:
            raise _fail(self.kind, "positive and negative scales differ in dtype")


Payload = Dense | Sparse | Signs | OneBit
"""Every kind of payload."""

PAYLOADS: tuple[type, ...] = (Dense, Sparse, Signs, OneBit)


def decode(payload: Payload) -> torch.Tensor:
    """The float32 vector a payload stands for (a new tensor; the payload is untouched)."""
    return payload.to_dense()
