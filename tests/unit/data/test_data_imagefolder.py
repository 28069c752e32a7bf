"""Image folders (Caltech-101 layout) from generated PNG and JPEG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from downpour.data import load
from downpour.errors import DataError


def _make_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    layout = {"zebra": ("png", 5, "RGB"), "ant": ("jpg", 5, "L"), "cat": ("PNG", 10, "RGBA")}
    for name, (suffix, count, mode) in layout.items():
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(count):
            shape = (20 + i, 30) if mode == "L" else (20 + i, 30, len(mode))
            pixels = rng.integers(0, 256, shape, dtype=np.uint8)
            Image.fromarray(pixels, mode).save(folder / f"img_{i}.{suffix}")
        (folder / "notes.txt").write_text("not an image")
    (root / "empty_class").mkdir()
    (root / "README").write_text("top-level file")
    return root


def test_imagefolder_layout_and_values(tmp_path):
    root = _make_folder(tmp_path / "images")
    data = load("imagefolder", path=root, size=16, seed=0, stream=False, skip_empty=True)
    assert data.num_classes == 3  # ant, cat, zebra; the empty folder is left out (skip_empty)
    assert data.input_shape == (3, 16, 16) and data.x_train.dtype == torch.float32
    assert data.num_train + len(data.y_test) == 20
    assert len(data.y_test) == 4  # 20% of each class: 1 + 2 + 1
    labels = torch.cat([data.y_train, data.y_test])
    assert torch.bincount(labels).tolist() == [5, 10, 5]  # sorted: ant, cat, zebra
    assert 0.0 <= float(data.x_train.min()) and float(data.x_train.max()) <= 1.0
    # Greyscale JPEGs become RGB with three equal channels.
    ant = data.x_train[data.y_train == 0]
    assert torch.allclose(ant[:, 0], ant[:, 1]) and torch.allclose(ant[:, 1], ant[:, 2])


def test_imagefolder_pixel_values(tmp_path):
    folder = tmp_path / "one" / "red"
    folder.mkdir(parents=True)
    for i in range(5):
        Image.new("RGB", (8, 8), (255, 0, 51 * i)).save(folder / f"{i}.png")
    data = load("imagefolder", path=tmp_path / "one", size=4, stream=False)
    values = torch.cat([data.x_train, data.x_test])
    assert torch.all(values[:, 0] == 1.0) and torch.all(values[:, 1] == 0.0)
    assert sorted(values[:, 2, 0, 0].tolist()) == pytest.approx([0, 0.2, 0.4, 0.6, 0.8])


def test_imagefolder_errors(tmp_path):
    (tmp_path / "nothing" / "class_a").mkdir(parents=True)
    with pytest.raises(DataError, match=r"class folder .*class_a holds no image"):
        load("imagefolder", path=tmp_path / "nothing")
    with pytest.raises(DataError, match="no images under"):
        load("imagefolder", path=tmp_path / "nothing", skip_empty=True)
    with pytest.raises(DataError, match="not a folder"):
        load("imagefolder", path=tmp_path / "absent")
    with pytest.raises(ValueError, match="needs path="):
        load("imagefolder")
    broken = tmp_path / "broken" / "a"
    broken.mkdir(parents=True)
    (broken / "bad.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match=r"cannot read image .*bad\.png"):
        load("imagefolder", path=tmp_path / "broken", on_error="raise")
    with pytest.raises(DataError, match=r"class folder .*a holds no readable image"):
        load("imagefolder", path=tmp_path / "broken")
    with pytest.raises(ValueError, match="size"):
        load("imagefolder", path=tmp_path / "broken", size=0)
