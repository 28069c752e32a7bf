"""The imagefolder dataset streamed: Caltech-101's layout, balanced split, augmentation, errors."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from downpour.data import epoch, load
from downpour.data.streamed import eval_batches
from downpour.errors import DataError


def _caltech(root: Path, counts: dict[str, int]) -> Path:
    rng = np.random.default_rng(0)
    for k, (name, count) in enumerate(counts.items()):
        folder = root / "101_ObjectCategories" / name
        folder.mkdir(parents=True)
        for i in range(count):
            pixels = np.full((20 + i, 30, 3), 40 * k, dtype=np.uint8)
            pixels[..., 1] = rng.integers(0, 256, pixels.shape[:2])
            Image.fromarray(pixels).save(folder / f"image_{i:04d}.jpg")
    return root


def test_caltech_layout_streams_without_decoding(tmp_path, monkeypatch):
    root = _caltech(tmp_path, {"BACKGROUND_Google": 4, "accordion": 6, "airplanes": 9})
    decoded = []
    from downpour.data import images

    original = images.ImageFolder.decode
    monkeypatch.setattr(images.ImageFolder, "decode",
                        lambda self, file: decoded.append(file) or original(self, file))
    data = load("imagefolder", path=root, size=8, test_per_class=2, seed=1)
    assert data.streamed and data.num_classes == 2  # BACKGROUND_Google is left out
    # Only the shape probe decodes: items 0 and 1 of each set.
    assert sorted(decoded) == sorted(data.train.files[:2] + data.test.files[:2])
    assert data.num_train == 11 and data.num_test == 4
    assert np.bincount(data.test.targets).tolist() == [2, 2]  # class-balanced
    assert all("BACKGROUND" not in f for f in data.train.files + data.test.files)
    x, y = next(eval_batches(data, 4))
    assert x.shape == (4, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    kept = load("imagefolder", path=root, size=8, exclude=())
    assert kept.num_classes == 3


def test_augmentation_crops_and_flips_training_images_only(tmp_path):
    folder = tmp_path / "one" / "a"
    folder.mkdir(parents=True)
    left_red = np.zeros((32, 32, 3), dtype=np.uint8)
    left_red[:, :16, 0] = 255
    for i in range(10):
        Image.fromarray(left_red).save(folder / f"{i}.png")
    data = load("imagefolder", path=tmp_path / "one", size=16, crop=True, flip=True, seed=0)
    assert data.train.crop and data.train.flip and not data.test.crop and not data.test.flip
    torch.manual_seed(0)
    reds = {round(float(data.train[0][0][0, :, 0].mean()), 2) for _ in range(40)}
    assert len(reds) == 2 and min(reds) < 0.1 and max(reds) > 0.9  # flipped, and not
    xs = [data.train[0][0] for _ in range(20)]
    assert all(x.shape == (3, 16, 16) for x in xs)
    assert any(not torch.equal(xs[0], x) for x in xs[1:])  # crops move
    plain = data.test[0][0]
    assert torch.equal(plain, data.test[0][0])  # the test images are not augmented


def test_unreadable_images_are_skipped_and_counted_or_fatal(tmp_path, caplog):
    root = _caltech(tmp_path, {"a": 5, "b": 5})
    folder = root / "101_ObjectCategories" / "a"
    (folder / "broken.jpg").write_bytes(b"not a jpeg at all")
    with caplog.at_level(logging.WARNING, logger="downpour.data.images"):
        data = load("imagefolder", path=root, size=8)
    assert data.num_train + data.num_test == 10
    assert "skipped 1 unreadable image(s)" in caplog.text and "broken.jpg" in caplog.text
    with pytest.raises(DataError, match=r"cannot read image .*broken\.jpg"):
        load("imagefolder", path=root, size=8, on_error="raise")


def test_an_image_that_fails_to_decode_is_replaced_or_fatal(tmp_path, caplog):
    root = _caltech(tmp_path, {"a": 6, "b": 6})
    folder = root / "101_ObjectCategories" / "a"
    noise = np.random.default_rng(1).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "cut.jpg")
    whole = (folder / "cut.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(whole[: len(whole) // 2])  # a valid header, cut short
    data = load("imagefolder", path=root, size=8, test_per_class=2, seed=0)
    with caplog.at_level(logging.WARNING, logger="downpour.data.images"):
        batches = list(epoch(data, 4, generator=torch.Generator().manual_seed(0)))
    assert sum(len(y) for _, y in batches) == data.num_train
    assert any(f.endswith("cut.jpg") for f in data.train.files)  # seed 0 puts it there
    assert data.train.skipped >= 1 and "skipped unreadable image" in caplog.text
    with pytest.raises(DataError, match=r"cannot read image .*cut\.jpg"):
        strict = load("imagefolder", path=root, size=8, on_error="raise", test_per_class=2, seed=0)
        list(epoch(strict, 4))


def test_empty_class_folder(tmp_path):
    root = _caltech(tmp_path, {"a": 3})
    (root / "101_ObjectCategories" / "b").mkdir()
    with pytest.raises(DataError, match=r"class folder .*101_ObjectCategories/b holds no image"):
        load("imagefolder", path=root)
    assert load("imagefolder", path=root, skip_empty=True, size=8).num_classes == 1


def test_streamed_and_in_memory_forms_hold_the_same_images(tmp_path):
    root = _caltech(tmp_path, {"a": 5, "b": 7})
    streamed = load("imagefolder", path=root, size=8, seed=3)
    memory = load("imagefolder", path=root, size=8, seed=3, stream=False)
    assert streamed.num_train == memory.num_train
    x, y = next(eval_batches(streamed, 100))
    assert torch.allclose(x, memory.x_test) and torch.equal(y, memory.y_test)
