"""Images in, square model views out, and per-view maps stitched back onto the image.

An image keeps its aspect ratio: its short side is resized to the view size and the
long side (rounded to the model's block size) is covered by overlapping square windows.
Window offsets are multiples of the block size, so every window lands exactly on the
cells of every coarser grid (attention 1/16, features 1/8, ...) and stitching is exact.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

ImageInput = str | os.PathLike | Image.Image | np.ndarray


class ImageLoadError(ValueError):
    """An input that is not a readable image (or one over the input limits); the message names it."""


@dataclass(frozen=True)
class InputLimits:
    """What one image may cost, checked before any decoding or model work.

    Attributes:
        max_pixels: width x height of the decoded image (40 megapixels: its RGB copy is
            120 MB and its int64 label map 320 MB). Checked from the file header, so a
            "decompression bomb" (a small file that decodes to gigabytes) is never decoded.
        max_aspect: long side / short side. A view covers the short side, so the long side
            costs about ``2 * aspect`` sliding windows: 16 = at most 31 views per image.
    """

    max_pixels: int = 40_000_000
    max_aspect: float = 16.0

    def check(self, size: tuple[int, int], label: str) -> None:
        """Raise :class:`ImageLoadError` when an image of ``size = (width, height)`` is over a limit."""
        width, height = size
        if width < 1 or height < 1:
            raise ImageLoadError(f"image {label} is empty ({width}x{height} pixels)")
        if width * height > self.max_pixels:
            raise ImageLoadError(
                f"image {label} has {width}x{height} = {width * height / 1e6:.3g} megapixels, over the limit of "
                f"{self.max_pixels / 1e6:g}: downscale it first (or raise the limit: --max-megapixels, "
                "InputLimits(max_pixels=...))"
            )
        aspect = max(width, height) / min(width, height)
        if aspect > self.max_aspect:
            raise ImageLoadError(
                f"image {label} is {width}x{height} pixels, an aspect ratio of {aspect:.1f}:1, over the limit of "
                f"{self.max_aspect:g}:1 (each view covers the short side, so the long side would need "
                f"{round(2 * aspect)} views): crop it into pieces of at most {self.max_aspect:g}:1 "
                "(or raise the limit: InputLimits(max_aspect=...))"
            )


DEFAULT_LIMITS = InputLimits()


def _composite_on_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(canvas, rgba).convert("RGB")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; transparency is composited on white."""
    if image.mode in ("La", "RGBa"):  # premultiplied alpha: un-premultiply first
        image = image.convert("LA" if image.mode == "La" else "RGBA")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode in ("P", "L", "RGB") and "transparency" in image.info):
        return _composite_on_white(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        peak = (
            1.0
            if image.mode == "F" and values.max(initial=0) <= 1.0
            else (255.0 if values.max(initial=0) <= 255 else 65535.0)
        )
        gray = np.clip(values / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    return image.convert("RGB")


def _display(value: str, limit: int = 120) -> str:
    """A user-given name, shortened for messages."""
    return value if len(value) <= limit else f"{value[: limit - 20]}…{value[-19:]}"


def load_image(image: ImageInput, *, name: str | None = None, limits: InputLimits = DEFAULT_LIMITS) -> Image.Image:
    """Read a path, PIL image or array as an upright 8-bit RGB PIL image.

    EXIF orientation is applied; grayscale, palette, CMYK and 16-bit images are
    converted; alpha is composited on white. Arrays: ``(H, W)``, ``(H, W, 1|3|4)``,
    uint8 or finite float in [0, 1]. ``limits`` is checked on the header, before decoding.
    Raises :class:`ImageLoadError` naming the input.
    """
    label = repr(_display(name or (os.fspath(image) if isinstance(image, (str, os.PathLike)) else "")))
    if label == "''":
        label = f"(a {type(image).__module__.split('.')[0]} {type(image).__name__})"
    if isinstance(image, (str, os.PathLike)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limits below decide
                opened = Image.open(image)
            with opened:
                limits.check(opened.size, label)
                opened.load()
                pil = ImageOps.exif_transpose(opened)
                pil = pil.copy() if pil is opened else pil
        except FileNotFoundError:
            raise ImageLoadError(f"image {label} does not exist: check the path") from None
        except IsADirectoryError:
            raise ImageLoadError(f"image {label} is a folder, not an image file") from None
        except Image.DecompressionBombError as error:
            raise ImageLoadError(
                f"image {label} is refused: it decodes to far more pixels than its file size suggests ({error}); "
                f"the limit is {limits.max_pixels / 1e6:g} megapixels: downscale it first"
            ) from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as error:
            if isinstance(error, ImageLoadError):
                raise
            raise ImageLoadError(
                f"cannot read image {label}: not an image file or corrupt ({type(error).__name__}: "
                f"{_display(str(error))}); re-save it as PNG/JPEG or leave it out"
            ) from None
        return _to_rgb(pil)
    if isinstance(image, Image.Image):
        limits.check(image.size, label)
        return _to_rgb(ImageOps.exif_transpose(image) or image)
    if isinstance(image, np.ndarray):
        array = image
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)) or 0 in array.shape:
            raise ImageLoadError(
                f"image array {label} has shape {image.shape}: expected (H, W), (H, W, 3) or (H, W, 4)"
            )
        limits.check((array.shape[1], array.shape[0]), label)
        if array.dtype != np.uint8:
            if not np.issubdtype(array.dtype, np.floating):
                raise ImageLoadError(f"image array {label} has dtype {array.dtype}: use uint8 or float in [0, 1]")
            if not np.isfinite(array).all():
                raise ImageLoadError(f"image array {label} holds NaN or infinite values: give finite values in [0, 1]")
            array = (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        return _to_rgb(Image.fromarray(array))
    raise ImageLoadError(
        f"unsupported image input of type {type(image).__name__}: give a file path, a PIL image or a numpy array"
    )


@dataclass(frozen=True)
class ViewLayout:
    """Where the square views of one image sit on its resized copy.

    ``height``/``width``: the resized image in pixels (short side = ``size``);
    ``offsets``: ``(top, left)`` pixel offset of each ``size x size`` view.
    """

    height: int
    width: int
    size: int
    offsets: tuple[tuple[int, int], ...]

    @classmethod
    def for_image(cls, image_size: tuple[int, int], size: int, unit: int, overlap: float) -> ViewLayout:
        """Layout for an image of ``(width, height)`` pixels.

        ``unit`` is the block size views and offsets are multiples of; ``overlap`` the
        fraction of a view shared by neighbouring windows.
        """
        width, height = image_size
        scale = size / min(width, height)
        long = max(size, round(max(width, height) * scale / unit) * unit)
        count = 1 if long == size else math.ceil((long - size) / max(size * (1.0 - overlap), unit)) + 1
        step = (long - size) / max(count - 1, 1)
        starts = sorted({round(i * step / unit) * unit for i in range(count)})
        if width >= height:
            return cls(size, long, size, tuple((0, s) for s in starts))
        return cls(long, size, size, tuple((s, 0) for s in starts))

    def crops(self, image: Image.Image) -> torch.Tensor:
        """``(V, 3, size, size)`` float32 in [-1, 1]: the views of ``image``."""
        resized = image.resize((self.width, self.height), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0
        return torch.stack([pixels[:, t : t + self.size, s : s + self.size] for t, s in self.offsets])

    def grid_shape(self, factor: int) -> tuple[int, int]:
        return self.height // factor, self.width // factor

    def stitch(self, maps: torch.Tensor, factor: int) -> torch.Tensor:
        """Average per-view maps ``(V, ..., size/f, size/f)`` onto the image grid ``(..., H/f, W/f)``."""
        rows, cols = self.grid_shape(factor)
        cell = self.size // factor
        total = maps.new_zeros(*maps.shape[1:-2], rows, cols)
        count = maps.new_zeros(rows, cols)
        for view, (top, left) in zip(maps, self.offsets, strict=True):
            t, s = top // factor, left // factor
            total[..., t : t + cell, s : s + cell] += view
            count[t : t + cell, s : s + cell] += 1
        return total / count

    def stitch_log(self, log_maps: torch.Tensor, factor: int) -> torch.Tensor:
        """Like :meth:`stitch` for maps given as logarithms: log of the mean of exp, overflow-free."""
        dims = tuple(range(-2, 0))
        shift = log_maps.amax(dim=(0, *dims), keepdim=True)
        shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
        return self.stitch(torch.exp(log_maps - shift), factor).log() + shift[0]


def bilinear_matrix(out_size: int, in_size: int) -> torch.Tensor:
    """``(out, in)`` weights of 1-D bilinear resizing, as ``F.interpolate(align_corners=False)``."""
    source = ((torch.arange(out_size, dtype=torch.float64) + 0.5) * (in_size / out_size) - 0.5).clamp_min(0.0)
    low = source.floor().long().clamp_max(in_size - 1)
    high = (low + 1).clamp_max(in_size - 1)
    frac = (source - low).to(torch.float32)
    matrix = torch.zeros(out_size, in_size)
    rows = torch.arange(out_size)
    matrix.index_put_((rows, low), 1.0 - frac, accumulate=True)
    matrix.index_put_((rows, high), frac, accumulate=True)
    return matrix


def upsample_rows(grid: torch.Tensor, size: tuple[int, int], rows: slice) -> torch.Tensor:
    """Rows ``rows`` of ``grid`` ``(C, h, w)`` resized bilinearly to ``size = (H, W)``: ``(C, r, W)``.

    Equal to slicing ``F.interpolate(grid[None], size, mode="bilinear")[0]``, without
    materialising the whole ``(C, H, W)`` tensor.
    """
    height, width = size
    row_weights = bilinear_matrix(height, grid.shape[1])[rows].to(grid)
    col_weights = bilinear_matrix(width, grid.shape[2]).to(grid)
    return torch.einsum("rh,chw,Ww->crW", row_weights, grid, col_weights)


def resize_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``(..., h, w)`` maps; antialiased when shrinking."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    lead = maps.shape[:-2]
    flat = maps.reshape(-1, 1, *maps.shape[-2:])
    shrink = size[0] < maps.shape[-2] or size[1] < maps.shape[-1]
    out = F.interpolate(flat, size=size, mode="bilinear", align_corners=False, antialias=shrink)
    return out.reshape(*lead, *size)
