"""Image datasets: MNIST, Fashion-MNIST, CIFAR-10 and scikit-learn's digits.

MNIST-style files are IDX (big-endian header, then raw uint8) and CIFAR-10
ships as a tarball of fixed-size binary records or of pickled numpy arrays.
All are decoded with ``np.frombuffer`` over whole files, never per image.
"""

from __future__ import annotations

import gzip
import io
import pickle
import tarfile
import zlib
from pathlib import Path

import numpy as np
import torch

from downpour.data.dataset import Dataset, holdout
from downpour.data.download import RemoteFile, fetch
from downpour.errors import DataError

# Published files per dataset, keyed by role. Module-level so a test (or a
# user with a re-packed copy) can substitute files with other digests.
FILES: dict[str, dict[str, RemoteFile]] = {
    "mnist": {
        "train_images": RemoteFile(
            name="train-images-idx3-ubyte.gz",
            size=9912422,
            sha256="440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            md5="f68b3c2dcbeaaa9fbdd348bbdeb94873",
        ),
        "train_labels": RemoteFile(
            name="train-labels-idx1-ubyte.gz",
            size=28881,
            sha256="3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            md5="d53e105ee54ea40749a09fcbcd1e9432",
        ),
        "test_images": RemoteFile(
            name="t10k-images-idx3-ubyte.gz",
            size=1648877,
            sha256="8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            md5="9fb629c4189551a2d022fa330f9573f3",
        ),
        "test_labels": RemoteFile(
            name="t10k-labels-idx1-ubyte.gz",
            size=4542,
            sha256="f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
            md5="ec29112dd5afa0611ce80d1b7f02629c",
        ),
    },
    "fashion-mnist": {
        "train_images": RemoteFile(
            name="train-images-idx3-ubyte.gz",
            size=26421880,
            sha256="3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
            md5="8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        ),
        "train_labels": RemoteFile(
            name="train-labels-idx1-ubyte.gz",
            size=29515,
            sha256="a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
            md5="25c81989df183df01b3e8a0aad5dffbe",
        ),
        "test_images": RemoteFile(
            name="t10k-images-idx3-ubyte.gz",
            size=4422102,
            sha256="346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
            md5="bef4ecab320f06d8554ea6380940ec79",
        ),
        "test_labels": RemoteFile(
            name="t10k-labels-idx1-ubyte.gz",
            size=5148,
            sha256="67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
            md5="bb300cfdad3c16e7a12a480ee83cd310",
        ),
    },
    # Only MD5 is published for CIFAR-10 (on its home page).
    "cifar10": {
        "binary": RemoteFile(name="cifar-10-binary.tar.gz", md5="c32a1d4ab5d03f1284b67883e8d87530"),
        "python": RemoteFile(name="cifar-10-python.tar.gz", md5="c58f30108f718f92721af3b95e74349a"),
    },
}

# The usual per-channel statistics of each training set, after scaling to [0, 1].
_MNIST_STATS = ((0.1307,), (0.3081,))
_FASHION_STATS = ((0.2860,), (0.3530,))
_CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))

