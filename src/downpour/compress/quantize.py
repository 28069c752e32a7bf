"""Quantizers: every element is sent, with fewer bits each."""

from __future__ import annotations

from dataclasses import replace

import torch

from downpour.compress.base import Transform, stage
from downpour.compress.payloads import Dense, OneBit, Sparse, pack_bits
from downpour.errors import check_range

_FP16_MAX = float(torch.finfo(torch.float16).max)


def none() -> Transform:
    """No compression: the vector as float32 (a copy, so the payload owns it).

    Example:
        >>> c = none()
        >>> c.encode(torch.ones(2), c.init(torch.ones(2)))[0].nbytes  # 8 of values, 6 of framing
        14
    """
    return stage("none", {Dense: Dense}, lambda p: Dense(p.values.to(torch.float32, copy=True)))


def _half(values: torch.Tensor) -> torch.Tensor:
    # Clamped, not overflowed to infinity (which the receiver would refuse);
    # under error feedback the clipped part is sent later.
    return values.clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16)


def fp16() -> Transform:
    """Values as float16: of the vector, of a sparse payload, or one-bit scales.

    Example:
        >>> c = fp16()
        >>> c.encode(torch.tensor([1.0, -0.1]), c.init(torch.zeros(2)))[0].values
        tensor([ 1.0000, -0.1000], dtype=torch.float16)
    """

    def halve(p):
        if isinstance(p, OneBit):
            return replace(p, positive=_half(p.positive), negative=_half(p.negative))
        return replace(p, values=_half(p.values))

    return stage("fp16", {Dense: Dense, Sparse: Sparse, OneBit: OneBit}, halve)


def onebit(chunk: int = 512) -> Transform:
    """1-bit SGD (Seide et al., Interspeech 2014): the sign of each element.

    Each chunk of ``chunk`` consecutive elements (Seide's columns) gets two
    reconstruction values, the means of its non-negative and of its negative
    elements, so the decoded chunk keeps its sum. Biased per step: use it
    under :func:`error_feedback` (``parse("onebit")`` does). With the default
    chunk a float32 vector shrinks about 28 times.

    Args:
        chunk: elements per chunk; two float32 scales (8 bytes) each.

    Example:
        >>> c = onebit(chunk=2)
        >>> x = torch.tensor([1.0, 3.0, -1.0, 2.0])
        >>> payload, _ = c.encode(x, c.init(x))
        >>> payload.to_dense()
        tensor([ 2.,  2., -1.,  2.])
    """
    check_range("onebit chunk", chunk, 1, 2**32 - 1)

    def quantize(p: Dense) -> OneBit:
        x = p.values.to(torch.float32)
        size = x.numel()
        num_chunks = -(-size // chunk)
        padding = num_chunks * chunk - size
        rows = torch.nn.functional.pad(x, (0, padding)) if padding else x.reshape(-1)
        rows = rows.view(num_chunks, chunk)
        nonnegative = rows >= 0  # the padding zeros count here; taken off below
        positive_sum = torch.where(nonnegative, rows, 0.0).sum(1)
        negative_sum = rows.sum(1) - positive_sum
        positive_count = nonnegative.sum(1)
        negative_count = chunk - positive_count
        if padding:
            positive_count[-1] -= padding
        return OneBit(
            size,
            chunk,
            pack_bits(nonnegative.view(-1)[:size]),
            positive_sum / positive_count.clamp(min=1),
            negative_sum / negative_count.clamp(min=1),
        )

    return stage(f"onebit:chunk={chunk}", {Dense: OneBit}, quantize)
