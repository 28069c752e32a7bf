"""partition(): disjointness, coverage, balance and skew of each scheme."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from downpour.data import partition

labels_and_workers = st.integers(1, 400).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(0, 9), min_size=n, max_size=n).map(np.array),
        st.integers(1, n),
        st.integers(0, 2**32 - 1),
    )
)


def _check_disjoint(parts, n):
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined)
    assert joined.size == 0 or (joined.min() >= 0 and joined.max() < n)
    assert all(p.dtype == np.int64 for p in parts)


@settings(max_examples=60, deadline=None)
@given(labels_and_workers)
def test_iid_covers_everything_evenly(case):
    labels, workers, seed = case
    parts = partition(labels, workers, "iid", seed=seed)
    assert len(parts) == workers
    _check_disjoint(parts, len(labels))
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(labels)))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


@settings(max_examples=60, deadline=None)
@given(labels_and_workers, st.floats(0.01, 100.0))
def test_dirichlet_covers_everything_and_no_worker_is_empty(case, alpha):
    labels, workers, seed = case
    parts = partition(labels, workers, "dirichlet", alpha=alpha, seed=seed)
    assert len(parts) == workers
    _check_disjoint(parts, len(labels))
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(labels)))
    assert all(len(p) > 0 for p in parts)


def test_seed_determines_partition():
    labels = np.arange(1000) % 10
    for scheme in ("iid", "label", "dirichlet"):
        a = partition(labels, 4, scheme, seed=1)
        b = partition(labels, 4, scheme, seed=1)
        c = partition(labels, 4, scheme, seed=2)
        assert all(np.array_equal(x, y) for x, y in zip(a, b))
        assert not all(np.array_equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize(("workers", "k"), [(5, 2), (10, 2), (3, 4), (7, 3), (10, 1)])
def test_label_scheme_gives_each_worker_k_classes(workers, k):
    labels = np.repeat(np.arange(10), 100)
    parts = partition(labels, workers, "label", labels_per_worker=k, seed=3)
    _check_disjoint(parts, len(labels))
    for part in parts:
        assert len(np.unique(labels[part])) == k
    if workers * k >= 10:
        assert sum(len(p) for p in parts) == len(labels)


def test_small_alpha_is_skewed_and_large_alpha_is_not():
    labels = np.repeat(np.arange(10), 500)

    def mean_classes(alpha):
        parts = partition(labels, 10, "dirichlet", alpha=alpha, seed=0)
        # Classes holding at least 5% of a worker's examples.
        counts = [np.bincount(labels[p], minlength=10) / len(p) for p in parts]
        return np.mean([(c > 0.05).sum() for c in counts])

    assert mean_classes(0.05) < 3 and mean_classes(100.0) > 9


def test_accepts_torch_labels():
    parts = partition(torch.arange(10) % 3, 2)
    assert [len(p) for p in parts] == [5, 5]


def test_bad_arguments_name_the_argument():
    labels = np.arange(10) % 2
    with pytest.raises(ValueError, match=r"num_workers must be in \[1, 10\], got 11"):
        partition(labels, 11)
    with pytest.raises(ValueError, match="num_workers"):
        partition(labels, 0)
    with pytest.raises(ValueError, match="unknown partition scheme 'shards'; choose one of"):
        partition(labels, 2, "shards")
    with pytest.raises(ValueError, match=r"labels_per_worker must be in \[1, 2\], got 3"):
        partition(labels, 2, "label", labels_per_worker=3)
    with pytest.raises(ValueError, match=r"alpha must be in \(0, inf\], got 0"):
        partition(labels, 2, "dirichlet", alpha=0)
    with pytest.raises(ValueError, match="1-D integer"):
        partition(np.zeros((2, 2), dtype=int), 1)
    with pytest.raises(TypeError, match="num_workers must be an int"):
        partition(labels, 2.0)
