"""Interchange formats of data-set runs: per-image writes, resume after a kill, merges across workers."""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
import torch
from PIL import Image

from maskdiffusion import exports, files, visualize
from maskdiffusion.exports import EXPORTS, CocoExport, CvatExport, ExportError, PngExport
from maskdiffusion.presets import Preset
from maskdiffusion.prompts import ClassName
from maskdiffusion.result import Result

mask_api = pytest.importorskip("pycocotools.mask")
# pycocotools' decode passes copy=False to numpy 2's __array__ protocol (its bug, harmless here)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning")

CLASSES = [ClassName("road", ("road", "street")), ClassName("sky", ("sky",)), ClassName("traffic light", ("lamp",))]


def make_result(labels: np.ndarray, classes: list[ClassName] = CLASSES) -> Result:
    """A Result around a hand-made label map (no model): exact values to compare against."""
    labels = np.asarray(labels, dtype=np.int64)
    height, width = labels.shape
    return Result(
        classes=[c.name for c in classes],
        labels=labels,
        attention=np.zeros((len(classes), 2, 2), dtype=np.float32),
        image=Image.new("RGB", (width, height), (90, 120, 150)),
        grid_scores=torch.zeros(len(classes), 2, 2),
        preset=Preset(),
        vocabulary=list(classes),
    )


