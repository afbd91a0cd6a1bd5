"""The main job at data-set scale: ``segment`` over a folder tree, mirrored, resumable, on one or two processes.

A 3-level tree of 300 small images (with a corrupt file, an empty folder and a symbolic-link
loop) is segmented with the tiny random model; runs killed part-way and started again end with
the files of an uninterrupted run, byte for byte, and two workers write what one writes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from maskdiffusion import cli, labelling
from maskdiffusion.commands import segment as segment_command

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLASSES = "sky, road, traffic light"
RUN = ["--classes", CLASSES, "--model", "tiny-random", "--device", "cpu", "--size", "64", "--quiet"]


def build_tree(root: Path, count: int = 300) -> Path:
    """``count`` images in city/<district>/<street>/NNNN.png (3 levels), a corrupt file, an empty folder, a loop."""
    rng = np.random.default_rng(0)
    for index in range(count):
        folder = root / f"city{index % 3}" / f"district{index % 5}" / f"street{index % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        height, width = (24, 40) if index % 4 else (40, 24)
        Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8)).save(folder / f"{index:04d}.png")
    (root / "city0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    (root / "city1" / "empty").mkdir()
    os.symlink(root, root / "city2" / "loop")
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return build_tree(tmp_path_factory.mktemp("data") / "photos")


def outputs(out: Path) -> dict[str, bytes]:
    """Every file under ``out`` but the run's own state folder: relative path -> bytes."""
    found = {}
    for path in sorted(out.rglob("*")):
        relative = path.relative_to(out)
        if path.is_file() and relative.parts[0] != ".maskdiffusion":
            found[relative.as_posix()] = path.read_bytes()
    return found


def comparable(files: dict[str, bytes]) -> dict[str, object]:
    """The outputs as a run must reproduce them: PNGs byte for byte, each JSON but its timings."""
    kept = {}
    for name, data in files.items():
        if name.endswith(".json"):
            summary = json.loads(data)
            summary.pop("timings")
            kept[name] = summary
        else:
            kept[name] = data
    return kept


def label_pngs(files: dict[str, bytes]) -> dict[str, bytes]:
    return {name: data for name, data in files.items() if name.endswith(".labels.png")}


def segment(*args: str) -> int:
    return cli.main(["segment", *args])


@pytest.fixture(scope="module")
def uninterrupted(tree, tmp_path_factory) -> tuple[Path, int]:
    out = tmp_path_factory.mktemp("runs") / "whole"
    code = segment(str(tree), *RUN, "--out", str(out))
    return out, code


def test_a_folder_tree_is_segmented_into_a_mirrored_tree(uninterrupted, tree, capsys):
    out, code = uninterrupted
    assert code == 1  # the corrupt file failed: reported, the others written
    files = outputs(out)
    labels = label_pngs(files)
    assert len(labels) == 300
    assert "city0/district0/street0/0000.labels.png" in labels
    assert {name.rsplit(".", 2)[0] for name in files} == {name.removesuffix(".labels.png") for name in labels}
    summary = json.loads((out / ".maskdiffusion" / "summary.json").read_text())
    assert summary["done"] == 300 and summary["skipped"] == 0
    failed = summary["failed"]
    assert any(path.endswith("broken.png") for path in failed)
    assert any("symbolic-link loop" in message for message in failed.values())
    image = Image.open(out / "city0/district0/street0/0000.labels.png")
    assert image.size == (24, 40) and image.mode == "P"  # the input's own size


def stop_after(monkeypatch, images: int) -> None:
    """Make ``segment`` raise KeyboardInterrupt once ``images`` images are written (through the public hook)."""

    def on_image(count: int) -> None:
        if count >= images:
            raise KeyboardInterrupt

    monkeypatch.setattr(segment_command, "label_shard", partial(labelling.label_shard, on_image=on_image))


