"""Sparse (index, value) updates of a flat vector."""

from __future__ import annotations

from typing import NamedTuple

import torch

# An index costs 4 bytes (int32) and a value 4 (float32) on the wire.
_SPARSE_BYTES_PER_ENTRY = 8
_DENSE_BYTES_PER_ENTRY = 4


class SparseUpdate(NamedTuple):
    """Entries ``values`` at positions ``indices`` of a vector of length ``size``."""

    indices: torch.Tensor  # int64, strictly increasing
    values: torch.Tensor  # float32
    size: int

    def to_dense(self) -> torch.Tensor:
        dense = torch.zeros(self.size, dtype=self.values.dtype)
        dense[self.indices] = self.values
        return dense

    @property
    def nnz(self) -> int:
        return int(self.indices.numel())


def sparsify(vector: torch.Tensor, *, force: bool = False) -> SparseUpdate | None:
    """The nonzero entries of ``vector`` as a SparseUpdate, or None when dense is smaller.

    A sparse entry costs twice a dense one (index and value), so sparse pays
    off only below 50% density; ``force=True`` returns it regardless.
    """
    flat = vector.reshape(-1)
    indices = torch.nonzero(flat, as_tuple=False).reshape(-1)
    if not force and indices.numel() * _SPARSE_BYTES_PER_ENTRY >= flat.numel() * _DENSE_BYTES_PER_ENTRY:
        return None
    return SparseUpdate(indices, flat[indices].clone(), flat.numel())


def apply_sparse_(vector: torch.Tensor, update: SparseUpdate, alpha: float = 1.0) -> torch.Tensor:
    """``vector[update.indices] += alpha * update.values`` in place; returns ``vector``."""
    if update.size != vector.numel():
        raise ValueError(f"sparse update is for a vector of {update.size}, got {vector.numel()}")
    if update.nnz:
        if int(update.indices.min()) < 0 or int(update.indices.max()) >= update.size:
            raise ValueError("sparse update has an index outside the vector")
        vector.index_add_(0, update.indices, update.values, alpha=alpha)
    return vector
