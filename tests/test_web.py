"""The web demo's request handler and app, without a browser (see test_web_browser.py for that)."""

import argparse
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from maskdiffusion import web

CLASSES = "sky, road, person|pedestrian"


@pytest.fixture
def photo(tmp_path, rng):
    """An upload as Gradio hands it over: a file path keeping the user's file name."""
    path = tmp_path / "street.png"
    Image.fromarray((rng.random((96, 160, 3)) * 255).astype(np.uint8)).save(path)
    return path


def request(segmenter, image, classes=CLASSES, **settings):
    settings = {"preset_name": "default", "size": 128, "threshold": None, **settings}
    return web.segment_request(segmenter, image, classes, **settings)


def png_header_only(path, width, height):
    """A PNG whose header claims ``width x height`` pixels and whose pixel data is empty."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"") + chunk(b"IEND", b""))
    return path


def test_request_returns_overlay_label_map_heatmaps_and_shares(segmenter, photo):
    response = request(segmenter, photo)
    assert response.ok, response.message
    assert response.overlay.height == 96 and response.overlay.width > 160  # legend panel on the right
    assert response.label_map.size == (160, 96) and response.label_map.mode == "RGB"
    assert [caption for _, caption in response.heatmaps] == ["sky", "road", "person"]
    assert [row[:2] for row in response.shares] == [["sky", "sky"], ["road", "road"], ["person", "person | pedestrian"]]
    assert sum(row[2] for row in response.shares) == pytest.approx(100, abs=0.1)
    assert "street.png (160x96) into 3 classes" in response.message and " s**" in response.message


def test_request_writes_labels_png_and_json_for_download(segmenter, photo, tmp_path):
    response = request(segmenter, photo, out_dir=tmp_path / "out")
    labels_path, json_path = map(str, response.downloads)
    assert labels_path.endswith("street.labels.png") and json_path.endswith("street.json")
    labels = Image.open(labels_path)
    assert labels.mode == "P" and labels.size == (160, 96) and np.asarray(labels).max() < 3
    with open(json_path) as handle:
        summary = json.load(handle)
    assert [c["words"] for c in summary["classes"]] == [["sky"], ["road"], ["person", "pedestrian"]]
    assert summary["source"] == "street.png" and summary["settings"]["size"] == 128


def test_request_without_out_dir_writes_nothing(segmenter, photo):
    assert request(segmenter, photo).downloads == []


def test_changing_only_the_classes_segments_the_same_image_again(segmenter, photo):
    first, second = request(segmenter, photo, "sky, road"), request(segmenter, photo, "sky, road, car")
    assert first.ok and second.ok
    assert [row[0] for row in second.shares] == ["sky", "road", "car"]


def test_arrays_and_pil_images_are_accepted(segmenter, rng):
    array = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
    assert request(segmenter, array).ok
    assert request(segmenter, Image.fromarray(array)).ok


def test_background_threshold_adds_a_background_row(segmenter, photo):
    response = request(segmenter, photo, threshold=2.0)  # cosine scores never reach 2
    assert response.ok
    assert response.shares[-1][0] == "background" and response.shares[-1][2] == pytest.approx(100)


@pytest.mark.parametrize("threshold", [None, float("nan")])
def test_empty_threshold_means_no_background(segmenter, photo, threshold):
    assert all(row[0] != "background" for row in request(segmenter, photo, threshold=threshold).shares)


def test_class_names_are_escaped_in_the_legend(segmenter, photo):
    response = request(segmenter, photo, "<img src=x onerror=alert(1)>, sky")
    assert response.ok
    assert "<img" not in response.legend_html and "&lt;img src=x" in response.legend_html


def test_a_trailing_comma_is_not_a_class(segmenter, photo):
    assert [row[0] for row in request(segmenter, photo, "sky, road,").shares] == ["sky", "road"]


def test_no_image_is_a_message(segmenter):
    response = request(segmenter, None)
    assert not response.ok and "no image" in response.message
    assert response.overlay is None and response.outputs()[1:] == (None, None, "", [], None)


@pytest.mark.parametrize("classes", [None, "", "   ", " , "])
def test_empty_class_list_is_a_message(segmenter, photo, classes):
    response = request(segmenter, photo, classes)
    assert not response.ok and "class list is empty" in response.message


@pytest.mark.parametrize(
    ("classes", "words"),
    [("sky, , road", "blank"), ("sky, Sky", "appears twice"), ("sky|", "blank synonym")],
)
def test_malformed_class_list_is_a_message(segmenter, photo, classes, words):
    response = request(segmenter, photo, classes)
    assert not response.ok and words in response.message


def test_too_many_classes_is_a_message(segmenter, photo):
    classes = ", ".join(f"thing {i}" for i in range(web.MAX_CLASSES + 1))
    response = request(segmenter, photo, classes)
    assert not response.ok
    assert f"{web.MAX_CLASSES + 1} classes is more than this app takes ({web.MAX_CLASSES})" in response.message


def test_unreadable_upload_is_a_message_naming_it(segmenter, tmp_path):
    broken = tmp_path / "holiday.png"
    broken.write_bytes(b"this is not a PNG")
    response = request(segmenter, broken)
    assert not response.ok and "cannot read image 'holiday.png'" in response.message


def test_image_over_the_pixel_limit_is_refused_before_decoding(segmenter, tmp_path):
    huge = png_header_only(tmp_path / "huge.png", 8000, 6000)  # 48 MP, and no pixel data to decode
    response = request(segmenter, huge)
    assert not response.ok
    assert "huge.png has 8000x6000 = 48.0 megapixels; this app takes at most 40" in response.message


def test_decompression_bomb_is_refused_as_too_large(segmenter, tmp_path):
    bomb = png_header_only(tmp_path / "bomb.png", 60000, 60000)  # past Pillow's own bomb limit
    response = request(segmenter, bomb)
    assert not response.ok and "too many megapixels" in response.message


def test_in_memory_image_over_the_pixel_limit_is_refused(segmenter, monkeypatch):
    monkeypatch.setattr(web, "MAX_PIXELS", 1000)
    response = request(segmenter, np.zeros((40, 40, 3), dtype=np.uint8))
    assert not response.ok and "40x40 = 0.0 megapixels" in response.message


def test_size_that_the_model_cannot_take_is_a_message(segmenter, photo):
    response = request(segmenter, photo, size=100)
    assert not response.ok and "not a multiple of" in response.message


def test_unknown_preset_is_a_message(segmenter, photo):
    response = request(segmenter, photo, preset_name="fastest")
    assert not response.ok and "unknown preset 'fastest'" in response.message


def test_model_info_names_model_device_and_dtype(segmenter):
    info = web.model_info(segmenter)
    assert f"`{segmenter.model_id}`" in info and "`cpu`" in info and "`float32`" in info


def test_request_folders_keep_only_the_newest(tmp_path):
    folders = web.RequestFolders(tmp_path, keep=2)
    made = [folders.new() for _ in range(4)]
    assert [path.exists() for path in made] == [False, False, True, True]


def test_examples_ship_with_the_package():
    rows = web.example_rows()
    assert rows and all(Image.open(path).size and classes for path, classes in rows)


def test_serve_command_binds_loopback_by_default():
    parser = argparse.ArgumentParser()
    web.add_serve_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--model", "tiny-random"])
    assert (args.host, args.port, args.model, args.run) == ("127.0.0.1", 7860, "tiny-random", web.cmd_serve)
    assert parser.parse_args(["serve", "--host", "0.0.0.0", "--port", "8080"]).port == 8080


# -- the Gradio app (no server, no browser) ------------------------------------------------


@pytest.fixture(scope="module")
def gradio():
    try:
        import gradio
    except ImportError:
        pytest.fail("the web demo's tests need Gradio: pip install -e '.[web]'")
    return gradio


def segment_event(app):
    return next(fn for fn in app.fns.values() if fn.api_name == "segment")


def test_app_runs_one_request_at_a_time(gradio, segmenter):
    app = web.build_app(segmenter, examples=[])
    assert isinstance(app, gradio.Blocks)
    assert app._queue.default_concurrency_limit == 1
    # raw upload records reach segment_request, so unreadable files get our message
    assert segment_event(app).preprocess is False


def test_app_turns_an_unexpected_error_into_a_message(gradio, segmenter, monkeypatch, photo):
    def broken(*args, **kwargs):
        raise KeyError("boom")

    app = web.build_app(segmenter, examples=[])
    monkeypatch.setattr(web, "segment_request", broken)
    status, *rest = segment_event(app).fn({"path": str(photo)}, "sky", "default", 128, None)
    assert "internal error (KeyError: 'boom')" in status and rest == [None, None, "", [], None]
