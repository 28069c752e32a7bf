"""Sparsifiers: only some entries are sent, with their indices."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from downpour.compress.base import Transform, as_payload, stage
from downpour.compress.payloads import Dense, Signs, Sparse, pack_bits
from downpour.errors import check_range

_MAX_INDEXED = 2**31  # indices travel as int32


def _check_indexable(name: str, size: int) -> None:
    if size > _MAX_INDEXED:
        raise ValueError(
            f"{name} indexes with int32: a vector of {size} elements is too long; "
            f"shard it into pieces of at most {_MAX_INDEXED}"
        )


def num_kept(ratio: float, size: int) -> int:
    """Entries top-k keeps of ``size``: ``max(1, ceil(ratio * size))``, at most ``size``.

    ``ratio * size`` is rounded to 6 decimals first, so float noise does not
    add an entry (``0.07 * 100`` is ``7.000000000000001`` in binary).
    """
    return min(size, max(1, math.ceil(round(ratio * size, 6))))


def topk(ratio: float) -> Transform:
    """Top-k sparsification (Aji & Heafield 2017; Lin et al. 2018, "Deep Gradient Compression").

    Keeps exactly the ``k = max(1, ceil(ratio * n))`` entries of largest
    magnitude (ties broken arbitrarily), with their int32 indices in
    increasing order. Biased per step: use it under :func:`error_feedback`
    (``parse("topk:0.01")`` does).

    Args:
        ratio: fraction of entries kept, in (0, 1].

    Example:
        >>> c = topk(0.5)
        >>> payload, _ = c.encode(torch.tensor([0.5, -2.0, 1.0, 0.0]), c.init(torch.zeros(4)))
        >>> payload.indices, payload.values
        (tensor([1, 2], dtype=torch.int32), tensor([-2.,  1.]))
    """
    if not math.isfinite(ratio):
        raise ValueError(f"topk ratio must be a finite number in (0, 1], got {ratio!r}")
    check_range("topk ratio", ratio, 0, 1, low_open=True)
    ratio = float(ratio)

    def select(p: Dense) -> Sparse:
        _check_indexable("topk", p.size)
        k = num_kept(ratio, p.size)
        # numpy's introselect is several times faster than torch.topk on CPU.
        magnitudes = p.values.abs().numpy()
        top = np.argpartition(magnitudes, p.size - k)[p.size - k :] if k else np.zeros(0, np.intp)
        chosen = torch.from_numpy(np.sort(top)).long()
        return Sparse(p.size, chosen.to(torch.int32), p.values[chosen])

    return stage(f"topk:ratio={ratio!r}", {Dense: Sparse}, select)


class ThresholdState(NamedTuple):
    residual: torch.Tensor  # float64: inputs summed, minus every +-tau sent


def threshold(tau: float) -> Transform:
    """Threshold quantization with residuals (Strom, Interspeech 2015).

    The residual accumulates the inputs; each element whose residual reaches
    ``|r| >= tau`` is sent as its index and a sign bit and counts as ``+tau``
    or ``-tau``, which is taken off its residual; everything else waits. One
    quantum per element per step, as in the paper. The residual is part of
    the scheme, so the compressor needs no :func:`error_feedback`.

    What was sent plus the residual equals the sum of the inputs, exactly
    when every float64 addition is exact: ``tau`` is rounded to float32 once
    (it travels as one), the residual is float64, and float32 inputs on a
    common grid (multiples of some 2**-e, sums below 2**(53 - e)) never
    round. Other inputs drift from the exact sum by float64 rounding only.

    Args:
        tau: the quantum, positive; set it from the gradients' scale.

    Example:
        >>> c = threshold(2.0)
        >>> x = torch.tensor([1.5, -2.5, 0.0])
        >>> payload, state = c.encode(x, c.init(x))
        >>> payload.to_dense(), state.residual
        (tensor([ 0., -2.,  0.]), tensor([ 1.5000, -0.5000,  0.0000], dtype=torch.float64))
    """
    tau = float(np.float32(tau)) if math.isfinite(tau) else tau
    if not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"threshold tau must be positive and finite as a float32, got {tau!r}")

    def init(x: torch.Tensor) -> ThresholdState:
        _check_indexable("threshold", x.numel())
        return ThresholdState(torch.zeros(x.numel(), dtype=torch.float64))

    def encode(x, state: ThresholdState) -> tuple[Signs, ThresholdState]:
        dense = as_payload(x)
        if not isinstance(dense, Dense):
            raise TypeError(f"threshold takes the vector, got a {type(dense).__name__} payload")
        residual = torch.add(state.residual, dense.values)  # float64, cast on the fly
        chosen = torch.nonzero(residual.abs() >= tau).view(-1)
        negative = residual[chosen] < 0
        residual[chosen] -= torch.where(negative, -tau, tau).double()
        payload = Signs(residual.numel(), chosen.to(torch.int32), pack_bits(negative), tau)
        return payload, ThresholdState(residual)

    return Transform(f"threshold:tau={tau!r}", init, encode, {Dense: Signs}, feedback=True)
