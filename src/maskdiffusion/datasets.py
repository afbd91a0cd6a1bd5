"""Evaluation data sets, read from their official on-disk layouts.

Every benchmark is a name in :data:`DATASETS` whose factory turns ``(root, split)`` into a
:class:`Dataset`: a sorted list of samples (image path + label file) and the class words
used as prompts. Labels are decoded on demand into one form for all benchmarks,
``(H, W) uint8`` class indices with 255 = ignore, so the metrics never see a data set's
own encoding (Cityscapes label ids, COCO fine ids, ISPRS colours, ...). Images are handed
out as paths only: decoding images is the pipeline's job.

``root`` may be the data sets folder (holding ``cityscapes/``, ``cocostuff/``,
``VOCdevkit/``, ``ADEChallengeData2016/``, ``potsdam/``) or one data set's own folder. A
missing or malformed data set raises :class:`DatasetError` with the expected layout and the
places searched.

The open-vocabulary benchmarks' class words (with synonyms) ship as text files in
``maskdiffusion/classnames/`` (:func:`benchmark_classes`). Other modules add data sets with
:func:`register_dataset` (e.g. the bundled model's ``toyworld``). See ``docs/datasets.md``
for layouts, sources and class-list notes.
"""

from __future__ import annotations

import importlib.util
import inspect
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import cache, partial
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .prompts import read_class_file

IGNORE_INDEX = 255
MAX_LABEL_PIXELS = 40_000_000
"""Label images above this size are refused from their header (the default image limit, views.InputLimits)."""
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
CLASSNAMES_FOLDER = "classnames"
"""Package folder of the benchmarks' class-name files, ``<data set name>.txt``."""


class DatasetError(ValueError):
    """A data set that cannot be read: missing, incomplete, malformed, or an unknown name/split."""


@dataclass(frozen=True, eq=False)
class Sample:
    """One evaluation sample.

    ``label`` is ``(H, W) uint8``: class index ``0..num_classes-1``, 255 = ignore.
    """

    id: str
    image_path: Path
    label: np.ndarray


@dataclass(frozen=True)
class SampleFile:
    """Where one sample lives on disk; ``label_path`` is None for unlabelled splits."""

    id: str
    image_path: Path
    label_path: Path | None


