"""Seeded synthetic classification problems, dense or sparse.

Labels come from a random linear teacher: ``y = argmax_c <x, w_c>``. For
``classes <= d`` the teacher's columns are orthonormal, so (the Gaussian
being rotation invariant) every class is equally likely. ``noise`` is the
fraction of labels flipped to another class at random, so the best possible
accuracy is ``1 - noise``; ``separable=True`` flips nothing and keeps only
points at least ``margin`` from every decision boundary, which is what lets
a perceptron or a linear SVM reach (near) 100%.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse
import torch

from downpour.data.dataset import Dataset, holdout
from downpour.data.rows import csr_from_scipy
from downpour.errors import check_range

_MAX_ROUNDS = 100


def load_synthetic(
    data_dir: object = None,
    *,
    download: bool = True,
    n: int = 10000,
    d: int = 20,
    classes: int = 2,
    noise: float = 0.1,
    sparse: bool = False,
    density: float = 0.05,
    separable: bool = False,
    margin: float = 0.25,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Dataset:
    """A seeded ``n``-example, ``d``-feature, ``classes``-class problem (``test_fraction`` held out).

    Args:
        data_dir: Unused.
        download: Unused.
        n: Examples in total (train + test), >= 2.
        d: Features, >= 1.
        classes: Classes, >= 2.
        noise: Fraction of labels flipped to a random other class, in [0, 1).
            Ignored when ``separable``.
        sparse: Return CSR inputs with about ``density * d`` nonzeros per row.
        density: Fraction of nonzero features when ``sparse``, in (0, 1].
        separable: Linearly separable labels with a geometric ``margin``.
        margin: Minimum distance to a decision boundary when ``separable``, >= 0.
        test_fraction: Held-out fraction, in (0, 1).
        seed: The same seed (and arguments) give the same data.

    Example:
        >>> data = load_synthetic(n=1000, d=5, separable=True, seed=1)
        >>> data.num_train, data.input_shape, data.num_classes
        (800, (5,), 2)
    """
    check_range("n", n, 2)
    check_range("d", d, 1)
    check_range("classes", classes, 2)
    check_range("noise", noise, 0, 1)
    if noise >= 1:
        raise ValueError(f"noise must be in [0, 1), got {noise!r}")
    check_range("density", density, 0, 1, low_open=True)
    check_range("margin", margin, 0)
    rng = np.random.default_rng(seed)
    teacher = _teacher(d, classes, rng)
    x, y = _sample(n, d, teacher, sparse, density, margin if separable else None, rng)
    if not separable and noise > 0:
        flip = rng.random(n) < noise
        # Adding 1..C-1 modulo C moves a label to a uniformly random other class.
        y[flip] = (y[flip] + rng.integers(1, classes, size=int(flip.sum()))) % classes
    inputs = csr_from_scipy(x) if sparse else torch.from_numpy(x)
    return holdout(
        "synthetic", inputs, torch.from_numpy(y), classes, test_fraction=test_fraction, seed=seed
    )


def _teacher(d: int, classes: int, rng: np.random.Generator) -> np.ndarray:
    weights = rng.standard_normal((d, classes))
    if classes <= d:
        q, _ = np.linalg.qr(weights)
        return q
    return weights / np.linalg.norm(weights, axis=0, keepdims=True)


def _draw(m: int, d: int, sparse: bool, density: float, rng: np.random.Generator):
    if not sparse:
        return rng.standard_normal((m, d)).astype(np.float32)
    return scipy.sparse.random(
        m,
        d,
        density=density,
        format="csr",
        dtype=np.float32,
        random_state=rng,
        data_rvs=lambda k: rng.standard_normal(k),
    )


def _sample(n, d, teacher, sparse, density, margin, rng):
    """Draw inputs, label them by the teacher, and (given a margin) keep only clear points."""
    kept_x, kept_y, count = [], [], 0
    for _ in range(_MAX_ROUNDS):
        x = _draw(max(n, 1024), d, sparse, density, rng)
        logits = np.asarray(x @ teacher)
        y = logits.argmax(axis=1).astype(np.int64)
        if margin is not None:
            keep = _distance_to_boundary(logits, y, teacher) >= max(margin, 1e-6)
            x, y = x[keep], y[keep]
        kept_x.append(x)
        kept_y.append(y)
        count += len(y)
        if count >= n:
            break
    else:
        raise ValueError(
            f"could not draw {n} points with margin {margin}: too few pass; "
            "lower margin or raise density"
        )
    x = scipy.sparse.vstack(kept_x, format="csr") if sparse else np.concatenate(kept_x)
    return x[:n], np.concatenate(kept_y)[:n]


def _distance_to_boundary(logits: np.ndarray, y: np.ndarray, teacher: np.ndarray) -> np.ndarray:
    """Geometric distance from each point to the nearest boundary of its predicted class."""
    gram = teacher.T @ teacher
    diag = np.diag(gram)
    # ||w_a - w_b|| for every pair of classes, from the Gram matrix (no (d, n) temporaries).
    pair_norm = np.sqrt(np.maximum(diag[:, None] + diag[None, :] - 2 * gram, 1e-12))
    winner = logits[np.arange(len(y)), y]
    distance = np.full(len(y), np.inf)
    for c in range(teacher.shape[1]):
        other = y != c
        gap = (winner[other] - logits[other, c]) / pair_norm[y[other], c]
        distance[other] = np.minimum(distance[other], gap)
    return distance
