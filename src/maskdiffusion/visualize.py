"""Pictures of segmentations: a stable palette, colour overlays with a legend, heat maps."""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Hand-picked, well separated colours for the first classes; more come from a golden-ratio
# walk around the hue circle.
_BASE_COLOURS = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
    (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
    (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128),
]  # fmt: skip
BACKGROUND_COLOUR = (0, 0, 0)
BAND_ROWS = 512  # rows blended at a time in overlays: bounds the float copies on large images


def palette(count: int) -> np.ndarray:
    """``(count, 3)`` uint8 colours; class ``i`` always gets the same colour."""
    colours = list(_BASE_COLOURS[:count])
    for i in range(len(colours), count):
        hue = (i * 0.618033988749895) % 1.0
        value = 0.95 if i % 2 else 0.7
        colours.append(tuple(round(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.75, value)))
    return np.array(colours, dtype=np.uint8).reshape(count, 3)


def colorize(labels: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` uint8 picture of ``labels`` ``(H, W)``; negative labels are background."""
    table = np.concatenate([colours, np.array([BACKGROUND_COLOUR], dtype=np.uint8)])
    return table[np.where(labels < 0, len(colours), labels)]


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def legend(
    names: Sequence[str], colours: np.ndarray, *, height: int, notes: Sequence[str] | None = None
) -> Image.Image:
    """A white panel listing ``names`` with their colour swatches (and optional notes)."""
    font_size = max(11, min(18, height // max(len(names), 1) - 4))
    font = _font(font_size)
    line = font_size + 6
    texts = [f"{n}  {notes[i]}" if notes else n for i, n in enumerate(names)]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_width = max((probe.textlength(t, font=font) for t in texts), default=0)
    width = int(text_width) + line + 24
    panel = Image.new("RGB", (width, max(height, line * len(names) + 12)), "white")
    draw = ImageDraw.Draw(panel)
    for i, text in enumerate(texts):
        top = 6 + i * line
        draw.rectangle(
            [8, top + 2, 8 + line - 6, top + line - 4], fill=tuple(int(c) for c in colours[i]), outline="black"
        )
        draw.text((8 + line, top), text, fill="black", font=font)
    return panel


def overlay(
    image: Image.Image,
    labels: np.ndarray,
    names: Sequence[str],
    colours: np.ndarray,
    *,
    alpha: float = 0.5,
    show: Sequence[int] | None = None,
    notes: Sequence[str] | None = None,
) -> Image.Image:
    """Image blended with its label colours, with a legend panel on the right.

    ``show``: class indices listed in the legend (default: the classes present). Works a
    band of rows at a time, so memory stays near the size of the picture itself.
    """
    base = np.asarray(image.convert("RGB"))
    blended = np.empty_like(base)
    present: set[int] = set()
    for top in range(0, base.shape[0], BAND_ROWS):
        rows = slice(top, top + BAND_ROWS)
        band, pixels = labels[rows], base[rows].astype(np.float32)
        painted = colorize(band, colours).astype(np.float32)
        mixed = np.where(band[..., None] >= 0, (1 - alpha) * pixels + alpha * painted, pixels)
        blended[rows] = mixed.round().astype(np.uint8)
        if show is None:
            present.update(int(c) for c in np.unique(band) if c >= 0)
    picture = Image.fromarray(blended)
    if show is None:
        show = sorted(present)
    panel = legend(
        [names[c] for c in show],
        colours[list(show)],
        height=picture.height,
        notes=[notes[c] for c in show] if notes else None,
    )
    canvas = Image.new("RGB", (picture.width + panel.width, max(picture.height, panel.height)), "white")
    canvas.paste(picture, (0, 0))
    canvas.paste(panel, (picture.width, 0))
    return canvas


def heatmap(values: np.ndarray, size: tuple[int, int] | None = None) -> Image.Image:
    """A [0, 1] map ``(h, w)`` as an RGB heat map (black -> red -> yellow -> white)."""
    v = np.clip(values, 0.0, 1.0)
    rgb = np.stack([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], axis=-1)
    picture = Image.fromarray((rgb * 255).round().astype(np.uint8))
    return picture.resize(size, Image.Resampling.BILINEAR) if size else picture


def side_by_side(panels: Sequence[Image.Image], titles: Sequence[str], *, gap: int = 6) -> Image.Image:
    """Panels in one row with a title above each."""
    font = _font(16)
    height = max(p.height for p in panels)
    width = sum(p.width for p in panels) + gap * (len(panels) - 1)
    canvas = Image.new("RGB", (width, height + 24), "white")
    draw = ImageDraw.Draw(canvas)
    left = 0
    for panel, title in zip(panels, titles, strict=True):
        canvas.paste(panel, (left, 24))
        draw.text((left + 4, 3), title, fill="black", font=font)
        left += panel.width + gap
    return canvas


def label_grid(
    rows: Sequence[Sequence[np.ndarray]],
    titles: Sequence[str],
    names: Sequence[str],
    colours: np.ndarray,
    *,
    scale: int = 4,
    gap: int = 4,
) -> Image.Image:
    """A table of pictures: one row per image, one titled column per panel, one legend of all classes.

    Arguments:
        rows: per row, one panel per title: an ``(H, W, 3)`` uint8 picture or an ``(H, W)``
            integer label map indexing ``names`` (a value outside ``0..len(names)-1``, e.g.
            -1 or the ignore value 255, is drawn in the background colour).
        titles: column titles.
        names, colours: the classes of the label maps and their ``(C, 3)`` uint8 colours.
        scale: nearest-neighbour enlargement, so that small images stay crisp.
    """

    def panel(values: np.ndarray) -> Image.Image:
        values = np.asarray(values)
        if values.ndim == 2:
            labels = values.astype(np.int64)
            values = colorize(np.where(labels < len(colours), labels, -1), colours)
        picture = Image.fromarray(values.astype(np.uint8))
        return picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)

    pictures = [[panel(values) for values in row] for row in rows]
    cell_w = max((p.width for row in pictures for p in row), default=1)
    cell_h = max((p.height for row in pictures for p in row), default=1)
    top = 22
    key = legend(list(names), colours, height=max(len(rows), 1) * (cell_h + gap))
    width = len(titles) * (cell_w + gap) + key.width
    canvas = Image.new("RGB", (width, top + max(len(rows) * (cell_h + gap), key.height)), "white")
    draw = ImageDraw.Draw(canvas)
    font = _font(14)
    for column, title in enumerate(titles):
        draw.text((column * (cell_w + gap) + 2, 3), title, fill="black", font=font)
    for r, row in enumerate(pictures):
        if len(row) != len(titles):
            raise ValueError(f"row {r} has {len(row)} panels for {len(titles)} titles")
        for column, picture in enumerate(row):
            canvas.paste(picture, (column * (cell_w + gap), top + r * (cell_h + gap)))
    canvas.paste(key, (len(titles) * (cell_w + gap), top))
    return canvas
