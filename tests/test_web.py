"""The web demo's request handler and app, without a browser (see test_web_browser.py for that)."""

import argparse
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from maskdiffusion import ImageLoadError, InputLimits, web
from maskdiffusion.commands import serve as serve_command

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
    response = request(segmenter, photo, threshold=1.0)  # the highest cosine score: no pixel reaches it
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


def test_upload_messages_name_the_file_never_the_server_path(segmenter, tmp_path):
    # Gradio keeps an upload at a path of its own; PIL's error text quotes that whole path
    folder = tmp_path / "gradio" / "4f1c0e9a"
    folder.mkdir(parents=True)
    broken = folder / "upload.png"
    broken.write_bytes(b"this is not a PNG")
    response = request(segmenter, broken, name="My holiday.png")
    assert not response.ok and "cannot read image 'My holiday.png'" in response.message
    assert str(tmp_path) not in response.message and "upload.png" not in response.message


def test_a_name_with_folders_is_shown_without_them(segmenter, photo):
    response = request(segmenter, photo, name="../../etc/street.png")
    assert response.ok and "Segmented street.png" in response.message and "etc" not in response.message


def test_an_odd_upload_name_still_names_the_downloads(segmenter, photo, tmp_path):
    response = request(segmenter, photo, name="bad\x00\nname" + "x" * 300 + ".png", out_dir=tmp_path / "out")
    assert response.ok and "badname" in response.message and "\x00" not in response.message
    assert all(len(path.name) < 120 and path.exists() for path in map(Path, response.downloads))


def test_image_over_the_pixel_limit_is_refused_before_decoding(segmenter, tmp_path):
    huge = png_header_only(tmp_path / "huge.png", 8000, 6000)  # 48 MP, and no pixel data to decode
    response = request(segmenter, huge)
    assert not response.ok and "'huge.png' has 8000x6000 = 48" in response.message
    assert "megapixels, over the limit of 40" in response.message


def test_thin_image_is_refused_by_its_aspect_ratio(segmenter, tmp_path):
    thin = png_header_only(tmp_path / "thin.png", 16, 4000)  # 64,000 pixels, but 250 views of the short side
    response = request(segmenter, thin)
    assert not response.ok
    assert "'thin.png' is 16x4000 pixels, an aspect ratio of 250.0:1, over the limit of 16:1" in response.message
    assert "crop it" in response.message


def test_the_segmenters_input_limits_apply(segmenter, monkeypatch, rng):
    """The app has no limits of its own: those of the segmenter (serve --max-megapixels) decide."""
    monkeypatch.setattr(segmenter, "limits", InputLimits(max_pixels=1000, max_aspect=2.0))
    response = request(segmenter, np.zeros((40, 40, 3), dtype=np.uint8))
    assert not response.ok and "40x40" in response.message and "over the limit of 0.001" in response.message
    response = request(segmenter, (rng.random((10, 30, 3)) * 255).astype(np.uint8))
    assert not response.ok and "aspect ratio of 3.0:1, over the limit of 2:1" in response.message

    class ReachedTheModel(Exception):
        pass

    def model(*args, **kwargs):
        raise ReachedTheModel

    monkeypatch.setattr(segmenter, "limits", InputLimits(max_aspect=18.0))  # raised by the server's operator
    monkeypatch.setattr(segmenter, "segment_batch", model)
    with pytest.raises(ReachedTheModel):  # 17:1 passes the app's checks
        request(segmenter, (rng.random((4, 68, 3)) * 255).astype(np.uint8))


def test_decompression_bomb_is_refused_as_too_large(segmenter, tmp_path):
    bomb = png_header_only(tmp_path / "bomb.png", 60000, 60000)  # past Pillow's own bomb limit
    response = request(segmenter, bomb)
    assert not response.ok and "'bomb.png' is refused" in response.message and "megapixels" in response.message


def test_size_that_the_model_cannot_take_is_a_message(segmenter, photo):
    response = request(segmenter, photo, size=100)
    assert not response.ok and "not a multiple of" in response.message


def test_unknown_preset_is_a_message(segmenter, photo):
    response = request(segmenter, photo, preset_name="fastest")
    assert not response.ok and "unknown preset 'fastest'" in response.message


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"size": 4096}, "size 4096 is not a whole number from 64 to 1024"),
        ({"size": 32}, "size 32 is not a whole number from 64 to 1024"),
        ({"size": 128.5}, "size 128.5 is not a whole number"),
        ({"size": float("inf")}, "size inf is not a whole number"),
        ({"size": float("nan")}, "size must be a number, got NaN"),
        ({"size": "512"}, "size must be a number, got '512'"),
        ({"size": True}, "size must be a number, got True"),
        (
            {"preset_name": ["default"]},
            "unknown preset ['default']; choose one of ['attention-only', 'default', 'reference']",
        ),
        ({"threshold": 2.0}, "background threshold 2.0 is not from 0 to 1, the range of the scores"),
        ({"threshold": float("-inf")}, "background threshold -inf is not from 0 to 1"),
        ({"threshold": "0.5"}, "background threshold must be a number, got '0.5'"),
        ({"preset_name": "reference", "threshold": float("inf")}, "background threshold inf is not a finite number"),
    ],
)
def test_settings_are_checked_as_strictly_as_the_page_does(segmenter, photo, settings, words):
    """The API takes any JSON; the slider's range, the preset list and the scores' range hold on the server."""
    response = request(segmenter, photo, **settings)
    assert not response.ok and words in response.message


