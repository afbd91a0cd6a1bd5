"""A seeded procedural world of textured backgrounds and patterned shapes, with captions.

Why this world looks the way it does (see issue 5 and ``docs/toyworld.md``):

* The segmentation classes are the nouns of the captions: four background kinds drawn as
  textures (``grass``, ``brick wall``, ``water``, ``sand``; "brick wall" is two CLIP tokens)
  and four shapes (``circle``, ``square``, ``triangle``, ``star``).
* All objects of a scene share one colour, taken from the same palette the background tints
  use, so raw colour tells neither the shapes apart nor reliably the background from them:
  colour k-means on pixels scores low.
* Every object of a scene wears a different fine pattern (striped, dotted, checkered, plain)
  fixed to the pixel grid. The caption names the pattern next to the shape ("a dotted
  star and a striped circle on sand"), and a noisy image at mid noise levels shows the
  shapes but not the patterns: the cheapest way to predict an object's pattern is to find
  the caption word of *that* object. That per-object word lookup is what makes
  cross-attention maps land on their objects.
* Captions vary in template and word order, sometimes name only part of the scene, and
  sometimes are bare class-name lists (the form the segmentation prompt takes).

Everything is a pure function of an integer seed. Training uses seeds ``[0, 10**9)``;
evaluation uses :func:`eval_seed`, which maps into ``[10**12, 10**12 + 10**9 * streams)``,
so no held-out scene can ever be a training scene.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

IMAGE_SIZE = 64
BACKGROUNDS: tuple[str, ...] = ("grass", "brick wall", "water", "sand")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
CLASS_NAMES: tuple[str, ...] = BACKGROUNDS + SHAPES
"""Segmentation classes; a label map's value ``i`` means ``CLASS_NAMES[i]``."""

PATTERNS: tuple[str, ...] = ("striped", "dotted", "checkered", "plain")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (200, 40, 40),
    "orange": (230, 130, 30),
    "yellow": (225, 205, 40),
    "green": (50, 160, 60),
    "blue": (40, 80, 200),
    "purple": (130, 50, 170),
    "white": (235, 235, 235),
    "black": (30, 30, 30),
}
# Background tints overlap the object palette on purpose (colour must not give classes away).
# Each tint has a colour word, which captions sometimes use ("yellow grass").
_BACKGROUND_TINTS: dict[str, tuple[tuple[str, tuple[int, int, int]], ...]] = {
    "grass": (("green", (50, 160, 60)), ("lime", (150, 180, 50)), ("dark", (30, 100, 40)), ("yellow", (225, 205, 40))),
    "brick wall": (
        ("brown", (160, 60, 40)),
        ("red", (200, 40, 40)),
        ("orange", (230, 130, 30)),
        ("grey", (130, 130, 130)),
    ),
    "water": (("blue", (40, 80, 200)), ("teal", (40, 140, 160)), ("purple", (130, 50, 170)), ("black", (30, 30, 30))),
    "sand": (
        ("beige", (220, 200, 140)),
        ("yellow", (225, 205, 40)),
        ("tan", (210, 160, 90)),
        ("white", (235, 235, 235)),
    ),
}

TRAIN_SEEDS = range(0, 10**9)
_EVAL_BASE = 10**12
_EVAL_STREAM = 10**9


def train_seed(index: int) -> int:
    """Seed of training scene ``index`` (``0 <= index < 10**9``)."""
    if not 0 <= index < len(TRAIN_SEEDS):
        raise ValueError(f"training scene index {index} is outside [0, {len(TRAIN_SEEDS)})")
    return TRAIN_SEEDS[index]


def eval_seed(index: int, stream: int = 0) -> int:
    """Seed of held-out scene ``index`` of evaluation stream ``stream`` (disjoint from training)."""
    if not 0 <= index < _EVAL_STREAM or stream < 0:
        raise ValueError(f"held-out scene index {index} / stream {stream} out of range")
    return _EVAL_BASE + stream * _EVAL_STREAM + index


def is_train_seed(seed: int) -> bool:
    """Whether ``seed`` belongs to the training range (evaluation code asserts it does not)."""
    return seed in TRAIN_SEEDS


@dataclass(frozen=True)
class SceneObject:
    """One drawn object: its shape class, pattern, colour name and geometry in pixels."""

    shape: str
    pattern: str
    colour: str
    cx: float
    cy: float
    radius: float
    angle: float


@dataclass(frozen=True)
class Scene:
    """A rendered scene.

    ``image`` is ``(H, W, 3) uint8``; ``labels`` is ``(H, W) uint8`` indexing
    :data:`CLASS_NAMES`; ``objects`` are in drawing order (later ones on top).
    """

    seed: int
    image: np.ndarray
    labels: np.ndarray
    caption: str
    background: str
    objects: tuple[SceneObject, ...]
    background_colour: str = ""


