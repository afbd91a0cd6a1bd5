"""Interchange formats for ``segment`` runs over data sets: how each image's labels are written under ``--out``.

A run segments its inputs in one or many worker processes, may be killed at any instant and
resumed with another number of processes. Each format therefore writes per image in a way
that marks the image complete only when all of it is on disk (:meth:`Export.done`), and
collects whatever spans the whole run (a COCO file, a CVAT label map) in :meth:`Export.finish`,
run once by rank 0 after every worker has closed. ``finish`` reads only what is on disk, so it
can be run again at any time (after a resumed run finished the images that failed) and gives
the same bytes for the same set of done images, however the run was split.

Formats (``--format``):

``png`` (default)
    ``<out>/<name>.labels.png``, ``<name>.overlay.png``, ``<name>.json`` per image
    (:meth:`Result.save`); the JSON is renamed into place last, so it marks a complete set.

``coco``
    ``<out>/annotations.json``: one COCO "instances"-style file for the run. ``images`` are the
    done inputs in listing order (ids 1..N, ``file_name`` = the input path as listed);
    ``categories`` the classes in order (ids 1..C, ``words`` = the synonyms); one annotation per
    (image, class present), its mask as COCO RLE (``pycocotools.mask.encode``, ``counts`` as a
    string), ``area`` and ``bbox`` as pycocotools computes them, ``iscrowd`` 0. Background
    pixels get no annotation. While the run goes on, each worker appends one JSON line per
    image to ``<out>/.maskdiffusion/coco/part-<rank>-of-<world_size>.jsonl``; ``finish`` merges
    the parts. Needs the ``coco`` extra (``pip install maskdiffusion[coco]``).

``cvat``
    CVAT's "Segmentation mask 1.1" import layout (Pascal VOC segmentation, as Datumaro reads it)::

        <out>/labelmap.txt                         # label:color_rgb:parts:actions
        <out>/ImageSets/Segmentation/default.txt   # one image name per line
        <out>/SegmentationClass/<name>.png         # RGB, each pixel its class's colour

    Zip those three entries (``cd OUT && zip -r ../cvat.zip labelmap.txt ImageSets
    SegmentationClass``) and import the archive into a task whose images have the same names.

    What this relies on (CVAT's format page, docs.cvat.ai "Segmentation Mask", and Datumaro's
    ``voc_format`` reader, which CVAT uses): ``labelmap.txt`` lines are ``name:r,g,b:parts:actions``
    split on ``:`` with no escape syntax, the name taken verbatim; blank lines and lines starting
    with ``#`` are skipped; a name defined twice is an error; a mask pixel whose colour is in no
    line is an error, so colours must be distinct (they are inverted into a colour -> label map).
    (0, 0, 0) is background by convention, declared as ``background:0,0,0::``. The lines of
    ``default.txt`` are stripped and ``#`` lines skipped; each is an item id, whose mask is
    ``SegmentationClass/<id>.png`` (ids may hold ``/``: subfolders are kept). ``SegmentationObject/``
    (instance masks) is optional on import and not written: a semantic segmentation has no
    instances, so CVAT makes one mask per class present in an image.

    Class names CVAT would misread are refused when the export is made (:class:`ExportError`),
    not escaped: the label map has no escape syntax, so an escaped name would be imported as a
    different label. Refused: ``:`` (splits the line), ``,`` (the separator of every other field,
    split on by other VOC readers), line breaks, a leading ``#`` (a comment line), leading or
    trailing spaces (stripped), the name ``background`` (taken by the background line) and
    duplicates. An image whose name cannot be a line of ``default.txt`` (a line break, a leading
    ``#`` or a leading/trailing space) is refused by :meth:`Export.write` (the image fails).

    Colours are :func:`visualize.palette`, the overlay colours, where they can be: it never makes
    black (its value is at least 0.7), but from class 631 on its hue walk repeats earlier colours.
    A colour that is black or already taken moves by a fixed odd step through the 2**24 RGB
    values to the next free one (:func:`cvat_colours`), so the map depends only on the number
    of classes.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path, PurePosixPath
from typing import IO, ClassVar

import numpy as np
from PIL import Image

from . import files, visualize
from .inputs import STATE_FOLDER
from .prompts import ClassName
from .result import Result


class ExportError(ValueError):
    """A class list or an image name that the chosen format cannot represent."""


class Export(ABC):
    """How each image's segmentation is written under --out, and what a finished run adds."""

    format: ClassVar[str]

    def __init__(self, out: Path, classes: Sequence[ClassName], *, rank: int = 0, world_size: int = 1):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} of {world_size} processes: need 0 <= rank < world_size")
        self.out = Path(out)
        self.classes = list(classes)
        self.rank = rank
        self.world_size = world_size

    @abstractmethod
    def done(self, name: PurePosixPath) -> bool:
        """This image's outputs are complete (a resumed run skips it)."""

    @abstractmethod
    def write(self, name: PurePosixPath, result: Result, source: str) -> None:
        """Write one image's outputs, all or none; ``source`` is the input path as listed."""

    def folder(self, name: PurePosixPath) -> Path | None:
        """The folder this image's files are renamed into (where a killed run may have left temp files),
        or ``None`` for formats that append to part files."""
        return None

    def close(self) -> None:  # noqa: B027 (a no-op for formats that keep no file open)
        """Flush and close this worker's files."""

    def finish(self, names: Iterable[PurePosixPath]) -> list[Path]:
        """Rank 0 only, after every worker closed: write the run-wide files; ``names`` are the
        run's inputs in listing order (those not done are left out). Returns the files written."""
        return []

    def _check(self, result: Result) -> np.ndarray:
        """``result``'s labels, after making sure they index this run's classes (a mix-up would
        silently write another vocabulary's ids)."""
        names = [c.name for c in self.classes]
        if list(result.classes) != names:
            raise ValueError(f"the result's classes {result.classes!r} are not this export's {names!r}")
        labels = np.asarray(result.labels)
        if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be a 2-D integer map, not {labels.dtype} of shape {labels.shape}")
        if labels.size and (labels.min() < -1 or labels.max() >= len(names)):
            raise ValueError(f"labels hold values outside -1..{len(names) - 1}")
        return labels


