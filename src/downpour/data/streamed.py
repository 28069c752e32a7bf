"""A user's map-style ``torch.utils.data.Dataset`` pair, streamed: each worker reads its own part.

:func:`from_torch` wraps a train and a test dataset without reading their
inputs: the coordinator keeps the two objects (and the training labels, for
the partitions), each worker gets its partition's indices and reads them
through a ``DataLoader`` of its own with a seeded sampler, and evaluation
reads the test set in order, in batches.

The training labels, which the partitions (iid, by label, Dirichlet) need,
come from the dataset's ``targets`` attribute when it has one (torchvision's
datasets and :class:`downpour.data.images.ImageFolder` do), else from the
``labels`` array the user gives, else from one pass over the training set
that keeps the targets only (each item is read once, its input dropped at once).

Example:
    >>> train = torch.utils.data.TensorDataset(torch.randn(8, 3), torch.arange(8) % 2)
    >>> data = from_torch(train, train)
    >>> data.num_classes, data.input_shape, data.shard(0, 2).num_train
    (2, (3,), 4)
"""

from __future__ import annotations

import ctypes
import gc
import math
import multiprocessing
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import default_collate

from downpour.data.partition import Scheme, partition
from downpour.errors import DataError, check_range

Batch = tuple[torch.Tensor, torch.Tensor]
CollateFn = Callable[[list[Any]], Any]


@dataclass(frozen=True, eq=False)
class StreamedDataset:
    """A train/test pair of map-style torch Datasets, read in mini-batches, never held whole.

    It answers what strategies ask of an in-memory :class:`~downpour.data.Dataset`
    (``num_train``, ``input_shape``, ``num_classes``, ``shard``, ``train_only``)
    without its tensors; :attr:`streamed` tells the two apart.

    Attributes:
        name: a name for the run's records.
        train: the training dataset; items are ``(input, target)``.
        test: the test dataset (None in a worker's part).
        num_classes: classes of a classification target, None for any other target.
        labels: the training labels (int64, one per item of ``train``), or None for
            targets that are not classes (then only the iid partition exists).
        input_shape: the shape of one input (read from the first item).
        target_shape: the shape of one target, ``()`` for a class index or a scalar.
        indices: the items of ``train`` that are this part's (None: all of them).
        loader_workers: DataLoader worker processes each worker reads through.
        collate: the DataLoader's ``collate_fn`` (None: torch's default, which stacks).
    """

    name: str
    train: TorchDataset
    test: TorchDataset | None
    num_classes: int | None
    labels: np.ndarray | None
    input_shape: tuple[int, ...]
    target_shape: tuple[int, ...] = ()
    indices: np.ndarray | None = None
    loader_workers: int = 0
    collate: CollateFn | None = None

    streamed: ClassVar[bool] = True
    sparse: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if isinstance(self.loader_workers, bool) or not isinstance(self.loader_workers, int):
            raise TypeError(f"loader_workers must be an integer, got {self.loader_workers!r}")
        check_range("loader_workers", self.loader_workers, 0, 64)

    @property
    def num_train(self) -> int:
        """Training examples of this part."""
        return len(self.train) if self.indices is None else len(self.indices)

    @property
    def num_test(self) -> int:
        """Test examples (0 in a worker's part)."""
        return 0 if self.test is None else len(self.test)

    @property
    def num_outputs(self) -> int:
        """What a model's output layer needs: the classes, else the target's size."""
        if self.num_classes is not None:
            return self.num_classes
        return math.prod(self.target_shape)

    @property
    def rows(self) -> np.ndarray:
        """This part's items of ``train``."""
        if self.indices is None:
            return np.arange(len(self.train), dtype=np.int64)
        return self.indices

    def subset(self, indices: np.ndarray | torch.Tensor) -> StreamedDataset:
        """This part restricted to ``indices`` (positions in it, in ``[0, num_train)``)."""
        index = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices)
        if index.ndim != 1 or (index.size and not np.issubdtype(index.dtype, np.integer)):
            raise ValueError(
                f"indices must be a 1-D integer array, got {index.dtype} {index.shape}")
        if index.size and (index.min() < 0 or index.max() >= self.num_train):
            raise ValueError(
                f"indices must be in [0, {self.num_train}), got {index.min()}..{index.max()}")
        return replace(self, indices=self.rows[index.astype(np.int64, copy=False)])

    def train_only(self) -> StreamedDataset:
        """The same training part with no test set (what a worker process needs)."""
        return replace(self, test=None)

    def shard(self, rank: int, num_workers: int, scheme: Scheme = "iid", *, seed: int = 0,
              labels_per_worker: int = 2, alpha: float = 0.5) -> StreamedDataset:
        """Worker ``rank``'s part under :func:`~downpour.data.partition`, from the labels alone."""
        if self.labels is None:
            if scheme != "iid":
                raise ValueError(f"partition scheme {scheme!r} needs class labels; {self.name}'s "
                                 "targets are not classes, so only the 'iid' partition applies")
            labels = np.zeros(self.num_train, dtype=np.int64)
        else:
            labels = self.labels[self.rows]
        parts = partition(labels, num_workers, scheme, labels_per_worker=labels_per_worker,
                          alpha=alpha, seed=seed)
        check_range("rank", rank, 0, num_workers - 1)
        return self.subset(parts[rank])


