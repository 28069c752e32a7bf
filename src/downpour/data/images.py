"""A folder of class subfolders holding JPEG/PNG files (the layout Caltech-101 ships in).

By default the folder is streamed: the coordinator lists the files (and reads
their headers, to leave out the unreadable ones), and each worker decodes and
resizes its own images on the fly with Pillow, with optional augmentation
(random crop, horizontal flip). ``stream=False`` decodes every image into an
in-memory :class:`~downpour.data.Dataset` instead, for the strategies that
need the training set in memory.

Caltech-101's archive unpacks to ``101_ObjectCategories/<class>/*.jpg`` with
a ``BACKGROUND_Google`` clutter class; given the folder above it or the
folder itself, the classes are its subfolders, ``BACKGROUND_Google`` left out.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset as TorchDataset

from downpour.data.dataset import Dataset, holdout, stratified_split
from downpour.data.streamed import StreamedDataset, from_torch
from downpour.errors import DataError, check_range, choose

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
CALTECH_FOLDER = "101_ObjectCategories"
OnError = Literal["skip", "raise"]
_READ_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError)


@dataclass(eq=False)
class ImageFolder(TorchDataset):
    """Images decoded on demand: item ``i`` is ``(float32 (3, size, size) in [0, 1], class)``.

    Attributes:
        files: the image files, as text.
        targets: each file's class index (what the partitions read; no image is opened for them).
        size: the side images are resized to (bilinear, aspect ratio not kept).
        crop: augment with a random ``size`` crop of the image resized to ``size * 9 / 8``.
        flip: augment with a random horizontal flip.
        on_error: an image that fails to decode is replaced by the next readable one of
            its class and counted in ``skipped`` (``"skip"``), or is an error (``"raise"``).

    Example:
        >>> folder = ImageFolder(["cat/1.jpg"], [0], size=64)  # doctest: +SKIP
        >>> folder[0][0].shape  # doctest: +SKIP
        torch.Size([3, 64, 64])
    """

    files: list[str]
    targets: list[int]
    size: int = 32
    crop: bool = False
    flip: bool = False
    on_error: OnError = "skip"
    skipped: int = field(default=0, compare=False)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        label = self.targets[i]
        for attempt in range(len(self.files)):
            j = (i + attempt) % len(self.files)
            if self.targets[j] != label:
                continue
            try:
                return self.decode(self.files[j]), label
            except _READ_ERRORS as error:
                if self.on_error == "raise":
                    raise DataError(f"imagefolder: cannot read image {self.files[j]}: {error}") \
                        from error
                self.skipped += 1
                logger.warning("imagefolder: skipped unreadable image %s (%s); %d skipped so far",
                               self.files[j], error, self.skipped)
        raise DataError(f"imagefolder: no image of class {label} in this split can be read "
                        f"({self.skipped} unreadable so far)")

    def decode(self, file: str) -> torch.Tensor:
        """One image as float32 ``(3, size, size)`` in [0, 1], augmented as configured."""
        side = self.size + max(1, self.size // 8) if self.crop else self.size
        with Image.open(file) as image:
            if image.format == "JPEG":
                image.draft("RGB", (2 * side, 2 * side))  # decode large JPEGs at a reduced scale
            rgb = image.convert("RGB").resize((side, side), Image.Resampling.BILINEAR)
            pixels = torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy())
        if self.crop:
            top, left = (int(v) for v in torch.randint(0, side - self.size + 1, (2,)))
            pixels = pixels[top: top + self.size, left: left + self.size]
        if self.flip and bool(torch.rand(()) < 0.5):
            pixels = pixels.flip(1)
        return pixels.permute(2, 0, 1).to(torch.float32).div_(255.0).contiguous()


def load_imagefolder(
    data_dir: Path,
    *,
    download: bool = True,
    path: str | Path | None = None,
    size: int = 32,
    test_fraction: float = 0.2,
    test_per_class: int | None = None,
    seed: int = 0,
    stream: bool = True,
    crop: bool = False,
    flip: bool = False,
    exclude: Sequence[str] = ("BACKGROUND_Google",),
    skip_empty: bool = False,
    on_error: OnError = "skip",
    loader_workers: int = 0,
) -> StreamedDataset | Dataset:
    """Images from ``path/<class>/<file>``, streamed (default) or decoded into memory.

    Classes are the subfolders, sorted by name (class index = position),
    less those in ``exclude``; a ``101_ObjectCategories`` subfolder of ``path``
    is taken as the folder. Every image is converted to RGB and resized to
    ``size x size`` (bilinear, aspect ratio not kept). A seeded, class-balanced
    test split is held out: ``test_per_class`` images of every class, else a
    stratified ``test_fraction`` of each. Augmentation (``crop``, ``flip``)
    applies to the training images only. A relative ``path`` is taken relative
    to the current directory; ``data_dir`` and ``download`` are ignored.

    Args:
        stream: decode on the fly in each worker (else every image now, into memory).
        crop, flip: training augmentation (see :class:`ImageFolder`).
        exclude: class folders to leave out.
        skip_empty: leave out class folders with no image (else they are an error).
        on_error: an unreadable image is left out and counted (``"skip"``, logged) or is
            an error (``"raise"``).
        loader_workers: DataLoader worker processes per worker (streamed only).

    Raises:
        ValueError: ``path`` not given, or ``size`` < 1.
        DataError: ``path`` missing or holding no images, a class folder without
            images (unless ``skip_empty``), an unreadable image with ``on_error="raise"``.

    Example:
        >>> data = load_imagefolder(Path("."), path="caltech101", size=64)  # doctest: +SKIP
        >>> data.num_classes  # doctest: +SKIP
        101
    """
    if path is None:
        raise ValueError("imagefolder needs path=<folder with one subfolder per class>")
    check_range("size", size, 1)
    choose("on_error", on_error, ("skip", "raise"))
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"imagefolder: {root} is not a folder (expected one subfolder per class)")
    if (root / CALTECH_FOLDER).is_dir():
        root = root / CALTECH_FOLDER
    classes = _classes(root, set(exclude), skip_empty=skip_empty, on_error=on_error)
    files = [str(f) for _, members in classes for f in members]
    labels = np.concatenate([np.full(len(members), c, dtype=np.int64)
                             for c, (_, members) in enumerate(classes)])
    logger.info("imagefolder: %d images in %d classes from %s", len(files), len(classes), root)
    if not stream:
        return _in_memory(files, labels, len(classes), size=size, test_fraction=test_fraction,
                          test_per_class=test_per_class, seed=seed, on_error=on_error)
    train_index, test_index = stratified_split(labels, test_fraction=test_fraction,
                                               test_per_class=test_per_class, seed=seed)

    def part(index: np.ndarray, augment: bool) -> ImageFolder:
        return ImageFolder([files[i] for i in index], labels[index].tolist(), size=size,
                           crop=crop and augment, flip=flip and augment, on_error=on_error)

    return from_torch(part(train_index, True), part(test_index, False), num_classes=len(classes),
                      name="imagefolder", loader_workers=loader_workers)


def _classes(root: Path, exclude: set[str], *, skip_empty: bool,
             on_error: OnError) -> list[tuple[str, list[Path]]]:
    """The class folders and their readable images (headers only are read)."""
    classes: list[tuple[str, list[Path]]] = []
    skipped: list[str] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name not in exclude):
        found = sorted(f for f in folder.iterdir()
                       if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        readable = []
        for file in found:
            problem = _header_problem(file)
            if problem is None:
                readable.append(file)
            elif on_error == "raise":
                raise DataError(f"imagefolder: cannot read image {file}: {problem}")
            else:
                skipped.append(f"{file} ({problem})")
        if readable:
            classes.append((folder.name, readable))
        elif not skip_empty:
            what = "no readable image" if found else "no image"
            raise DataError(f"imagefolder: class folder {folder} holds {what} (suffixes "
                            f"{', '.join(sorted(IMAGE_SUFFIXES))}); add images, remove it, or pass "
                            "skip_empty=True")
    if skipped:
        logger.warning("imagefolder: skipped %d unreadable image(s), e.g. %s", len(skipped),
                       skipped[0])
    if not classes:
        raise DataError(
            f"imagefolder: no images under {root} (expected <class>/<file> with suffix "
            f"{', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    return classes


def _header_problem(file: Path) -> str | None:
    try:
        with Image.open(file):
            pass  # opening parses the header; the pixels are decoded only when used
    except _READ_ERRORS as error:
        return str(error)
    return None


def _in_memory(files: list[str], labels: np.ndarray, num_classes: int, *, size: int,
               test_fraction: float, test_per_class: int | None, seed: int,
               on_error: OnError) -> Dataset:
    folder = ImageFolder(files, labels.tolist(), size=size, on_error=on_error)
    pixels = torch.empty((len(files), 3, size, size), dtype=torch.float32)
    for i in range(len(files)):
        pixels[i] = folder[i][0]
    y = torch.from_numpy(labels)
    if test_per_class is None:
        return holdout("imagefolder", pixels, y, num_classes, test_fraction=test_fraction,
                       seed=seed)
    train_index, test_index = stratified_split(labels, test_per_class=test_per_class, seed=seed)
    return Dataset("imagefolder", pixels[torch.from_numpy(train_index)], y[train_index],
                   pixels[torch.from_numpy(test_index)], y[test_index], num_classes)
