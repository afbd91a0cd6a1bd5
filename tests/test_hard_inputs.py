"""`maskdiffusion evaluate` on a data set of hard inputs: decompression bombs and labels of another size.

One `folder` data set holds a good pair, an image and a label whose PNG headers claim
30000x30000 pixels (a few hundred bytes each; PIL refuses them before decoding), a label at
half its image's size and a label of another aspect ratio. Each bad sample must be one failed
image in metrics.json, the run and every resume of it must finish, and the half-size label
must be scored with the prediction resized to it, counted and named.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from folder_data import folder_dataset
from interrupt import stop_evaluations_after
from PIL import Image

from maskdiffusion import cli
from maskdiffusion.datasets import DatasetError, build_dataset
from maskdiffusion.evaluation import label_size_problem

pytestmark = pytest.mark.usefixtures("one_torch_thread", "shared_models")

BOMB_SIDE = 30_000


def png_header(width: int, height: int) -> bytes:
    """A 1-bit grayscale PNG whose header claims ``width x height`` pixels, with almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def write_pair(root: Path, name: str, height: int, width: int, label_shape: tuple[int, int] | None = None) -> None:
    """A two-region image (top: class 0, bottom: class 1) and its label, optionally at another size."""
    label = np.zeros((height, width), np.uint8)
    label[height // 2 :] = 1
    image = np.where(label[..., None] == 1, (200, 40, 40), (60, 60, 200)).astype(np.uint8)
    Image.fromarray(image).save(root / "images" / f"{name}.png")
    if label_shape is not None:
        label = np.asarray(Image.fromarray(label).resize(label_shape[::-1], Image.Resampling.NEAREST))
    Image.fromarray(label).save(root / "labels" / f"{name}.png")


@pytest.fixture(scope="module")
def hard(tmp_path_factory) -> Path:
    root = folder_dataset(tmp_path_factory.mktemp("hard") / "data")
    write_pair(root, "a_good", 48, 64)
    (root / "images" / "b_image_bomb.png").write_bytes(png_header(BOMB_SIDE, BOMB_SIDE))
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "labels" / "b_image_bomb.png")
    write_pair(root, "c_label_bomb", 32, 32)
    (root / "labels" / "c_label_bomb.png").write_bytes(png_header(BOMB_SIDE, BOMB_SIDE))
    write_pair(root, "d_half_size_label", 64, 48, label_shape=(32, 24))
    write_pair(root, "e_rotated_label", 48, 64, label_shape=(64, 48))
    write_pair(root, "f_good", 40, 40)
    return root


def args(data: Path, model: Path, out: Path) -> list[str]:
    return [
        "evaluate", "--dataset", "folder", "--root", str(data), "--model", str(model), "--size", "64",
        "--device", "cpu", "--batch-size", "2", "--save-every", "2", "--out", str(out), "--quiet",
    ]  # fmt: skip


def results_of(metrics: dict) -> dict:
    return {key: value for key, value in metrics.items() if key != "runtime"}


@pytest.fixture(scope="module")
def hard_run(hard, tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("hard-run") / "run"
    assert cli.main(args(hard, tiny_model, out)) == 0
    return out, json.loads((out / "metrics.json").read_text())


def test_bombs_and_a_label_that_does_not_fit_are_failed_images_not_a_crash(hard_run):
    _, metrics = hard_run
    reasons = {item["id"]: item["reason"] for item in metrics["failed"]}
    assert sorted(reasons) == ["b_image_bomb", "c_label_bomb", "e_rotated_label"]
    assert "b_image_bomb.png" in reasons["b_image_bomb"] and "refused" in reasons["b_image_bomb"]
    assert "c_label_bomb.png" in reasons["c_label_bomb"] and "refused" in reasons["c_label_bomb"]
    assert "aspect ratios differ" in reasons["e_rotated_label"] and "e_rotated_label.png" in reasons["e_rotated_label"]
    assert metrics["num_images"] == 3 and metrics["num_failed"] == 3


def test_a_label_of_another_size_is_scored_at_its_size_counted_and_named(hard_run, capsys):
    out, metrics = hard_run
    assert metrics["num_resized_labels"] == 1
    assert metrics["resized_labels"] == [{"id": "d_half_size_label", "image_size": [64, 48], "label_size": [32, 24]}]
    assert metrics["num_pixels"] == 48 * 64 + 32 * 24 + 40 * 40  # the half-size label's own pixels
    assert "1 image(s) scored on a label of another size" in (out / "report.md").read_text()


def test_the_size_warning_and_summary_reach_the_console(hard, tiny_model, tmp_path, capsys):
    assert cli.main(args(hard, tiny_model, tmp_path / "run")) == 0
    captured = capsys.readouterr()
    assert "'d_half_size_label': its label is 24x32 pixels, its image 48x64" in captured.err
    assert "1 scored on a label of another size than the image" in captured.out


def test_resumes_of_a_run_with_bombs_end_with_the_same_metrics(hard, tiny_model, hard_run, tmp_path, monkeypatch):
    out = tmp_path / "run"
    for point in (2, 2):  # killed after every second image handled, twice, then finished
        with monkeypatch.context() as patch:
            stop_evaluations_after(patch, point, _Killed)
            with pytest.raises(_Killed):
                cli.main(args(hard, tiny_model, out))
    assert cli.main(args(hard, tiny_model, out)) == 0
    assert results_of(json.loads((out / "metrics.json").read_text())) == results_of(hard_run[1])
    assert cli.main(args(hard, tiny_model, out)) == 0  # and a run that is complete stays complete
    assert results_of(json.loads((out / "metrics.json").read_text())) == results_of(hard_run[1])


class _Killed(Exception):
    """Stands for SIGKILL in-process (nothing is written on the way out)."""


def test_a_label_bomb_is_refused_from_its_header_by_the_loader(hard):
    dataset = build_dataset("folder", hard)
    with pytest.raises(DatasetError, match=r"c_label_bomb\.png"):
        dataset.load(dataset.sample_ids.index("c_label_bomb"))


@pytest.mark.parametrize(
    ("image", "label", "fits"),
    [((48, 64), (48, 64), True), ((480, 640), (240, 320), True), ((481, 640), (240, 320), True),
     ((48, 64), (64, 48), False), ((100, 100), (100, 125), False), ((1000, 1000), (1000, 1090), True)],
)  # fmt: skip
def test_labels_fit_their_image_when_the_aspect_ratios_agree_within_ten_percent(image, label, fits):
    assert (label_size_problem(image, label, Path("x.png")) is None) == fits
