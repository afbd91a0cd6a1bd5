"""Offline batch inference with Ray Data: :class:`SegmentBatch` segments a dataset of images on a pool of actors.

Each actor loads the model once (:meth:`MaskDiffusion.from_pretrained
<maskdiffusion.MaskDiffusion.from_pretrained>`) and segments every Ray batch it is handed with one
:meth:`~maskdiffusion.MaskDiffusion.segment_batch` call. Install with ``pip install 'maskdiffusion[ray]'``.

Read a folder, segment it and write the masks with Ray's own writers::

    import json
    from importlib import resources

    import ray
    from maskdiffusion.integrations.ray import SegmentBatch

    folder = str(resources.files("maskdiffusion") / "examples")  # or a folder of your own images
    images = ray.data.read_images(folder, include_paths=True, mode="RGB")
    masks = images.map_batches(
        SegmentBatch,
        fn_constructor_kwargs={
            "model": "tiny-random",  # a hub id or a diffusers folder
            "classes": "sky, sea, sand, building, road",
            "preset": {"size": 256},  # a preset name, or fields changed on the model's default preset
        },
        compute=ray.data.ActorPoolStrategy(size=1),  # actors, each holding one copy of the model
        batch_size=2,  # images per segment_batch call
        batch_format="numpy",
        # num_gpus=1,  # one GPU per actor: device="auto" (the default) then runs there
    )
    masks.write_parquet("/tmp/masks")  # columns path, labels, classes, error (and rle with rle=True)
    for row in ray.data.read_parquet("/tmp/masks").iter_rows():
        print(row["path"], row["labels"].shape, json.loads(row["classes"]), row["error"] or "ok")

Each output row is one input row: its other columns (``path``, partition columns, ...) are
kept, the image column is dropped, and these are added:

* ``labels``: ``(H, W)`` class index per pixel at the image's size, as
  :meth:`Result.label_image() <maskdiffusion.Result.label_image>` writes it: ``uint8`` with 255 =
  background when there are fewer than 255 classes, else ``uint16`` with 65535 = background.
  Images of different sizes give a variable-shaped tensor column, which ``write_parquet`` stores
  as it is; ``write_numpy(path, column="labels")`` needs images of one size.
* ``classes``: the class names the labels index, as a JSON list (the same in every row).
* ``rle`` (with ``rle=True``): a JSON list with one COCO annotation per class present in the
  image, ``{"category_id": index + 1, "class", "segmentation": {"size": [H, W], "counts"},
  "area", "bbox"}``: ``pycocotools.mask.decode(segmentation)`` (``counts`` as bytes) gives the
  class's mask back.
* ``error``: ``""``, or why the image could not be segmented (not an image, over the input
  limits, ...): such a row has an empty ``(0, 0)`` ``labels`` and ``"[]"`` as ``rle``. Other
  failures (out of memory, a model that does not load) are raised as usual and Ray retries or
  stops as its settings say.

Inputs: the ``image`` column of :func:`ray.data.read_images` (``(H, W, 3)`` arrays; a batch of
images of different sizes arrives as an object array of them), or the ``bytes`` column of
:func:`ray.data.read_binary_files` (encoded files, decoded here). Two things to know about Ray's
image reader:

* it stops the whole dataset at a file that is not an image. Where a folder may hold such files,
  read it with ``ray.data.read_binary_files(folder, include_paths=True)`` instead: every file
  then becomes a row, and one that cannot be decoded gets its ``error``;
* without ``mode="RGB"`` it hands a grayscale image of a folder that also holds colour images
  over as a ``(1, H, W)`` array, which is refused here as an image of unknown shape.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Mapping
from typing import Any

try:
    import ray
    import ray.data  # Ray Data's own dependencies (pyarrow, ...) come with the extra
except ImportError as error:  # Ray is optional: the 'ray' extra
    raise ImportError(
        f"maskdiffusion.integrations.ray needs Ray Data ({error}): pip install 'maskdiffusion[ray]'"
    ) from error

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..exports import coco_annotations, coco_mask_api
from ..loading import pick_device
from ..pipeline import ClassesInput, MaskDiffusion
from ..presets import Preset
from ..result import PNG_BACKGROUND, Result
from ..views import ImageLoadError, InputLimits

__all__ = ["IMAGE_COLUMNS", "SegmentBatch", "actor_device", "label_values", "rle_json"]

IMAGE_COLUMNS = ("image", "bytes")  # looked for in this order: read_images' column, read_binary_files'
WIDE_BACKGROUND = 65535  # background label in uint16 label maps (255 or more classes)
SHAPE_HINT = (
    "; Ray's read_images gives grayscale images of a folder with colour ones as (1, H, W): "
    "read with ray.data.read_images(..., mode='RGB')"
)


def actor_device(device: str | Any | None = "auto") -> Any:
    """The torch device for ``device`` in this process: ``"auto"`` inside a Ray actor or task is
    the GPU Ray reserved for it (``num_gpus``), or the CPU when it reserved none (a GPU it did not
    reserve may be another worker's); outside Ray it is :func:`~maskdiffusion.loading.pick_device`'s
    choice (cuda > mps > cpu). Anything else is taken as it is.
    """
    if device is not None and str(device) != "auto":
        return pick_device(device)
    if not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:  # not a Ray worker
        return pick_device("auto")
    # Ray narrows CUDA_VISIBLE_DEVICES to the reserved GPUs, so torch's first device is ours
    return pick_device("auto") if ray.get_gpu_ids() else pick_device("cpu")


def label_values(result: Result) -> np.ndarray:
    """``result.labels`` as :meth:`Result.label_image` stores them: uint8 with 255 = background for
    fewer than 255 classes, else uint16 with 65535 = background."""
    if len(result.classes) < PNG_BACKGROUND:
        return np.where(result.labels < 0, PNG_BACKGROUND, result.labels).astype(np.uint8)
    return np.where(result.labels < 0, WIDE_BACKGROUND, result.labels).astype(np.uint16)


def rle_json(result: Result) -> str:
    """Each class present in ``result`` as a COCO annotation (:func:`maskdiffusion.exports.coco_annotations`:
    ``category_id`` = class index + 1, ``segmentation`` as compressed RLE with ``counts`` a string, ``area``,
    ``bbox``) plus its ``class`` name, in a JSON list."""
    entries = coco_annotations(np.asarray(result.labels), len(result.classes))
    return json.dumps([{**entry, "class": result.classes[entry["category_id"] - 1]} for entry in entries])


def _decode(data: bytes, limits: InputLimits) -> Image.Image:
    """An encoded image file's bytes as a decoded PIL image; :class:`ImageLoadError` when they are not one."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limits below decide
            opened = Image.open(io.BytesIO(data))
        limits.check(opened.size, f"({len(data)} bytes)")
        opened.load()
        return opened
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageLoadError(
            f"image bytes are refused: they decode to far more pixels than their size suggests ({error})"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageLoadError(
            f"cannot read image ({len(data)} bytes): not an image file or corrupt ({type(error).__name__}: {error})"
        ) from None


def _ray_grayscale(value: Any) -> bool:
    """Whether ``value`` looks like a grayscale image that Ray's reader gave a leading axis: ``(1, H, W)``."""
    return isinstance(value, np.ndarray) and value.ndim == 3 and value.shape[0] == 1 and value.shape[2] not in (1, 3, 4)


def _column(values: Any) -> np.ndarray:
    """A list of per-row values as a 1-D numpy column (arrays of any shape kept whole, as objects)."""
    column = np.empty(len(values), dtype=object)
    column[:] = values
    return column


class SegmentBatch:
    """A callable class for :meth:`ray.data.Dataset.map_batches` (``batch_format="numpy"``): one model per actor.

    Arguments (give them in ``fn_constructor_kwargs``; they must pickle):
        model: hub id (looked up in the local cache first), diffusers folder, ``toy`` or ``tiny-random``
            (e.g. :data:`~maskdiffusion.DEFAULT_MODEL`).
        classes: ``"road, sky, person|pedestrian"`` or a list of names (or of synonym lists).
        preset: a preset name (``"default"``, ``"fast"``, ...), a :class:`~maskdiffusion.Preset`, or a
            dict of preset fields changed on the model's default preset (``{"size": 256}``); ``None``:
            the model's default.
        overrides: preset fields changed on top of ``preset`` (``preset="fast", overrides={"size": 256}``).
        device: ``"auto"`` (the GPU Ray gave this actor, else the CPU: :func:`actor_device`), ``"cpu"``,
            ``"cuda"``, ``"mps"``.
        dtype: ``"float32"`` (default), ``"float16"`` or ``"bfloat16"``.
        batch_size: views per backbone batch inside a call (:meth:`MaskDiffusion.from_pretrained`'s), not
            Ray's rows per batch (``map_batches``' ``batch_size``).
        rle: also return each class's COCO RLE (needs ``pycocotools``: ``pip install pycocotools``).
        image_column: the column holding the images; ``None``: ``image`` (arrays) or else ``bytes``
            (encoded files).
        cache_size: images whose latents each actor keeps (0, since a batch job sees each image once).
        **load_options: passed on to :meth:`MaskDiffusion.from_pretrained` (``limits``,
            ``local_files_only``, ``channels_last``, ``compile``).

    The class names and the preset are checked here, so a wrong one stops the job when the actors
    start, before any image is read.
    """

    def __init__(
        self,
        model: str,
        classes: ClassesInput,
        *,
        preset: str | Preset | Mapping[str, Any] | None = None,
        overrides: Mapping[str, Any] | None = None,
        device: str | Any | None = "auto",
        dtype: str | Any | None = None,
        batch_size: int = 4,
        rle: bool = False,
        image_column: str | None = None,
        cache_size: int = 0,
        **load_options: Any,
    ):
        self.rle = rle
        if rle:
            coco_mask_api()  # pycocotools is needed: say so when the actor starts, not at its first batch
        self.segmenter = MaskDiffusion.from_pretrained(
            model,
            device=actor_device(device),
            dtype=dtype,
            batch_size=batch_size,
            cache_size=cache_size,
            **load_options,
        )
        if isinstance(preset, Mapping):
            overrides = {**preset, **(overrides or {})}
            preset = None
        _, chosen = self.segmenter.check_inputs(classes, preset)
        if overrides:
            chosen = Preset.from_dict({**chosen.to_dict(), **overrides})
        self.vocabulary, self.preset = self.segmenter.check_inputs(classes, chosen)
        self.classes = classes
        self.image_column = image_column

    def _image_column(self, batch: Mapping[str, np.ndarray]) -> str:
        if self.image_column is not None:
            if self.image_column not in batch:
                raise KeyError(f"the batch has no column {self.image_column!r}; it has {sorted(batch)}")
            return self.image_column
        for name in IMAGE_COLUMNS:
            if name in batch:
                return name
        raise KeyError(
            f"the batch has none of the columns {list(IMAGE_COLUMNS)} (it has {sorted(batch)}): read with "
            "ray.data.read_images or ray.data.read_binary_files, or name the column with image_column="
        )

    def _input(self, value: Any) -> Any:
        """What ``segment_batch`` gets for one row's value (an :class:`ImageLoadError` for bytes that are no image)."""
        if isinstance(value, (bytes, bytearray, memoryview)):
            try:
                return _decode(bytes(value), self.segmenter.limits)
            except ImageLoadError as error:
                return error
        return value

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Segment one Ray batch (a dict of numpy columns) with one ``segment_batch`` call."""
        name = self._image_column(batch)
        inputs = [self._input(value) for value in batch[name]]
        readable = [i for i, value in enumerate(inputs) if not isinstance(value, ImageLoadError)]
        outcomes: list[Result | ImageLoadError] = list(inputs)
        if readable:
            results = self.segmenter.segment_batch(
                [inputs[i] for i in readable], self.classes, preset=self.preset, errors="return"
            )
            for i, result in zip(readable, results, strict=True):
                outcomes[i] = result
        names = [c.name for c in self.vocabulary]
        wide = len(names) >= PNG_BACKGROUND
        empty = np.zeros((0, 0), dtype=np.uint16 if wide else np.uint8)
        labels, errors, rles = [], [], []
        for value, outcome in zip(batch[name], outcomes, strict=True):
            if isinstance(outcome, ImageLoadError):
                labels.append(empty)
                errors.append(str(outcome) + (SHAPE_HINT if _ray_grayscale(value) else ""))
                rles.append("[]")
                continue
            values = label_values(outcome)
            labels.append(values)
            errors.append("")
            if self.rle:
                rles.append(rle_json(outcome))
        out = {key: value for key, value in batch.items() if key != name}
        out["labels"] = _column(labels)
        out["classes"] = np.array([json.dumps(names)] * len(outcomes), dtype=object)
        if self.rle:
            out["rle"] = np.array(rles, dtype=object)
        out["error"] = np.array(errors, dtype=object)
        return out