_IDX_UBYTE = 0x08
_CIFAR_RECORD = 1 + 3 * 32 * 32
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Decode a gzip'd IDX file of uint8 with ``ndim`` dimensions.

    Raises:
        DataError: Not gzip, truncated, wrong magic number or wrong size; names the file.
    """
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"{path}: not a readable gzip file ({error})") from error
    header = 4 + 4 * ndim
    if len(raw) < header or raw[:2] != b"\0\0" or raw[2] != _IDX_UBYTE or raw[3] != ndim:
        raise DataError(
            f"{path}: bad IDX magic number {raw[:4].hex() or '(empty)'}, "
            f"expected 000008{ndim:02x} (uint8, {ndim} dimensions)"
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, 4))
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise DataError(f"{path}: {len(raw)} bytes, but its IDX header {dims} needs {expected}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def standardize(
    pixels: np.ndarray, stats: tuple[tuple[float, ...], tuple[float, ...]]
) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` to float32 ``(pixels / 255 - mean) / std`` per channel."""
    x = torch.from_numpy(pixels.astype(np.float32))
    mean = torch.tensor(stats[0], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(stats[1], dtype=torch.float32).view(1, -1, 1, 1)
    return x.mul_(1.0 / (255.0 * std)).sub_(mean / std)


def _load_idx_dataset(
    name: str, stats, data_dir: Path, *, download: bool, mirror: str | None
) -> Dataset:
    folder = data_dir / name
    paths = {
        role: fetch(name, remote, folder, download=download, mirror=mirror)
        for role, remote in FILES[name].items()
    }
    splits = []
    for split in ("train", "test"):
        images = read_idx(paths[f"{split}_images"], 3)
        labels = read_idx(paths[f"{split}_labels"], 1)
        if len(images) != len(labels):
            raise DataError(
                f"{paths[f'{split}_images']} holds {len(images)} images but "
                f"{paths[f'{split}_labels']} {len(labels)} labels"
            )
        if labels.size and labels.max() > 9:
            raise DataError(f"{paths[f'{split}_labels']}: label {labels.max()} outside 0..9")
        splits += [standardize(images[:, None], stats), torch.from_numpy(labels.astype(np.int64))]
    return Dataset(name, *splits, num_classes=10)


def load_mnist(data_dir: Path, *, download: bool = True, mirror: str | None = None) -> Dataset:
    """MNIST (LeCun et al., 1998): 60,000 + 10,000 digits as float32 ``(N, 1, 28, 28)``.

    Pixels are scaled to [0, 1] and standardized with mean 0.1307, std 0.3081.
    Files live in ``<data_dir>/mnist/``.

    Example:
        >>> data = load_mnist(resolve_data_dir())  # doctest: +SKIP
    """
    return _load_idx_dataset("mnist", _MNIST_STATS, data_dir, download=download, mirror=mirror)


def load_fashion_mnist(
    data_dir: Path, *, download: bool = True, mirror: str | None = None
) -> Dataset:
    """Fashion-MNIST (Xiao et al., 2017), laid out like MNIST; mean 0.2860, std 0.3530.

    Files live in ``<data_dir>/fashion-mnist/``.
    """
    return _load_idx_dataset(
        "fashion-mnist", _FASHION_STATS, data_dir, download=download, mirror=mirror
    )


def load_cifar10(data_dir: Path, *, download: bool = True, mirror: str | None = None) -> Dataset:
    """CIFAR-10 (Krizhevsky, 2009): 50,000 + 10,000 float32 ``(N, 3, 32, 32)`` images.

    Reads ``<data_dir>/cifar10/cifar-10-binary.tar.gz`` or, failing that,
    ``cifar-10-python.tar.gz``; downloads the binary one when neither exists.
    Standardized per channel with the training set's mean and std.
    """
    folder = data_dir / "cifar10"
    binary, python = FILES["cifar10"]["binary"], FILES["cifar10"]["python"]
    if (folder / python.name).is_file() and not (folder / binary.name).is_file():
        arrays = read_cifar_python(fetch("cifar10", python, folder, download=False))
    else:
        arrays = read_cifar_binary(
            fetch("cifar10", binary, folder, download=download, mirror=mirror)
        )
    x_train, y_train, x_test, y_test = arrays
    return Dataset(
        "cifar10",
        standardize(x_train, _CIFAR10_STATS),
        torch.from_numpy(y_train),
        standardize(x_test, _CIFAR10_STATS),
        torch.from_numpy(y_test),
        num_classes=10,
    )


def _tar_members(path: Path, names: tuple[str, ...]) -> dict[str, bytes]:
    """The bytes of the members whose base names are ``names`` (all required)."""
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile() and base in names:
                    found[base] = tar.extractfile(member).read()
    except (OSError, EOFError, tarfile.TarError, zlib.error) as error:
        raise DataError(f"{path}: not a readable .tar.gz ({error})") from error
    missing = [n for n in names if n not in found]
    if missing:
        raise DataError(f"{path}: missing members {', '.join(missing)}")
    return found


def _stack(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def read_cifar_binary(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Decode ``cifar-10-binary.tar.gz``: records of 1 label byte + 3072 CHW pixel bytes.

    Returns:
        ``x_train`` uint8 ``(N, 3, 32, 32)``, ``y_train`` int64, ``x_test``, ``y_test``.
    """
    members = _tar_members(path, tuple(f"{n}.bin" for n in (*_CIFAR_TRAIN, "test_batch")))

    def decode(name: str) -> tuple[np.ndarray, np.ndarray]:
        raw = members[f"{name}.bin"]
        if len(raw) % _CIFAR_RECORD:
            raise DataError(
                f"{path}: {name}.bin has {len(raw)} bytes, not a multiple of {_CIFAR_RECORD}"
            )
        records = np.frombuffer(raw, np.uint8).reshape(-1, _CIFAR_RECORD)
        labels = records[:, 0].astype(np.int64)
        if labels.size and labels.max() > 9:
            raise DataError(f"{path}: {name}.bin has label {labels.max()} outside 0..9")
        return records[:, 1:].reshape(-1, 3, 32, 32), labels

    return (*_stack([decode(n) for n in _CIFAR_TRAIN]), *decode("test_batch"))


def _allowed_pickle_globals() -> dict[tuple[str, str], object]:
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR-10's python batches that can build numpy arrays and nothing else.

    A pickle is a program: an ordinary ``pickle.load`` on a downloaded file
    runs whatever callables the file names (``os.system`` included). The
    CIFAR batches need only plain dicts, lists, bytes, str and int (built by
    opcodes, no lookup) and numpy's array reconstruction, so ``find_class``
    refuses every other global and a tampered file fails instead of running.
    """

    _allowed = _allowed_pickle_globals()

    def find_class(self, module: str, name: str) -> object:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}") from None


def read_cifar_python(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Decode ``cifar-10-python.tar.gz`` (pickled dicts) with a restricted unpickler.

    Returns:
        ``x_train`` uint8 ``(N, 3, 32, 32)``, ``y_train`` int64, ``x_test``, ``y_test``.
    """
    members = _tar_members(path, (*_CIFAR_TRAIN, "test_batch"))

    def decode(name: str) -> tuple[np.ndarray, np.ndarray]:
        try:
            batch = _ArrayUnpickler(io.BytesIO(members[name]), encoding="bytes").load()
            data = np.asarray(batch.get(b"data", batch.get("data")), dtype=np.uint8)
            labels = np.asarray(batch.get(b"labels", batch.get("labels")), dtype=np.int64)
        except Exception as error:  # any malformed pickle: report the file, not the opcode
            raise DataError(f"{path}: cannot decode member {name}: {error}") from error
        if data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (len(data),):
            raise DataError(
                f"{path}: member {name} holds data {data.shape} and labels {labels.shape}"
            )
        if labels.size and (labels.min() < 0 or labels.max() > 9):
            raise DataError(f"{path}: member {name} has labels outside 0..9")
        return data.reshape(-1, 3, 32, 32), labels

    return (*_stack([decode(n) for n in _CIFAR_TRAIN]), *decode("test_batch"))


def load_digits(
    data_dir: Path, *, download: bool = True, test_fraction: float = 0.2, seed: int = 0
) -> Dataset:
    """scikit-learn's 8x8 digits (1,797 images, 10 classes) as float32 ``(N, 1, 8, 8)`` in [0, 1].

    Ships inside scikit-learn, so it needs no files and no network;
    ``data_dir`` and ``download`` are ignored. A seeded, stratified
    ``test_fraction`` is held out.
    """
    from sklearn.datasets import load_digits as sklearn_digits

    x, y = sklearn_digits(return_X_y=True)
    images = torch.from_numpy((x / 16.0).astype(np.float32).reshape(-1, 1, 8, 8))
    labels = torch.from_numpy(y.astype(np.int64))
    return holdout("digits", images, labels, 10, test_fraction=test_fraction, seed=seed)
