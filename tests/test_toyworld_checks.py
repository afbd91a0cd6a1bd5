"""The benchmark's toy-world checks (benchmarks/toyworld_checks.py) return sane numbers, on 4 scenes."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from maskdiffusion import MaskDiffusion
from maskdiffusion.datasets import COCOSTUFF171_CLASSES
from maskdiffusion.prompts import build_prompts, parse_classes
from maskdiffusion.toyworld.gate import held_out_scenes
from maskdiffusion.toyworld.world import CLASS_NAMES

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import toyworld_checks as checks  # benchmarks/toyworld_checks.py

SCENES = 4
DISTRACTORS = checks.distractor_names()[:40]  # with the 8 toy classes: 2 prompts


def test_distractors_share_no_word_with_a_toy_class():
    names = checks.distractor_names()
    assert len(names) == len(set(names)) and set(names) < set(COCOSTUFF171_CLASSES)
    for dropped in ("grass", "sand", "water", "brick wall", "wall", "water drops", "stone wall"):
        assert dropped not in names
    assert "sandwich" in names and "sea" in names
    parse_classes([*CLASS_NAMES, *names])  # no duplicate words


@pytest.mark.parametrize("placement", checks.PLACEMENTS)
def test_long_vocabulary_keeps_every_name_once(placement):
    vocabulary = checks.long_vocabulary(CLASS_NAMES, DISTRACTORS, placement)
    assert sorted(vocabulary) == sorted([*CLASS_NAMES, *DISTRACTORS])
    assert vocabulary[0] == CLASS_NAMES[0]
    if placement == "spread":
        positions = [vocabulary.index(name) for name in CLASS_NAMES]
        assert positions == sorted(positions) and positions[-1] > len(vocabulary) // 2
    with pytest.raises(ValueError, match="placement"):
        checks.long_vocabulary(CLASS_NAMES, DISTRACTORS, "last")


@pytest.fixture(scope="module")
def toy(one_torch_thread):
    return MaskDiffusion.from_pretrained("toy", device="cpu", cache_size=0)


def test_shared_queries_labels_come_from_the_multi_prompt_vocabulary(toy):
    vocabulary = checks.long_vocabulary(CLASS_NAMES, DISTRACTORS, "spread")
    assert build_prompts(toy.tokenizer, parse_classes(vocabulary), toy.preset.separator).num_prompts >= 2
    scenes = held_out_scenes(SCENES)
    shared = checks.segment(toy, scenes, vocabulary, preset=toy.preset.replace(long_vocabulary="shared-queries"))
    assert len(shared.labels) == SCENES and shared.seconds > 0
    for labels, scene in zip(shared.labels, scenes, strict=True):
        assert labels.shape == scene.labels.shape
        assert labels.min() >= 0 and labels.max() < len(vocabulary)
    scored = checks.toy_scores(shared, scenes)
    assert 0.0 <= scored["mIoU"] <= 100.0 and 0.0 <= scored["distractor_pixels"] <= 1.0
    assert checks.agreement(shared, shared) == 1.0


def test_distractor_pixels_are_misses_not_false_positives():
    scenes = held_out_scenes(1)
    truth = scenes[0].labels.astype(np.int64)
    vocabulary = ["sea", *CLASS_NAMES]  # vocabulary index = class index + 1
    perfect = checks.toy_scores(checks.Segmentation(vocabulary, [truth + 1], 1.0), scenes)
    assert perfect["mIoU"] == 100.0 and perfect["distractor_pixels"] == 0.0
    wrong = checks.toy_scores(checks.Segmentation(vocabulary, [np.zeros_like(truth)], 1.0), scenes)
    assert wrong["mIoU"] == 0.0 and wrong["pixel_accuracy"] == 0.0 and wrong["distractor_pixels"] == 1.0
    assert all(iou in (0.0, None) for iou in wrong["per_class_iou"].values())


def test_run_checks_returns_sane_values_and_a_report(one_torch_thread):
    result = checks.run_checks("cpu", torch.bfloat16, SCENES, distractors=DISTRACTORS, log=lambda _: None)
    precision = result["precision"]
    assert 0.0 <= precision["agreement"] <= 1.0 and precision["dtype"] == "bfloat16"
    for scored in (precision["fp32"], precision["half"]):
        assert 0.0 <= scored["mIoU"] <= 100.0 and scored["distractor_pixels"] == 0.0
    assert set(result["long_vocabulary"]) == set(checks.PLACEMENTS)
    for row in result["long_vocabulary"].values():
        assert row["prompts"] >= 2 and row["names"] == len(CLASS_NAMES) + len(DISTRACTORS)
        assert 0.0 <= row["agreement"] <= 1.0
        for mode in ("batch", "shared-queries"):
            assert 0.0 <= row[mode]["mIoU"] <= 100.0 and row[mode]["seconds"] > 0
    text = checks.report(result, "test CPU")
    assert "# Toy-world checks on test CPU" in text and "shared-queries" in text
    assert text.count("\n| ") >= 4 + 5 + len(CLASS_NAMES)


def test_bench_toyworld_flag_writes_its_results_file(tmp_path, one_torch_thread):
    import bench

    assert bench.main(["--toyworld", "--scenes", "2", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "toyworld-cpu.md").read_text()
    assert "2 held-out toy-world scenes" in text and "168 names" in text
    assert not (tmp_path / "cpu.md").exists()  # the SD-shaped benchmark did not run
