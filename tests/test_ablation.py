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
