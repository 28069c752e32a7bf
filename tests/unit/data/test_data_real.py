"""Loaders against the real files in shared/data: checksums, shapes, class counts."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from downpour.data import load
from downpour.data.svmlight import W8A
from downpour.data.vision import FILES, read_idx
from downpour.errors import DataError

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


@pytest.mark.parametrize("dataset", ["mnist", "fashion-mnist"])
def test_shared_files_match_published_checksums(shared_data, dataset):
    for remote in FILES[dataset].values():
        blob = (shared_data / dataset / remote.name).read_bytes()
        assert len(blob) == remote.size
        assert hashlib.sha256(blob).hexdigest() == remote.sha256
        assert hashlib.md5(blob).hexdigest() == remote.md5


def test_mnist_shapes_counts_and_standardization(mnist):
    assert mnist.x_train.shape == (60000, 1, 28, 28)
    assert mnist.x_test.shape == (10000, 1, 28, 28)
    assert mnist.x_train.dtype == torch.float32 and mnist.y_train.dtype == torch.int64
    assert mnist.input_shape == (1, 28, 28) and mnist.num_classes == 10 and not mnist.sparse
    assert torch.bincount(mnist.y_train).tolist() == MNIST_TRAIN_COUNTS
    # Standardized with the usual statistics: the training set has mean ~0, std ~1.
    assert abs(float(mnist.x_train.mean())) < 1e-3
    assert abs(float(mnist.x_train.std()) - 1.0) < 1e-3
    zero = (0 - 0.1307) / 0.3081
    assert float(mnist.x_train.min()) == pytest.approx(zero, abs=1e-5)


def test_fashion_mnist_is_balanced(shared_data):
    data = load("fashion-mnist", data_dir=shared_data, download=False)
    assert data.x_train.shape == (60000, 1, 28, 28) and data.x_test.shape == (10000, 1, 28, 28)
    assert torch.bincount(data.y_train).tolist() == [6000] * 10
    assert torch.bincount(data.y_test).tolist() == [1000] * 10
    assert abs(float(data.x_train.mean())) < 1e-2


def test_w8a_shape_and_labels(shared_data):
    blob = (shared_data / "w8a" / "w8a").read_bytes()
    assert hashlib.sha256(blob).hexdigest() == W8A.sha256
    data = load("w8a", data_dir=shared_data, download=False)
    assert data.sparse and data.x_train.layout == torch.sparse_csr
    assert data.input_shape == (300,) and data.num_classes == 2
    assert data.num_train + len(data.y_test) == 49749
    assert int(data.y_train.sum() + data.y_test.sum()) == 1479
    nnz = data.x_train.values().numel() + data.x_test.values().numel()
    assert nnz == 579586
    # Stratified 20% holdout keeps the positive rate in both splits.
    assert len(data.y_test) == pytest.approx(0.2 * 49749, abs=2)
    assert float(data.y_test.float().mean()) == pytest.approx(1479 / 49749, abs=1e-3)
    again = load("w8a", data_dir=shared_data, download=False)
    assert torch.equal(again.y_test, data.y_test)


def test_digits_offline():
    data = load("digits", seed=1)
    assert data.input_shape == (1, 8, 8) and data.num_classes == 10
    assert data.num_train + len(data.y_test) == 1797
    assert 0.0 <= float(data.x_train.min()) and float(data.x_train.max()) <= 1.0
    assert len(data.y_test) == pytest.approx(0.2 * 1797, abs=10)


def _write_gz(path: Path, payload: bytes) -> Path:
    path.write_bytes(gzip.compress(payload))
    return path


def test_read_idx_rejects_bad_magic(tmp_path):
    path = _write_gz(tmp_path / "x.gz", b"\0\0\x08\x01" + (3).to_bytes(4, "big") + b"abc")
    with pytest.raises(DataError, match=r"x\.gz.*magic"):
        read_idx(path, 3)


def test_read_idx_rejects_wrong_size(tmp_path):
    header = b"\0\0\x08\x03" + b"".join(n.to_bytes(4, "big") for n in (2, 2, 2))
    assert read_idx(_write_gz(tmp_path / "ok.gz", header + bytes(8)), 3).shape == (2, 2, 2)
    with pytest.raises(DataError, match=r"short\.gz.*needs 24"):
        read_idx(_write_gz(tmp_path / "short.gz", header + bytes(7)), 3)


def test_read_idx_rejects_truncated_gzip(tmp_path):
    blob = gzip.compress(b"\0\0\x08\x01" + (1000).to_bytes(4, "big") + bytes(1000))
    path = tmp_path / "cut.gz"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match=r"cut\.gz"):
        read_idx(path, 1)
    path.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"cut\.gz"):
        read_idx(path, 1)


def test_idx_labels_must_match_images(tmp_path, monkeypatch):
    folder = tmp_path / "mnist"
    folder.mkdir()
    images = b"\0\0\x08\x03" + b"".join(n.to_bytes(4, "big") for n in (3, 28, 28)) + bytes(3 * 784)
    labels = b"\0\0\x08\x01" + (2).to_bytes(4, "big") + bytes([1, 2])
    remotes = {}
    for role, payload in [
        ("train_images", images),
        ("train_labels", labels),
        ("test_images", images),
        ("test_labels", labels),
    ]:
        blob = gzip.compress(payload)
        (folder / f"{role}.gz").write_bytes(blob)
        remotes[role] = type(FILES["mnist"][role])(
            name=f"{role}.gz", size=len(blob), sha256=hashlib.sha256(blob).hexdigest()
        )
    monkeypatch.setitem(FILES, "mnist", remotes)
    with pytest.raises(DataError, match="3 images but .* 2 labels"):
        load("mnist", data_dir=tmp_path, download=False)


def test_labels_are_int64_class_indices(mnist):
    assert set(np.unique(mnist.y_test.numpy())) == set(range(10))
