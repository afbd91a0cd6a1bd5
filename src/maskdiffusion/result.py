"""What a segmentation returns, and how it is written to disk."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import files, visualize
from .presets import Preset
from .prompts import ClassName
from .views import upsample_rows

BACKGROUND = -1  # label of pixels under the background threshold
PNG_BACKGROUND = 255  # ... as written in 8-bit label PNGs (65535 in 16-bit ones)


@dataclass
class Result:
    """A segmentation of one image.

    Attributes:
        classes: class display names; ``labels`` index into this list.
        labels: ``(H, W)`` int64 class index per pixel at the input's size; -1 where
            the background threshold rejected every class.
        attention: ``(C, h, w)`` float32 per-class cross-attention on the attention grid
            covering the whole image, normalised as the preset says (``max``: each map's
            peak is 1; ``probabilities``: the class's softmax mass per cell).
        image: the input as RGB (for overlays).
        grid_scores: ``(C, hf, wf)`` float32 class scores on the feature grid (what they are:
            ``preset.score_kind()``).
        features: ``(D, hf, wf)`` float32 stitched features (UNet decoder or transformer blocks) on
            the feature grid, kept only when asked for (``keep_features=True``), e.g. for clustering.
        preset_name: the named preset ``preset`` is (or is closest to; JSON lists the changes).
        warnings: what the user must know to read the result (random weights, words the
            model never saw); also in the JSON and printed by the command line.
        absent: classes the head judged absent (``Preset.class_presence="support"``); they
            take no pixel.
    """

    classes: list[str]
    labels: np.ndarray
    attention: np.ndarray
    image: Image.Image
    grid_scores: torch.Tensor
    preset: Preset
    vocabulary: list[ClassName]
    model: str = ""
    source: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    runtime: dict[str, object] = field(default_factory=dict)
    features: torch.Tensor | None = None
    preset_name: str = ""
    warnings: list[str] = field(default_factory=list)
    absent: list[str] = field(default_factory=list)

    @cached_property
    def scores(self) -> np.ndarray:
        """``(C, H, W)`` float32 class scores at the input size (bilinear from the grid)."""
        size = (self.image.height, self.image.width)
        return upsample_rows(self.grid_scores, size, slice(None)).numpy()

    @property
    def palette(self) -> np.ndarray:
        """``(C, 3)`` uint8 colour of each class."""
        return visualize.palette(len(self.classes))

    def pixel_share(self) -> dict[str, float]:
        """Fraction of the image's pixels given to each class (and to background, if any)."""
        counts = np.bincount(self.labels.ravel() + 1, minlength=len(self.classes) + 1)
        total = max(self.labels.size, 1)
        share = {name: float(counts[i + 1]) / total for i, name in enumerate(self.classes)}
        if counts[0]:
            share["background"] = float(counts[0]) / total
        return share

    def overlay(self, alpha: float = 0.5) -> Image.Image:
        """The image with class colours blended in and a legend of the classes present."""
        share = self.pixel_share()
        notes = [f"{100 * share[name]:.1f}%" for name in self.classes]
        return visualize.overlay(self.image, self.labels, self.classes, self.palette, alpha=alpha, notes=notes)

    def label_image(self) -> Image.Image:
        """Labels as a PNG-ready image: palette mode (value = class index, 255 = background),
        or 16-bit grayscale when there are more than 255 classes (65535 = background)."""
        if len(self.classes) < PNG_BACKGROUND:
            values = np.where(self.labels < 0, PNG_BACKGROUND, self.labels).astype(np.uint8)
            picture = Image.fromarray(values, mode="P")
            table = np.zeros((256, 3), dtype=np.uint8)
            table[: len(self.classes)] = self.palette
            picture.putpalette(table.ravel().tolist())
            return picture
        values = np.where(self.labels < 0, 65535, self.labels).astype(np.uint16)
        return Image.fromarray(values)

    def summary(self) -> dict:
        """JSON-ready description: classes, palette, pixel shares, model, settings, timings."""
        return {
            "source": self.source,
            "image_size": [self.image.width, self.image.height],
            "model": self.model,
            "warnings": self.warnings,
            "classes": [{"index": i, "name": c.name, "words": list(c.synonyms)} for i, c in enumerate(self.vocabulary)],
            "palette": self.palette.tolist(),
            "background_label": PNG_BACKGROUND if len(self.classes) < PNG_BACKGROUND else 65535,
            "pixel_share": self.pixel_share(),
            "absent": self.absent,
            "preset": self.preset_name,
            "settings": {**self.preset.to_dict(), **self.runtime},
            "timings": self.timings,
        }

    def save(self, out_dir: str | os.PathLike, name: str | None = None) -> dict[str, Path]:
        """Write ``NAME.labels.png``, ``NAME.overlay.png`` and ``NAME.json`` into ``out_dir``.

        ``name`` defaults to the source file's stem. The three are written as a set (all or
        none, the JSON renamed into place last): an interrupt or a full disk never leaves an
        image with only some of its files.
        """
        out = Path(out_dir)
        stem = name or (Path(self.source).stem if self.source else "image")
        paths = {
            "labels": out / f"{stem}.labels.png",
            "overlay": out / f"{stem}.overlay.png",
            "json": out / f"{stem}.json",
        }
        files.write_files(
            {
                paths["labels"]: files.image_bytes(self.label_image()),
                paths["overlay"]: files.image_bytes(self.overlay()),
                paths["json"]: files.json_bytes(self.summary()),
            }
        )
        return paths
