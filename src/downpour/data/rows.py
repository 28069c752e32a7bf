"""Row selection that works the same on dense tensors and sparse CSR matrices.

torch (2.13) has no ``index_select`` for the sparse CSR layout, and going
through COO costs a sort per batch. Selecting rows of a CSR matrix is a
gather over its three arrays, done here with numpy in O(rows + nnz): about
0.1 ms for a 128-row batch of w8a.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse
import torch


def is_csr(x: torch.Tensor) -> bool:
    """Whether ``x`` uses the sparse CSR layout."""
    return x.layout == torch.sparse_csr


def csr_tensor(
    crow: np.ndarray, col: np.ndarray, values: np.ndarray, shape: tuple[int, int]
) -> torch.Tensor:
    """A float32 torch CSR tensor from numpy arrays (int64 indices)."""
    with warnings.catch_warnings():
        # torch warns once per process that CSR is "beta"; it is what we need.
        warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
        return torch.sparse_csr_tensor(
            torch.from_numpy(np.ascontiguousarray(crow, dtype=np.int64)),
            torch.from_numpy(np.ascontiguousarray(col, dtype=np.int64)),
            torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)),
            size=tuple(int(s) for s in shape),
            check_invariants=False,
        )


def csr_from_scipy(matrix: scipy.sparse.spmatrix | scipy.sparse.sparray) -> torch.Tensor:
    """A float32 torch CSR tensor with the contents of a scipy sparse matrix."""
    csr = scipy.sparse.csr_matrix(matrix)
    csr.sum_duplicates()
    csr.sort_indices()
    return csr_tensor(csr.indptr, csr.indices, csr.data, csr.shape)


def take_rows(x: torch.Tensor, indices: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Rows ``indices`` of ``x`` (dense, or sparse CSR), in that order, as a new tensor.

    Example:
        >>> take_rows(torch.arange(6.0).reshape(3, 2), np.array([2, 0])).tolist()
        [[4.0, 5.0], [0.0, 1.0]]
    """
    if not is_csr(x):
        return x[torch.as_tensor(indices, dtype=torch.int64)]
    index = torch.as_tensor(indices, dtype=torch.int64).numpy()
    if index.size and (index.min() < 0 or index.max() >= x.shape[0]):
        raise IndexError(
            f"row indices must be in [0, {x.shape[0]}), got {index.min()}..{index.max()}"
        )
    crow = x.crow_indices().numpy()
    starts = crow[index]
    lengths = crow[index + 1] - starts
    out_crow = np.zeros(len(index) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out_crow[1:])
    # Position of each kept nonzero in the source arrays: its row's start plus
    # its offset within the row, built without a Python loop over rows.
    positions = np.repeat(starts - out_crow[:-1], lengths) + np.arange(out_crow[-1])
    return csr_tensor(
        out_crow,
        x.col_indices().numpy()[positions],
        x.values().numpy()[positions],
        (len(index), x.shape[1]),
    )