def from_torch(train: TorchDataset, test: TorchDataset, *, num_classes: int | None = None,
               labels: Sequence[int] | np.ndarray | torch.Tensor | None = None,
               name: str = "torch", collate: CollateFn | None = None,
               loader_workers: int = 0) -> StreamedDataset:
    """Wrap map-style torch Datasets whose items are ``(input, target)`` for a run.

    Nothing but the first two items of each set are read here (for the shapes),
    and, for class targets with neither a ``targets`` attribute nor ``labels``,
    one pass over the training targets (see the module's docstring). A scalar
    integer target is a class index; a float target (regression) or a vector
    target (multi-label, multi-hot) is not. Batches of inputs are float32
    (converted, not rescaled), class targets int64, other targets float32.

    Args:
        train: the training set: ``len()`` and ``[i]`` giving ``(input, target)``.
        test: the test set, the same kind of items.
        num_classes: the number of classes of integer targets (default: the largest
            training label plus one). Float targets (regression, multi-label) have none.
        labels: the training labels, one per item, when ``train`` has no ``targets``.
        name: the dataset's name in the run's records.
        collate: the DataLoader's ``collate_fn``, e.g. for inputs of varying shape.
        loader_workers: DataLoader worker processes per worker.

    Raises:
        DataError: items that are not ``(input, target)``; inputs of varying shape
            without ``collate``; labels outside ``[0, num_classes)``; an empty set.

    Example:
        >>> xs = torch.utils.data.TensorDataset(torch.randn(6, 2), torch.randn(6))
        >>> from_torch(xs, xs).num_classes is None
        True
    """
    for split, dataset in (("training", train), ("test", test)):
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(f"the {split} set must be a map-style torch Dataset (with __len__ and "
                            f"__getitem__), got {type(dataset).__name__}")
        if len(dataset) == 0:
            raise DataError(f"{name}: the {split} set is empty")
    x0, y0 = _item(train, 0, "training")
    input_shape, target_shape = tuple(x0.shape), tuple(y0.shape)
    if collate is None:
        for split, dataset in (("training", train), ("test", test)):
            for i in range(1 if dataset is train else 0, min(2, len(dataset))):
                x, _ = _item(dataset, i, split)
                if tuple(x.shape) != input_shape:
                    raise DataError(_varying(name, f"{split} item {i}", tuple(x.shape),
                                             input_shape))
    # A scalar integer target is a class; a float one, or a vector (multi-hot), is not.
    classes = y0.dim() == 0 and not y0.is_floating_point() and not y0.is_complex()
    label_array = _labels(train, labels, name) if classes or labels is not None else None
    if label_array is not None:
        if num_classes is None:
            num_classes = int(label_array.max()) + 1
        _check_labels(label_array, num_classes, f"{name}: training label")
    elif num_classes is not None:
        raise ValueError(f"{name}: num_classes={num_classes} given, but the targets are "
                         f"{y0.dtype} values, not class indices; drop num_classes, or give integer "
                         "targets")
    return StreamedDataset(name, train, test, num_classes, label_array, input_shape,
                           target_shape if label_array is None else (),
                           loader_workers=loader_workers, collate=collate)


