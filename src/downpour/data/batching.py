"""Mini-batches over in-memory tensors, dense or sparse CSR, or over a streamed dataset.

In memory there is no DataLoader: the whole (worker's) dataset is already a
tensor, so an epoch is one permutation and one gather per batch, with no
worker processes and no per-example Python calls. A streamed dataset is read
through a DataLoader with the same seeded order (:func:`epoch`, :func:`stream`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import torch

from downpour.data.rows import take_rows
from downpour.data.streamed import iterate, loader
from downpour.errors import check_range


def batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    *,
    generator: torch.Generator | None = None,
    shuffle: bool = True,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of ``(x_batch, y_batch)`` pairs; every example appears once.

    Args:
        x: Inputs, dense ``(N, ...)`` or sparse CSR ``(N, d)``.
        y: Labels ``(N,)``.
        batch_size: Examples per batch, at least 1.
        generator: Source of the shuffle; pass a seeded one for reproducible epochs.
        shuffle: Visit examples in a random order (else in order).
        drop_last: Skip the final batch when it is smaller than ``batch_size``.

    Yields:
        Batches with the layout of ``x`` (CSR batches for CSR input).

    Example:
        >>> x, y = torch.randn(10, 3), torch.arange(10)
        >>> [len(yb) for _, yb in batches(x, y, 4)]
        [4, 4, 2]
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise TypeError(f"batch_size must be an int, got {batch_size!r}")
    check_range("batch_size", batch_size, 1)
    n = int(y.shape[0])
    if x.shape[0] != n:
        raise ValueError(f"x has {x.shape[0]} rows but y has {n} labels")
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        index = order[start : start + batch_size]
        if shuffle or x.layout == torch.sparse_csr:
            yield take_rows(x, index), y[index]
        else:
            # In-order dense batches are views: no copy at all.
            yield x[start : start + batch_size], y[start : start + batch_size]


def epoch(data: Any, batch_size: int, *, generator: torch.Generator | None = None,
          pin_memory: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One shuffled pass over a dataset's training part, held in memory or streamed.

    An in-memory :class:`~downpour.data.Dataset` is batched here; a
    :class:`~downpour.data.streamed.StreamedDataset` is read through a DataLoader
    (its ``loader_workers``), in the order the same ``generator`` gives in memory.

    Example:
        >>> from downpour.data import load
        >>> data = load("synthetic", n=100, d=2, seed=0)
        >>> sum(len(y) for _, y in epoch(data, 32)) == data.num_train
        True
    """
    if not data.streamed:
        return batches(data.x_train, data.y_train, batch_size, generator=generator)
    generator = generator if generator is not None else torch.Generator()
    return iterate(loader(data, batch_size, generator, passes=1, pin_memory=pin_memory))


def stream(data: Any, batch_size: int, *, generator: torch.Generator, skip: int = 0,
           pin_memory: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless passes over a dataset's training part, reshuffled each pass, ``skip`` batches in.

    The same batches in the same order whether ``data`` is held in memory or
    streamed (and, streamed, whatever its ``loader_workers``).
    """
    if data.streamed:
        return iterate(loader(data, batch_size, generator, skip=skip, pin_memory=pin_memory))
    passes = _memory_passes(data, batch_size, generator)
    return itertools.islice(passes, skip, None) if skip else passes


def _memory_passes(data: Any, batch_size: int,
                   generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:
        yield from batches(data.x_train, data.y_train, batch_size, generator=generator)