LabelDecoder = Callable[[Path], np.ndarray]
"""``decode(label_path) -> (H, W) uint8`` class indices, 255 = ignore. Raise on bad files."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """An evaluation split: samples in a stable order plus the class words.

    Fields:
        name: registry name, e.g. ``"cityscapes27"``.
        split: e.g. ``"val"``.
        root: the data set's own folder that was found (for the run's settings).
        classes: one prompt string per class index; ``"a|b"`` = synonyms of one class.
        files: the samples, sorted by id.
        decode_label: turns a label file into ``(H, W) uint8`` indices (see ``LabelDecoder``).
        background_index: the class that stands for "none of the others" (VOC's
            ``background``), so a pipeline may fill it by score threshold instead of a prompt.
        image_list: which images of the split were chosen, for data sets that offer a choice
            (COCO-Stuff: ``"curated"``, ``"all"`` or a list file's path); None otherwise.
    """

    name: str
    split: str
    root: Path
    classes: tuple[str, ...]
    files: tuple[SampleFile, ...]
    decode_label: LabelDecoder
    background_index: int | None = None
    ignore_index: int = IGNORE_INDEX
    image_list: str | None = None

    @property
    def class_names(self) -> list[str]:
        return list(self.classes)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def sample_ids(self) -> list[str]:
        return [f.id for f in self.files]

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> Sample:
        """The ``index``-th sample with its decoded label; raises ``DatasetError`` on a bad label file."""
        entry = self.files[index]
        if entry.label_path is None:
            raise DatasetError(f"{self.name} ({self.split}): sample {entry.id!r} has no ground-truth label")
        try:
            label = self.decode_label(entry.label_path)
        except DatasetError:
            raise
        except Exception as error:  # any decoding failure: report the file, not a library trace
            raise DatasetError(
                f"{self.name}: cannot read label file {entry.label_path}: {type(error).__name__}: {error}"
            ) from error
        if label.ndim != 2 or label.dtype != np.uint8:
            raise DatasetError(
                f"{self.name}: label {entry.label_path} decoded to shape {label.shape}, dtype {label.dtype}; "
                "expected (H, W) uint8"
            )
        bad = (label >= self.num_classes) & (label != self.ignore_index)
        if bad.any():
            values = np.unique(label[bad])[:10].tolist()
            raise DatasetError(
                f"{self.name}: label {entry.label_path} holds values {values} but there are only "
                f"{self.num_classes} classes (0..{self.num_classes - 1}, {self.ignore_index} = ignore)"
            )
        return Sample(id=entry.id, image_path=entry.image_path, label=label)

    def with_class_names(self, names: Sequence[str]) -> Dataset:
        """The same samples with other prompt words (``--class-names``); same count required."""
        names = tuple(names)
        if len(names) != self.num_classes:
            raise DatasetError(
                f"{self.name} has {self.num_classes} classes but {len(names)} class names were given: "
                "give one name per class, in label-index order"
            )
        return replace(self, classes=names)


DatasetFactory = Callable[..., Dataset]
"""``factory(root: Path, split: str, **options) -> Dataset``."""

DATASETS: dict[str, DatasetFactory] = {}


def register_dataset(name: str, factory: DatasetFactory, *, replace_existing: bool = False) -> None:
    """Make ``name`` available to :func:`build_dataset` (and so to ``--dataset``)."""
    if not name or name != name.strip().lower():
        raise ValueError(f"data set names are lower-case without spaces, got {name!r}")
    if name in DATASETS and not replace_existing:
        raise ValueError(f"data set {name!r} is already registered; pass replace_existing=True to replace it")
    DATASETS[name] = factory


def available_datasets() -> list[str]:
    return sorted(DATASETS)


def build_dataset(name: str, root: str | Path, split: str = "val", **options: Any) -> Dataset:
    """Open data set ``name`` under ``root``; raises :class:`DatasetError` if it is not there."""
    if name not in DATASETS:
        raise DatasetError(f"unknown data set {name!r}; available: {', '.join(available_datasets())}")
    factory = DATASETS[name]
    path = Path(root).expanduser()
    try:
        inspect.signature(factory).bind(path, split, **options)
    except TypeError:
        raise DatasetError(f"data set {name!r} does not take the option(s) {sorted(options)}") from None
    return factory(path, split, **options)


# ---------------------------------------------------------------------------------------------
# Shared helpers: locating a data set, error messages, label decoders.


def _error(name: str, problem: str, layout: str, looked: Sequence[Path]) -> DatasetError:
    places = "\n".join(f"  {p}" for p in dict.fromkeys(looked))
    return DatasetError(
        f"data set {name!r}: {problem}\n"
        f"Expected this layout, with --root pointing at the folder that holds it or at the data "
        f"set's own folder:\n{layout}\nLooked in:\n{places}"
    )


def _locate(name: str, root: Path, own_folders: Sequence[str], markers: Sequence[str], layout: str) -> Path:
    """The first of ``root/<own folder>``..., ``root`` that holds every ``marker`` path."""
    candidates = [root / folder for folder in own_folders] + [root]
    for candidate in candidates:
        if all((candidate / marker).exists() for marker in markers):
            return candidate
    raise _error(name, f"no folder holding {', '.join(markers)} was found", layout, candidates)


def _check_split(name: str, split: str, splits: Sequence[str]) -> None:
    if split not in splits:
        raise DatasetError(f"data set {name!r} has no split {split!r}; available: {', '.join(splits)}")


def _finish(
    name: str,
    split: str,
    base: Path,
    classes: Sequence[str] | str,
    files: Sequence[SampleFile],
    decode: LabelDecoder,
    layout: str,
    *,
    labelled: bool = True,
    background_index: int | None = None,
    image_list: str | None = None,
) -> Dataset:
    """Checks common to every layout, then the Dataset (samples sorted by id).

    ``classes``: the prompt strings, or the name of a shipped class-name file
    (:func:`benchmark_classes`), read only when a data set is opened.
    """
    if not files:
        raise _error(name, f"split {split!r} holds no images", layout, [base])
    missing_images = [f.image_path for f in files if not f.image_path.is_file()]
    if missing_images:
        shown = "\n".join(f"    {p}" for p in missing_images[:3])
        raise _error(name, f"{len(missing_images)} listed images are missing, e.g.\n{shown}", layout, [base])
    if labelled:
        missing = [f for f in files if f.label_path is None or not f.label_path.is_file()]
        if missing:
            shown = "\n".join(f"    {f.label_path}" for f in missing[:3])
            raise _error(
                name, f"{len(missing)} of {len(files)} images have no label file, e.g.\n{shown}", layout, [base]
            )
    ordered = sorted(files, key=lambda f: f.id)
    ids = [f.id for f in ordered]
    if len(set(ids)) != len(ids):
        duplicates = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise _error(name, f"sample ids occur twice: {duplicates}", layout, [base])
    return Dataset(
        name=name,
        split=split,
        root=base,
        classes=benchmark_classes(classes) if isinstance(classes, str) else tuple(classes),
        files=tuple(ordered),
        decode_label=decode,
        background_index=background_index,
        image_list=image_list,
    )


def _read_lines(name: str, path: Path, layout: str, what: str) -> list[str]:
    """The lines of a text file of the data set (a list of ids, of classes); DatasetError naming it."""
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise _error(name, f"cannot read {what} {path}: {error.strerror or error}", layout, [path.parent]) from None
    except UnicodeDecodeError as error:
        problem = f"{what} {path} is not UTF-8 text (byte {error.start}): it must hold one entry per line"
        raise _error(name, problem, layout, [path.parent]) from None


def _read_id_list(name: str, path: Path, layout: str) -> list[str]:
    """Ids from a list file, one per line; extensions and folders are stripped."""
    lines = _read_lines(name, path, layout, "list file")
    return list(dict.fromkeys(Path(line.strip()).stem for line in lines if line.strip()))


@cache
def benchmark_classes(name: str) -> tuple[str, ...]:
    """The prompt strings of benchmark ``name`` from its file ``maskdiffusion/classnames/<name>.txt``:
    one per class in label-index order, ``"a|b"`` for synonyms (the first word names the class).

    Kept as text so the words can be read, diffed and passed to ``--class-names`` like any class file.
    """
    resource = resources.files("maskdiffusion").joinpath(CLASSNAMES_FOLDER).joinpath(f"{name}.txt")
    with resources.as_file(resource) as path:
        return tuple("|".join(c.synonyms) for c in read_class_file(str(path)))


@contextmanager
def open_label_image(path: Path) -> Iterator[Image.Image]:
    """``Image.open`` for a label file, refusing one over :data:`MAX_LABEL_PIXELS` from its header
    (so a small file that decodes to gigabytes, a "decompression bomb", is never decoded)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit below decides
            image = Image.open(path)
    except Image.DecompressionBombError as error:
        raise DatasetError(
            f"label {path} is refused: it decodes to far more pixels than a label may have ({error})"
        ) from None
    with image:
        width, height = image.size
        if width * height > MAX_LABEL_PIXELS:
            raise DatasetError(
                f"label {path} is {width}x{height} pixels, over the limit of {MAX_LABEL_PIXELS / 1e6:g} megapixels "
                "(images above it are refused too): downscale the image and its label, or leave the pair out"
            )
        yield image


def read_index_png(path: Path) -> np.ndarray:
    """A single-channel label image as ``(H, W)`` integer values (palette PNGs: the indices).

    Refuses colour images, which usually means the colour visualisation was given instead of
    the index file (e.g. Cityscapes ``*_color.png``).
    """
    with open_label_image(path) as image:
        if image.mode not in ("L", "P", "I", "I;16", "1"):
            raise DatasetError(
                f"label {path} is a {image.mode} image; expected a single-channel index image "
                "(one class index per pixel), not a colour visualisation"
            )
        return np.asarray(image)


def _lookup(values: np.ndarray, table: np.ndarray) -> np.ndarray:
    """``table[values]`` with values outside the table -> ignore; ``(H, W)`` -> ``(H, W) uint8``."""
    values = np.asarray(values).astype(np.int64)
    inside = (values >= 0) & (values < table.shape[0])
    return np.where(inside, table[np.clip(values, 0, table.shape[0] - 1)], IGNORE_INDEX).astype(np.uint8)


def _table(mapping: dict[int, int], size: int = 256) -> np.ndarray:
    table = np.full(size, IGNORE_INDEX, dtype=np.uint8)
    for source, target in mapping.items():
        table[source] = target
    return table


def _decode_png_with_table(path: Path, table: np.ndarray) -> np.ndarray:
    return _lookup(read_index_png(path), table)


REDUCE_ZERO_LABEL = _table({value: value - 1 for value in range(1, IGNORE_INDEX)})
"""mmsegmentation's ``reduce_zero_label``: 0 (background / "other") -> ignore, k -> k - 1, 255 stays ignore."""


def decode_index_png(path: Path) -> np.ndarray:
    """A label PNG whose values are the class indices, as ``(H, W) uint8`` (255 = ignore)."""
    values = read_index_png(path)
    if values.size and (values.min() < 0 or values.max() > 255):
        raise DatasetError(f"label {path} holds values outside 0..255; at most 255 classes are supported")
    return values.astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Cityscapes: gtFine *_labelIds.png (ids 0..33). Names and ids follow cityscapesScripts' labels.py.

CITYSCAPES27_CLASSES = (
    "road", "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail",
    "bridge", "tunnel", "pole", "pole group", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "caravan", "trailer", "train",
    "motorcycle", "bicycle",
)  # fmt: skip
"""Label ids 7..33 in order (27-class protocol: class = labelId - 7)."""

# labelId -> trainId of the 19 evaluated classes (every other id -> ignore).
CITYSCAPES_TRAIN_IDS = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
    26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip
CITYSCAPES19_CLASSES = tuple(CITYSCAPES27_CLASSES[label_id - 7] for label_id in CITYSCAPES_TRAIN_IDS)

CITYSCAPES_LAYOUT = """\
  cityscapes/
  ├── leftImg8bit/
  │   └── val/<city>/<city>_<seq>_<frame>_leftImg8bit.png      (also train/)
  └── gtFine/
      └── val/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png  (also train/)"""


def _cityscapes(root: Path, split: str, *, name: str, classes: Sequence[str] | str, table: np.ndarray) -> Dataset:
    base = _locate(name, root, ("cityscapes",), ("leftImg8bit", "gtFine"), CITYSCAPES_LAYOUT)
    _check_split(name, split, ("val", "train"))
    image_dir = base / "leftImg8bit" / split
    if not image_dir.is_dir():
        raise _error(name, f"there is no {image_dir.relative_to(base)} folder", CITYSCAPES_LAYOUT, [base])
    files = []
    for image in image_dir.glob("*/*_leftImg8bit.png"):
        stem = image.name.removesuffix("_leftImg8bit.png")
        label = base / "gtFine" / split / image.parent.name / f"{stem}_gtFine_labelIds.png"
        files.append(SampleFile(stem, image, label))
    decode = partial(_decode_png_with_table, table=table)
    return _finish(name, split, base, classes, files, decode, CITYSCAPES_LAYOUT)


# ---------------------------------------------------------------------------------------------
# COCO-Stuff 164k: stuffthingmaps PNGs hold fine ids 0..181 (= COCO-Stuff id - 1), 255 = unlabeled.

# (official name, prompt word, supercategory) per fine id 0..181. Prompt word None marks the
# 11 thing ids COCO defines but never annotates: they have no index in the 171-class set.
# Supercategories are COCO's (things) and COCO-Stuff's stuff hierarchy; the two that share
# a name with a thing supercategory are written "food-stuff" and "furniture-stuff".
COCOSTUFF_FINE: tuple[tuple[str, str | None, str], ...] = (
    ("person", "person", "person"),
    ("bicycle", "bicycle", "vehicle"),
    ("car", "car", "vehicle"),
    ("motorcycle", "motorcycle", "vehicle"),
    ("airplane", "airplane", "vehicle"),
    ("bus", "bus", "vehicle"),
    ("train", "train", "vehicle"),
    ("truck", "truck", "vehicle"),
    ("boat", "boat", "vehicle"),
    ("traffic light", "traffic light", "outdoor"),
    ("fire hydrant", "fire hydrant", "outdoor"),
    ("street sign", None, "outdoor"),
    ("stop sign", "stop sign", "outdoor"),
    ("parking meter", "parking meter", "outdoor"),
    ("bench", "bench", "outdoor"),
    ("bird", "bird", "animal"),
    ("cat", "cat", "animal"),
    ("dog", "dog", "animal"),
    ("horse", "horse", "animal"),
    ("sheep", "sheep", "animal"),
    ("cow", "cow", "animal"),
    ("elephant", "elephant", "animal"),
    ("bear", "bear", "animal"),
    ("zebra", "zebra", "animal"),
    ("giraffe", "giraffe", "animal"),
    ("hat", None, "accessory"),
    ("backpack", "backpack", "accessory"),
    ("umbrella", "umbrella", "accessory"),
    ("shoe", None, "accessory"),
    ("eye glasses", None, "accessory"),
    ("handbag", "handbag", "accessory"),
    ("tie", "tie", "accessory"),
    ("suitcase", "suitcase", "accessory"),
    ("frisbee", "frisbee", "sports"),
    ("skis", "skis", "sports"),
    ("snowboard", "snowboard", "sports"),
    ("sports ball", "sports ball", "sports"),
    ("kite", "kite", "sports"),
    ("baseball bat", "baseball bat", "sports"),
    ("baseball glove", "baseball glove", "sports"),
    ("skateboard", "skateboard", "sports"),
    ("surfboard", "surfboard", "sports"),
    ("tennis racket", "tennis racket", "sports"),
    ("bottle", "bottle", "kitchen"),
    ("plate", None, "kitchen"),
    ("wine glass", "wine glass", "kitchen"),
    ("cup", "cup", "kitchen"),
    ("fork", "fork", "kitchen"),
    ("knife", "knife", "kitchen"),
    ("spoon", "spoon", "kitchen"),
    ("bowl", "bowl", "kitchen"),
    ("banana", "banana", "food"),
    ("apple", "apple", "food"),
    ("sandwich", "sandwich", "food"),
    ("orange", "orange", "food"),
    ("broccoli", "broccoli", "food"),
    ("carrot", "carrot", "food"),
    ("hot dog", "hot dog", "food"),
    ("pizza", "pizza", "food"),
    ("donut", "donut", "food"),
    ("cake", "cake", "food"),
    ("chair", "chair", "furniture"),
    ("couch", "couch", "furniture"),
    ("potted plant", "potted plant", "furniture"),
    ("bed", "bed", "furniture"),
    ("mirror", None, "furniture"),
    ("dining table", "dining table", "furniture"),
    ("window", None, "furniture"),
    ("desk", None, "furniture"),
    ("toilet", "toilet", "furniture"),
    ("door", None, "furniture"),
    ("tv", "television", "electronic"),
    ("laptop", "laptop", "electronic"),
    ("mouse", "computer mouse", "electronic"),
    ("remote", "remote control", "electronic"),
    ("keyboard", "keyboard", "electronic"),
    ("cell phone", "cell phone", "electronic"),
    ("microwave", "microwave", "appliance"),
    ("oven", "oven", "appliance"),
    ("toaster", "toaster", "appliance"),
    ("sink", "sink", "appliance"),
    ("refrigerator", "refrigerator", "appliance"),
    ("blender", None, "appliance"),
    ("book", "book", "indoor"),
    ("clock", "clock", "indoor"),
    ("vase", "vase", "indoor"),
    ("scissors", "scissors", "indoor"),
    ("teddy bear", "teddy bear", "indoor"),
    ("hair drier", "hair dryer", "indoor"),
    ("toothbrush", "toothbrush", "indoor"),
    ("hair brush", None, "indoor"),
    # stuff, fine ids 91..181
    ("banner", "banner", "textile"),
    ("blanket", "blanket", "textile"),
    ("branch", "branch", "plant"),
    ("bridge", "bridge", "building"),
    ("building-other", "building", "building"),
    ("bush", "bush", "plant"),
    ("cabinet", "cabinet", "furniture-stuff"),
    ("cage", "cage", "structural"),
    ("cardboard", "cardboard", "raw material"),
    ("carpet", "carpet", "floor"),
    ("ceiling-other", "ceiling", "ceiling"),
    ("ceiling-tile", "ceiling tile", "ceiling"),
    ("cloth", "cloth", "textile"),
    ("clothes", "clothes", "textile"),
    ("clouds", "clouds", "sky"),
    ("counter", "counter", "furniture-stuff"),
    ("cupboard", "cupboard", "furniture-stuff"),
    ("curtain", "curtain", "textile"),
    ("desk-stuff", "desk", "furniture-stuff"),
    ("dirt", "dirt", "ground"),
    ("door-stuff", "door", "furniture-stuff"),
    ("fence", "fence", "structural"),
    ("floor-marble", "marble floor", "floor"),
    ("floor-other", "floor", "floor"),
    ("floor-stone", "stone floor", "floor"),
    ("floor-tile", "tile floor", "floor"),
    ("floor-wood", "wooden floor", "floor"),
    ("flower", "flower", "plant"),
    ("fog", "fog", "water"),
    ("food-other", "food", "food-stuff"),
    ("fruit", "fruit", "food-stuff"),
    ("furniture-other", "furniture", "furniture-stuff"),
    ("grass", "grass", "plant"),
    ("gravel", "gravel", "ground"),
    ("ground-other", "ground", "ground"),
    ("hill", "hill", "solid"),
    ("house", "house", "building"),
    ("leaves", "leaves", "plant"),
    ("light", "light", "furniture-stuff"),
    ("mat", "mat", "textile"),
    ("metal", "metal", "raw material"),
    ("mirror-stuff", "mirror", "furniture-stuff"),
    ("moss", "moss", "plant"),
    ("mountain", "mountain", "solid"),
    ("mud", "mud", "ground"),
    ("napkin", "napkin", "textile"),
    ("net", "net", "structural"),
    ("paper", "paper", "raw material"),
    ("pavement", "pavement", "ground"),
    ("pillow", "pillow", "textile"),
    ("plant-other", "plant", "plant"),
    ("plastic", "plastic", "raw material"),
    ("platform", "platform", "ground"),
    ("playingfield", "playing field", "ground"),
    ("railing", "railing", "structural"),
    ("railroad", "railroad", "ground"),
    ("river", "river", "water"),
    ("road", "road", "ground"),
    ("rock", "rock", "solid"),
    ("roof", "roof", "building"),
    ("rug", "rug", "textile"),
    ("salad", "salad", "food-stuff"),
    ("sand", "sand", "ground"),
    ("sea", "sea", "water"),
    ("shelf", "shelf", "furniture-stuff"),
    ("sky-other", "sky", "sky"),
    ("skyscraper", "skyscraper", "building"),
    ("snow", "snow", "ground"),
    ("solid-other", "solid", "solid"),
    ("stairs", "stairs", "furniture-stuff"),
    ("stone", "stone", "solid"),
    ("straw", "straw", "plant"),
    ("structural-other", "structure", "structural"),
    ("table", "table", "furniture-stuff"),
    ("tent", "tent", "building"),
    ("textile-other", "textile", "textile"),
    ("towel", "towel", "textile"),
    ("tree", "tree", "plant"),
    ("vegetable", "vegetable", "food-stuff"),
    ("wall-brick", "brick wall", "wall"),
    ("wall-concrete", "concrete wall", "wall"),
    ("wall-other", "wall", "wall"),
    ("wall-panel", "wall panel", "wall"),
    ("wall-stone", "stone wall", "wall"),
    ("wall-tile", "tile wall", "wall"),
    ("wall-wood", "wooden wall", "wall"),
    ("water-other", "water", "water"),
    ("waterdrops", "water drops", "water"),
    ("window-blind", "window blind", "window"),
    ("window-other", "window", "window"),
    ("wood", "wood", "solid"),
)

# The 27 coarse classes in the order of unsupervised-segmentation work (12 thing
# supercategories, then 15 stuff ones, each group alphabetical), with their prompt words.
# The two duplicated names get distinct words: "food-stuff" (food-other, fruit, salad,
# vegetable) and "furniture-stuff" (cabinet, counter, shelf, table, door, stairs, ...).
COCOSTUFF27_COARSE: tuple[tuple[str, str], ...] = (
    ("electronic", "electronics"),
    ("appliance", "appliance"),
    ("food", "food"),
    ("furniture", "furniture"),
    ("indoor", "indoor object"),
    ("kitchen", "kitchenware"),
    ("accessory", "accessory"),
    ("animal", "animal"),
    ("outdoor", "outdoor object"),
    ("person", "person"),
    ("sports", "sports equipment"),
    ("vehicle", "vehicle"),
    ("ceiling", "ceiling"),
    ("floor", "floor"),
    ("food-stuff", "vegetable|salad"),
    ("furniture-stuff", "fixture|cabinet|shelf"),
    ("raw material", "raw material"),
    ("textile", "textile"),
    ("wall", "wall"),
    ("window", "window"),
    ("building", "building"),
    ("ground", "ground"),
    ("plant", "plant"),
    ("sky", "sky"),
    ("solid", "solid|rock"),
    ("structural", "structure|fence"),
    ("water", "water"),
)

COCOSTUFF171_CLASSES = tuple(word for _, word, _ in COCOSTUFF_FINE if word is not None)
COCOSTUFF27_CLASSES = tuple(word for _, word in COCOSTUFF27_COARSE)
_COARSE_INDEX = {key: i for i, (key, _) in enumerate(COCOSTUFF27_COARSE)}
COCOSTUFF_FINE_TO_171 = {
    fine: index
    for index, fine in enumerate(fine for fine, (_, word, _) in enumerate(COCOSTUFF_FINE) if word is not None)
}
COCOSTUFF_FINE_TO_27 = {fine: _COARSE_INDEX[coarse] for fine, (_, _, coarse) in enumerate(COCOSTUFF_FINE)}

# COCO-Object: background + the 80 annotated thing classes. Fine ids 0..90 are COCO's thing
# ids, so the first 80 of the 171 classes are the things, in id order. Every stuff id and the
# unlabelled 255 are background; the 11 thing ids COCO never annotates stay ignore.
COCO_NUM_THINGS = 80
COCO_OBJECT_CLASSES = ("background", *COCOSTUFF171_CLASSES[:COCO_NUM_THINGS])
COCO_OBJECT_FROM_FINE = {
    fine: index + 1 if index < COCO_NUM_THINGS else 0 for fine, index in COCOSTUFF_FINE_TO_171.items()
} | {IGNORE_INDEX: 0}

COCOSTUFF_LAYOUT = """\
  cocostuff/                       (or coco_stuff164k/, mmsegmentation's name)
  ├── images/
  │   └── val2017/<id>.jpg         (also train2017/)
  ├── annotations/
  │   └── val2017/<id>.png         (stuffthingmaps: fine ids 0..181, 255 = unlabeled)
  └── curated/val2017/Coco164kFull_Stuff_Coarse_7.txt   (cocostuff27's image list)"""

_COCO_SPLITS = {"val": "val2017", "train": "train2017"}
COCOSTUFF_CURATED_LIST = "Coco164kFull_Stuff_Coarse_7.txt"
CURATED_SOURCE = "STEGO's cocostuff download (https://github.com/mhamilton723/STEGO, its curated/ folder)"


def _coco_ids(name: str, base: Path, folder: str, image_list: str) -> tuple[list[str], str]:
    """The image ids an ``image_list`` choice selects, and how the run records that choice."""
    if image_list == "all":
        return [p.stem for p in (base / "images" / folder).glob("*.jpg")], "all"
    if image_list == "curated":
        list_path = base / "curated" / folder / COCOSTUFF_CURATED_LIST
        if not list_path.is_file():
            raise _error(
                name,
                f"the curated image list {list_path} is missing. The COCO-Stuff-27 benchmark (STEGO, PiCIE, IIC) "
                f"scores that list, so it is {name}'s default: get it from {CURATED_SOURCE}, or pass "
                "--image-list all to score every image of the split (not comparable with published numbers), "
                "or --image-list FILE for a list of your own",
                COCOSTUFF_LAYOUT,
                [list_path.parent],
            )
        return _read_id_list(name, list_path, COCOSTUFF_LAYOUT), "curated"
    list_path = Path(image_list).expanduser()
    if not list_path.is_file() and (base / list_path).is_file():
        list_path = base / list_path
    return _read_id_list(name, list_path, COCOSTUFF_LAYOUT), str(list_path.resolve())


def _cocostuff(
    root: Path,
    split: str,
    *,
    name: str,
    classes: Sequence[str] | str,
    table: np.ndarray,
    default_list: str,
    background_index: int | None = None,
    image_list: str | Path | None = None,
) -> Dataset:
    """``image_list``: ``"curated"`` = STEGO's curated list ``curated/<split>2017/Coco164kFull_Stuff_Coarse_7.txt``,
    ``"all"`` = every image of the split, or a file of image ids (one per line), absolute or
    relative to the data set folder. None = ``default_list`` (the benchmark's protocol).
    """
    base = _locate(name, root, ("cocostuff", "coco_stuff164k"), ("images", "annotations"), COCOSTUFF_LAYOUT)
    _check_split(name, split, tuple(_COCO_SPLITS))
    folder = _COCO_SPLITS[split]
    image_dir = base / "images" / folder
    if not image_dir.is_dir():
        raise _error(name, f"there is no images/{folder} folder", COCOSTUFF_LAYOUT, [base])
    ids, chosen = _coco_ids(name, base, folder, str(image_list) if image_list is not None else default_list)
    files = [SampleFile(i, image_dir / f"{i}.jpg", base / "annotations" / folder / f"{i}.png") for i in ids]
    decode = partial(_decode_png_with_table, table=table)
    return _finish(
        name,
        split,
        base,
        classes,
        files,
        decode,
        COCOSTUFF_LAYOUT,
        background_index=background_index,
        image_list=chosen,
    )


# ---------------------------------------------------------------------------------------------
# PASCAL VOC 2012 and PASCAL Context: index PNGs beside JPEGImages/, an id list per split.
# VOC: palette PNGs whose index is the class, 255 = object boundary / difficult.
# Context: mmsegmentation's conversion of the 2010 release (tools/dataset_converters/pascal_context.py).

VOC2012_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "dining table", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa",
    "train", "tv monitor",
)  # fmt: skip
VOC20_CLASSES = VOC2012_CLASSES[1:]