def _item(dataset: TorchDataset, i: int, split: str) -> Batch:
    item = dataset[i]
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        what = (f"a {type(item).__name__} of {len(item)}" if isinstance(item, (tuple, list))
                else f"a {type(item).__name__}")
        raise DataError(f"{split} item {i} is {what}; each item must be an (input, target) pair, "
                        "e.g. return (image, label) from __getitem__")
    x, y = item
    try:
        return torch.as_tensor(x), torch.as_tensor(y)
    except (TypeError, ValueError, RuntimeError) as error:
        raise DataError(f"{split} item {i}: input and target must be tensors, arrays or numbers; "
                        f"got {type(x).__name__} and {type(y).__name__} ({error})") from error


def _varying(name: str, where: str, shape: tuple[int, ...], first: tuple[int, ...]) -> str:
    return (f"{name}: {where} has input shape {shape}, the first training item {first}: inputs of "
            "varying shape cannot be stacked into a batch; resize them in the dataset's transform "
            "or pass collate= (a function from a list of items to an (inputs, targets) batch)")


def _labels(train: TorchDataset, given: Any, name: str) -> np.ndarray:
    """The training labels: ``given``, else ``train.targets``, else one pass over the targets."""
    if given is None:
        given = getattr(train, "targets", None)
    if given is None:
        given = [int(torch.as_tensor(_item(train, i, "training")[1])) for i in range(len(train))]
    values = np.asarray(given.cpu() if isinstance(given, torch.Tensor) else given)
    if values.ndim != 1 or len(values) != len(train):
        raise DataError(f"{name}: the labels must be one per training item ({len(train)}), got "
                        f"shape {values.shape}")
    if values.size and not np.issubdtype(values.dtype, np.integer):
        raise DataError(f"{name}: the labels must be integers (class indices), got {values.dtype}")
    return values.astype(np.int64, copy=False)


def _check_labels(labels: np.ndarray | torch.Tensor, num_classes: int, what: str) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if len(labels) == 0:
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise DataError(f"{what} {bad} is outside [0, {num_classes}); labels must be class indices "
                        f"0..{num_classes - 1} (pass num_classes= if there are more classes)")


class Collate:
    """A batch from items: checks each is ``(input, target)``, stacks, checks the labels' range.

    Runs in the DataLoader's worker processes, so it is a plain picklable object.
    """

    def __init__(self, num_classes: int | None, collate: CollateFn | None = None) -> None:
        self.num_classes, self.collate = num_classes, collate

    def __call__(self, items: list[Any]) -> Batch:
        for item in items:
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise DataError(f"a dataset item is a {type(item).__name__}; each item must be an "
                                "(input, target) pair")
        if self.collate is not None:
            x, y = self.collate(items)
        else:
            try:
                x, y = default_collate(items)
            except RuntimeError as error:
                shapes = sorted({tuple(torch.as_tensor(item[0]).shape) for item in items})
                shown = ", ".join(map(str, shapes[:3]))
                raise DataError(f"inputs of varying shape in one batch ({shown}): resize them in "
                                f"the dataset's transform or pass collate= ({error})") from error
        x = torch.as_tensor(x)
        y = torch.as_tensor(y)
        if not x.is_floating_point() or x.dtype != torch.float32:
            x = x.to(torch.float32)
        if self.num_classes is not None:
            if y.is_floating_point():
                raise DataError(f"a batch's targets are {y.dtype}; class targets must be integers")
            y = y.to(torch.int64)
            _check_labels(y, self.num_classes, "a label")
        elif y.dtype != torch.float32:
            y = y.to(torch.float32)
        return x, y


class Passes(Sampler[list[int]]):
    """Endless seeded passes over ``rows`` in batches; ``skip`` batches left out at the start.

    Each pass is ``torch.randperm`` from ``generator``, as
    :func:`downpour.data.batches` draws it, so a part read from a stream visits
    its examples in the same order as the same part held in memory.
    """

    def __init__(self, rows: np.ndarray, batch_size: int, generator: torch.Generator, *,
                 skip: int = 0, shuffle: bool = True, passes: int | None = None) -> None:
        check_range("batch_size", batch_size, 1)
        if len(rows) == 0:
            raise DataError("a worker's part of the training set is empty: use fewer workers")
        self.rows, self.batch_size, self.generator = torch.from_numpy(rows), batch_size, generator
        self.skip, self.shuffle, self.passes = skip, shuffle, passes

    def __iter__(self) -> Iterator[list[int]]:
        n, skip, done = len(self.rows), self.skip, 0
        per_pass = math.ceil(n / self.batch_size)
        while self.passes is None or done < self.passes:
            order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
            done += 1
            if skip >= per_pass:
                skip -= per_pass
                continue
            for start in range(skip * self.batch_size, n, self.batch_size):
                yield self.rows[order[start: start + self.batch_size]].tolist()
            skip = 0

    def __len__(self) -> int:
        per_pass = math.ceil(len(self.rows) / self.batch_size)
        return 2**62 if self.passes is None else max(0, per_pass * self.passes - self.skip)


