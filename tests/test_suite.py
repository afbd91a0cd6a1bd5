"""``maskdiffusion benchmark --suite ovss``: every data set found, one table, resumable, on fixture trees."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_datasets import make_cocostuff, make_voc, write_index
from test_datasets_ovss import make_ade20k, make_context

from maskdiffusion import MaskDiffusion, cli
from maskdiffusion.presets import Preset
from maskdiffusion.suite import OVSS, SCLIP_BACKGROUND_WORDS, column_preset

ROW = np.tile(np.asarray([0, 15, 15, 1, 20, 255]), (4, 1))  # valid in every layout used here


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Every suite data set but Cityscapes, two val images each."""
    root = tmp_path_factory.mktemp("ovss")
    for make in (make_voc, make_context, make_cocostuff, make_ade20k):
        make(root, ROW)
    write_index(root / "cocostuff/annotations/val2017/000000000285.png", ROW)
    return root


def benchmark(data: Path, model: Path, out: Path, *extra: str) -> int:
    args = ["benchmark", "--suite", "ovss", "--root", str(data), "--model", str(model), "--size", "64"]
    return cli.main([*args, "--device", "cpu", "--batch-size", "2", "--out", str(out), "--quiet", *extra])


@pytest.fixture(scope="module")
def suite_run(data, tiny_model, shared_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("suite") / "out"
    assert benchmark(data, tiny_model, out) == 0
    return out, json.loads((out / "results.json").read_text())


def test_the_table_has_the_fields_columns_a_row_per_preset_and_lists_what_is_missing(suite_run):
    out, results = suite_run
    titles = [c["title"] for c in results["columns"]]
    assert titles == ["VOC21", "Context60", "COCO-Object", "VOC20", "Context59", "COCO-Stuff", "Cityscapes", "ADE"]
    assert list(results["missing"]) == ["cityscapes19"] and not results["complete"]
    assert [row["preset"] for row in results["rows"]] == ["default", "reference", "attention-only"]
    present = [c.dataset for c in OVSS if c.dataset != "cityscapes19"]
    for row in results["rows"]:
        assert list(row["mIoU"]) == present
        for name, value in row["mIoU"].items():  # each cell is its evaluate run dir's number
            assert value == json.loads((out / row["preset"] / name / "metrics.json").read_text())["mIoU"]
        assert row["average"] == pytest.approx(np.mean(list(row["mIoU"].values())))
    table = (out / "results.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| preset |"))
    assert header.endswith("| Cityscapes | ADE | Avg of 7 |")
    default = next(line for line in table.splitlines() if line.startswith("| default |")).split(" | ")
    assert default[7] == "-" and default[-1].rstrip(" |") == f"{results['rows'][0]['average']:.1f}"


def test_background_words_are_used_where_the_data_set_has_a_background_class(suite_run):
    out, results = suite_run
    protocol = results["protocol"]
    for name in ("voc21", "context60", "coco-object"):
        assert protocol[name]["background"] == "background words"
        settings = json.loads((out / "default" / name / "metrics.json").read_text())["settings"]
        assert settings["preset"]["background_words"] == list(SCLIP_BACKGROUND_WORDS)
    # Words that are Context classes ("sky", "wall", ...) stay classes; the others are background words.
    assert "sky" in protocol["voc21"]["background_words"] and "sky" not in protocol["context60"]["background_words"]
    for name in ("voc20", "context59", "cocostuff171", "ade20k"):
        assert protocol[name]["background"] is None and protocol[name]["background_words"] == []
    assert protocol["voc21"]["num_images"] == 2 and protocol["voc21"]["view_size"] == 64


def test_a_second_run_resumes_every_cell_to_the_same_table(suite_run, data, tiny_model, shared_models, monkeypatch):
    out, results = suite_run
    calls = []
    segment_batch = MaskDiffusion.segment_batch
    monkeypatch.setattr(
        MaskDiffusion, "segment_batch", lambda self, *a, **k: calls.append(1) or segment_batch(self, *a, **k)
    )
    assert benchmark(data, tiny_model, out) == 0
    assert json.loads((out / "results.json").read_text()) == results
    assert calls == []  # every cell was complete: read back, nothing segmented again


def test_no_suite_data_set_under_root_is_a_usage_error_naming_them(tiny_model, tmp_path, capsys):
    assert benchmark(tmp_path, tiny_model, tmp_path / "out") == 2
    error = capsys.readouterr().err
    assert "none of the ovss data sets" in error and "ade20k" in error and "voc21" in error


def test_column_presets_keep_background_words_to_data_sets_with_a_background_class():
    voc21, voc20 = OVSS[0], OVSS[3]
    plain = Preset()
    assert column_preset(plain, voc21, has_background=True).background_words == SCLIP_BACKGROUND_WORDS
    mine = plain.replace(background_words=("sky", "road"))
    assert column_preset(mine, voc21, has_background=True).background_words == ("sky", "road")
    assert column_preset(mine, voc20, has_background=False).background_words == ()


def test_background_words_flag_takes_words_or_sclips_list(capsys):
    parser = cli.build_parser()
    args = ["evaluate", "--dataset", "voc21", "--root", "x", "--background-words"]
    assert parser.parse_args([*args, "sky, wall"]).background_words == ("sky", "wall")
    assert parser.parse_args([*args, "SCLIP"]).background_words == SCLIP_BACKGROUND_WORDS
    with pytest.raises(SystemExit):
        parser.parse_args([*args, "sky,,wall"])
    assert "expected comma-separated words or 'sclip'" in capsys.readouterr().err
