"""The ablation benchmark (benchmarks/ablation.py): its statistics and a tiny end-to-end run."""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from maskdiffusion.metrics import ConfusionMatrix, scores
from maskdiffusion.toyworld.world import CLASS_NAMES

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import ablation  # benchmarks/ablation.py

C = len(CLASS_NAMES)


def test_summed_scores_are_the_metrics_of_one_confusion_matrix():
    rng = np.random.default_rng(0)
    per_scene = rng.integers(0, 50, (5, C, C + 1))
    matrix = ConfusionMatrix(C)
    matrix.counts[:], matrix.unassigned[:] = per_scene.sum(0)[:, :-1], per_scene.sum(0)[:, -1]
    assert ablation.summed_scores(per_scene.sum(0))["mIoU"] == pytest.approx(scores(matrix, CLASS_NAMES)["mIoU"])


def test_bootstrap_interval_brackets_the_estimate_and_is_empty_for_identical_scenes():
    rng = np.random.default_rng(1)
    per_scene = rng.integers(0, 40, (30, C, C + 1))
    estimate = ablation.summed_scores(per_scene.sum(0))["mIoU"]
    low, high = ablation.bootstrap_interval(per_scene, 200, seed=0)
    assert low < estimate < high
    same = np.repeat(per_scene[:1], 10, axis=0)
    low, high = ablation.bootstrap_interval(same, 50, seed=0)
    assert low == pytest.approx(high)  # nothing to resample: no uncertainty


def test_stream_zero_is_refused():
    with pytest.raises(SystemExit):
        ablation.main(["--streams", "0", "3"])


def test_a_tiny_run_writes_the_page_and_every_row(tmp_path):
    out = tmp_path / "ablation"
    ablation.main(["--streams", "3", "--scenes", "3", "--bootstrap", "5", "--long-scenes", "1", "--out", str(out)])
    report = json.loads(out.with_suffix(".json").read_text())
    page = out.with_suffix(".md").read_text()
    softmax = ablation.Preset(attention_mode="softmax")
    assert len(report["rows"]) == len(ablation.rows(softmax, softmax, softmax, SimpleNamespace(kind="unet")))
    for row in report["rows"]:
        assert 0.0 <= row["streams"]["3"]["mIoU"] <= 100.0 and row["long_vocabulary_miou"] is not None
        assert f"| {row['name']} |" in page
    assert sorted(report["calibration"]["mean_attention"]) == sorted(CLASS_NAMES)
    pamr = {(p["first"], p["second"]): p for p in report["paired"]}  # a UNet: only the PAMR pairs apply
    assert set(pamr) == {pair for pair in ablation.PAIRS if "PAMR" in pair[0]}
    first, second = ablation.PAIRS[2]
    by_name = {row["name"]: row["streams"]["3"]["mIoU"] for row in report["rows"]}
    assert pamr[first, second]["streams"]["3"]["difference"] == pytest.approx(by_name[first] - by_name[second])
    assert "Paired differences" in page


def test_a_paired_difference_is_zero_against_itself_and_positive_where_one_row_wins_every_scene():
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 5, (40, C, C + 1))
    first = noise + np.eye(C, C + 1, dtype=np.int64) * 40  # mostly on the diagonal: right
    second = first.copy()
    second[:, np.arange(C), np.arange(C)] -= 20  # the same scenes with half of each class's hits moved off it
    second[:, np.arange(C), (np.arange(C) + 1) % C] += 20
    assert ablation.paired_interval(first, first, 50, seed=0) == (0.0, 0.0, 0.0)
    difference, low, high = ablation.paired_interval(first, second, 200, seed=0)
    assert 0 < low <= difference <= high
    single_low, single_high = ablation.bootstrap_interval(first, 200, seed=0)
    assert high - low < single_high - single_low  # the same resamples cancel what both rows share