def loader(data: StreamedDataset, batch_size: int, generator: torch.Generator, *, skip: int = 0,
           passes: int | None = None, shuffle: bool = True, pin_memory: bool = False) -> DataLoader:
    """The DataLoader one worker reads its part through: seeded order, ``data.loader_workers``."""
    workers = data.loader_workers
    order = Passes(data.rows, batch_size, generator, skip=skip, shuffle=shuffle, passes=passes)
    return DataLoader(
        data.train, batch_sampler=order,
        num_workers=workers, collate_fn=Collate(data.num_classes, data.collate),
        pin_memory=pin_memory, prefetch_factor=4 if workers else None,
        # Forked from the worker itself: its children, which end when it does (a DataLoader
        # worker watches its parent), not the fork server's, which lives on (see iterate).
        multiprocessing_context=_FORK if workers else None,
        worker_init_fn=die_with_parent if workers else None,
        # Augmentation in the loader's processes draws from torch's generator, seeded from this.
        generator=torch.Generator().manual_seed(int(generator.initial_seed())),
    )


_FORK = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
_PR_SET_PDEATHSIG = 1


def die_with_parent(loader_worker: int) -> None:
    """A DataLoader worker's start: on Linux, the kernel kills it when its worker dies.

    A DataLoader worker notices its parent gone only at its next status check
    (seconds later); a worker SIGKILLed by a staged fault, or a crashed one,
    takes its loader processes with it at once this way.
    """
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:  # not Linux: the DataLoader's own watchdog ends it
        return
    parent = os.getppid()
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the worker died before prctl took effect
        os._exit(1)


def iterate(batches: DataLoader) -> Iterator[Batch]:
    """Iterate ``batches``, starting its worker processes, also from a role's daemonic process.

    Roles run as daemonic processes (they end with the coordinator), and
    multiprocessing refuses children to a daemonic process as a blanket rule.
    A DataLoader's worker processes are daemonic themselves and watch their
    parent, ending when it does, which is the guarantee that rule protects; so
    the flag is lifted while they start, and put back at once.
    """
    process = multiprocessing.current_process()
    if not batches.num_workers:
        return iter(batches)
    if not process.daemon:
        return _forked(batches)
    config = process._config  # noqa: SLF001  (the flag multiprocessing checks; no public setter)
    config["daemon"] = False
    try:
        return _forked(batches)
    finally:
        config["daemon"] = True


def _forked(batches: DataLoader) -> Iterator[Batch]:
    """``iter(batches)``, whose worker processes fork this one, with everything this process
    holds frozen out of their garbage collector.

    A forked child inherits the parent's garbage too, and collecting it there runs destructors
    meant for the parent: a ``TCPStore`` left in a reference cycle by an earlier
    ``torch.distributed`` group detaches its daemon thread, which the child does not have, and
    aborts it (a loader worker killed by SIGABRT mid-epoch, seen in a test process). Frozen
    (``gc.freeze``) while the workers fork, what the child inherits is never collected there.
    """
    gc.freeze()
    try:
        return iter(batches)
    finally:
        gc.unfreeze()


def eval_batches(data: StreamedDataset, batch_size: int,
                 indices: np.ndarray | None = None) -> Iterator[Batch]:
    """The test set (or its items ``indices``) in order, in batches, read in this process."""
    if data.test is None:
        raise ValueError(f"{data.name}: this part has no test set (a worker's part)")
    rows = np.arange(len(data.test), dtype=np.int64) if indices is None else indices
    batches = DataLoader(data.test, batch_sampler=Passes(rows, batch_size, torch.Generator(),
                                                         shuffle=False, passes=1),
                         num_workers=0, collate_fn=Collate(data.num_classes, data.collate),
                         # Its own generator: a DataLoader draws a seed from torch's global one
                         # otherwise, and training's dropout masks would depend on evaluations.
                         generator=torch.Generator())
    return iter(batches)