def _under(root: Path, name: PurePosixPath, suffix: str) -> Path:
    """``root/<name><suffix>``: the suffix appended, never replacing a dot already in the name."""
    return root.joinpath(*name.parent.parts, name.name + suffix)


# -- png ----------------------------------------------------------------------------------------------


class PngExport(Export):
    """Today's per-image files: labels PNG, overlay PNG and the JSON summary (the JSON last)."""

    format = "png"

    def done(self, name: PurePosixPath) -> bool:
        return _under(self.out, name, ".json").is_file()

    def folder(self, name: PurePosixPath) -> Path:
        return self.out.joinpath(*name.parent.parts)

    def write(self, name: PurePosixPath, result: Result, source: str) -> None:
        self._check(result)
        folder = self.folder(name)
        folder.mkdir(parents=True, exist_ok=True)
        result.save(folder, name.name)


# -- coco ---------------------------------------------------------------------------------------------

COCO_FILE = "annotations.json"
COCO_PARTS = PurePosixPath(STATE_FOLDER, "coco")
FSYNC_LINES = 64  # a part file is fsynced after this many lines ...
FSYNC_SECONDS = 5.0  # ... or when this long has passed since the last fsync, and on close
_PART_BITS = 16  # finish packs (byte offset, part index) into one int
_PART_MASK = (1 << _PART_BITS) - 1


def coco_mask_api():
    """pycocotools' mask module, or an ImportError that says how to install it."""
    try:
        from pycocotools import mask
    except ImportError:  # pragma: no cover - depends on the installation
        raise ImportError(
            "the coco format needs pycocotools: pip install 'maskdiffusion[coco]' (or pip install pycocotools)"
        ) from None
    return mask


