"""Datasets held in memory as tensors or streamed from torch Datasets, split among workers.

Example:
    >>> from downpour.data import batches, load
    >>> data = load("synthetic", n=1000, d=8, seed=0).shard(0, 4)
    >>> x, y = next(batches(data.x_train, data.y_train, 32))
    >>> tuple(x.shape)
    (32, 8)
"""

from downpour.data.batching import batches
from downpour.data.batching import epoch
from downpour.data.batching import stream
from downpour.data.dataset import Dataset
from downpour.data.download import resolve_data_dir
from downpour.data.partition import partition
from downpour.data.registry import DATASETS, dataset_options
from downpour.data.registry import load
from downpour.data.streamed import StreamedDataset
from downpour.data.streamed import from_torch

__all__ = [
    "DATASETS",
    "dataset_options",
    "Dataset",
    "StreamedDataset",
    "batches",
    "epoch",
    "from_torch",
    "load",
    "partition",
    "resolve_data_dir",
    "stream",
]
