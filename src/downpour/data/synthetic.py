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


# Reuters RCV1 (Lewis et al., JMLR 2004) as the SGD literature uses it (CCAT vs the rest):
# 781,265 training and 23,149 test documents over 47,236 tf-idf features, about 76 per document.
RCV1_SHAPE = {"n_train": 781_265, "n_test": 23_149, "features": 47_236, "nonzeros": 76}


def load_rcv1_like(
    data_dir: object = None,
    *,
    download: bool = True,
    n_train: int = RCV1_SHAPE["n_train"],
    n_test: int = RCV1_SHAPE["n_test"],
    features: int = RCV1_SHAPE["features"],
    nonzeros: int = RCV1_SHAPE["nonzeros"],
    zipf: float = 1.1,
    topic: float = 0.04,
    noise: float = 0.03,
    seed: int = 0,
) -> Dataset:
    """A seeded sparse binary problem with RCV1's shape, built CSR from the start (never dense).

    Documents draw words by a Zipf law over the features (rank r with weight
    ``r^-zipf``), about ``nonzeros`` distinct words each (log-normal lengths).
    A share ``topic`` of a document's words come from its class's own topic
    vocabulary instead (a thousand words, Zipf-weighted too, drawn from the
    most frequent fifth), as a category shows in its terms; ``noise`` of the
    labels are then flipped. A value is ``(1 + log count) * idf`` of its word,
    each row scaled to unit length, as RCV1's tf-idf vectors are. The classes
    are balanced. With the defaults a linear SVM's test error is in RCV1's
    range (scikit-learn's ``SGDClassifier``: about 6%, see benchmarks/sparse_linear.py).

    Example:
        >>> data = load_rcv1_like(n_train=2000, n_test=500, features=3000, seed=1)
        >>> data.sparse, data.input_shape, round(data.x_train.values().numel() / 2000)
        (True, (3000,), 74)
    """
    for name, value in (("n_train", n_train), ("n_test", n_test), ("features", features),
                        ("nonzeros", nonzeros)):
        check_range(name, value, 1)
    if not 0 <= noise < 0.5:
        raise ValueError(f"noise must be in [0, 0.5), got {noise!r}")
    if not 0 <= topic <= 1:
        raise ValueError(f"topic must be in [0, 1], got {topic!r}")
    rng = np.random.default_rng(seed)
    background = np.arange(1, features + 1, dtype=np.float64) ** -zipf
    background /= background.sum()
    common = max(2, features // 5)
    vocabulary = min(1000, common // 2)
    words = rng.permutation(common)
    topics = []
    for c in range(2):
        mix = np.zeros(features)
        chosen = words[c * vocabulary : (c + 1) * vocabulary]
        mix[chosen] = np.arange(1, len(chosen) + 1, dtype=np.float64) ** -zipf
        topics.append((1 - topic) * background + topic * mix / mix.sum())
    # idf from the mixture every document draws from, as a corpus's document frequencies give it.
    idf = np.log(2.0 / (topics[0] + topics[1])).astype(np.float32)
    draws = _words_per_distinct(topics[0], nonzeros, rng)
    total = n_train + n_test
    y = rng.permutation(np.arange(total) % 2)
    parts = []
    for start in range(0, total, _CHUNK_ROWS):
        labels = y[start : start + _CHUNK_ROWS]
        parts.append(_documents(labels, topics, idf, draws, nonzeros, rng))
    x = scipy.sparse.vstack(parts, format="csr")
    flip = rng.random(total) < noise
    y = np.where(flip, 1 - y, y).astype(np.int64)
    train, test = x[:n_train], x[n_train:]
    return Dataset("rcv1-like", csr_from_scipy(train), torch.from_numpy(y[:n_train]),
                   csr_from_scipy(test), torch.from_numpy(y[n_train:]), 2)


_CHUNK_ROWS = 100_000  # documents drawn at a time: the word draws of a chunk are its scratch


def _words_per_distinct(probability: np.ndarray, nonzeros: int, rng: np.random.Generator) -> float:
    """Word draws per document that give ``nonzeros`` distinct words on average, found on a sample."""
    ratio = 1.5
    for _ in range(4):
        draws = max(1, round(ratio * nonzeros))
        sample = rng.choice(len(probability), size=(200, draws), p=probability)
        distinct = np.mean([len(np.unique(row)) for row in sample])
        ratio *= nonzeros / max(distinct, 1.0)
    return ratio


def _documents(labels: np.ndarray, topics: list[np.ndarray], idf: np.ndarray, words: float,
               nonzeros: int, rng: np.random.Generator) -> scipy.sparse.csr_matrix:
    count, features = len(labels), len(idf)
    lengths = np.maximum(1, np.round(rng.lognormal(np.log(words * nonzeros) - 0.125, 0.5, count)))
    lengths = lengths.astype(np.int64)
    rows = np.repeat(np.arange(count), lengths)
    tokens = np.empty(len(rows), dtype=np.int64)
    of_class = labels[rows]
    for c, probability in enumerate(topics):
        mine = of_class == c
        tokens[mine] = rng.choice(features, size=int(mine.sum()), p=probability)
    counts = scipy.sparse.csr_matrix((np.ones(len(tokens), np.float32), (rows, tokens)),
                                     shape=(count, features))
    counts.sum_duplicates()
    counts.data = (1.0 + np.log(counts.data)) * idf[counts.indices]
    norms = np.sqrt(np.asarray(counts.multiply(counts).sum(axis=1)).ravel())
    counts = scipy.sparse.diags((1.0 / np.maximum(norms, 1e-12)).astype(np.float32)) @ counts
    counts = counts.tocsr().astype(np.float32)
    counts.sort_indices()
    return counts
