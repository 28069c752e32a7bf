"""CIFAR-10 from tiny tarballs written in the binary and python formats."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from downpour.data import load
from downpour.data.download import RemoteFile
from downpour.data.vision import FILES, read_cifar_binary, read_cifar_python
from downpour.errors import DataError

BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
PER_BATCH = 4


def _batches(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {
        name: (
            rng.integers(0, 256, (PER_BATCH, 3072), dtype=np.uint8),
            rng.integers(0, 10, PER_BATCH).astype(np.int64),
        )
        for name in BATCHES
    }


def _tarball(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


def _binary_tarball(path: Path, batches) -> Path:
    members = {}
    for name, (data, labels) in batches.items():
        records = np.concatenate([labels.astype(np.uint8)[:, None], data], axis=1)
        members[f"cifar-10-batches-bin/{name}.bin"] = records.tobytes()
    members["cifar-10-batches-bin/batches.meta.txt"] = b"airplane\n"
    return _tarball(path, members)


class _Python2Pickler(pickle._Pickler):
    """Writes bytes the way Python 2 wrote str (BINSTRING), as in the real CIFAR files."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def _py2_pickle(obj) -> bytes:
    buffer = io.BytesIO()
    _Python2Pickler(buffer, protocol=2).dump(obj)
    # Python 2's numpy lived at numpy.core; numpy 2 names numpy._core.
    return buffer.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")


def _python_tarball(path: Path, batches, *, py2: bool = True) -> Path:
    members = {}
    for name, (data, labels) in batches.items():
        batch = {b"batch_label": name.encode(), b"labels": labels.tolist(), b"data": data}
        members[f"cifar-10-batches-py/{name}"] = (
            _py2_pickle(batch) if py2 else pickle.dumps(batch, protocol=4)
        )
    return _tarball(path, members)


def _expected(batches):
    train = [batches[n] for n in BATCHES[:5]]
    x = np.concatenate([d for d, _ in train]).reshape(-1, 3, 32, 32)
    return x, np.concatenate([y for _, y in train])


def _register(monkeypatch, role: str, path: Path) -> None:
    digest = hashlib.md5(path.read_bytes()).hexdigest()
    files = dict(FILES["cifar10"])
    files[role] = RemoteFile(name=path.name, md5=digest)
    monkeypatch.setitem(FILES, "cifar10", files)


def test_binary_format(tmp_path):
    batches = _batches()
    x_train, y_train, x_test, y_test = read_cifar_binary(
        _binary_tarball(tmp_path / "b.tar.gz", batches)
    )
    ex, ey = _expected(batches)
    np.testing.assert_array_equal(x_train, ex)
    np.testing.assert_array_equal(y_train, ey)
    np.testing.assert_array_equal(x_test, batches["test_batch"][0].reshape(-1, 3, 32, 32))
    np.testing.assert_array_equal(y_test, batches["test_batch"][1])


@pytest.mark.parametrize("py2", [True, False])
def test_python_format_matches_binary(tmp_path, py2):
    batches = _batches(1)
    ours = read_cifar_python(_python_tarball(tmp_path / "p.tar.gz", batches, py2=py2))
    theirs = read_cifar_binary(_binary_tarball(tmp_path / "b.tar.gz", batches))
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(a, b)


def test_load_cifar10_binary_through_registry(tmp_path, monkeypatch):
    folder = tmp_path / "cifar10"
    folder.mkdir()
    batches = _batches(2)
    path = _binary_tarball(folder / "cifar-10-binary.tar.gz", batches)
    _register(monkeypatch, "binary", path)
    data = load("cifar10", data_dir=tmp_path, download=False)
    assert data.x_train.shape == (5 * PER_BATCH, 3, 32, 32) and data.x_test.shape == (
        PER_BATCH,
        3,
        32,
        32,
    )
    assert data.num_classes == 10 and data.x_train.dtype == torch.float32
    ex, ey = _expected(batches)
    assert data.y_train.tolist() == ey.tolist()
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
    expected = (torch.from_numpy(ex).float() / 255 - mean) / std
    assert torch.allclose(data.x_train, expected, atol=1e-5)


def test_load_cifar10_python_through_registry(tmp_path, monkeypatch):
    folder = tmp_path / "cifar10"
    folder.mkdir()
    batches = _batches(3)
    _register(monkeypatch, "python", _python_tarball(folder / "cifar-10-python.tar.gz", batches))
    data = load("cifar10", data_dir=tmp_path, download=False)
    assert data.y_test.tolist() == batches["test_batch"][1].tolist()


def test_missing_cifar_names_path(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "cifar10" / "cifar-10-binary.tar.gz")):
        load("cifar10", data_dir=tmp_path, download=False)


class _Evil:
    def __reduce__(self):
        return (os.getcwd, ())


def test_python_format_refuses_other_globals(tmp_path):
    evil = pickle.dumps({b"data": _Evil(), b"labels": []}, protocol=4)
    members = {f"cifar-10-batches-py/{n}": evil for n in BATCHES}
    path = _tarball(tmp_path / "evil.tar.gz", members)
    with pytest.raises(DataError, match=r"refusing to load global (posix|os)\.getcwd"):
        read_cifar_python(path)


def test_binary_format_errors(tmp_path):
    members = {f"cifar-10-batches-bin/{n}.bin": bytes(3073 * 2) for n in BATCHES[:-1]}
    with pytest.raises(DataError, match="missing members test_batch.bin"):
        read_cifar_binary(_tarball(tmp_path / "a.tar.gz", members))
    members["cifar-10-batches-bin/test_batch.bin"] = bytes(3073 + 5)
    with pytest.raises(DataError, match="not a multiple of 3073"):
        read_cifar_binary(_tarball(tmp_path / "b.tar.gz", members))
    members["cifar-10-batches-bin/test_batch.bin"] = bytes([10]) + bytes(3072)
    with pytest.raises(DataError, match="label 10"):
        read_cifar_binary(_tarball(tmp_path / "c.tar.gz", members))
    (tmp_path / "d.tar.gz").write_bytes(b"garbage")
    with pytest.raises(DataError, match="not a readable"):
        read_cifar_binary(tmp_path / "d.tar.gz")