# Background, then the 59 classes in the order of mmsegmentation's PascalContextDataset.
CONTEXT60_CLASSES = (
    "background", "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book",
    "bottle", "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow",
    "cup", "curtain", "dog", "door", "fence", "floor", "flower", "food", "grass", "ground", "horse",
    "keyboard", "light", "motorbike", "mountain", "mouse", "person", "plate", "platform", "potted plant",
    "road", "rock", "sheep", "shelves", "sidewalk", "sign", "sky", "snow", "sofa", "table", "track",
    "train", "tree", "truck", "tv monitor", "wall", "water", "window", "wood",
)  # fmt: skip
CONTEXT59_CLASSES = CONTEXT60_CLASSES[1:]

VOC_LAYOUT = """\
  VOCdevkit/
  └── VOC2012/
      ├── JPEGImages/<id>.jpg
      ├── SegmentationClass/<id>.png          (palette PNG: index = class, 0 = background, 255 = ignore)
      └── ImageSets/Segmentation/val.txt      (also train.txt, trainval.txt)"""

CONTEXT_LAYOUT = """\
  VOCdevkit/
  └── VOC2010/
      ├── JPEGImages/<id>.jpg
      ├── SegmentationClassContext/<id>.png          (index PNG: 0 = background, 1..59 = classes, 255 = ignore)
      └── ImageSets/SegmentationContext/val.txt      (also train.txt)"""


