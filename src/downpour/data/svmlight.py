"""Sparse datasets in svmlight / LIBSVM text format, including w8a.

Parsing is scikit-learn's (``load_svmlight_file``, compiled). Its errors do
not say where the problem is, so only when it fails do we re-read the file
line by line to find the first line that breaks the format, and report that
line number.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from downpour.data.dataset import Dataset, holdout
from downpour.data.download import RemoteFile, fetch
from downpour.data.rows import csr_from_scipy
from downpour.errors import DataError, check_range

# No checksum is published for w8a; this is the digest of the LIBSVM file,
# checked against its published shape (see shared/data/README.md).
W8A = RemoteFile(
    name="w8a",
    size=3478239,
    sha256="b464b4f6ce6a5d9e181ffc793e19a04751036273722312398ef7673705014902",
    md5="a0447c58bf2c1c2d2eb1c414f8cca393",
)
W8A_FEATURES = 300

ZeroBased = bool | Literal["auto"]


def load_svmlight(
    data_dir: Path,
    *,
    download: bool = True,
    path: str | Path | None = None,
    test_path: str | Path | None = None,
    n_features: int | None = None,
    zero_based: ZeroBased = "auto",
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Dataset:
    """An svmlight/LIBSVM file as a sparse CSR float32 dataset.

    Labels are mapped to ``0..C-1`` in sorted order of their values (so -1/+1
    become 0/1), over train and test together. Comments (``#``) and blank
    lines are allowed. Without ``test_path`` a seeded, stratified
    ``test_fraction`` of ``path`` is held out. ``data_dir`` and ``download``
    are ignored.

    Args:
        data_dir: Unused (files are given by path).
        download: Unused.
        path: Training file.
        test_path: Optional test file.
        n_features: Number of features; inferred from the files when None.
        zero_based: Whether indices start at 0, 1, or ``"auto"`` (0 if any index is 0).
        test_fraction: Held-out fraction when there is no ``test_path``.
        seed: Seed of the held-out split.

    Raises:
        ValueError: Bad arguments.
        DataError: A file is missing or malformed (the message names the file and line).

    Example:
        >>> data = load_svmlight(Path("."), path="a9a", test_path="a9a.t")  # doctest: +SKIP
    """
    if path is None:
        raise ValueError("svmlight needs path=<training file in svmlight format>")
    if zero_based not in (True, False, "auto"):
        raise ValueError(f"zero_based must be True, False or 'auto', got {zero_based!r}")
    if n_features is not None:
        check_range("n_features", n_features, 1)
    files = [Path(path).expanduser()] + ([Path(test_path).expanduser()] if test_path else [])
    return read_svmlight(
        "svmlight",
        files,
        n_features=n_features,
        zero_based=zero_based,
        test_fraction=test_fraction,
        seed=seed,
    )


def load_w8a(
    data_dir: Path,
    *,
    download: bool = True,
    mirror: str | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Dataset:
    """w8a (Platt, 1998; LIBSVM's binary "web" set): 49,749 examples, 300 binary features.

    Reads ``<data_dir>/w8a/w8a`` (downloaded from the LIBSVM site if missing)
    and holds out a seeded, stratified ``test_fraction``. Labels: -1 -> 0, +1 -> 1.
    """
    file = fetch("w8a", W8A, data_dir / "w8a", download=download, mirror=mirror)
    return read_svmlight(
        "w8a",
        [file],
        n_features=W8A_FEATURES,
        zero_based=False,
        test_fraction=test_fraction,
        seed=seed,
    )


def read_svmlight(
    name: str,
    files: list[Path],
    *,
    n_features: int | None,
    zero_based: ZeroBased,
    test_fraction: float,
    seed: int,
) -> Dataset:
    """Parse one (train) or two (train, test) svmlight files into a Dataset."""
    for file in files:
        if not file.is_file():
            raise DataError(f"{name}: missing file {file}")
    try:
        from sklearn.datasets import load_svmlight_files  # slow to import: only when parsing
        parsed = load_svmlight_files(
            [str(f) for f in files], n_features=n_features, zero_based=zero_based, dtype=np.float32
        )
    except (ValueError, OverflowError) as error:
        raise _locate_error(files, n_features, zero_based, error) from error
    except OSError as error:
        raise DataError(f"{name}: cannot read {', '.join(map(str, files))}: {error}") from error
    matrices, targets = parsed[0::2], parsed[1::2]
    if matrices[0].shape[0] == 0:
        raise DataError(f"{name}: {files[0]} holds no examples")
    values, y_all = np.unique(np.concatenate(targets), return_inverse=True)
    if len(values) < 2:
        raise DataError(
            f"{name}: {files[0]} has a single label {values[0]:g}; need at least 2 classes"
        )
    labels = torch.from_numpy(y_all.astype(np.int64))
    y_train, y_test = labels[: len(targets[0])], labels[len(targets[0]) :]
    x_train = csr_from_scipy(matrices[0])
    if len(files) == 1:
        return holdout(name, x_train, y_train, len(values), test_fraction=test_fraction, seed=seed)
    return Dataset(name, x_train, y_train, csr_from_scipy(matrices[1]), y_test, len(values))


def _locate_error(
    files: list[Path], n_features: int | None, zero_based: ZeroBased, error: Exception
) -> DataError:
    """A DataError naming the first offending file and line, found by a slow re-scan."""
    largest: list[tuple[Path, int, int]] = []  # (file, line, largest index) per nonempty line
    smallest = math.inf
    for file in files:
        with file.open("rb") as f:
            for number, raw in enumerate(f, start=1):
                try:
                    indices = _check_line(raw, zero_based)
                except ValueError as problem:
                    text = raw.decode("utf-8", "replace").rstrip("\r\n")
                    return DataError(f"{file}:{number}: {problem}: {text[:120]!r}")
                if indices:
                    smallest = min(smallest, indices[0])
                    largest.append((file, number, indices[-1]))
    if n_features is not None:
        # The index base is known only after the whole file was read ("auto").
        offset = 1 if zero_based is False or (zero_based == "auto" and smallest > 0) else 0
        for file, number, index in largest:
            if index - offset >= n_features:
                return DataError(
                    f"{file}:{number}: feature index {index} exceeds n_features={n_features}"
                )
    return DataError(f"{', '.join(map(str, files))}: malformed svmlight data: {error}")


def _check_line(raw: bytes, zero_based: ZeroBased) -> list[int]:
    """The feature indices of one line; ValueError saying what is wrong with it."""
    tokens = raw.split(b"#", 1)[0].split()
    if not tokens:
        return []
    try:
        float(tokens[0])
    except ValueError:
        raise ValueError(
            f"label {tokens[0].decode('utf-8', 'replace')!r} is not a number"
        ) from None
    indices: list[int] = []
    for token in tokens[1:]:
        key, colon, value = token.partition(b":")
        if not colon:
            raise ValueError(f"{token.decode('utf-8', 'replace')!r} is not index:value")
        if key == b"qid" and not indices:
            int(value)
            continue
        try:
            index, _ = int(key), float(value)
        except ValueError:
            raise ValueError(f"{token.decode('utf-8', 'replace')!r} is not index:value") from None
        if index < (1 if zero_based is False else 0):
            raise ValueError(f"invalid feature index {index}")
        if indices and index <= indices[-1]:
            raise ValueError(f"feature indices not strictly increasing at {index}")
        indices.append(index)
    return indices
