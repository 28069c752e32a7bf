"""Datasets held in memory as tensors, split among workers, served in mini-batches.

Example:
    >>> from downpour.data import batches, load
    >>> data = load("synthetic", n=1000, d=8, seed=0).shard(0, 4)
    >>> x, y = next(batches(data.x_train, data.y_train, 32))
    >>> tuple(x.shape)
    (32, 8)
"""

from downpour.data.batching import batches
from downpour.data.dataset import Dataset
from downpour.data.download import resolve_data_dir
from downpour.data.partition import partition
from downpour.data.registry import DATASETS
from downpour.data.registry import load

__all__ = [
    "DATASETS",
    "Dataset",
    "batches",
    "load",
    "partition",
    "resolve_data_dir",
]
