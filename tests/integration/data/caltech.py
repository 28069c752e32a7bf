"""A generated folder in Caltech-101's layout, and one measured downpour run over it.

``make_folder`` writes ``101_ObjectCategories/<class>/image_NNNN.jpg`` (and a
``BACKGROUND_Google`` class the loader leaves out): JPEGs of about 300 x 200
whose colours and stripes depend on the class, so a CNN can learn them.

Run as a module, it trains a CNN with downpour on such a folder in this
(fresh) process and prints one JSON line: the run's summary figures, the
coordinator's peak resident memory and each role's, and the size the
training images would take decoded at full size as float32 (3 x H x W x 4
bytes each), which the in-memory form would hold:

    python -m tests.integration.data.caltech FOLDER [--steps 300] [--loader-workers 0]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = 101


def make_folder(root: Path, *, per_class: int = 20, classes: int = CLASSES, seed: int = 0) -> Path:
    """Write the folder under ``root`` and return ``root``; sizes vary around 300 x 200."""
    rng = np.random.default_rng(seed)
    top = root / "101_ObjectCategories"
    names = ["BACKGROUND_Google"] + [f"class_{c:03d}" for c in range(classes)]
    palette = rng.integers(0, 256, (len(names), 2, 3))
    for k, name in enumerate(names):
        folder = top / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            width, height = 300 + int(rng.integers(-20, 21)), 200 + int(rng.integers(-20, 21))
            # Stripes at a class's own angle, in its two colours, plus noise.
            angle = math.pi * k / len(names)
            yy, xx = np.mgrid[0:height, 0:width]
            wave = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) / (4 + k % 7)) > 0
            pixels = np.where(wave[..., None], palette[k, 0], palette[k, 1]).astype(np.float32)
            pixels += rng.normal(0, 25, pixels.shape)
            image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
            image.save(folder / f"image_{i:04d}.jpg", quality=85)
    return root


def decoded_bytes(files: list[str]) -> int:
    """What the images take decoded at full size as float32 (headers only are read)."""
    total = 0
    for file in files:
        with Image.open(file) as image:
            width, height = image.size
        total += 3 * width * height * 4
    return total


def main() -> None:
    import downpour as dp
    from downpour.metrics.memory import RoleMemory, peak_rss

    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--loader-workers", type=int, default=0)
    parser.add_argument("--run-dir", type=Path, default=None)
    args = parser.parse_args()
    data = dp.data.load("imagefolder", path=args.folder, size=args.size, test_per_class=3,
                        crop=True, flip=True, loader_workers=args.loader_workers)
    with RoleMemory() as roles:
        result = dp.train(model="cnn", data=data, strategy=dp.Downpour(), workers=2, servers=1,
                          epochs=1000, max_steps=args.steps, batch_size=args.batch_size,
                          eval_samples=101, optimizer=dp.optim("adam", lr=2e-3),
                          save=args.run_dir is not None, run_dir=args.run_dir, seed=0)
    summary = result.summary
    print(json.dumps({
        "images": data.num_train + data.num_test, "classes": data.num_classes,
        "train_images": data.num_train,
        "decoded_train_bytes": decoded_bytes(data.train.files),
        "coordinator_peak_bytes": peak_rss(),
        "role_peak_bytes": roles.peaks,
        "accuracy": summary["accuracy"], "loss": summary["loss"], "steps": summary["steps"],
        "samples_per_second": summary["samples_per_second"], "seconds": summary["seconds"],
        "first_loss": next(e["train/loss"] for e in result.history if "train/loss" in e),
    }))


if __name__ == "__main__":
    main()
