"""The dataset registry and :func:`load`, the one entry point to every loader."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable

from downpour.data.dataset import Dataset
from downpour.data.download import resolve_data_dir
from downpour.data.images import load_imagefolder
from downpour.data.svmlight import load_svmlight, load_w8a
from downpour.data.synthetic import load_rcv1_like, load_synthetic
from downpour.data.vision import load_cifar10, load_digits, load_fashion_mnist, load_mnist
from downpour.errors import choose

Loader = Callable[..., Dataset]

# name -> loader(data_dir, *, download, **options). One line per dataset.
DATASETS: dict[str, Loader] = {
    "mnist": load_mnist,
    "fashion-mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "svmlight": load_svmlight,
    "w8a": load_w8a,
    "digits": load_digits,
    "imagefolder": load_imagefolder,
    "synthetic": load_synthetic,
    "rcv1-like": load_rcv1_like,
}


def load(
    name: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    **options,
) -> Dataset:
    """Load a registered dataset into memory.

    Args:
        name: One of :data:`DATASETS`.
        data_dir: Root data folder (see :func:`resolve_data_dir`).
        download: Whether missing files may be downloaded.
        **options: Loader-specific options (``path=``, ``seed=``, ``mirror=``, ...).

    Raises:
        ValueError: Unknown dataset name.
        TypeError: An option the dataset does not take.
        DataError: Files missing, corrupt or malformed.

    Example:
        >>> data = load("synthetic", n=500, d=4, seed=3)
        >>> data.num_train, data.input_shape
        (400, (4,))
    """
    choose("dataset", name, DATASETS)
    loader = DATASETS[name]
    accepted = dataset_options(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(
            f"dataset {name!r} takes no option {', '.join(map(repr, unknown))}; "
            f"its options are: {', '.join(accepted) or '(none)'}"
        )
    return loader(resolve_data_dir(data_dir), download=download, **options)


def dataset_options(name: str) -> list[str]:
    """The options :func:`load` takes for dataset ``name`` (``path``, ``seed``, ...).

    Example:
        >>> "path" in dataset_options("svmlight"), "path" in dataset_options("mnist")
        (True, False)
    """
    choose("dataset", name, DATASETS)
    return [p.name for p in inspect.signature(DATASETS[name]).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "download"]