def random_labels(seed: int, shape: tuple[int, int], classes: int = len(CLASSES)) -> np.ndarray:
    """Blocky labels (-1 = background) so that masks have runs and several components."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(-1, classes, size=(shape[0] // 4 + 1, shape[1] // 4 + 1))
    return np.kron(coarse, np.ones((4, 4), dtype=np.int64))[: shape[0], : shape[1]]


# five images of different sizes; image 3 lacks class 1 ("sky") on purpose, image 4 is all background
IMAGES = [
    (PurePosixPath("city/000001"), "photos/city/000001.png", random_labels(1, (24, 32))),
    (PurePosixPath("city/000002"), "photos/city/000002.png", random_labels(2, (17, 9))),
    (PurePosixPath("rural/a.b"), "photos/rural/a.b.jpg", random_labels(3, (8, 40))),
    (PurePosixPath("street"), "street.png", np.where(random_labels(4, (12, 12)) == 1, 2, random_labels(4, (12, 12)))),
    (PurePosixPath("empty"), "empty.png", np.full((6, 5), -1)),
]
NAMES = [name for name, _, _ in IMAGES]


def write(export, indices) -> None:
    for i in indices:
        name, source, labels = IMAGES[i]
        export.write(name, make_result(labels), source)


def test_registry_has_the_three_formats():
    assert dict(EXPORTS) == {"png": PngExport, "coco": CocoExport, "cvat": CvatExport}
    assert all(EXPORTS[key].format == key for key in EXPORTS)


# -- png ----------------------------------------------------------------------------------------------


def test_png_write_makes_the_set_and_marks_done(tmp_path):
    export = PngExport(tmp_path, CLASSES)
    name, source, labels = IMAGES[0]
    assert not export.done(name)
    export.write(name, make_result(labels), source)
    assert export.done(name)
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert written == ["city/000001.json", "city/000001.labels.png", "city/000001.overlay.png"]
    assert np.array_equal(
        np.asarray(Image.open(tmp_path / "city/000001.labels.png")), np.where(labels < 0, 255, labels)
    )
    # a dot in the name is kept, not taken for a suffix
    export.write(IMAGES[2][0], make_result(IMAGES[2][2]), IMAGES[2][1])
    assert (tmp_path / "rural" / "a.b.json").is_file() and export.done(PurePosixPath("rural/a.b"))
    export.close()
    assert export.finish(NAMES) == []


def test_png_failed_write_leaves_no_file(tmp_path, monkeypatch):
    replace = os.replace

    def full_disk(source, target):  # the JSON, renamed last, fails as on a full disk
        if str(target).endswith(".json"):
            raise OSError(28, "No space left on device")
        replace(source, target)

    monkeypatch.setattr(files.os, "replace", full_disk)
    export = PngExport(tmp_path, CLASSES)
    name, source, labels = IMAGES[0]
    with pytest.raises(OSError, match="No space"):
        export.write(name, make_result(labels), source)
    assert not export.done(name)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # no image file, no temp file


def test_write_refuses_a_result_of_other_classes(tmp_path):
    other = [ClassName("cat", ("cat",)), *CLASSES[1:]]
    for kind in EXPORTS.values():
        with pytest.raises(ValueError, match="classes"):
            kind(tmp_path / kind.format, CLASSES).write(NAMES[0], make_result(IMAGES[0][2], other), "x.png")


# -- coco ---------------------------------------------------------------------------------------------


def coco_run(out: Path, plan: list[tuple[int, int, list[int]]], names=NAMES) -> bytes:
    """Workers ``(rank, world_size, image indices)`` run one after another, then rank 0 finishes."""
    for rank, world_size, indices in plan:
        export = CocoExport(out, CLASSES, rank=rank, world_size=world_size)
        write(export, [i for i in indices if not export.done(IMAGES[i][0])])
        export.close()
    (written,) = CocoExport(out, CLASSES).finish(names)
    assert written == out / "annotations.json"
    return written.read_bytes()


def test_coco_round_trip(tmp_path):
    data = json.loads(coco_run(tmp_path, [(0, 1, range(len(IMAGES)))]))
    assert data["categories"] == [
        {"id": 1, "name": "road", "supercategory": "", "words": ["road", "street"]},
        {"id": 2, "name": "sky", "supercategory": "", "words": ["sky"]},
        {"id": 3, "name": "traffic light", "supercategory": "", "words": ["lamp"]},
    ]
    assert data["images"] == [
        {"id": i + 1, "file_name": source, "width": labels.shape[1], "height": labels.shape[0]}
        for i, (_, source, labels) in enumerate(IMAGES)
    ]
    assert [a["id"] for a in data["annotations"]] == list(range(1, len(data["annotations"]) + 1))
    for image_id, (_, _, labels) in enumerate(IMAGES, start=1):
        mine = [a for a in data["annotations"] if a["image_id"] == image_id]
        present = sorted(int(c) for c in np.unique(labels) if c >= 0)  # background: no annotation
        assert [a["category_id"] for a in mine] == [c + 1 for c in present]
        for annotation in mine:
            truth = labels == annotation["category_id"] - 1
            assert annotation["iscrowd"] == 0
            assert annotation["segmentation"]["size"] == list(labels.shape)
            rle = {**annotation["segmentation"], "counts": annotation["segmentation"]["counts"].encode()}
            assert np.array_equal(mask_api.decode(rle), truth)
            assert annotation["area"] == int(truth.sum())
            ys, xs = np.nonzero(truth)
            box = [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert annotation["bbox"] == [float(v) for v in box]
    assert not [a for a in data["annotations"] if a["image_id"] == 5]  # all background
    assert 2 not in [a["category_id"] for a in data["annotations"] if a["image_id"] == 4]  # sky absent


def test_coco_loads_in_pycocotools(tmp_path):
    from pycocotools.coco import COCO

    coco_run(tmp_path, [(0, 1, range(len(IMAGES)))])
    api = COCO(str(tmp_path / "annotations.json"))
    annotation = api.loadAnns(api.getAnnIds(imgIds=[1], catIds=[3]))[0]
    assert np.array_equal(api.annToMask(annotation), IMAGES[0][2] == 2)


def test_coco_workers_and_resumes_give_the_same_bytes(tmp_path):
    once = coco_run(tmp_path / "once", [(0, 1, range(5))])
    # two workers, alternate images, rank 1 first
    assert coco_run(tmp_path / "two", [(1, 2, [1, 3]), (0, 2, [0, 2, 4])]) == once
    # killed after two images, resumed with two workers, then with three (which find nothing left)
    assert (
        coco_run(tmp_path / "resumed", [(0, 1, [0, 1]), (0, 2, [0, 2, 4]), (1, 2, range(5)), (2, 3, range(5))]) == once
    )
    # the same image written by two runs (e.g. raced): the first record wins, bytes unchanged
    out = tmp_path / "twice"
    coco_run(out, [(0, 1, range(5))])
    write(CocoExport(out, CLASSES, rank=1, world_size=4), [0, 3])
    assert coco_run(out, []) == once
    # finishing again changes nothing
    assert coco_run(out, []) == once


def test_coco_done_sees_parts_of_any_world_size(tmp_path):
    first = CocoExport(tmp_path, CLASSES, rank=1, world_size=2)
    write(first, [1, 3])
    first.close()
    later = CocoExport(tmp_path, CLASSES, rank=0, world_size=3)
    assert [later.done(name) for name in NAMES] == [False, True, False, True, False]
    write(later, [0])
    assert later.done(NAMES[0])  # its own writes count too
    later.close()


def test_coco_skips_images_not_done_and_records_of_other_runs(tmp_path):
    export = CocoExport(tmp_path, CLASSES)
    write(export, [0, 2])
    export.close()
    (path,) = export.finish([NAMES[2], NAMES[1], NAMES[0]])  # listing order decides, NAMES[1] failed
    data = json.loads(path.read_text())
    assert [(i["id"], i["file_name"]) for i in data["images"]] == [(1, IMAGES[2][1]), (2, IMAGES[0][1])]
    assert data["annotations"][0]["image_id"] == 1
    # nothing done at all: a valid empty file
    empty = json.loads(CocoExport(tmp_path / "none", CLASSES).finish(NAMES)[0].read_text())
    assert (empty["images"], empty["annotations"], len(empty["categories"])) == ([], [], 3)


def test_coco_torn_line_of_a_killed_worker_is_ignored(tmp_path):
    once = coco_run(tmp_path / "once", [(0, 1, range(5))])
    out = tmp_path / "killed"
    export = CocoExport(out, CLASSES)
    write(export, [0, 1, 2])
    export.close()
    part = out / ".maskdiffusion" / "coco" / "part-0-of-1.jsonl"
    lines = part.read_bytes().splitlines(keepends=True)
    part.write_bytes(b"".join(lines[:2]) + lines[2][: len(lines[2]) // 2])  # killed mid-line while writing image 2
    resumed = CocoExport(out, CLASSES)
    assert [resumed.done(name) for name in NAMES] == [True, True, False, False, False]
    write(resumed, [2, 3, 4])
    resumed.close()
    after = part.read_bytes().split(b"\n")
    assert after[:2] == [line.rstrip(b"\n") for line in lines[:2]]
    assert after[2] == lines[2][: len(lines[2]) // 2]  # the torn line stays, on its own line
    assert [json.loads(line)["name"] for line in after[3:-1]] == ["rural/a.b", "street", "empty"]
    assert after[-1] == b""
    assert coco_run(out, []) == once


def test_coco_failed_write_leaves_no_record(tmp_path, monkeypatch):
    export = CocoExport(tmp_path, CLASSES)
    write(export, [0])
    part = export.part
    before = part.read_bytes()
    real_write = os.write

    def half_then_fail(descriptor, data):  # the disk fills up in the middle of the line
        real_write(descriptor, bytes(data[: len(data) // 2]))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(exports.os, "write", half_then_fail)
    with pytest.raises(OSError, match="No space"):
        write(export, [1])
    monkeypatch.setattr(exports.os, "write", real_write)
    assert part.read_bytes() == before and not export.done(NAMES[1])
    write(export, [1])
    export.close()
    assert [json.loads(line)["name"] for line in part.read_bytes().splitlines()] == ["city/000001", "city/000002"]


def test_coco_fsync_policy(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(exports.os, "fsync", lambda descriptor: synced.append(descriptor))
    monkeypatch.setattr(exports, "FSYNC_LINES", 2)
    monkeypatch.setattr(exports, "FSYNC_SECONDS", 1e9)
    export = CocoExport(tmp_path, CLASSES)
    write(export, [0])
    assert synced == []
    write(export, [1])
    assert len(synced) == 1  # every FSYNC_LINES lines
    write(export, [2])
    export.close()
    assert len(synced) == 2  # and on close


# -- cvat ---------------------------------------------------------------------------------------------


def read_cvat(out: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """Parse a CVAT "Segmentation mask 1.1" folder back: class names in label-map order, index maps by name
    (index into those names, -1 where the pixel is the background colour)."""
    names, colours = [], {}
    for line in (out / "labelmap.txt").read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, colour, parts, actions = line.split(":")
        assert (parts, actions) == ("", "")
        rgb = tuple(int(v) for v in colour.split(","))
        assert rgb not in colours, "colours must be distinct"
        colours[rgb] = len(names) - 1  # the first line is background: -1
        names.append(name)
    assert names[0] == "background" and colours[(0, 0, 0)] == -1
    maps = {}
    for item in (out / "ImageSets/Segmentation/default.txt").read_text(encoding="utf-8").splitlines():
        picture = Image.open(out / "SegmentationClass" / f"{item}.png")
        assert picture.mode == "RGB"
        pixels = np.asarray(picture).reshape(-1, 3)
        maps[item] = np.array([colours[tuple(p)] for p in pixels.tolist()]).reshape(picture.height, picture.width)
    return names[1:], maps


def test_cvat_round_trip(tmp_path):
    export = CvatExport(tmp_path, CLASSES)
    assert not any(export.done(name) for name in NAMES)
    write(export, [3, 0, 2, 4])  # image 1 fails
    export.close()
    assert [export.done(name) for name in NAMES] == [True, False, True, True, True]
    written = export.finish(NAMES)
    assert written == [tmp_path / "labelmap.txt", tmp_path / "ImageSets/Segmentation/default.txt"]
    classes, maps = read_cvat(tmp_path)
    assert classes == ["road", "sky", "traffic light"]
    assert list(maps) == ["city/000001", "rural/a.b", "street", "empty"]  # listing order, subfolders kept
    for name, _, labels in IMAGES:
        if str(name) in maps:
            assert np.array_equal(maps[str(name)], labels)
    assert (tmp_path / "SegmentationClass/city/000001.png").is_file()
    colours = visualize.palette(3).tolist()
    assert (tmp_path / "labelmap.txt").read_text().splitlines() == [
        "# label:color_rgb:parts:actions",
        "background:0,0,0::",
        "road:{},{},{}::".format(*colours[0]),
        "sky:{},{},{}::".format(*colours[1]),
        "traffic light:{},{},{}::".format(*colours[2]),
    ]


def test_cvat_colours_are_distinct_and_never_black():
    colours = exports.cvat_colours(1500)  # the overlay palette repeats itself from class 631 on
    assert len(np.unique(colours, axis=0)) == 1500
    assert not (colours == 0).all(axis=1).any()
    palette = visualize.palette(1500)
    assert np.array_equal(colours[:630], palette[:630])  # the overlay colours wherever they are free
    assert np.array_equal(exports.cvat_colours(1500), colours)  # deterministic
    assert np.array_equal(exports.cvat_colours(700), colours[:700])


@pytest.mark.parametrize("name", ["a:b", "red, dark", "background", "#tag", " padded", "two\nlines"])
def test_cvat_refuses_class_names_its_label_map_cannot_hold(tmp_path, name):
    with pytest.raises(ExportError, match=r"labelmap\.txt"):
        CvatExport(tmp_path, [*CLASSES, ClassName(name, (name,))])


def test_cvat_refuses_duplicate_class_names_and_unlistable_image_names(tmp_path):
    with pytest.raises(ExportError, match="twice"):
        CvatExport(tmp_path, [*CLASSES, ClassName("sky", ("heaven",))])
    export = CvatExport(tmp_path, CLASSES)
    with pytest.raises(ExportError, match=r"default\.txt"):
        export.write(PurePosixPath("#1"), make_result(IMAGES[0][2]), "#1.png")
    assert not (tmp_path / "SegmentationClass").exists()


# -- with the real pipeline -----------------------------------------------------------------------------


def test_every_format_takes_a_pipeline_result(tmp_path, segmenter):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8))
    result = segmenter(image, "road, sky", preset=segmenter.preset.replace(size=64))
    classes = list(result.vocabulary)
    name = PurePosixPath("sub/picture")
    for kind in EXPORTS.values():
        export = kind(tmp_path / kind.format, classes)
        export.write(name, result, "in/sub/picture.png")
        export.close()
        assert export.done(name)
        export.finish([name])
    data = json.loads((tmp_path / "coco/annotations.json").read_text())
    decoded = np.full(result.labels.shape, -1)
    for annotation in data["annotations"]:
        rle = {**annotation["segmentation"], "counts": annotation["segmentation"]["counts"].encode()}
        decoded[mask_api.decode(rle).astype(bool)] = annotation["category_id"] - 1
    assert np.array_equal(decoded, result.labels)
    assert np.array_equal(read_cvat(tmp_path / "cvat")[1]["sub/picture"], result.labels)