def coco_annotations(labels: np.ndarray, classes: int) -> list[dict]:
    """Per class present in ``labels`` (ascending), its mask as COCO RLE with pycocotools' area and bbox.

    ``category_id`` is the class index + 1; background (-1) gets none.
    """
    mask_api = coco_mask_api()
    counts = np.bincount(labels.ravel() + 1, minlength=classes + 1)[1:]
    annotations = []
    for c in np.flatnonzero(counts).tolist():
        rle = mask_api.encode(np.asfortranarray(labels == c, dtype=np.uint8))
        annotations.append(
            {
                "category_id": c + 1,
                "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
                "area": int(mask_api.area(rle)),
                "bbox": [float(v) for v in mask_api.toBbox(rle)],
            }
        )
    return annotations


def _record(line: bytes) -> dict | None:
    """A part file line as a record, or None when it is not one (torn by a kill, garbage after a crash)."""
    try:
        record = json.loads(line)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return None
    if not (
        isinstance(record, dict)
        and isinstance(record.get("name"), str)
        and isinstance(record.get("file_name"), str)
        and isinstance(record.get("width"), int)
        and isinstance(record.get("height"), int)
        and isinstance(record.get("annotations"), list)
    ):
        return None
    return record


def _dumps(value: object) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


@contextmanager
def _atomic_stream(path: Path) -> Iterator[IO[bytes]]:
    """A binary stream that becomes ``path`` only if the block completes (synced temp file, then rename),
    for files too large to build in memory; same guarantees as :func:`files.write_bytes`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    # 0o666 through the process umask: the mode an ordinary new file gets
    descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(descriptor, "wb") as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


class CocoExport(Export):
    """One COCO JSON for the run, merged at the end from each worker's append-only part file.

    A record (one JSON line: name, file name, size, the image's annotations) is written with
    one ``os.write`` loop straight to the kernel, so a killed process loses at most the line
    being written; a failed write is cut off again (all or none). The part file is fsynced
    every :data:`FSYNC_LINES` lines or :data:`FSYNC_SECONDS` seconds, whichever comes first,
    and on :meth:`close`, so a power loss costs at most that much work (redone on resume).
    :meth:`done` knows the names of all valid records present when it is first called, plus
    this worker's own writes (about 100 bytes a name: ~100 MB per 10**6 images), found once by
    parsing every line of every part (~0.4 GB/s of part file on one core).
    """

    format = "coco"

    def __init__(self, out: Path, classes: Sequence[ClassName], *, rank: int = 0, world_size: int = 1):
        super().__init__(out, classes, rank=rank, world_size=world_size)
        coco_mask_api()  # fail before the first image, not after it
        self.parts = self.out.joinpath(*COCO_PARTS.parts)
        self.part = self.parts / f"part-{rank}-of-{world_size}.jsonl"
        self._done: set[str] | None = None  # read on the first done() call: a run that never asks skips the scan
        self._descriptor: int | None = None
        self._unsynced = 0
        self._synced_at = 0.0

    def _part_files(self) -> list[Path]:
        """Every part present, of any world size, in a fixed order (the first valid record of an image wins)."""
        return sorted(self.parts.glob("part-*.jsonl")) if self.parts.is_dir() else []

    @staticmethod
    def _scan(paths: Sequence[Path]) -> Iterator[tuple[int, int, str]]:
        """``(index in paths, byte offset, name)`` of every valid record in the part files ``paths``."""
        for index, path in enumerate(paths):
            with open(path, "rb") as stream:
                offset = 0
                for line in stream:
                    record = _record(line)
                    if record is not None:
                        yield index, offset, record["name"]
                    offset += len(line)

    def done(self, name: PurePosixPath) -> bool:
        if self._done is None:
            self._done = {found for _, _, found in self._scan(self._part_files())}
        return str(name) in self._done

    def _open(self) -> int:
        """This worker's part file for appending, after ending a torn last line (a killed worker's) with a newline."""
        if self._descriptor is None:
            self.parts.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(self.part, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)  # read: the last byte
            try:
                size = os.fstat(descriptor).st_size
                if size and os.pread(descriptor, 1, size - 1) != b"\n":
                    _write_all(descriptor, b"\n")
            except BaseException:
                os.close(descriptor)
                raise
            self._descriptor = descriptor
            self._synced_at = time.monotonic()
        return self._descriptor

    def write(self, name: PurePosixPath, result: Result, source: str) -> None:
        labels = self._check(result)
        height, width = labels.shape
        record = {
            "name": str(name),
            "file_name": source,
            "width": int(width),
            "height": int(height),
            "annotations": coco_annotations(labels, len(self.classes)),
        }
        line = _dumps(record) + b"\n"  # JSON escapes line breaks inside strings: one record, one line
        descriptor = self._open()
        start = os.fstat(descriptor).st_size
        try:
            _write_all(descriptor, line)
        except BaseException:
            # none of the record: cut a partial line off; if even that fails, the next open ends it with a newline
            try:
                os.ftruncate(descriptor, start)
            finally:
                self.close()
            raise
        if self._done is not None:  # else the scan will find the line
            self._done.add(str(name))
        self._unsynced += 1
        if self._unsynced >= FSYNC_LINES or time.monotonic() - self._synced_at >= FSYNC_SECONDS:
            self._sync()

    def _sync(self) -> None:
        if self._descriptor is not None:
            os.fsync(self._descriptor)
        self._unsynced = 0
        self._synced_at = time.monotonic()

    def close(self) -> None:
        if self._descriptor is None:
            return
        try:
            self._sync()
        finally:
            descriptor, self._descriptor = self._descriptor, None
            os.close(descriptor)

    def finish(self, names: Iterable[PurePosixPath]) -> list[Path]:
        """Merge every part into ``annotations.json``, images in ``names``' order.

        Streams: holds one ``(part, offset)`` per done image, never the masks; the annotations
        go to a temp file while the images are written, then are copied after them.
        """
        paths = self._part_files()
        if len(paths) > _PART_MASK:
            raise ExportError(f"{len(paths):,} part files in {self.parts}: at most {_PART_MASK:,} can be merged")
        where: dict[str, int] = {}  # name -> offset << _PART_BITS | part index: one int, ~120 MB per 10**6 images
        for index, offset, name in self._scan(paths):
            where.setdefault(name, offset << _PART_BITS | index)
        categories = [
            {"id": i + 1, "name": c.name, "supercategory": "", "words": list(c.synonyms)}
            for i, c in enumerate(self.classes)
        ]
        target = self.out / COCO_FILE
        with ExitStack() as stack:
            parts = [stack.enter_context(open(path, "rb")) for path in paths]
            stream = stack.enter_context(_atomic_stream(target))
            pending = stack.enter_context(tempfile.TemporaryFile(dir=self.parts if self.parts.is_dir() else self.out))
            stream.write(b'{"info":' + _dumps({"description": "maskdiffusion segment, --format coco"}))
            stream.write(b',\n"licenses":[],\n"categories":[\n' + b",\n".join(map(_dumps, categories)))
            stream.write(b'\n],\n"images":[')
            image_id = annotation_id = 0
            for name in names:
                found = where.pop(str(name), None)  # pop: an image listed twice is written once
                if found is None:
                    continue
                part = parts[found & _PART_MASK]
                part.seek(found >> _PART_BITS)
                record = json.loads(part.readline())
                image_id += 1
                image = {
                    "id": image_id,
                    "file_name": record["file_name"],
                    "width": record["width"],
                    "height": record["height"],
                }
                stream.write((b",\n" if image_id > 1 else b"\n") + _dumps(image))
                for annotation in record["annotations"]:
                    annotation_id += 1
                    entry = {"id": annotation_id, "image_id": image_id, **annotation, "iscrowd": 0}
                    pending.write((b",\n" if annotation_id > 1 else b"\n") + _dumps(entry))
            stream.write(b'\n],\n"annotations":[')
            pending.seek(0)
            shutil.copyfileobj(pending, stream)
            stream.write(b"\n]}\n")
        return [target]


def _write_all(descriptor: int, data: bytes) -> None:
    """``os.write`` until all of ``data`` is written (a write may take fewer bytes than given)."""
    view = memoryview(data)
    while view:
        view = view[os.write(descriptor, view) :]


# -- cvat ---------------------------------------------------------------------------------------------

CVAT_MASKS = "SegmentationClass"
CVAT_LABELMAP = "labelmap.txt"
CVAT_LIST = PurePosixPath("ImageSets", "Segmentation", "default.txt")
CVAT_HEADER = "# label:color_rgb:parts:actions"
_COLOUR_STEP = 0x9E3779  # odd, so stepping by it visits all 2**24 colours before repeating


def cvat_colours(count: int) -> np.ndarray:
    """``(count, 3)`` uint8 distinct colours, none black: the overlay palette, with black or repeated
    colours moved to the next free one ``_COLOUR_STEP`` apart (deterministic; depends only on ``count``)."""
    if count >= 1 << 24:
        raise ExportError(f"{count:,} classes cannot have distinct RGB colours")
    taken = {0}
    chosen = []
    for r, g, b in visualize.palette(count).tolist():
        value = (r << 16) | (g << 8) | b
        while value in taken:
            value = (value + _COLOUR_STEP) % (1 << 24)
        taken.add(value)
        chosen.append(((value >> 16) & 255, (value >> 8) & 255, value & 255))
    return np.array(chosen, dtype=np.uint8).reshape(count, 3)


def _line_problem(text: str) -> str | None:
    """Why ``text`` cannot be a line of a CVAT list (Datumaro strips lines and skips ``#`` ones), or None."""
    if not text:
        return "is empty"
    if "\n" in text or "\r" in text:
        return "holds a line break"
    if text.startswith("#"):
        return "starts with '#' (a comment line)"
    if text != text.strip():
        return "starts or ends with white space (stripped when read)"
    return None


class CvatExport(Export):
    """CVAT "Segmentation mask 1.1": one colour PNG per image, the label map and image list at the end."""

    format = "cvat"

    def __init__(self, out: Path, classes: Sequence[ClassName], *, rank: int = 0, world_size: int = 1):
        super().__init__(out, classes, rank=rank, world_size=world_size)
        seen: set[str] = set()
        for c in self.classes:
            problem = _line_problem(c.name)
            if problem is None and (":" in c.name or "," in c.name):
                problem = "holds ':' or ',' (labelmap.txt separators, which it cannot escape)"
            if problem is None and c.name == "background":
                problem = "is the background line's name"
            if problem is None and c.name in seen:
                problem = "is given twice"
            if problem:
                raise ExportError(
                    f"class name {c.name!r} {problem}: CVAT's labelmap.txt cannot hold it; give the class "
                    "another display name (its first word), e.g. 'paved road|road: paved'"
                )
            seen.add(c.name)
        self.colours = cvat_colours(len(self.classes))
        self._table = np.concatenate([np.zeros((1, 3), dtype=np.uint8), self.colours])  # row 0: background

    def _mask_path(self, name: PurePosixPath) -> Path:
        return _under(self.out / CVAT_MASKS, name, ".png")

    def done(self, name: PurePosixPath) -> bool:
        return self._mask_path(name).is_file()

    def folder(self, name: PurePosixPath) -> Path:
        return self._mask_path(name).parent

    def write(self, name: PurePosixPath, result: Result, source: str) -> None:
        problem = _line_problem(str(name))
        if problem:
            raise ExportError(f"image name {str(name)!r} {problem}: it cannot be listed in CVAT's {CVAT_LIST.name}")
        labels = self._check(result)
        files.write_image(self._mask_path(name), Image.fromarray(self._table[labels + 1]))

    def labelmap(self) -> str:
        """The text of ``labelmap.txt``: header, background, one ``name:r,g,b::`` line per class."""
        lines = [CVAT_HEADER, "background:0,0,0::"]
        lines += [f"{c.name}:{r},{g},{b}::" for c, (r, g, b) in zip(self.classes, self.colours.tolist(), strict=True)]
        return "\n".join(lines) + "\n"

    def finish(self, names: Iterable[PurePosixPath]) -> list[Path]:
        listed = "".join(f"{name}\n" for name in names if self.done(name))
        return [
            files.write_text(self.out / CVAT_LABELMAP, self.labelmap()),
            files.write_text(self.out.joinpath(*CVAT_LIST.parts), listed),
        ]


EXPORTS: dict[str, type[Export]] = {export.format: export for export in (PngExport, CocoExport, CvatExport)}
