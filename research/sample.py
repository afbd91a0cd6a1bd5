"""Sample images from a toy-world model, and check them against their captions without it.

``python -m research.sample --model toy --caption "a star on grass" --out grid.png``
draws ``--per-caption`` images per caption with DDIM and classifier-free guidance (the empty
caption is the unconditional one, as in training) and writes a grid, one row per caption.

The check is independent of the model: :func:`classify_background` tells the four
background kinds apart from a handful of statistics of the slightly blurred image (direction
of the gradients, vertical autocorrelation at the wave and brick periods, the tint of the
image's frame) with a nearest-centroid rule fitted on training scenes of the world;
:func:`classify_object_colour` lets the pixels whose hue is off the background's vote for
their nearest palette colour. Both are validated on held-out scenes of the world before they
are trusted on generated images (``tests/test_toyworld_sample.py``); the background kind is
the robust one (a factor-4 autoencoder keeps bricks, waves and tints but shifts object
colours).
"""

from __future__ import annotations

import argparse
import functools
import re
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from maskdiffusion.files import write_image
from maskdiffusion.loading import Components, load_components, pick_device, resolve_model_folder
from maskdiffusion.toyworld.world import BACKGROUNDS, COLOURS, PATTERNS, SHAPES, _second_colour, make_scene, train_seed

# ----------------------------------------------------------------------------- sampling


def load(model: str | Path, device: str | torch.device = "cpu") -> Components:
    """The model's components (``toy``, a folder or a hub id), float32, on ``device``."""
    return load_components(resolve_model_folder(str(model)), device=pick_device(device), dtype=torch.float32)


def _encode(components: Components, captions: Sequence[str]) -> torch.Tensor:
    tokenizer = components.backbone.tokenizer
    ids = tokenizer(
        list(captions),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    device = next(components.backbone.text_encoder.parameters()).device
    return components.backbone.text_encoder(ids.to(device))[0]


def _noise(shape: tuple[int, ...], seed: int, column: int) -> torch.Tensor:
    """Initial latent of column ``column``: every caption's row starts from the same noises."""
    generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + column)
    return torch.randn(shape, generator=generator)