def test_a_run_killed_twice_and_rerun_ends_with_the_uninterrupted_runs_files(
    uninterrupted, tree, tmp_path, monkeypatch
):
    out = tmp_path / "killed"
    with monkeypatch.context() as patch:
        stop_after(patch, 70)
        assert segment(str(tree), *RUN, "--out", str(out)) == 130
    first = len(label_pngs(outputs(out)))
    assert 70 <= first < 300
    with monkeypatch.context() as patch:
        stop_after(patch, 90)  # counts this run's images: 90 more
        assert segment(str(tree), *RUN, "--out", str(out)) == 130
    assert first + 90 <= len(label_pngs(outputs(out))) < 300
    assert segment(str(tree), *RUN, "--out", str(out)) == 1  # finishes; the corrupt file still fails
    summary = json.loads((out / ".maskdiffusion" / "summary.json").read_text())
    assert summary["skipped"] >= first + 90 and summary["done"] + summary["skipped"] >= 300
    assert comparable(outputs(out)) == comparable(outputs(uninterrupted[0]))  # every PNG byte for byte, the JSONs


def test_a_process_killed_outright_is_resumed_to_the_same_files(uninterrupted, tree, tmp_path):
    """SIGKILL (as ``kill -9``) after 40 images: no temp file or torn set survives the rerun."""
    out = tmp_path / "sigkill"
    killer = Path(__file__).with_name("interrupt.py")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(killer), "40", "segment", str(tree), *RUN, "--out", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == -9, done.stderr
    assert segment(str(tree), *RUN, "--out", str(out)) == 1
    assert comparable(outputs(out)) == comparable(outputs(uninterrupted[0]))


def test_two_processes_write_what_one_writes(uninterrupted, tree, tmp_path, capsys):
    out = tmp_path / "two"
    assert segment(str(tree), *RUN, "--out", str(out), "--num-processes", "2") == 1
    assert comparable(outputs(out)) == comparable(outputs(uninterrupted[0]))
    assert "wrote 300 segmentation(s)" in capsys.readouterr().out
    done = sorted(path.name for path in (out / ".maskdiffusion" / "done").iterdir())
    assert done == ["rank0of2.txt", "rank1of2.txt"]


def test_a_rerun_skips_everything_and_other_settings_are_refused(uninterrupted, tree, capsys):
    out, _ = uninterrupted
    before = outputs(out)
    assert segment(str(tree), *RUN, "--out", str(out)) == 1
    assert "0 segmentation(s)" in capsys.readouterr().out and outputs(out) == before
    assert segment(str(tree), *RUN, "--out", str(out), "--timestep", "100") == 2
    err = capsys.readouterr().err
    assert "holds a segmentation run with other settings" in err and "preset.timestep: 250" in err
    assert "--overwrite" in err


def test_overwrite_starts_afresh(tree, tmp_path, capsys):
    few = build_tree(tmp_path / "few", count=6)
    out = tmp_path / "out"
    assert segment(str(few), *RUN, "--out", str(out)) == 1
    first = outputs(out)
    assert segment(str(few), *RUN, "--out", str(out), "--timestep", "100", "--overwrite") == 1
    assert "wrote 6 segmentation(s)" in capsys.readouterr().out
    second = outputs(out)
    assert second.keys() == first.keys() and second != first  # every image written again, with t = 100
    assert json.loads(second["city0/district0/street0/0000.json"])["settings"]["timestep"] == 100


def test_loose_files_lists_and_patterns_together(tree, tmp_path):
    listing = tree / "some.txt"
    listing.write_text("city0/district0/street0/0000.png\ncity1\n")
    out = tmp_path / "mixed"
    loose = str(tree / "city0/district0/street0/0000.png")
    pattern = f"{tree}/city2/district2/*/*.png"
    assert segment(loose, f"@{listing}", pattern, *RUN, "--out", str(out)) == 0
    names = label_pngs(outputs(out))
    assert "0000.labels.png" in names  # a loose file stays flat
    assert "city0/district0/street0/0000.labels.png" in names  # a list line keeps its path
    assert "city1/district1/street1/0001.labels.png" in names  # a list's folder line mirrors below the list
    assert "street0/0002.labels.png" in names  # a pattern's files are named below its fixed part


