"""Index coding: gaps as variable-length integers, then a general-purpose entropy coder.

Sorted indices are sent as the first index, then each gap minus one (never
negative, since indices strictly increase). Each number is a LEB128 varint,
protobuf's base-128 integers: 7 bits a byte, so the small gaps of a dense or
clustered index set take one byte instead of four. zlib's deflate (stdlib)
then squeezes what regularity is left. Vectorized with numpy; the decoder
refuses anything malformed and never inflates beyond 5 bytes per index.
"""

from __future__ import annotations

import zlib
from dataclasses import replace

import numpy as np
import torch

from downpour.compress.base import Transform, stage
from downpour.compress.payloads import CodedIndices, MalformedPayload, Signs, Sparse
from downpour.errors import check_range

MAX_VARINT_BYTES = 5
"""A varint of a number below 2**32, as every gap here is, takes at most 5 bytes."""


def leb128(values: np.ndarray) -> np.ndarray:
    """Non-negative integers below 2**32 as concatenated LEB128 varints (uint8)."""
    values = values.astype(np.uint64)
    lengths = np.ones(values.size, np.int64)
    for shift in range(7, 7 * MAX_VARINT_BYTES, 7):
        lengths += values >= (1 << shift)
    owner = np.repeat(np.arange(values.size), lengths)
    place = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    out = ((values[owner] >> (7 * place).astype(np.uint64)) & 0x7F).astype(np.uint8)
    out[place < lengths[owner] - 1] |= 0x80  # continuation bit on all but each last byte
    return out


def unleb128(data: np.ndarray, count: int) -> np.ndarray:
    """Exactly ``count`` LEB128 varints from ``data`` (uint8) as uint64, else MalformedPayload."""
    if data.size and data[-1] & 0x80:
        raise MalformedPayload("malformed coded indices: truncated, the last varint does not end")
    ends = np.flatnonzero(data < 0x80)
    if ends.size != count:
        raise MalformedPayload(
            f"malformed coded indices: wrong count: {ends.size} varints, expected {count}"
        )
    if not count:
        return np.zeros(0, np.uint64)
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if int(lengths.max()) > MAX_VARINT_BYTES:
        raise MalformedPayload(
            f"malformed coded indices: a varint longer than {MAX_VARINT_BYTES} bytes"
        )
    place = np.arange(data.size) - np.repeat(starts, lengths)
    parts = (data & 0x7F).astype(np.uint64) << (7 * place).astype(np.uint64)
    values = np.add.reduceat(parts, starts)
    if int(values.max()) >= 1 << 32:
        raise MalformedPayload("malformed coded indices: a gap of 2**32 or more")
    return values


def code_indices(indices: torch.Tensor, level: int = 6) -> CodedIndices:
    """Strictly increasing non-negative indices, coded as gaps, varints and deflate.

    Example:
        >>> coded = code_indices(torch.arange(1000, 2000, dtype=torch.int32))
        >>> len(coded.data)  # instead of 4000 bytes of int32
        18
        >>> torch.equal(decode_indices(coded.data, 1000, 2000), coded.indices)
        True
    """
    array = indices.numpy().astype(np.int64)
    gaps = np.diff(array, prepend=-1) - 1
    if gaps.size and (gaps.min() < 0 or gaps.max() >= 1 << 32):
        raise ValueError(
            "indices to code must be non-negative, below 2**31 and strictly increasing"
        )
    data = zlib.compress(leb128(gaps).tobytes(), level)
    return CodedIndices(data, indices.to(torch.int32))


def decode_indices(data: bytes, count: int, size: int) -> torch.Tensor:
    """The ``count`` int32 indices ``data`` codes, all below ``size``; MalformedPayload if not."""
    inflater = zlib.decompressobj()
    limit = MAX_VARINT_BYTES * count
    try:
        varints = inflater.decompress(data, limit + 1)  # one byte over: too long shows
    except zlib.error as error:
        raise MalformedPayload(f"malformed coded indices: not a zlib stream ({error})") from None
    if len(varints) > limit:
        raise MalformedPayload(
            f"malformed coded indices: they inflate to more than {limit} bytes for {count} indices"
        )
    if not inflater.eof:
        raise MalformedPayload("malformed coded indices: truncated zlib stream")
    if inflater.unused_data:
        raise MalformedPayload("malformed coded indices: bytes after the end of the zlib stream")
    gaps = unleb128(np.frombuffer(varints, np.uint8), count)
    indices = np.cumsum(gaps.astype(np.int64) + 1) - 1
    if count and indices[-1] >= size:
        raise MalformedPayload(
            f"malformed coded indices: index {int(indices[-1])} out of range for a vector of {size}"
        )
    return torch.from_numpy(indices.astype(np.int32))


def entropy(level: int = 6) -> Transform:
    """Code the indices of a sparse payload (top-k, threshold) with :func:`code_indices`.

    Args:
        level: zlib's compression level, 1 (fastest) to 9 (smallest).

    Example:
        >>> from downpour.compress import chain, threshold
        >>> c = chain(threshold(1.0), entropy())
        >>> x = torch.tensor([0.0, 2.0, 2.0, 2.0])
        >>> payload, _ = c.encode(x, c.init(x))
        >>> payload.positions
        tensor([1, 2, 3], dtype=torch.int32)
    """
    check_range("entropy level", level, 1, 9)

    def code(p):
        if isinstance(p.indices, CodedIndices):
            return p
        return replace(p, indices=code_indices(p.indices, level))

    return stage(f"entropy:level={level}", {Sparse: Sparse, Signs: Signs}, code)