# ----------------------------------------------------------------------------- drawing


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    return yy + 0.5, xx + 0.5


def _smooth_rows(field: np.ndarray, length: int, axis: int) -> np.ndarray:
    """Box blur along one axis (wrap-around): streaky textures without scipy."""
    out = np.zeros_like(field)
    for shift in range(-(length // 2), length // 2 + 1):
        out += np.roll(field, shift, axis=axis)
    return out / length


def _background(kind: str, size: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """``(size, size, 3) float64`` texture of one background kind in 0..255, and its tint's name."""
    tints = _BACKGROUND_TINTS[kind]
    tint_name, tint = tints[rng.integers(len(tints))]
    base = np.array(tint, dtype=np.float64)
    yy, xx = _grid(size)
    if kind == "grass":
        blades = _smooth_rows(rng.normal(0.0, 1.0, (size, size)), 7, axis=0)
        shade = 55.0 * blades + 10.0 * rng.normal(0.0, 1.0, (size, size))
        img = base + shade[..., None]
    elif kind == "brick wall":
        bh, bw = 6, 12
        oy, ox = rng.integers(bh), rng.integers(bw)
        row = ((yy - 0.5 + oy) // bh).astype(int)
        col = ((xx - 0.5 + ox + (row % 2) * (bw // 2)) // bw).astype(int)
        jitter = rng.normal(0.0, 18.0, (row.max() + 2, col.max() + 2))
        img = base + jitter[row, col][..., None]
        mortar = (((yy - 0.5 + oy) % bh) < 1) | (((xx - 0.5 + ox + (row % 2) * (bw // 2)) % bw) < 1)
        img[mortar] = 0.35 * img[mortar] + 0.65 * 215.0
    elif kind == "water":
        phase = rng.uniform(0, 2 * np.pi)
        wobble = 0.8 * np.sin(2 * np.pi * xx / 19.0 + phase)
        waves = np.sin(2 * np.pi * (yy + wobble * 3.0) / 6.0 + phase)
        img = base + (38.0 * waves)[..., None] + 6.0 * rng.normal(0.0, 1.0, (size, size, 1))
    elif kind == "sand":
        grain = rng.normal(0.0, 22.0, (size, size))
        dark = rng.random((size, size)) < 0.06
        grain[dark] -= 70.0
        img = base + grain[..., None]
    else:  # pragma: no cover - guarded by BACKGROUNDS
        raise ValueError(f"unknown background {kind!r}")
    return img, tint_name


def _polygon_mask(xx: np.ndarray, yy: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test at pixel centres (works for the non-convex star)."""
    inside = np.zeros(xx.shape, dtype=bool)
    n = len(vertices)
    for i in range(n):
        x1, y1 = vertices[i]
        x2, y2 = vertices[(i + 1) % n]
        crosses = (y1 > yy) != (y2 > yy)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = (x2 - x1) * (yy - y1) / (y2 - y1) + x1
        inside ^= crosses & (xx < x_at)
    return inside


def shape_mask(obj: SceneObject, size: int) -> np.ndarray:
    """``(size, size) bool`` pixels covered by ``obj`` (pixel centres inside the shape)."""
    yy, xx = _grid(size)
    if obj.shape == "circle":
        return (xx - obj.cx) ** 2 + (yy - obj.cy) ** 2 <= obj.radius**2
    if obj.shape == "square":
        count, radii, start = 4, [obj.radius * 0.95], np.pi / 4
    elif obj.shape == "triangle":
        count, radii, start = 3, [obj.radius * 1.1], -np.pi / 2
    elif obj.shape == "star":
        count, radii, start = 10, [obj.radius * 1.1, obj.radius * 0.5], -np.pi / 2
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")
    angles = start + obj.angle + 2 * np.pi * np.arange(count) / count
    r = np.array([radii[i % len(radii)] for i in range(count)])
    vertices = np.stack([obj.cx + r * np.cos(angles), obj.cy + r * np.sin(angles)], axis=1)
    return _polygon_mask(xx, yy, vertices)


def pattern_mask(pattern: str, size: int) -> np.ndarray:
    """``(size, size) bool`` second-colour pixels of a pattern, fixed to the pixel grid."""
    y, x = np.mgrid[0:size, 0:size]
    if pattern == "striped":
        return ((x + y) // 4) % 2 == 1
    if pattern == "checkered":
        return (x // 4 + y // 4) % 2 == 1
    if pattern == "dotted":
        return (x % 8 - 3.5) ** 2 + (y % 8 - 3.5) ** 2 <= 2.3**2
    if pattern == "plain":
        return np.zeros((size, size), dtype=bool)
    raise ValueError(f"unknown pattern {pattern!r}")


def _second_colour(rgb: np.ndarray) -> np.ndarray:
    """The pattern's other colour: a dark shade of light colours, a light tint of dark ones."""
    luma = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return rgb * 0.35 if luma > 110 else rgb + (255.0 - rgb) * 0.6


# ----------------------------------------------------------------------------- layout


def _sample_objects(rng: np.random.Generator, size: int) -> tuple[SceneObject, ...]:
    """1-3 objects of distinct shapes and distinct patterns, one colour, overlaps allowed.

    Each object keeps at least 40% of its area visible after the later ones are drawn, so
    every named object is really there.
    """
    count = int(rng.choice([1, 2, 3], p=[0.2, 0.4, 0.4]))
    colour = str(rng.choice(list(COLOURS)))
    scale = size / IMAGE_SIZE
    for _ in range(50):
        shapes = rng.permutation(len(SHAPES))[:count]
        patterns = rng.permutation(len(PATTERNS))[:count]
        objects = []
        for s, p in zip(shapes, patterns, strict=True):
            radius = rng.uniform(9.0, 16.0) * scale
            margin = radius * 0.8
            objects.append(
                SceneObject(
                    shape=SHAPES[s],
                    pattern=PATTERNS[p],
                    colour=colour,
                    cx=float(rng.uniform(margin, size - margin)),
                    cy=float(rng.uniform(margin, size - margin)),
                    radius=float(radius),
                    angle=float(rng.uniform(0, 2 * np.pi)),
                )
            )
        masks = [shape_mask(o, size) for o in objects]
        visible_ok = True
        for i, mask in enumerate(masks):
            covered = np.zeros_like(mask)
            for later in masks[i + 1 :]:
                covered |= later
            area = mask.sum()
            if area == 0 or (mask & ~covered).sum() < 0.4 * area:
                visible_ok = False
                break
        if visible_ok:
            return tuple(objects)
    return tuple(objects[:1])


# ----------------------------------------------------------------------------- captions


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _object_phrase(obj: SceneObject, rng: np.random.Generator, p_attributes: float = 1.0) -> str:
    """ "a dotted red star" and variants; the pattern word almost always precedes the shape.

    With probability ``1 - p_attributes`` the phrase is the bare shape ("a star").
    """
    style = rng.random()
    plain = rng.random() >= p_attributes
    pattern = obj.pattern
    if plain:
        words = [obj.shape]
    elif style < 0.3:
        words = [pattern, obj.shape]
    elif style < 0.6:
        words = [pattern, obj.colour, obj.shape]
    elif style < 0.82:
        words = [obj.colour, pattern, obj.shape]
    elif style < 0.93:
        words = [obj.colour, obj.shape]
    else:
        words = [obj.shape]
    return _article(" ".join(words))


def _join(phrases: Sequence[str], rng: np.random.Generator) -> str:
    if len(phrases) == 1:
        return phrases[0]
    if len(phrases) == 2 or rng.random() < 0.5:
        return ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return " and ".join(phrases)


_BACKGROUND_PHRASES = {"grass": "grass", "brick wall": "a brick wall", "water": "water", "sand": "sand"}


def make_caption(
    background: str,
    objects: Sequence[SceneObject],
    caption_seed: int,
    background_colour: str = "",
    p_attributes: float = 1.0,
) -> str:
    """A caption for a scene, drawn from several templates by ``caption_seed``.

    Colour words (the background's tint, the objects' colour) are there because colour is
    most of what a very noisy image has lost: they give the text pathway a strong early
    training signal, which the pattern words then refine.

    The template choices depend only on ``caption_seed`` and the number of objects, so the
    same seed on a scene whose objects' patterns were swapped gives the same sentence with
    those two words exchanged (the binding test relies on this). ``p_attributes`` scales how
    often colour and pattern words appear at all (1.0: the captions above).
    """
    rng = np.random.default_rng(caption_seed)
    order = rng.permutation(len(objects))
    kept = [objects[i] for i in order]
    if len(kept) > 1 and rng.random() < 0.15:  # name only part of the scene
        kept = kept[: int(rng.integers(1, len(kept)))]
    style = rng.random()
    if style < 0.15:  # bare class-name list, the segmentation prompt's form
        names = [background] + [o.shape for o in kept]
        names = [names[i] for i in rng.permutation(len(names))]
        if rng.random() < 0.3 and len(names) > 1:
            names = names[: int(rng.integers(1, len(names)))]
        return (" and " if rng.random() < 0.6 else ", ").join(names)
    phrases = [_object_phrase(o, rng, p_attributes) for o in kept]
    things = _join(phrases, rng)
    bg = _BACKGROUND_PHRASES[background]
    if rng.random() < 0.6 * p_attributes and background_colour:
        bg = f"a {background_colour} brick wall" if background == "brick wall" else f"{background_colour} {bg}"
    templates = (
        "{things} on {bg}",
        "{bg} with {things}",
        "{things} in front of {bg}",
        "a picture of {things} and {bg}",
        "{things}",
        "{bg} behind {things}",
    )
    if style < 0.2:
        return bg
    template = templates[int(rng.integers(len(templates)))]
    return template.format(things=things, bg=bg)


def swap_patterns(objects: Sequence[SceneObject], i: int, j: int) -> tuple[SceneObject, ...]:
    """The objects with the patterns of ``i`` and ``j`` exchanged (for the binding test)."""
    swapped = list(objects)
    swapped[i] = replace(objects[i], pattern=objects[j].pattern)
    swapped[j] = replace(objects[j], pattern=objects[i].pattern)
    return tuple(swapped)


# ----------------------------------------------------------------------------- scenes


def render(
    background_image: np.ndarray, background: str, objects: Sequence[SceneObject]
) -> tuple[np.ndarray, np.ndarray]:
    """Draw objects over a background texture -> ``(image uint8 (H,W,3), labels uint8 (H,W))``.

    The label map is written with the very masks that paint the pixels, so labels match the
    drawing exactly.
    """
    size = background_image.shape[0]
    img = background_image.copy()
    labels = np.full((size, size), CLASS_NAMES.index(background), dtype=np.uint8)
    for obj in objects:
        mask = shape_mask(obj, size)
        first = np.array(COLOURS[obj.colour], dtype=np.float64)
        colour = np.where(pattern_mask(obj.pattern, size)[..., None], _second_colour(first), first)
        img[mask] = colour[mask]
        labels[mask] = CLASS_NAMES.index(obj.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), labels


def make_scene(seed: int, size: int = IMAGE_SIZE) -> Scene:
    """The scene of ``seed``: same seed, same image, labels and caption, on any machine."""
    if size % 8:
        raise ValueError(f"size must be a multiple of 8 (patterns are 8-pixel periodic), got {size}")
    rng = np.random.default_rng(seed)
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    objects = _sample_objects(rng, size)
    texture, tint = _background(background, size, rng)
    # Objects get a little sensor noise of their own so flat regions are not perfectly flat.
    texture_noise = rng.normal(0.0, 6.0, (size, size, 1))
    image, labels = render(texture, background, objects)
    on_objects = labels >= len(BACKGROUNDS)
    noisy = np.clip(image.astype(np.float64) + texture_noise * on_objects[..., None], 0, 255)
    caption = make_caption(background, objects, int(rng.integers(2**31)), tint)
    return Scene(
        seed=seed,
        image=np.rint(noisy).astype(np.uint8),
        labels=labels,
        caption=caption,
        background=background,
        objects=objects,
        background_colour=tint,
    )


def class_palette() -> np.ndarray:
    """``(len(CLASS_NAMES), 3) uint8`` display colours for label maps."""
    return np.array(
        [
            (60, 170, 70),
            (170, 80, 60),
            (60, 110, 210),
            (220, 200, 130),
            (240, 60, 60),
            (250, 210, 40),
            (170, 60, 220),
            (250, 250, 250),
        ],
        dtype=np.uint8,
    )


def sample_grid(seeds: Sequence[int], columns: int = 4, scale: int = 3):
    """A PIL image showing scenes (image | label map) with captions, for docs and eyeballing."""
    from PIL import Image, ImageDraw

    scenes = [make_scene(s) for s in seeds]
    cell_w, cell_h = 2 * IMAGE_SIZE * scale + 8, IMAGE_SIZE * scale + 28
    rows = (len(scenes) + columns - 1) // columns
    canvas = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    palette = class_palette()
    for k, scene in enumerate(scenes):
        x0, y0 = (k % columns) * cell_w, (k // columns) * cell_h
        big = (IMAGE_SIZE * scale,) * 2
        canvas.paste(Image.fromarray(scene.image).resize(big, Image.NEAREST), (x0, y0))
        canvas.paste(Image.fromarray(palette[scene.labels]).resize(big, Image.NEAREST), (x0 + big[0], y0))
        text = scene.caption if len(scene.caption) <= 60 else scene.caption[:57] + "..."
        draw.text((x0 + 2, y0 + big[1] + 2), text, fill="black")
    return canvas
