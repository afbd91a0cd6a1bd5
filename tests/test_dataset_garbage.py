"""Property-based tests: data set loaders on generated garbage.

Random bytes, truncated or corrupted encodings, images of every PIL mode and size, in place of
label files, images, class lists and split lists of a `folder` data set, a Cityscapes and a
COCO-Stuff layout and STEGO's Potsdam `.mat` tiles. Every outcome must be a loaded sample or
a DatasetError / ImageLoadError whose message names the file, never another exception. One
short evaluate run on such a data set checks that the run goes on around them.
"""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from folder_data import folder_dataset
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from maskdiffusion import cli
from maskdiffusion.datasets import DatasetError, build_dataset
from maskdiffusion.evaluation import read_image
from maskdiffusion.views import ImageLoadError, load_image

SETTINGS = settings(max_examples=25, deadline=None)
MODES = ["1", "L", "P", "I", "I;16", "F", "RGB", "RGBA", "LA", "CMYK", "YCbCr"]
FORMATS = ["PNG", "TIFF", "BMP", "GIF", "JPEG", "WEBP"]


@st.composite
def encoded_images(draw) -> bytes:
    """An image of any mode, size and content, in any format that will take it, maybe cut short."""
    mode, fmt = draw(st.sampled_from(MODES)), draw(st.sampled_from(FORMATS))
    size = (draw(st.integers(1, 24)), draw(st.integers(1, 24)))
    raw = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).bytes(len(Image.new(mode, size).tobytes()))
    if draw(st.booleans()):  # small values: often valid class indices
        raw = bytes(b % 4 for b in raw)
    image = Image.frombytes(mode, size, raw)
    buffer = io.BytesIO()
    try:
        image.save(buffer, format=fmt)
    except (OSError, ValueError, KeyError):  # the format does not take the mode: TIFF takes them all
        buffer = io.BytesIO()
        image.save(buffer, format="TIFF")
    data = buffer.getvalue()
    return data[: draw(st.integers(0, len(data)))] if draw(st.booleans()) else data


GARBAGE = st.one_of(st.binary(max_size=300), encoded_images())
TEXT_GARBAGE = st.one_of(st.binary(max_size=200), st.text(max_size=200).map(lambda text: text.encode("utf-8")))


def check_sample(dataset, index: int) -> None:
    """The sample's label loads as (H, W) uint8 within the classes, or a DatasetError names its file."""
    entry = dataset.files[index]
    try:
        label = dataset.load(index).label
    except DatasetError as error:
        assert str(entry.label_path) in str(error)
        return
    assert label.ndim == 2 and label.dtype == np.uint8 and label.size > 0
    assert ((label < dataset.num_classes) | (label == 255)).all()


def check_image(path: Path) -> None:
    """The image reads as RGB through evaluate's path, or an ImageLoadError names it."""
    try:
        image = load_image(read_image(path))
    except ImageLoadError as error:
        assert path.name in str(error)
        return
    assert image.mode == "RGB"


def check_dataset(name: str, root: Path, **options) -> None:
    try:
        dataset = build_dataset(name, root, **options)
    except DatasetError as error:
        assert str(root) in str(error) or "--root" in str(error)
        return
    for index in range(len(dataset)):
        check_sample(dataset, index)
        check_image(dataset.files[index].image_path)


@SETTINGS
@given(labels=st.lists(GARBAGE, min_size=1, max_size=3), images=st.lists(GARBAGE, min_size=3, max_size=3))
def test_folder_data_set_with_garbage_labels_and_images(labels, images):
    with tempfile.TemporaryDirectory() as folder:
        root = folder_dataset(Path(folder) / "data", "grass\nsky|heaven\ncow\n")
        for index, (label, image) in enumerate(zip(labels, images, strict=False)):
            (root / "images" / f"s{index}.png").write_bytes(image)
            (root / "labels" / f"s{index}.png").write_bytes(label)
        check_dataset("folder", root)


@SETTINGS
@given(classes=TEXT_GARBAGE, split=TEXT_GARBAGE)
def test_folder_data_set_with_garbage_class_and_split_lists(classes, split):
    with tempfile.TemporaryDirectory() as folder:
        root = folder_dataset(Path(folder) / "data")
        Image.new("RGB", (4, 4)).save(root / "images" / "a.png")
        Image.new("L", (4, 4)).save(root / "labels" / "a.png")
        (root / "classes.txt").write_bytes(classes)
        (root / "val.txt").write_bytes(split)
        try:
            build_dataset("folder", root)
        except DatasetError as error:
            assert "classes.txt" in str(error) or "val.txt" in str(error) or "images" in str(error)