def test_unbounded_scores_take_any_finite_threshold(segmenter, photo):
    response = request(segmenter, photo, preset_name="reference", threshold=1e6)  # dot products, not cosines
    assert response.ok and response.shares[-1][0] == "background"


@pytest.mark.parametrize(
    ("classes", "words"),
    [(["sky", "road"], "the class list must be text, got list"), (42, "the class list must be text, got int")],
)
def test_class_list_that_is_not_text_is_a_message(segmenter, photo, classes, words):
    response = request(segmenter, photo, classes)
    assert not response.ok and words in response.message


def test_overlong_class_text_is_refused_before_parsing(segmenter, photo):
    text = "sky, " + "x" * web.MAX_CLASS_TEXT
    response = request(segmenter, photo, text)
    assert not response.ok
    assert f"is {len(text)} characters long, more than this app takes ({web.MAX_CLASS_TEXT})" in response.message
    assert len(response.message) < 400  # the text is not echoed


def test_request_past_its_deadline_is_stopped_with_a_message(segmenter, photo):
    response = request(segmenter, photo, timeout=1e-9)
    assert not response.ok
    assert "took longer than this server's limit of 1e-09 s and was stopped" in response.message
    assert "--request-timeout" in response.message
    assert request(segmenter, photo, timeout=60).ok


def test_request_whose_client_has_gone_is_stopped(segmenter, photo):
    asked = []

    def gone():
        asked.append(True)
        return True

    response = request(segmenter, photo, client_gone=gone)
    assert not response.ok and "the client has gone" in response.message and asked


def test_random_weights_are_said_in_the_model_line_and_after_each_request(segmenter, photo):
    assert segmenter.card.random_weights
    assert "Random weights" in web.model_info(segmenter) and "meaningless" in web.model_info(segmenter)
    response = request(segmenter, photo)
    assert response.ok and "**Warning:**" in response.message
    assert "random weights" in response.message and "labels are meaningless" in response.message


def test_result_warnings_are_escaped_in_the_status(segmenter, photo, monkeypatch):
    monkeypatch.setattr(type(segmenter), "warnings", lambda self, vocabulary: ["<script>alert(1)</script> & more"])
    response = request(segmenter, photo)
    assert response.ok and "**Warning:** &lt;script&gt;alert(1)&lt;/script&gt; &amp; more" in response.message


def test_error_messages_are_escaped(segmenter, photo):
    response = request(segmenter, photo, preset_name="<b>x</b>")
    assert not response.ok and "&lt;b&gt;x&lt;/b&gt;" in response.message and "<b>" not in response.message


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


@pytest.fixture(scope="module")
def toy_segmenter():
    from maskdiffusion import MaskDiffusion

    return MaskDiffusion.from_pretrained("toy", device="cpu")


def test_toy_world_model_gets_toy_world_scenes_as_examples(toy_segmenter, segmenter, tmp_path):
    from maskdiffusion.toyworld.gate import held_out_scenes
    from maskdiffusion.toyworld.world import CLASS_NAMES

    assert web.is_toy_world_model(toy_segmenter) and not web.is_toy_world_model(segmenter)
    rows = web.toy_world_rows(tmp_path, count=3)
    assert [classes for _, classes in rows] == [", ".join(CLASS_NAMES)] * 3
    for (path, _), scene in zip(rows, held_out_scenes(3), strict=True):
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), scene.image)  # held out, not training
    assert "trained on these words only: grass, brick wall" in web.model_info(toy_segmenter)


def test_toy_world_model_app_offers_toy_world_examples(gradio, toy_segmenter, tmp_path):
    folders = web.RequestFolders(tmp_path)
    app = web.build_app(toy_segmenter, folders=folders)
    examples = next(block for block in app.blocks.values() if isinstance(block, gradio.Dataset))
    paths = [row[0]["path"] if isinstance(row[0], dict) else row[0] for row in examples.samples]
    assert len(paths) == web.TOY_EXAMPLES and all("toy-world-" in str(path) for path in paths)
    assert all(row[1] == ", ".join(toy_segmenter.card.vocabulary) for row in examples.samples)


def test_toy_world_example_is_segmented_without_warnings(toy_segmenter, tmp_path):
    path, classes = web.toy_world_rows(tmp_path, count=1)[0]
    response = web.segment_request(toy_segmenter, path, classes)
    assert response.ok and "Warning" not in response.message