@dataclass(frozen=True)
class PascalFolders:
    """Where a PASCAL-style data set keeps its files, relative to its own folder."""

    own_folders: tuple[str, ...]
    labels: str
    lists: str
    splits: tuple[str, ...]
    layout: str


VOC_FOLDERS = PascalFolders(
    ("VOCdevkit/VOC2012", "VOC2012"), "SegmentationClass", "ImageSets/Segmentation", ("val", "train", "trainval"),
    VOC_LAYOUT,
)  # fmt: skip
CONTEXT_FOLDERS = PascalFolders(
    ("VOCdevkit/VOC2010", "VOC2010"), "SegmentationClassContext", "ImageSets/SegmentationContext", ("val", "train"),
    CONTEXT_LAYOUT,
)  # fmt: skip


def _pascal(
    root: Path, split: str, *, name: str, vocabulary: str, folders: PascalFolders, reduce_zero_label: bool
) -> Dataset:
    """VOC21 / Context60 (``reduce_zero_label`` False: label 0 is the background class) or
    VOC20 / Context59 (True: background ignored, the other classes move down by one)."""
    layout = folders.layout
    base = _locate(name, root, folders.own_folders, ("JPEGImages", folders.labels, folders.lists), layout)
    _check_split(name, split, folders.splits)
    ids = _read_id_list(name, base / folders.lists / f"{split}.txt", layout)
    files = [SampleFile(i, base / "JPEGImages" / f"{i}.jpg", base / folders.labels / f"{i}.png") for i in ids]
    if reduce_zero_label:
        decode, background = partial(_decode_png_with_table, table=REDUCE_ZERO_LABEL), None
    else:
        decode, background = decode_index_png, 0
    return _finish(name, split, base, vocabulary, files, decode, layout, background_index=background)