def test_missing_inputs_are_refused_before_the_model_is_loaded(tmp_path, capsys, monkeypatch):
    from maskdiffusion.commands import options

    monkeypatch.setattr(options, "load_segmenter", lambda args: pytest.fail("the model was loaded"))
    assert segment(str(tmp_path / "nowhere"), f"@{tmp_path / 'none.txt'}", *RUN, "--out", str(tmp_path / "o")) == 1
    err = capsys.readouterr().err
    assert "does not exist" in err and "list file" in err and "nothing to segment" in err


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return build_tree(tmp_path_factory.mktemp("small") / "photos", count=12)


@pytest.fixture(scope="module")
def small_png(small, tmp_path_factory) -> dict[str, np.ndarray]:
    """The png run's label maps of the small tree: name -> (H, W) labels (-1 = background)."""
    out = tmp_path_factory.mktemp("small-png") / "out"
    segment(str(small), *RUN, "--out", str(out))
    maps = {}
    for path in sorted(out.rglob("*.labels.png")):
        values = np.asarray(Image.open(path)).astype(np.int64)
        maps[path.relative_to(out).as_posix().removesuffix(".labels.png")] = np.where(values == 255, -1, values)
    return maps


def test_coco_output_decodes_back_to_the_label_maps_and_two_workers_write_the_same_bytes(small, small_png, tmp_path):
    from pycocotools import mask

    one, two = tmp_path / "one", tmp_path / "two"
    assert segment(str(small), *RUN, "--out", str(one), "--format", "coco") == 1
    assert segment(str(small), *RUN, "--out", str(two), "--format", "coco", "--num-processes", "2") == 1
    assert (one / "annotations.json").read_bytes() == (two / "annotations.json").read_bytes()
    coco = json.loads((one / "annotations.json").read_text())
    assert [c["name"] for c in coco["categories"]] == ["sky", "road", "traffic light"]
    by_image = {image["id"]: image for image in coco["images"]}
    assert len(by_image) == len(small_png) == 12
    decoded = {image["file_name"]: np.full((image["height"], image["width"]), -1) for image in coco["images"]}
    for annotation in coco["annotations"]:
        image = by_image[annotation["image_id"]]
        decoded[image["file_name"]][mask.decode(annotation["segmentation"]).astype(bool)] = (
            annotation["category_id"] - 1
        )
    for file_name, labels in decoded.items():
        name = Path(file_name).relative_to(small).as_posix().removesuffix(".png")
        np.testing.assert_array_equal(labels, small_png[name])
    assert not list(one.rglob("*.labels.png"))  # coco writes its one file, not the per-image PNGs


def test_cvat_output_parses_back_to_the_label_maps(small, small_png, tmp_path):
    out = tmp_path / "cvat"
    assert segment(str(small), *RUN, "--out", str(out), "--format", "cvat") == 1
    lines = (out / "labelmap.txt").read_text().splitlines()
    assert lines[0].startswith("# label:color_rgb") and lines[1] == "background:0,0,0::"
    colours = {}
    for index, line in enumerate(lines[1:]):
        _, rgb, _, _ = line.split(":")
        colours[tuple(int(v) for v in rgb.split(","))] = index - 1  # background -> -1
    assert [line.split(":")[0] for line in lines[2:]] == ["sky", "road", "traffic light"]
    listed = (out / "ImageSets" / "Segmentation" / "default.txt").read_text().split()
    assert listed == sorted(small_png)  # the done images, in listing order
    for name in listed:
        pixels = np.asarray(Image.open(out / "SegmentationClass" / f"{name}.png").convert("RGB"))
        labels = np.vectorize(lambda r, g, b: colours[(r, g, b)])(pixels[..., 0], pixels[..., 1], pixels[..., 2])
        np.testing.assert_array_equal(labels, small_png[name])
