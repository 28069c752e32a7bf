"""Split a training set among workers: IID, by label, or Dirichlet label skew.

Partitioning needs only the labels, so every worker can compute the same
split from the same seed and then materialize only its own part.
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import torch

from downpour.errors import check_range, choose

logger = logging.getLogger(__name__)

Scheme = Literal["iid", "label", "dirichlet"]
SCHEMES: tuple[str, ...] = ("iid", "label", "dirichlet")


def partition(
    labels: np.ndarray | torch.Tensor,
    num_workers: int,
    scheme: Scheme = "iid",
    *,
    labels_per_worker: int = 2,
    alpha: float = 0.5,
    seed: int = 0,
) -> list[np.ndarray]:
    """Disjoint index arrays, one per worker.

    Schemes:
        ``"iid"``: a seeded shuffle cut into ``num_workers`` parts whose sizes
        differ by at most one; covers every example.

        ``"label"``: pathological label skew (McMahan et al., 2017, "Communication-
        Efficient Learning of Deep Networks from Decentralized Data"). Classes are
        shuffled and dealt round-robin, ``labels_per_worker`` to each worker; a
        class dealt to m workers is split evenly among them. Every worker sees
        exactly ``labels_per_worker`` classes (given at least m examples of
        each class). If ``num_workers *
        labels_per_worker`` is below the number of classes, the classes never
        dealt are left out (and a warning is logged).

        ``"dirichlet"``: each class is split among workers in proportions drawn
        from Dir(alpha) (Hsu et al., 2019, "Measuring the Effects of Non-Identical
        Data Distribution for Federated Visual Classification"); small alpha means
        strong skew. Covers every example, and every worker gets at least one
        (a worker left empty takes one example from the largest part).

    Args:
        labels: Class index per example, shape ``(N,)``.
        num_workers: Number of parts, in [1, N].
        scheme: One of ``"iid"``, ``"label"``, ``"dirichlet"``.
        labels_per_worker: Classes per worker for ``"label"``, in [1, num classes].
        alpha: Dirichlet concentration for ``"dirichlet"``, > 0.
        seed: Seed of the split; the same seed gives the same parts.

    Returns:
        ``num_workers`` sorted int64 arrays of example indices.

    Example:
        >>> parts = partition(np.arange(10) % 2, 3)
        >>> [len(p) for p in parts]
        [4, 3, 3]
    """
    y = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got {y.dtype} of shape {y.shape}")
    choose("partition scheme", scheme, SCHEMES)
    if isinstance(num_workers, bool) or not isinstance(num_workers, int):
        raise TypeError(f"num_workers must be an int, got {num_workers!r}")
    check_range("num_workers", num_workers, 1, max(len(y), 1))
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = np.array_split(rng.permutation(len(y)), num_workers)
    elif scheme == "label":
        parts = _by_label(y, num_workers, labels_per_worker, rng)
    else:
        check_range("alpha", alpha, 0, None, low_open=True)
        parts = _dirichlet(y, num_workers, alpha, rng)
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _by_label(
    y: np.ndarray, num_workers: int, k: int, rng: np.random.Generator
) -> list[np.ndarray]:
    classes = np.unique(y)
    check_range("labels_per_worker", k, 1, len(classes))
    order = rng.permutation(classes)
    dealt = [[order[(w * k + j) % len(classes)] for j in range(k)] for w in range(num_workers)]
    if num_workers * k < len(classes):
        logger.warning(
            "label partition: %d workers x %d labels cover only %d of %d classes",
            num_workers,
            k,
            num_workers * k,
            len(classes),
        )
    holders: dict[int, list[int]] = {}
    for worker, owned in enumerate(dealt):
        for c in owned:
            holders.setdefault(int(c), []).append(worker)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_workers)]
    for c, workers in holders.items():
        members = rng.permutation(np.flatnonzero(y == c))
        for worker, piece in zip(workers, np.array_split(members, len(workers))):
            parts[worker].append(piece)
    return [np.concatenate(p) if p else np.zeros(0, np.int64) for p in parts]


def _dirichlet(
    y: np.ndarray, num_workers: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    parts: list[list[np.ndarray]] = [[] for _ in range(num_workers)]
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        shares = rng.dirichlet(np.full(num_workers, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
        for worker, piece in enumerate(np.split(members, cuts)):
            parts[worker].append(piece)
    merged = [np.concatenate(p) for p in parts]
    # Dir(alpha) with small alpha often gives a worker nothing; an empty worker
    # cannot take a step, so move single examples from the largest part.
    for worker in range(num_workers):
        if len(merged[worker]) == 0:
            largest = max(range(num_workers), key=lambda w: len(merged[w]))
            merged[worker] = merged[largest][-1:]
            merged[largest] = merged[largest][:-1]
    return merged