# ---------------------------------------------------------------------------------------------
# ADE20K SceneParsing (ADEChallengeData2016): annotation PNGs hold 0 = "other", 1..150 = classes.

# The 150 classes in the official order (objectInfo150.csv), by their first name.
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher",
    "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier",
    "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip

ADE20K_LAYOUT = """\
  ADEChallengeData2016/
  ├── images/
  │   └── validation/<id>.jpg      (also training/: split "train")
  └── annotations/
      └── validation/<id>.png      (index PNG: 0 = other (ignored), k = class k - 1)"""

_ADE20K_SPLITS = {"val": "validation", "train": "training"}


def _ade20k(root: Path, split: str) -> Dataset:
    name = "ade20k"
    base = _locate(name, root, ("ADEChallengeData2016",), ("images", "annotations"), ADE20K_LAYOUT)
    _check_split(name, split, tuple(_ADE20K_SPLITS))
    folder = _ADE20K_SPLITS[split]
    image_dir = base / "images" / folder
    if not image_dir.is_dir():
        raise _error(name, f"there is no images/{folder} folder", ADE20K_LAYOUT, [base])
    files = [SampleFile(p.stem, p, base / "annotations" / folder / f"{p.stem}.png") for p in image_dir.glob("*.jpg")]
    decode = partial(_decode_png_with_table, table=REDUCE_ZERO_LABEL)
    return _finish(name, split, base, name, files, decode, ADE20K_LAYOUT)


