import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from maskdiffusion.cli import main


@pytest.fixture
def images(tmp_path, rng):
    folder = tmp_path / "in"
    folder.mkdir()
    paths = []
    for i, (h, w) in enumerate([(64, 96), (80, 64)]):
        path = folder / f"img{i}.png"
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def run(tiny_model, *args):
    return main(["segment", *map(str, args), "--model", str(tiny_model), "--size", "64", "--device", "cpu", "--quiet"])


def test_segment_writes_labels_overlay_and_json_per_image(tiny_model, images, tmp_path):
    out = tmp_path / "out"
    assert run(tiny_model, *images, "--classes", "road, traffic light, sky", "--out", out) == 0
    for path in images:
        labels = Image.open(out / f"{path.stem}.labels.png")
        assert labels.mode == "P" and labels.size == Image.open(path).size
        assert np.asarray(labels).max() < 3
        assert (out / f"{path.stem}.overlay.png").exists()
        summary = json.loads((out / f"{path.stem}.json").read_text())
        assert [c["name"] for c in summary["classes"]] == ["road", "traffic light", "sky"]
        assert summary["model"] == str(tiny_model)
        assert summary["settings"]["size"] == 64 and "seconds" in summary["timings"]
        assert len(summary["palette"]) == 3


def test_a_corrupt_image_is_reported_and_the_others_still_written(tiny_model, images, tmp_path, capsys):
    broken = tmp_path / "in" / "broken.jpg"
    broken.write_bytes(b"not a jpeg at all")
    out = tmp_path / "out"
    code = run(tiny_model, images[0], broken, images[1], "--classes", "road, sky", "--out", out)
    assert code == 1
    assert "broken.jpg" in capsys.readouterr().err
    assert (out / "img0.labels.png").exists() and (out / "img1.labels.png").exists()
    assert not (out / "broken.labels.png").exists()


def test_classes_file_with_synonyms(tiny_model, images, tmp_path):
    classes = tmp_path / "classes.txt"
    classes.write_text("road|street\nsky\nEiffel Tower\n", encoding="utf-8")
    out = tmp_path / "out"
    assert run(tiny_model, images[0], "--classes", f"@{classes}", "--out", out) == 0
    summary = json.loads((out / "img0.json").read_text())
    assert summary["classes"][0]["words"] == ["road", "street"]
    assert summary["classes"][2]["name"] == "Eiffel Tower"


@pytest.mark.parametrize("classes", ["", " , ", "road, road", "road, , sky"])
def test_bad_class_lists_are_usage_errors(tiny_model, images, tmp_path, classes, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(tiny_model, images[0], "--classes", classes, "--out", tmp_path / "out")
    assert exit_info.value.code == 2
    assert "class" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_non_ascii_class_names_work(tiny_model, images, tmp_path):
    out = tmp_path / "out"
    assert run(tiny_model, images[0], "--classes", "café, 東京タワー, Straße", "--out", out) == 0
    summary = json.loads((out / "img0.json").read_text(encoding="utf-8"))
    assert [c["name"] for c in summary["classes"]] == ["café", "東京タワー", "Straße"]


def test_size_that_is_not_a_block_multiple_is_a_usage_error(tiny_model, images, tmp_path, capsys):
    code = main(["segment", str(images[0]), "--classes", "a, b", "--model", str(tiny_model), "--size", "100"])
    assert code == 2
    assert "multiple of 64" in capsys.readouterr().err


def test_missing_model_offline_explains_how_to_get_it(images, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    code = main(["segment", str(images[0]), "--classes", "a, b", "--model", "nobody/no-such-model"])
    err = capsys.readouterr().err
    assert code == 1
    assert "nobody/no-such-model" in err and "hf download" in err and "--model" in err
    code = main(["segment", str(images[0]), "--classes", "a, b", "--model", str(tmp_path / "nowhere")])
    assert code == 1 and "does not exist" in capsys.readouterr().err


def test_model_folder_without_components_is_explained(images, tmp_path, capsys):
    (tmp_path / "half" / "unet").mkdir(parents=True)
    assert main(["segment", str(images[0]), "--classes", "a, b", "--model", str(tmp_path / "half")]) == 1
    err = capsys.readouterr().err
    assert "vae/" in err and "text_encoder/" in err


def test_python_dash_m_runs_the_cli_end_to_end(tiny_model, images, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "maskdiffusion", "segment", str(images[1]), "--classes", "road, sky",
               "--model", str(tiny_model), "--size", "64", "--out", str(out)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "segmenting" in done.stderr  # the progress bar
    assert (out / "img1.labels.png").exists()


def test_tiny_random_alias_is_built_in_the_cache_on_first_use(images, tmp_path, monkeypatch):
    monkeypatch.setenv("MASKDIFFUSION_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    assert run("tiny-random", images[0], "--classes", "road, sky", "--out", out) == 0
    assert (out / "img0.labels.png").exists()
    assert (tmp_path / "cache" / "tiny-random-sd" / "unet").is_dir()
