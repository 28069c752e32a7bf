"""Streamed datasets: from_torch, partitions from labels alone, batches, and bad input."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import TensorDataset

from downpour.data import Dataset, epoch, from_torch, partition, stream
from downpour.errors import DataError


class Counted(TorchDataset):
    """Items (x, label) that count how often an input is read, with no ``targets``."""

    def __init__(self, n: int, classes: int = 3) -> None:
        self.x = torch.arange(n * 2, dtype=torch.float32).reshape(n, 2)
        self.y = [i % classes for i in range(n)]
        self.reads = 0

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        self.reads += 1
        return self.x[i], self.y[i]


class WithTargets(Counted):
    """The same, with a ``targets`` attribute (as torchvision's datasets have)."""

    @property
    def targets(self) -> list[int]:
        return self.y


def test_labels_come_from_targets_without_reading_inputs():
    train = WithTargets(30)
    data = from_torch(train, WithTargets(6))
    # Only the first two items are read, for the input shape; the labels are the attribute.
    assert train.reads == 2
    assert data.num_classes == 3 and data.input_shape == (2,) and data.num_train == 30
    assert data.labels.tolist() == train.y


def test_labels_from_one_pass_or_given():
    train = Counted(12)
    data = from_torch(train, Counted(3))
    assert data.labels.tolist() == train.y and train.reads == 2 + 12
    given = Counted(12)
    data = from_torch(given, Counted(3), labels=np.array(given.y), num_classes=5)
    assert given.reads == 2 and data.num_classes == 5


@pytest.mark.parametrize("scheme", ["iid", "label", "dirichlet"])
def test_shards_are_the_partition_of_the_labels(scheme):
    train = WithTargets(60, classes=4)
    data = from_torch(train, WithTargets(4, classes=4))
    parts = partition(np.array(train.y), 3, scheme, seed=5)
    shards = [data.shard(r, 3, scheme, seed=5) for r in range(3)]
    for shard, part in zip(shards, parts):
        assert shard.rows.tolist() == part.tolist()
        assert shard.train_only().test is None
    if scheme != "dirichlet":
        assert sorted(np.concatenate([s.rows for s in shards]).tolist()) == list(range(60))


def test_streamed_batches_are_the_in_memory_batches():
    x, y = torch.randn(50, 3), torch.arange(50) % 4
    memory = Dataset("m", x, y, x[:5], y[:5], 4).shard(1, 2, seed=3)
    streamed = from_torch(TensorDataset(x, y), TensorDataset(x[:5], y[:5])).shard(1, 2, seed=3)
    for loader_workers in (0, 2):
        part = replace(streamed, loader_workers=loader_workers)
        a = stream(memory, 4, generator=torch.Generator().manual_seed(9), skip=3)
        b = stream(part, 4, generator=torch.Generator().manual_seed(9), skip=3)
        for _ in range(20):  # more than one pass, skipping into the first
            (xa, ya), (xb, yb) = next(a), next(b)
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
        del b  # stops the loader's worker processes
    one = list(epoch(streamed, 7, generator=torch.Generator().manual_seed(1)))
    assert sum(len(yb) for _, yb in one) == streamed.num_train


def test_regression_targets_have_no_classes():
    train = TensorDataset(torch.randn(20, 4), torch.randn(20))
    data = from_torch(train, train)
    assert data.num_classes is None and data.labels is None and data.num_outputs == 1
    assert data.shard(0, 2).num_train == 10
    with pytest.raises(ValueError, match="needs class labels"):
        data.shard(0, 2, "label")
    with pytest.raises(ValueError, match="not class indices"):
        from_torch(train, train, num_classes=3)
    _, yb = next(epoch(data, 8))
    assert yb.dtype == torch.float32


class Single(TorchDataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        return torch.zeros(2)


class Ragged(TorchDataset):
    def __init__(self, start: int = 0) -> None:
        self.start = start

    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int):
        return torch.zeros(3 + (i >= self.start) * (i % 2)), 0


def test_items_that_are_not_pairs():
    with pytest.raises(DataError, match=r"training item 0 is a Tensor; each item must be an "
                                        r"\(input, target\) pair"):
        from_torch(Single(), Single())


def test_inputs_of_varying_shape_need_a_collate():
    with pytest.raises(DataError, match=r"training item 1 has input shape \(4,\).*varying shape"
                                        r".*pass collate="):
        from_torch(Ragged(), Ragged())
    # Found only in a batch (the first items agree): the batch names it.
    late = from_torch(Ragged(start=4), Ragged(start=4), num_classes=1)
    with pytest.raises(DataError, match="inputs of varying shape in one batch"):
        list(epoch(late, 6))

    def pad(items):
        x = torch.nn.utils.rnn.pad_sequence([item[0] for item in items], batch_first=True)
        return x, torch.tensor([item[1] for item in items])

    padded = from_torch(Ragged(), Ragged(), collate=pad, num_classes=1)
    assert next(epoch(padded, 6))[0].shape == (6, 4)


def test_labels_outside_the_classes():
    x = torch.randn(6, 2)
    with pytest.raises(DataError, match=r"training label 7 is outside \[0, 3\)"):
        from_torch(TensorDataset(x, torch.tensor([0, 1, 2, 7, 0, 1])), TensorDataset(x, x[:, 0]),
                   num_classes=3)
    with pytest.raises(DataError, match=r"training label -1 is outside"):
        from_torch(TensorDataset(x, torch.tensor([0, 1, 2, -1, 0, 1])), TensorDataset(x, x[:, 0]))
    # A test label out of range is found when its batch is read.
    data = from_torch(TensorDataset(x, torch.tensor([0, 1, 2, 0, 1, 2])),
                      TensorDataset(x, torch.tensor([0, 1, 9, 0, 1, 2])))
    from downpour.data.streamed import eval_batches

    with pytest.raises(DataError, match=r"a label 9 is outside \[0, 3\)"):
        list(eval_batches(data, 6))


def test_empty_sets_and_bad_arguments():
    x = torch.randn(4, 2)
    full = TensorDataset(x, torch.tensor([0, 1, 0, 1]))
    with pytest.raises(DataError, match="the test set is empty"):
        from_torch(full, TensorDataset(x[:0], torch.tensor([], dtype=torch.int64)))
    with pytest.raises(TypeError, match="map-style torch Dataset"):
        from_torch(iter([(x[0], 0)]), full)
    with pytest.raises(ValueError, match="loader_workers must be in"):
        from_torch(full, full, loader_workers=-1)


def test_multi_hot_integer_targets_are_not_classes():
    train = TensorDataset(torch.randn(10, 3), torch.randint(0, 2, (10, 4)))
    data = from_torch(train, train)
    assert data.num_classes is None and data.num_outputs == 4 and data.target_shape == (4,)
    _, yb = next(epoch(data, 5))
    assert yb.dtype == torch.float32 and yb.shape == (5, 4)
