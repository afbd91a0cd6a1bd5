"""Small test images and data sets whose two halves differ: sky over sand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from folder_data import folder_dataset
from PIL import Image


def scene(height: int = 64, width: int = 96) -> np.ndarray:
    """Sky over sand, with noise: an image whose two halves differ."""
    rng = np.random.default_rng(0)
    image = np.empty((height, width, 3), np.int64)
    image[: height // 2] = (100, 160, 250)
    image[height // 2 :] = (220, 200, 140)
    return np.clip(image + rng.integers(-20, 20, image.shape), 0, 255).astype(np.uint8)


def sky_and_sand_dataset(root: Path) -> Path:
    """A `folder` data set of two small images (sky over sand) and their labels."""
    root = folder_dataset(root)
    for name, (height, width) in {"a": (64, 96), "b": (48, 64)}.items():
        label = np.zeros((height, width), np.uint8)
        label[height // 2 :] = 1
        Image.fromarray(scene(height, width)).save(root / "images" / f"{name}.png")
        Image.fromarray(label).save(root / "labels" / f"{name}.png")
    return root
