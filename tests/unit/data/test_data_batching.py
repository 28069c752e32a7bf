"""batches(), Dataset.subset() and Dataset.shard() over dense and CSR inputs."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse
import torch

from downpour.data import Dataset, batches, partition
from downpour.data.rows import csr_from_scipy, take_rows


def _csr(n: int, d: int, seed: int = 0) -> torch.Tensor:
    matrix = scipy.sparse.random(
        n, d, density=0.2, format="csr", random_state=seed, dtype=np.float32
    )
    matrix = matrix.tolil()
    matrix[3] = 0  # an empty row
    matrix = matrix.tocsr()
    return csr_from_scipy(matrix)


def _dataset(sparse: bool, n: int = 53) -> Dataset:
    x = _csr(n, 11) if sparse else torch.randn(n, 2, 3)
    y = torch.arange(n) % 4
    x_test = _csr(5, 11, seed=1) if sparse else torch.randn(5, 2, 3)
    return Dataset("t", x, y, x_test, torch.arange(5) % 4, 4)


def _dense(x: torch.Tensor) -> torch.Tensor:
    return x.to_dense() if x.layout == torch.sparse_csr else x


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("shuffle", [False, True])
def test_each_example_once_per_epoch(sparse, shuffle):
    data = _dataset(sparse)
    # Labels here are row ids so we can check which rows came out.
    ids = torch.arange(data.num_train)
    seen_x, seen_y, sizes = [], [], []
    for xb, yb in batches(
        data.x_train, ids, 8, shuffle=shuffle, generator=torch.Generator().manual_seed(0)
    ):
        assert xb.layout == data.x_train.layout
        seen_x.append(_dense(xb))
        seen_y.append(yb)
        sizes.append(len(yb))
    order = torch.cat(seen_y)
    assert sorted(order.tolist()) == list(range(data.num_train))
    assert sizes == [8] * 6 + [5]
    assert torch.equal(torch.cat(seen_x), _dense(data.x_train)[order])
    assert (order.tolist() == list(range(data.num_train))) != shuffle


def test_drop_last_and_generator_reproducibility():
    x, y = torch.randn(10, 3), torch.arange(10)
    assert [len(yb) for _, yb in batches(x, y, 4, drop_last=True)] == [4, 4]
    first = [yb for _, yb in batches(x, y, 4, generator=torch.Generator().manual_seed(7))]
    again = [yb for _, yb in batches(x, y, 4, generator=torch.Generator().manual_seed(7))]
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_batches_bad_arguments():
    x, y = torch.randn(10, 3), torch.arange(10)
    with pytest.raises(ValueError, match=r"batch_size must be in \[1, inf\], got 0"):
        next(batches(x, y, 0))
    with pytest.raises(TypeError, match="batch_size must be an int"):
        next(batches(x, y, 2.5))
    with pytest.raises(ValueError, match="9 labels"):
        next(batches(x, y[:9], 2))


def test_take_rows_csr_matches_dense():
    x = _csr(40, 9)
    index = np.array([3, 0, 39, 3, 17])
    assert torch.equal(take_rows(x, index).to_dense(), x.to_dense()[index])
    assert take_rows(x, np.array([], dtype=np.int64)).shape == (0, 9)
    with pytest.raises(IndexError):
        take_rows(x, np.array([40]))


@pytest.mark.parametrize("sparse", [False, True])
def test_subset_and_shard(sparse):
    data = _dataset(sparse)
    part = data.subset(np.array([5, 1, 2]))
    assert part.num_train == 3 and part.y_train.tolist() == [1, 1, 2]
    assert torch.equal(_dense(part.x_train), _dense(data.x_train)[[5, 1, 2]])
    assert part.x_test is data.x_test and part.sparse == sparse
    shards = [data.shard(r, 3, seed=1) for r in range(3)]
    expected = partition(data.y_train, 3, seed=1)
    for shard, index in zip(shards, expected):
        assert torch.equal(shard.y_train, data.y_train[index])
        assert torch.equal(_dense(shard.x_train), _dense(data.x_train)[index])
    assert sum(s.num_train for s in shards) == data.num_train
    label_shard = data.shard(0, 2, "label", labels_per_worker=2)
    assert len(label_shard.y_train.unique()) == 2
    assert data.shard(1, 2, "dirichlet", alpha=0.1).num_train > 0
    with pytest.raises(ValueError, match="rank"):
        data.shard(3, 3)
    with pytest.raises(ValueError, match="indices"):
        data.subset(np.array([data.num_train]))


def test_dataset_properties_and_validation():
    data = _dataset(False)
    assert data.input_shape == (2, 3) and not data.sparse and data.num_train == 53
    sparse = _dataset(True)
    assert sparse.input_shape == (11,) and sparse.sparse
    with pytest.raises(TypeError, match="int64"):
        Dataset("t", torch.zeros(2, 1), torch.zeros(2), torch.zeros(1, 1), torch.zeros(1).long(), 2)
    with pytest.raises(ValueError, match=r"outside \[0, 2\)"):
        Dataset(
            "t", torch.zeros(2, 1), torch.tensor([0, 2]), torch.zeros(1, 1), torch.tensor([0]), 2
        )
    with pytest.raises(ValueError, match="rows"):
        Dataset(
            "t", torch.zeros(3, 1), torch.tensor([0, 1]), torch.zeros(1, 1), torch.tensor([0]), 2
        )
    with pytest.raises(ValueError, match="differ"):
        Dataset(
            "t", torch.zeros(2, 1), torch.tensor([0, 1]), torch.zeros(1, 2), torch.tensor([0]), 2
        )
