"""A folder of class subfolders holding JPEG/PNG files (the layout Caltech-101 ships in)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from downpour.data.dataset import Dataset, holdout
from downpour.errors import DataError, check_range

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})


def load_imagefolder(
    data_dir: Path,
    *,
    download: bool = True,
    path: str | Path | None = None,
    size: int = 32,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Dataset:
    """Images from ``path/<class>/<file>`` as float32 ``(N, 3, size, size)`` in [0, 1].

    Classes are the subfolders that hold at least one image, sorted by name
    (class index = position). Every image is converted to RGB and resized to
    ``size x size`` (bilinear, aspect ratio not kept). A seeded, stratified
    ``test_fraction`` is held out. A relative ``path`` is taken relative to the
    current directory; ``data_dir`` and ``download`` are ignored.

    Raises:
        ValueError: ``path`` not given, or ``size`` < 1.
        DataError: ``path`` missing, holding no images, or holding an unreadable image.

    Example:
        >>> data = load_imagefolder(Path("."), path="101_ObjectCategories", size=64)  # doctest: +SKIP
    """
    if path is None:
        raise ValueError("imagefolder needs path=<folder with one subfolder per class>")
    check_range("size", size, 1)
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"imagefolder: {root} is not a folder (expected one subfolder per class)")
    classes: list[tuple[str, list[Path]]] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(
            f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
        )
        if files:
            classes.append((folder.name, files))
    if not classes:
        raise DataError(
            f"imagefolder: no images under {root} (expected <class>/<file> with suffix "
            f"{', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    total = sum(len(files) for _, files in classes)
    pixels = np.empty((total, size, size, 3), dtype=np.uint8)
    labels = np.empty(total, dtype=np.int64)
    i = 0
    for label, (_, files) in enumerate(classes):
        for file in files:
            pixels[i] = _read_image(file, size)
            labels[i] = label
            i += 1
    logger.info("imagefolder: %d images in %d classes from %s", total, len(classes), root)
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255.0).contiguous()
    return holdout(
        "imagefolder",
        x,
        torch.from_numpy(labels),
        len(classes),
        test_fraction=test_fraction,
        seed=seed,
    )


def _read_image(file: Path, size: int) -> np.ndarray:
    try:
        with Image.open(file) as image:
            rgb = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(rgb, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise DataError(f"imagefolder: cannot read image {file}: {error}") from error