@SETTINGS
@given(label=GARBAGE, image=GARBAGE)
def test_cityscapes_layout_with_garbage_files(label, image):
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder) / "cityscapes"
        name = "frankfurt_000000_000294"
        (base / "leftImg8bit/val/frankfurt").mkdir(parents=True)
        (base / "gtFine/val/frankfurt").mkdir(parents=True)
        (base / "leftImg8bit/val/frankfurt" / f"{name}_leftImg8bit.png").write_bytes(image)
        (base / "gtFine/val/frankfurt" / f"{name}_gtFine_labelIds.png").write_bytes(label)
        check_dataset("cityscapes19", Path(folder))


@SETTINGS
@given(label=GARBAGE, curated=TEXT_GARBAGE)
def test_cocostuff_layout_with_garbage_label_and_image_list(label, curated):
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder) / "cocostuff"
        (base / "images/val2017").mkdir(parents=True)
        (base / "annotations/val2017").mkdir(parents=True)
        (base / "curated/val2017").mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(base / "images/val2017/000000000139.jpg")
        (base / "annotations/val2017/000000000139.png").write_bytes(label)
        (base / "curated/val2017/Coco164kFull_Stuff_Coarse_7.txt").write_bytes(curated)
        check_dataset("cocostuff27", Path(folder))
        check_dataset("cocostuff171", Path(folder))


@SETTINGS
@given(tile=st.binary(max_size=400), gt=st.binary(max_size=400))
def test_potsdam_mat_tiles_of_garbage(tile, gt):
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder) / "potsdam"
        (base / "imgs").mkdir(parents=True)
        (base / "gt").mkdir()
        (base / "imgs" / "t1.mat").write_bytes(tile)
        (base / "gt" / "t1.mat").write_bytes(gt)
        (base / "labelled_test.txt").write_text("t1\n")
        check_dataset("potsdam3", Path(folder))


GARBAGE_SAMPLES = {  # (image, label) of a short evaluate run: every kind of trouble once
    "a_ok": ("rgb", "ok"),
    "b_noise_image": (b"\x89PNG\r\n\x1a\nnot really", "ok"),
    "c_truncated_label": ("rgb", "truncated"),
    "d_colour_label": ("rgb", "colour"),
    "e_class_out_of_range": ("rgb", "value 7"),
    "f_ok_grey": ("grey", "ok"),
}


def write_garbage_sample(root: Path, name: str, image, label: str) -> None:
    if image == "rgb":
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(
            root / "images" / f"{name}.png"
        )
    elif image == "grey":
        Image.new("I;16", (32, 24), 4000).save(root / "images" / f"{name}.png")
    else:
        (root / "images" / f"{name}.png").write_bytes(image)
    values = np.zeros((24, 32), np.uint8)
    values[12:] = 1
    buffer = io.BytesIO()
    if label == "colour":
        Image.new("RGB", (32, 24)).save(buffer, format="PNG")
    else:
        Image.fromarray(np.where(values == 1, 7, 0).astype(np.uint8) if label == "value 7" else values).save(
            buffer, format="PNG"
        )
    data = buffer.getvalue()
    (root / "labels" / f"{name}.png").write_bytes(data[: len(data) // 2] if label == "truncated" else data)


@pytest.mark.usefixtures("one_torch_thread", "shared_models")
def test_evaluate_scores_the_good_samples_and_names_every_bad_one(tiny_model, tmp_path):
    root = folder_dataset(tmp_path / "data")
    for name, (image, label) in GARBAGE_SAMPLES.items():
        write_garbage_sample(root, name, image, label)
    out = tmp_path / "run"
    args = ["evaluate", "--dataset", "folder", "--root", str(root), "--model", str(tiny_model), "--size", "64",
            "--device", "cpu", "--batch-size", "2", "--out", str(out), "--quiet"]  # fmt: skip
    assert cli.main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    failed = {item["id"]: item["reason"] for item in metrics["failed"]}
    assert sorted(failed) == ["b_noise_image", "c_truncated_label", "d_colour_label", "e_class_out_of_range"]
    for name, reason in failed.items():
        assert f"{name}.png" in reason
    assert metrics["num_images"] == 2 and metrics["num_pixels"] == 2 * 24 * 32
