import argparse
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


def test_version_and_top_level_help_read_as_plain_text(capsys):
    from maskdiffusion import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"maskdiffusion {__version__}"
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "``" not in text and ":func:" not in text  # no raw reStructuredText
    for command in ("segment", "demo", "evaluate", "serve"):
        assert command in text


def every_parser_action():
    from maskdiffusion.cli import build_parser

    parsers = [("maskdiffusion", build_parser())]
    for name, parser in parsers:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend((f"{name} {sub}", child) for sub, child in action.choices.items())
            elif not isinstance(action, argparse._HelpAction):
                yield name, action


def test_every_flag_has_help_and_states_its_default():
    for command, action in every_parser_action():
        flag = "/".join(action.option_strings) or action.dest
        assert action.help, f"{command} {flag} has no help text"
        silent_default = action.default in (None, False, argparse.SUPPRESS) or action.option_strings == []
        shown = "default" in action.help or "%(default)" in action.help
        assert silent_default or shown or action.choices == [action.default], (
            f"{command} {flag} does not say its default ({action.default!r})"
        )


def test_inputs_with_the_same_name_never_overwrite_each_other(tiny_model, tmp_path, rng, capsys):
    paths = []
    for folder, name in [("a", "x.png"), ("b", "x.png"), ("c", "x_2.png"), ("d", "X.png")]:
        (tmp_path / folder).mkdir()
        paths.append(tmp_path / folder / name)
        Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(paths[-1])
    out = tmp_path / "out"
    assert run(tiny_model, *paths, "--classes", "road, sky", "--out", out) == 0
    sources = sorted(json.loads(p.read_text())["source"] for p in out.glob("*.json"))
    assert sources == sorted(map(str, paths))  # four inputs, four output sets
    assert "wrote 4" in capsys.readouterr().out


def test_output_folder_problems_are_found_before_the_model_is_looked_up(images, tmp_path, capsys):
    not_a_folder = tmp_path / "file.txt"
    not_a_folder.write_text("x")
    args = ["segment", str(images[0]), "--classes", "a, b", "--model", "nobody/not-cached"]
    assert main([*args, "--out", str(not_a_folder)]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "file.txt" in err and "not in the local" not in err


def test_missing_images_are_named_before_the_model_is_looked_up(images, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    missing = tmp_path / "nope.png"
    code = main(["segment", str(missing), "--classes", "a, b", "--model", "nobody/not-cached", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and "nope.png" in err and "does not exist" in err
    assert "not in the local" not in err  # nothing to segment: the model was never looked up


def test_settings_are_checked_before_the_model_is_looked_up(images, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    base = ["segment", str(images[0]), "--classes", "a, b", "--model", "nobody/not-cached", "--out", str(tmp_path)]
    for flags, message in [
        (["--size", "100"], "size"),
        (["--background-threshold", "2"], "EM posteriors lie in [0, 1]"),
    ]:
        assert main([*base, *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and "not in the local" not in err


def test_a_failed_write_leaves_no_partial_set_and_the_others_are_written(tiny_model, images, tmp_path, capsys):
    from maskdiffusion import files

    original = files._write_temp

    def full_disk_for_img0_overlay(path, data):
        if path.name == "img0.overlay.png":
            raise OSError(28, "No space left on device")
        return original(path, data)

    out = tmp_path / "out"
    files._write_temp = full_disk_for_img0_overlay
    try:
        code = run(tiny_model, *images, "--classes", "road, sky", "--out", out)
    finally:
        files._write_temp = original
    err = capsys.readouterr().err
    assert code == 1 and "img0.png" in err and "No space left on device" in err
    written = sorted(p.name for p in out.iterdir() if p.name != ".maskdiffusion")  # the run's own state folder
    assert written == ["img1.json", "img1.labels.png", "img1.overlay.png"]


def test_json_names_the_preset_and_says_the_weights_are_random(tiny_model, images, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(tiny_model, images[0], "--classes", "road, sky", "--out", out, "--timestep", "10") == 0
    summary = json.loads((out / "img0.json").read_text())
    assert summary["preset"] == "default"
    assert any("random weights" in warning for warning in summary["warnings"])
    assert "random weights" in capsys.readouterr().err


def test_words_the_bundled_model_never_saw_are_named(images, tmp_path, capsys):
    args = ["segment", str(images[0]), "--model", "toy", "--device", "cpu", "--quiet"]
    assert main([*args, "--classes", "sky, building, grass", "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "never saw 'sky', 'building'" in err and "'grass'" not in err.split("never saw")[1]
    assert "never saw" in json.loads((tmp_path / "a" / "img0.json").read_text())["warnings"][0]
    assert main([*args, "--classes", "grass, brick wall|wall, star", "--out", str(tmp_path / "b")]) == 0
    assert "warning" not in capsys.readouterr().err
    assert json.loads((tmp_path / "b" / "img0.json").read_text())["warnings"] == []


@pytest.mark.parametrize("command", ["segment", "evaluate"])
def test_every_preset_flags_help_says_the_presets_own_defaults(command):
    """The help of a preset field's flag names what each named preset uses (not "default 0" where t = 250)."""
    from maskdiffusion.cli import build_parser
    from maskdiffusion.commands.options import PRESET_FLAGS
    from maskdiffusion.presets import PRESETS

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    helps = {action.dest: " ".join(action.help.split()) for action in sub._actions if action.help}
    for field in PRESET_FLAGS:
        text = helps[field]
        if field == "size":
            assert "default: the model's native size" in text
            continue
        values = {}
        for name, preset in PRESETS.items():
            value = getattr(preset, field)
            values[name] = (
                "off" if value in (None, ()) else ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
            )
        if len(set(values.values())) == 1:
            assert f"default: the preset's ({values['default']};" in text, (field, text)
        else:
            for name, value in values.items():
                assert f"{name}: {value}" in text, (field, name, text)
    assert "default: 250" in helps["timestep"] and "reference: 0" in helps["timestep"]
    assert "default: 10" in helps["refine_steps"]
