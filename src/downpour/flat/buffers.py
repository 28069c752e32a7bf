"""A module's buffers (BatchNorm running statistics and counts, any registered buffer) as raw bytes.

Buffers travel beside the flat parameter vector: in their own dtypes, in the
module's ``named_buffers()`` order, little-endian, with no pickle. The
receiver knows their shapes from its own copy of the model.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn


def has_buffers(module: nn.Module) -> bool:
    """Whether ``module`` registers any buffer."""
    return next(module.buffers(), None) is not None


def encode_buffers(module: nn.Module) -> bytes:
    """Every buffer of ``module``, end to end, as raw little-endian bytes.

    Example:
        >>> len(encode_buffers(nn.BatchNorm1d(3)))  # mean, var (float32) and the count (int64)
        32
    """
    parts = []
    for buffer in module.buffers():
        array = buffer.detach().cpu().contiguous().numpy()
        parts.append(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
    return b"".join(parts)


def decode_buffers_(module: nn.Module, payload: bytes) -> None:
    """Copy buffers encoded by :func:`encode_buffers` into ``module``'s own, in place."""
    offset = 0
    for name, buffer in module.named_buffers():
        size = buffer.numel() * buffer.element_size()
        if offset + size > len(payload):
            raise ValueError(f"buffer payload of {len(payload)} bytes ends before buffer {name!r}")
        dtype = np.dtype(torch.empty(0, dtype=buffer.dtype).numpy().dtype).newbyteorder("<")
        array = np.frombuffer(payload, dtype=dtype, count=buffer.numel(), offset=offset)
        buffer.copy_(torch.from_numpy(array.copy()).view(buffer.shape))
        offset += size
    if offset != len(payload):
        raise ValueError(f"buffer payload has {len(payload)} bytes, the model's buffers {offset}")


@torch.no_grad()
def combine_buffers_(module: nn.Module, payloads: Sequence[bytes]) -> None:
    """Load the replicas' buffers combined: floating-point ones averaged, counters summed.

    Running statistics of replicas that train the same model on shards of the
    same data estimate the same quantities, so their mean is the estimate;
    a counter (``num_batches_tracked``) counts the batches all of them saw.
    """
    if not payloads:
        return
    replicas = []
    for payload in payloads:
        decode_buffers_(module, payload)
        replicas.append([b.clone() for b in module.buffers()])
    for i, buffer in enumerate(module.buffers()):
        stacked = torch.stack([replica[i] for replica in replicas])
        buffer.copy_(stacked.mean(0) if buffer.is_floating_point() else stacked.sum(0))