def test_words_the_model_never_saw_are_warned_about(toy_segmenter, tmp_path):
    path, _ = web.toy_world_rows(tmp_path, count=1)[0]
    response = web.segment_request(toy_segmenter, path, "sky, grass, car")
    assert response.ok and "**Warning:**" in response.message and "'sky', 'car'" in response.message


def serve_parser():
    parser = argparse.ArgumentParser()
    serve_command.add_command(parser.add_subparsers(dest="command"))
    return parser


def test_serve_command_binds_loopback_by_default():
    parser = serve_parser()
    args = parser.parse_args(["serve", "--model", "tiny-random"])
    assert (args.host, args.port, args.model, args.run) == ("127.0.0.1", 7860, "tiny-random", serve_command.run)
    assert (args.request_timeout, args.max_megapixels) == (120.0, 40.0)
    assert parser.parse_args(["serve", "--host", "0.0.0.0", "--port", "8080"]).port == 8080
    assert parser.parse_args(["serve", "--request-timeout", "2.5"]).request_timeout == 2.5


@pytest.mark.parametrize(("host", "warned"), [("0.0.0.0", True), ("::", True), ("127.0.0.1", False), ("::1", False)])
def test_serve_warns_when_the_app_is_open_to_the_network(host, warned, monkeypatch, capsys):
    from maskdiffusion.pipeline import MaskDiffusion

    class Stop(Exception):
        pass

    def no_model(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(MaskDiffusion, "from_pretrained", no_model)
    with pytest.raises(Stop):  # the warning comes before the model loads
        serve_command.run(serve_parser().parse_args(["serve", "--host", host]))
    assert ("anyone who can reach this machine can use the app" in capsys.readouterr().out) is warned


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_serve_refuses_a_request_timeout_that_is_not_positive(value, capsys):
    with pytest.raises(SystemExit):
        serve_parser().parse_args(["serve", "--request-timeout", value])
    assert "expected a number of seconds above 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("host", "in_url", "loopback"),
    [
        ("127.0.0.1", "127.0.0.1", True),
        ("localhost", "localhost", True),
        ("::1", "[::1]", True),
        ("[::1]", "[::1]", True),
        ("0.0.0.0", "0.0.0.0", False),
        ("::", "[::]", False),
        ("192.168.1.5", "192.168.1.5", False),
        ("example.org", "example.org", False),
    ],
)
def test_hosts_in_urls_and_which_are_loopback(host, in_url, loopback):
    assert web.url_host(host) == in_url and web.is_loopback(host) is loopback


def test_upload_file_takes_only_files_in_gradios_upload_folder(gradio, tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "uploads"))
    inside = tmp_path / "uploads" / "abc" / "x.png"
    assert web.upload_file(None) == (None, None)
    assert web.upload_file({"path": str(inside), "orig_name": "holiday.png"}) == (str(inside), "holiday.png")
    assert web.upload_file({"path": str(inside)}) == (str(inside), None)
    for outside in [tmp_path / "secret.png", tmp_path / "uploads" / ".." / "secret.png", "/etc/passwd"]:
        with pytest.raises(ImageLoadError, match="must be a file uploaded to this app"):
            web.upload_file({"path": str(outside)})
    for payload in [str(inside), ["x"], 5, {"url": "http://example.org/x.png"}]:
        with pytest.raises(ImageLoadError, match="must be an uploaded file"):
            web.upload_file(payload)


def test_request_folders_in_the_temp_folder_are_removed_on_close():
    folders = web.RequestFolders()
    folders.new()
    assert folders.root.name.startswith("maskdiffusion-web-") and folders.root.exists()
    folders.close()
    assert not folders.root.exists()


def test_request_folders_in_a_given_root_remove_only_their_own(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    folders = web.RequestFolders(tmp_path)
    made = folders.new()
    folders.close()
    assert not made.exists() and (tmp_path / "keep.txt").exists()


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

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(photo.parent))
    app = web.build_app(segmenter, examples=[])
    monkeypatch.setattr(web, "segment_request", broken)
    status, *rest = segment_event(app).fn({"path": str(photo)}, "sky", "default", 128, None)
    assert "internal error (KeyError: 'boom')" in status and rest == [None, None, "", [], None]


def test_app_refuses_a_file_that_was_not_uploaded(gradio, segmenter, monkeypatch, photo, tmp_path):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "uploads"))
    app = web.build_app(segmenter, examples=[])
    status, overlay, *_ = segment_event(app).fn({"path": str(photo)}, "sky", "default", 128, None)
    assert "must be a file uploaded to this app" in status and overlay is None


def test_app_names_the_upload_by_its_original_name(gradio, segmenter, monkeypatch, photo):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(photo.parent))
    app = web.build_app(segmenter, examples=[])
    status, overlay, *_ = segment_event(app).fn(
        {"path": str(photo), "orig_name": "Beach day.png"}, "sky", "default", 128, None
    )
    assert "Segmented Beach day.png (160x96)" in status and overlay is not None
