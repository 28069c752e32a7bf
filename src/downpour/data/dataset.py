"""The in-memory dataset every loader returns."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np
import torch

from downpour.data.partition import Scheme, partition
from downpour.data.rows import is_csr, pack_rows, take_rows, unpack_rows
from downpour.errors import check_range


@dataclass(frozen=True)
class Dataset:
    """A labelled train/test split held as tensors.

    Attributes:
        name: Registry name of the dataset (``"mnist"``, ``"w8a"``, ...).
        x_train: float32 inputs, dense ``(N, *input_shape)`` or sparse CSR ``(N, d)``.
        y_train: int64 class indices in ``[0, num_classes)``.
        x_test: Test inputs, same layout as ``x_train``.
        y_test: Test labels.
        num_classes: Number of classes.

    Example:
        >>> data = Dataset("tiny", torch.zeros(4, 2), torch.tensor([0, 1, 0, 1]),
        ...                torch.zeros(2, 2), torch.tensor([0, 1]), 2)
        >>> data.input_shape, data.num_train, data.shard(1, 2).num_train
        ((2,), 4, 2)
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    # Held in memory (a StreamedDataset is not): what strategies that need the tensors check.
    streamed: ClassVar[bool] = False

    def __post_init__(self) -> None:
        for split, x, y in (
            ("train", self.x_train, self.y_train),
            ("test", self.x_test, self.y_test),
        ):
            if x.dtype != torch.float32:
                raise TypeError(f"{self.name}: x_{split} must be float32, got {x.dtype}")
            if y.dtype != torch.int64 or y.dim() != 1:
                raise TypeError(
                    f"{self.name}: y_{split} must be 1-D int64, got {y.dtype} {tuple(y.shape)}"
                )
            if x.shape[0] != y.shape[0]:
                raise ValueError(
                    f"{self.name}: x_{split} has {x.shape[0]} rows, y_{split} {y.shape[0]}"
                )
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                raise ValueError(f"{self.name}: y_{split} outside [0, {self.num_classes})")
        same_shape = self.x_train.shape[1:] == self.x_test.shape[1:]
        if not same_shape or is_csr(self.x_train) != is_csr(self.x_test):
            raise ValueError(
                f"{self.name}: train inputs {tuple(self.x_train.shape[1:])} and test inputs "
                f"{tuple(self.x_test.shape[1:])} differ in shape or layout"
            )

    def __getstate__(self) -> dict[str, object]:
        # Sparse inputs travel as their arrays, so a worker process rebuilds
        # them without torch's per-process warnings (see rows.pack_rows).
        return {name: pack_rows(value) for name, value in vars(self).items()}

    def __setstate__(self, state: dict[str, object]) -> None:
        for name, value in state.items():
            object.__setattr__(self, name, unpack_rows(value))

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example, e.g. ``(1, 28, 28)`` or ``(300,)``."""
        return tuple(int(s) for s in self.x_train.shape[1:])

    @property
    def sparse(self) -> bool:
        """Whether inputs are sparse CSR tensors."""
        return is_csr(self.x_train)

    @property
    def num_outputs(self) -> int:
        """What a model's output layer needs: one output per class."""
        return self.num_classes

    @property
    def num_train(self) -> int:
        """Number of training examples."""
        return int(self.y_train.shape[0])

    def subset(self, indices: np.ndarray | torch.Tensor) -> Dataset:
        """The same dataset with the training part restricted to ``indices`` (test kept).

        Args:
            indices: Integer row indices into the training set, in ``[0, num_train)``.
        """
        index = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices)
        if index.ndim != 1 or (index.size and not np.issubdtype(index.dtype, np.integer)):
            raise ValueError(
                f"indices must be a 1-D integer array, got {index.dtype} {index.shape}"
            )
        if index.size and (index.min() < 0 or index.max() >= self.num_train):
            raise ValueError(
                f"indices must be in [0, {self.num_train}), got {index.min()}..{index.max()}"
            )
        index = index.astype(np.int64, copy=False)
        return replace(
            self,
            x_train=take_rows(self.x_train, index),
            y_train=self.y_train[torch.from_numpy(index)],
        )

    def train_only(self) -> Dataset:
        """The same training part with an empty test set (what a worker process needs)."""
        none = np.empty(0, dtype=np.int64)
        return replace(self, x_test=take_rows(self.x_test, none), y_test=self.y_test[:0])

    def shard(
        self,
        rank: int,
        num_workers: int,
        scheme: Scheme = "iid",
        *,
        seed: int = 0,
        labels_per_worker: int = 2,
        alpha: float = 0.5,
    ) -> Dataset:
        """Worker ``rank``'s part of the training set under :func:`partition`.

        Every worker computes the same partition from the labels and copies
        only its own rows.
        """
        parts = partition(
            self.y_train,
            num_workers,
            scheme,
            labels_per_worker=labels_per_worker,
            alpha=alpha,
            seed=seed,
        )
        check_range("rank", rank, 0, num_workers - 1)
        return self.subset(parts[rank])


def holdout(
    name: str,
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Dataset:
    """A Dataset whose test part is a seeded, stratified ``test_fraction`` of ``(x, y)``.

    Each class contributes ``round(test_fraction * count)`` test examples, so
    class proportions match between the splits; the same seed gives the same split.
    """
    train_index, test_index = stratified_split(y.numpy(), test_fraction=test_fraction, seed=seed)
    return Dataset(
        name,
        take_rows(x, train_index),
        y[torch.from_numpy(train_index)],
        take_rows(x, test_index),
        y[torch.from_numpy(test_index)],
        num_classes,
    )


def stratified_split(labels: np.ndarray, *, test_fraction: float = 0.2,
                     test_per_class: int | None = None,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train and test indices with each class split alike; the same seed, the same split.

    Each class gives ``round(test_fraction * count)`` test examples, or exactly
    ``test_per_class`` (a class-balanced test set; a class with fewer keeps one
    for training).

    Example:
        >>> labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
        >>> train, test = stratified_split(labels, test_per_class=2)
        >>> len(train), np.bincount(labels[test]).tolist()
        (6, [2, 2])
    """
    if test_per_class is None:
        check_range("test_fraction", test_fraction, 0, 1, low_open=True)
        if test_fraction >= 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    else:
        check_range("test_per_class", test_per_class, 1)
    rng = np.random.default_rng(seed)
    test_parts = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        count = (round(test_fraction * len(members)) if test_per_class is None
                 else min(test_per_class, len(members) - 1))
        test_parts.append(members[:count])
    is_test = np.zeros(len(labels), dtype=bool)
    if test_parts:
        is_test[np.concatenate(test_parts)] = True
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)