@torch.no_grad()
def sample(
    model: str | Path | Components,
    captions: Sequence[str],
    *,
    per_caption: int = 4,
    steps: int = 50,
    guidance: float = 3.0,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """``(len(captions) * per_caption, H, W, 3) uint8`` images, caption by caption.

    DDIM (eta 0, the model's own ``scheduler/`` configuration) with classifier-free guidance
    ``eps = eps("") + guidance * (eps(caption) - eps(""))``; ``guidance=1`` is the plain
    conditional model. Image ``j`` of every caption starts from the same noise, drawn from
    ``seed`` and ``j`` only, so rows differ by their caption alone and a seed always gives the
    same images. Everything runs as one batch.
    """
    from diffusers import DDIMScheduler

    if per_caption < 1 or steps < 1:
        raise ValueError(f"per_caption and steps must be >= 1, got {per_caption} and {steps}")
    components = model if isinstance(model, Components) else load(model, device)
    unet, vae = components.backbone.unet, components.vae
    run_device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    captions = list(captions)
    if not captions:
        raise ValueError("no captions to sample")
    scheduler_dir = Path(components.folder) / "scheduler"
    if (scheduler_dir / "scheduler_config.json").exists():
        scheduler = DDIMScheduler.from_pretrained(scheduler_dir)
    else:  # a folder without a schedule: SD's, which is what toy models are trained with
        from maskdiffusion.tiny import SD_NOISE_SCHEDULE

        scheduler = DDIMScheduler(**SD_NOISE_SCHEDULE)
    scheduler.set_timesteps(steps)

    n = len(captions) * per_caption
    channels = unet.config.in_channels
    size = unet.config.sample_size
    columns = [_noise((channels, size, size), seed, j) for j in range(per_caption)]
    latents = torch.stack(columns * len(captions)).to(run_device, dtype) * scheduler.init_noise_sigma
    texts = [c for c in captions for _ in range(per_caption)]
    guided = guidance != 1.0
    context = _encode(components, texts + ([""] * n if guided else [])).to(dtype)
    for t in scheduler.timesteps:
        x = torch.cat([latents, latents]) if guided else latents
        eps = unet(x, t.to(run_device), encoder_hidden_states=context).sample
        if guided:
            eps_text, eps_empty = eps.chunk(2)
            eps = eps_empty + guidance * (eps_text - eps_empty)
        latents = scheduler.step(eps, t, latents, eta=0.0).prev_sample
    images = vae.decode(latents / vae.config.scaling_factor).sample
    images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()


def grid_image(images: np.ndarray, captions: Sequence[str], scale: int = 2, notes: Sequence[str] | None = None):
    """A PIL grid: one row per caption (its text above), ``len(images) // len(captions)`` columns.

    ``notes`` (one per image, optional) are written under each image.
    """
    from PIL import Image, ImageDraw

    rows = len(captions)
    cols = len(images) // rows
    side = images.shape[1] * scale
    gap, text_h = 4, 14
    note_h = text_h if notes else 0
    width = max(cols * (side + gap) + gap, 200)
    row_h = text_h + side + note_h + gap
    canvas = Image.new("RGB", (width, rows * row_h + gap), "white")
    draw = ImageDraw.Draw(canvas)
    for r, caption in enumerate(captions):
        y0 = gap + r * row_h
        text, limit = caption, width - 2 * gap
        if draw.textlength(text) > limit:
            while text and draw.textlength(text + "...") > limit:
                text = text[:-1]
            text += "..."
        draw.text((gap, y0), text, fill="black")
        for c in range(cols):
            k = r * cols + c
            x0 = gap + c * (side + gap)
            canvas.paste(Image.fromarray(images[k]).resize((side, side), Image.NEAREST), (x0, y0 + text_h))
            if notes:
                draw.text((x0, y0 + text_h + side + 1), notes[k], fill=(90, 90, 90))
    return canvas


# ----------------------------------------------------------------------------- measurement


def _chroma(rgb: np.ndarray) -> np.ndarray:
    """The colour with its grey level removed (the component orthogonal to ``(1, 1, 1)``)."""
    return rgb - rgb.mean(-1, keepdims=True)


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of an ``(H, W[, C])`` float array (separable, mirrored edges)."""
    radius = int(np.ceil(3 * sigma))
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    pad = ((radius, radius), (radius, radius)) + ((0, 0),) * (image.ndim - 2)
    padded = np.pad(image, pad, mode="reflect")
    h, w = image.shape[:2]
    rows = sum(k * padded[i : i + h] for i, k in enumerate(kernel))
    return sum(k * rows[:, i : i + w] for i, k in enumerate(kernel))


def _frame(shape: tuple[int, ...], width: int = 3) -> np.ndarray:
    """``(H, W) bool``: the outer ``width`` pixels (mostly background in every scene)."""
    frame = np.zeros(shape[:2], dtype=bool)
    frame[:width], frame[-width:], frame[:, :width], frame[:, -width:] = True, True, True, True
    return frame


BLUR_SIGMA = 1.0
"""Images are blurred first: the factor-4 autoencoder keeps bricks and waves (6-pixel
periods) but not grass blades or sand grain (1 pixel), and real and generated images must
be compared at the scale both have."""


def background_features(image: np.ndarray) -> np.ndarray:
    """Texture and colour statistics of a ``(H, W, 3) uint8`` image's background.

    Texture, on grey levels: ``log(mean |d/dx| / mean |d/dy|)`` (grass blades are vertical,
    mortar and waves horizontal, sand isotropic), the vertical autocorrelation at lags 1, 3
    and 6 (waves have a 6-pixel period, bricks are 6 pixels high) and the horizontal one at
    lag 1. Colour: the median chroma (two axes) and grey level of a 3-pixel frame, i.e. the
    background's tint, since each kind has its own four tints (some shared).
    """
    x = _blur(image.astype(np.float64), BLUR_SIGMA)
    grey = x.mean(-1)
    dx = np.abs(np.diff(grey, axis=1)).mean()
    dy = np.abs(np.diff(grey, axis=0)).mean()

    def autocorrelation(axis: int, lag: int) -> float:
        a = grey - grey.mean(axis=axis, keepdims=True)
        u, v = (a[:-lag], a[lag:]) if axis == 0 else (a[:, :-lag], a[:, lag:])
        return float((u * v).mean() / max((a * a).mean(), 1e-9))

    frame = _frame(x.shape)
    chroma = np.median(_chroma(x)[frame], axis=0)
    return np.array(
        [
            np.log((dx + 1e-3) / (dy + 1e-3)),
            autocorrelation(0, 1),
            autocorrelation(0, 3),
            autocorrelation(0, 6),
            autocorrelation(1, 1),
            (chroma[0] - chroma[2]) / 40.0,
            (chroma[1] - (chroma[0] + chroma[2]) / 2) / 40.0,
            np.median(grey[frame]) / 40.0,
        ]
    )


FIT_SCENES = 400
"""Training scenes (seeds ``0..FIT_SCENES-1``) the background classifier's centroids come from."""


@functools.lru_cache(maxsize=1)
def _background_centroids() -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Mean features per (kind, tint) of training scenes, the pooled spread, and each one's kind."""
    scenes = [make_scene(train_seed(i)) for i in range(FIT_SCENES)]
    feats = np.stack([background_features(s.image) for s in scenes])
    keys = sorted({(s.background, s.background_colour) for s in scenes})
    index = np.array([keys.index((s.background, s.background_colour)) for s in scenes])
    centroids = np.stack([feats[index == k].mean(0) for k in range(len(keys))])
    # Within one (kind, tint) the colour hardly varies on real scenes, but a decoder's colours
    # are a little off: the spread is floored at half the feature's spread over all scenes.
    spread = np.maximum((feats - centroids[index]).std(0), 0.5 * feats.std(0))
    return centroids, spread, tuple(kind for kind, _ in keys)


def classify_background(image: np.ndarray) -> str:
    """The background kind (one of :data:`BACKGROUNDS`) of a ``(H, W, 3) uint8`` image.

    Nearest of 16 centroids (one per background kind and tint, from real training scenes)
    in :func:`background_features` divided by their within-centroid spread (floored).
    """
    centroids, spread, kinds = _background_centroids()
    distance = (((background_features(image) - centroids) / spread) ** 2).sum(-1)
    return kinds[int(np.argmin(distance))]


_PALETTE = np.array(list(COLOURS.values()), dtype=np.float64)
# Patterned objects show their colour and its second colour: both vote for the colour.
_PATTERN_PALETTE = np.concatenate([_PALETTE, np.stack([_second_colour(c) for c in _PALETTE])])
_PATTERN_LABELS = np.concatenate([np.arange(len(_PALETTE)), np.arange(len(_PALETTE))])


def _off_line(chroma: np.ndarray, line: np.ndarray, low: float, high: float) -> np.ndarray:
    """Distance of chroma vectors from the segment ``[low * line, high * line]``."""
    norm = float(line @ line)
    if norm < 1e-6:
        return np.linalg.norm(chroma, axis=-1)
    along = np.clip((chroma @ line) / norm, low, high)
    return np.linalg.norm(chroma - along[..., None] * line, axis=-1)


def classify_object_colour(image: np.ndarray, far: float = 25.0, min_pixels: int = 30) -> str:
    """The objects' colour (a key of :data:`COLOURS`) of a ``(H, W, 3) uint8`` image.

    Every background texture is its tint plus a grey offset per pixel (and lighter mortar,
    a shrunk tint), so its pixels' chroma lies on a segment through the tint's chroma. The
    tint's chroma is the median over a 3-pixel frame (mostly background); pixels whose chroma
    is more than ``far`` off that segment are object pixels and each votes for its nearest
    palette colour or pattern second colour. When fewer than ``min_pixels`` are off it (the
    objects share the background's hue, or both are white/black/grey), the palette colours
    on the segment compete by how many pixels lie within 30 of them.
    """
    x = image.astype(np.float64)
    chroma = _chroma(x)
    tint = np.median(chroma[_frame(x.shape)], axis=0)
    objects = _off_line(chroma, tint, 0.3, 1.1) > far
    names = list(COLOURS)
    if objects.sum() >= min_pixels:
        pixels = x[objects]
        nearest = ((pixels[:, None, :] - _PATTERN_PALETTE[None]) ** 2).sum(-1).argmin(1)
        return names[int(np.bincount(_PATTERN_LABELS[nearest], minlength=len(names)).argmax())]
    candidates = [k for k in range(len(names)) if _off_line(_chroma(_PALETTE[k]), tint, 0.0, 1.5) < far]
    candidates = candidates or list(range(len(names)))
    pixels = x.reshape(-1, 3)
    counts = [int((np.linalg.norm(pixels - _PALETTE[k], axis=-1) < 30.0).sum()) for k in candidates]
    return names[candidates[int(np.argmax(counts))]]


_WORD = re.compile(r"[a-z]+")


def named_background(caption: str) -> str | None:
    """The background kind a caption names, or None when it names none."""
    words = _WORD.findall(caption.lower())
    text = " " + " ".join(words) + " "
    found = [kind for kind in BACKGROUNDS if f" {kind} " in text]
    return found[0] if len(found) == 1 else None


def named_object_colour(caption: str) -> str | None:
    """The colour a caption gives its objects ("a red dotted star" -> red), or None.

    A colour word counts only when the words after it, up to a shape, are pattern words:
    "yellow sand" names the background's tint, not the objects' colour.
    """
    words = _WORD.findall(caption.lower())
    found = set()
    for i, word in enumerate(words):
        if word not in COLOURS:
            continue
        rest = words[i + 1 :]
        k = 0
        while k < len(rest) and rest[k] in PATTERNS:
            k += 1
        if k < len(rest) and rest[k] in SHAPES:
            found.add(word)
    return found.pop() if len(found) == 1 else None


def background_accuracy(images: np.ndarray, kinds: Sequence[str]) -> float:
    """Share of images whose measured background kind is the named one."""
    return float(np.mean([classify_background(im) == kind for im, kind in zip(images, kinds, strict=True)]))


# ----------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="toy", help="'toy' (bundled), a diffusers folder or a hub id")
    parser.add_argument("--caption", action="append", required=True, help="a caption (repeat for more rows)")
    parser.add_argument("--per-caption", type=int, default=4, help="images per caption (default 4)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    parser.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=int, default=2, help="pixel scale of the grid (default 2)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, mps or auto")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--out", required=True, type=Path, help="grid PNG to write")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    components = load(args.model, args.device)
    start = time.perf_counter()
    images = sample(
        components,
        args.caption,
        per_caption=args.per_caption,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
    )
    seconds = time.perf_counter() - start
    notes = [f"{classify_background(im)} / {classify_object_colour(im)}" for im in images]
    write_image(args.out, grid_image(images, args.caption, args.scale, notes))
    print(f"{len(images)} images in {seconds:.1f} s -> {args.out}")
    print("measured (background / object colour) per caption, without the model:")
    for r, caption in enumerate(args.caption):
        row = notes[r * args.per_caption : (r + 1) * args.per_caption]
        named = named_background(caption)
        hits = f" ({sum(n.startswith(named) for n in row)}/{len(row)} {named})" if named else ""
        print(f"  {caption!r}: {', '.join(row)}{hits}")


if __name__ == "__main__":
    main()