# ---------------------------------------------------------------------------------------------
# Potsdam. ISPRS classes, in the ISPRS order that STEGO's/IIC's gt .mat files use as ids 0..5.

POTSDAM6_CLASSES = ("road|impervious surface", "building", "low vegetation", "tree", "car", "clutter")

# STEGO/IIC Potsdam-3: roads+cars, buildings+clutter, trees+low vegetation.
POTSDAM_6_TO_3 = {0: 0, 4: 0, 1: 1, 5: 1, 2: 2, 3: 2}
POTSDAM3_CLASSES = ("road|car", "building|clutter", "vegetation|tree")

# ISPRS label colours; each channel is 0 or 255, so a pixel is read by thresholding each
# channel at 128 (tolerates slightly off values). Black (boundary in *_noBoundary files)
# and magenta are no class.
POTSDAM_COLOURS = {
    (255, 255, 255): 0,  # impervious surfaces
    (0, 0, 255): 1,  # building
    (0, 255, 255): 2,  # low vegetation
    (0, 255, 0): 3,  # tree
    (255, 255, 0): 4,  # car
    (255, 0, 0): 5,  # clutter / background
}

# Class of each thresholded colour, indexed by 4*R + 2*G + B with R, G, B in {0, 1}.
_POTSDAM_CODE_TABLE = _table(
    {(r // 255) * 4 + (g // 255) * 2 + b // 255: c for (r, g, b), c in POTSDAM_COLOURS.items()}, 8
)

# The ISPRS 2D labelling benchmark's split of the 38 labelled tiles (the 14 tiles it held
# out for testing are the usual val set).
POTSDAM6_VAL_TILES = (
    "2_13", "2_14", "3_13", "3_14", "4_13", "4_14", "4_15", "5_13", "5_14", "5_15", "6_13", "6_14", "6_15", "7_13",
)  # fmt: skip
POTSDAM6_TRAIN_TILES = (
    "2_10", "2_11", "2_12", "3_10", "3_11", "3_12", "4_10", "4_11", "4_12", "5_10", "5_11", "5_12",
    "6_7", "6_8", "6_9", "6_10", "6_11", "6_12", "7_7", "7_8", "7_9", "7_10", "7_11", "7_12",
)  # fmt: skip

POTSDAM3_LAYOUT = """\
  potsdam/
  ├── imgs/<id>.mat               (key "img": (H, W, 4) RGB + infrared)
  ├── gt/<id>.mat                 (key "gt": (H, W) ISPRS ids 0..5)
  ├── labelled_test.txt           (split "val")
  ├── labelled_train.txt          (split "train")
  ├── unlabelled_train.txt        (split "unlabelled_train", no gt)
  └── all.txt                     (split "all")"""

POTSDAM6_LAYOUT = """\
  potsdam/
  ├── 2_Ortho_RGB/top_potsdam_<row>_<col>_RGB.tif
  └── 5_Labels_all/top_potsdam_<row>_<col>_label.tif   (ISPRS colour-coded labels)"""

_POTSDAM3_SPLITS = {
    "val": ("labelled_test.txt",),
    "train": ("labelled_train.txt",),
    "train+val": ("labelled_train.txt", "labelled_test.txt"),
    "unlabelled_train": ("unlabelled_train.txt",),
    "all": ("all.txt",),
}


def _decode_mat(path: Path, key: str, table: np.ndarray) -> np.ndarray:
    from scipy.io import loadmat

    contents = loadmat(path, variable_names=[key])
    if key not in contents:
        raise DatasetError(f"label {path} has no variable {key!r} (STEGO's Potsdam .mat files hold {key!r})")
    values = np.asarray(contents[key])
    if values.ndim == 3 and values.shape[2] == 1:
        values = values[..., 0]
    if values.ndim != 2:
        raise DatasetError(f"label {path}: {key!r} has shape {values.shape}, expected (H, W)")
    return _lookup(values, table)


def _decode_isprs_colours(path: Path) -> np.ndarray:
    with open_label_image(path) as image:
        rgb = np.asarray(image.convert("RGB"))
    bits = (rgb >= 128).astype(np.int64)
    return _POTSDAM_CODE_TABLE[bits[..., 0] * 4 + bits[..., 1] * 2 + bits[..., 2]]


def _potsdam3(root: Path, split: str) -> Dataset:
    name = "potsdam3"
    if importlib.util.find_spec("scipy") is None:
        raise DatasetError(
            f"{name} reads its .mat tiles with scipy, which is not installed: pip install 'maskdiffusion[eval]'"
        )
    base = _locate(name, root, ("potsdam",), ("imgs",), POTSDAM3_LAYOUT)
    _check_split(name, split, tuple(_POTSDAM3_SPLITS))
    ids: list[str] = []
    for list_name in _POTSDAM3_SPLITS[split]:
        if not (base / list_name).is_file():
            raise _error(name, f"split {split!r} needs the list file {list_name}", POTSDAM3_LAYOUT, [base])
        ids += _read_id_list(name, base / list_name, POTSDAM3_LAYOUT)
    labelled = split not in ("unlabelled_train", "all")
    files = []
    for i in dict.fromkeys(ids):
        gt = base / "gt" / f"{i}.mat"
        files.append(SampleFile(i, base / "imgs" / f"{i}.mat", gt if labelled or gt.is_file() else None))
    decode = partial(_decode_mat, key="gt", table=_table(POTSDAM_6_TO_3))
    return _finish(name, split, base, POTSDAM3_CLASSES, files, decode, POTSDAM3_LAYOUT, labelled=labelled)


def _potsdam6(root: Path, split: str) -> Dataset:
    name = "potsdam6"
    base = _locate(name, root, ("potsdam",), ("2_Ortho_RGB", "5_Labels_all"), POTSDAM6_LAYOUT)
    _check_split(name, split, ("val", "train", "all"))
    if split == "all":
        tiles = [
            p.name.removeprefix("top_potsdam_").removesuffix("_RGB.tif")
            for p in (base / "2_Ortho_RGB").glob("top_potsdam_*_RGB.tif")
        ]
    else:
        tiles = list(POTSDAM6_VAL_TILES if split == "val" else POTSDAM6_TRAIN_TILES)
    files = [
        SampleFile(
            f"top_potsdam_{t}",
            base / "2_Ortho_RGB" / f"top_potsdam_{t}_RGB.tif",
            base / "5_Labels_all" / f"top_potsdam_{t}_label.tif",
        )
        for t in tiles
    ]
    return _finish(name, split, base, POTSDAM6_CLASSES, files, _decode_isprs_colours, POTSDAM6_LAYOUT)


# ---------------------------------------------------------------------------------------------
# folder: a user's own data.

FOLDER_LAYOUT = """\
  <root>/
  ├── images/<stem>.jpg|.png|...
  ├── labels/<stem>.png        (single-channel: value = class index, 255 = ignore)
  ├── classes.txt              (one class per line, line i = label value i; "a|b" = synonyms)
  └── val.txt                  (optional: stems of split "val"; any <split>.txt adds a split)"""


def _folder(root: Path, split: str) -> Dataset:
    name = "folder"
    base = _locate(name, root, (), ("images", "labels", "classes.txt"), FOLDER_LAYOUT)
    lines = _read_lines(name, base / "classes.txt", FOLDER_LAYOUT, "class list")
    while lines and not lines[-1].strip():
        lines.pop()
    classes = [" ".join(line.split()) for line in lines]
    if not classes or any(not c for c in classes):
        problem = "classes.txt must list one non-blank class per line (line i names label value i)"
        raise _error(name, problem, FOLDER_LAYOUT, [base])
    images = {p.stem: p for p in sorted((base / "images").iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    split_file = base / f"{split}.txt"
    if split_file.is_file():
        ids = _read_id_list(name, split_file, FOLDER_LAYOUT)
    elif split in ("val", "all"):
        ids = list(images)
    else:
        raise DatasetError(f"data set 'folder' has no split {split!r}: add {split_file} or use --split val")
    files = [SampleFile(i, images.get(i, base / "images" / f"{i}.*"), base / "labels" / f"{i}.png") for i in ids]
    return _finish(name, split, base, classes, files, decode_index_png, FOLDER_LAYOUT)


# Class words of the open-vocabulary benchmarks: classnames/<name>.txt, whose first words are these names.
BENCHMARK_CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "voc21": VOC2012_CLASSES,
    "voc20": VOC20_CLASSES,
    "context60": CONTEXT60_CLASSES,
    "context59": CONTEXT59_CLASSES,
    "coco-object": COCO_OBJECT_CLASSES,
    "cocostuff171": COCOSTUFF171_CLASSES,
    "cityscapes19": CITYSCAPES19_CLASSES,
    "ade20k": ADE20K_CLASSES,
}

register_dataset(
    "cityscapes27",
    partial(_cityscapes, name="cityscapes27", classes=CITYSCAPES27_CLASSES,
            table=_table({label_id: label_id - 7 for label_id in range(7, 34)})),
)  # fmt: skip
register_dataset(
    "cityscapes19",
    partial(_cityscapes, name="cityscapes19", classes="cityscapes19", table=_table(CITYSCAPES_TRAIN_IDS)),
)
# COCO-Stuff-27 is reported on the curated list (STEGO, PiCIE, IIC), COCO-Stuff-171 and COCO-Object on every val image.
register_dataset(
    "cocostuff27",
    partial(_cocostuff, name="cocostuff27", classes=COCOSTUFF27_CLASSES, table=_table(COCOSTUFF_FINE_TO_27),
            default_list="curated"),
)  # fmt: skip
register_dataset(
    "cocostuff171",
    partial(_cocostuff, name="cocostuff171", classes="cocostuff171", table=_table(COCOSTUFF_FINE_TO_171),
            default_list="all"),
)  # fmt: skip
register_dataset(
    "coco-object",
    partial(_cocostuff, name="coco-object", classes="coco-object", table=_table(COCO_OBJECT_FROM_FINE),
            default_list="all", background_index=0),
)  # fmt: skip
for _name, _vocabulary, _folders, _reduce_zero_label in (
    ("voc21", "voc21", VOC_FOLDERS, False),
    ("voc2012", "voc21", VOC_FOLDERS, False),  # voc21's earlier name, kept so old commands work
    ("voc20", "voc20", VOC_FOLDERS, True),
    ("context60", "context60", CONTEXT_FOLDERS, False),
    ("context59", "context59", CONTEXT_FOLDERS, True),
):
    register_dataset(
        _name,
        partial(_pascal, name=_name, vocabulary=_vocabulary, folders=_folders, reduce_zero_label=_reduce_zero_label),
    )
register_dataset("ade20k", _ade20k)
register_dataset("potsdam3", _potsdam3)
register_dataset("potsdam6", _potsdam6)
register_dataset("folder", _folder)
