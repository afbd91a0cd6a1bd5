"""Metrics: the confusion matrix and the scores derived from it, checked against sklearn."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import accuracy_score, confusion_matrix, jaccard_score

from maskdiffusion.metrics import (
    ConfusionMatrix,
    clusters_to_classes,
    hungarian_match,
    relabel,
    scores,
)

NAMES = ["road", "sky", "car", "tree"]


def random_pair(seed: int, shape=(17, 23), num_classes=4, ignore_fraction=0.2):
    """A prediction and a ground truth with some 255 (ignore) pixels in the ground truth."""
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, num_classes, shape).astype(np.uint8)
    gt[rng.random(shape) < ignore_fraction] = 255
    pred = rng.integers(0, num_classes, shape).astype(np.int64)
    return pred, gt


def test_counts_equal_sklearn_confusion_matrix_on_non_ignored_pixels():
    pred, gt = random_pair(0)
    matrix = ConfusionMatrix(4)
    matrix.update(pred, gt)
    keep = gt != 255
    expected = confusion_matrix(gt[keep], pred[keep], labels=range(4))
    np.testing.assert_array_equal(matrix.counts, expected)
    assert matrix.counts.dtype == np.int64


def test_ignored_ground_truth_pixels_are_not_counted_whatever_the_prediction():
    matrix = ConfusionMatrix(3)
    matrix.update(np.array([[0, -1, 7]]), np.array([[255, 255, 255]], dtype=np.uint8))
    assert matrix.num_pixels == 0


def test_out_of_range_predictions_are_unassigned_per_ground_truth_class():
    gt = np.array([[0, 0, 1, 1, 2]], dtype=np.uint8)
    pred = np.array([[-1, 0, 255, 3, 2]])
    matrix = ConfusionMatrix(3)
    matrix.update(pred, gt)
    np.testing.assert_array_equal(matrix.unassigned, [1, 2, 0])
    assert matrix.counts.sum() == 2


def test_batches_accumulate_to_the_same_counts_as_one_update():
    pairs = [random_pair(seed) for seed in range(3)]
    batched = ConfusionMatrix(4)
    for pred, gt in pairs:
        batched.update(pred, gt)
    whole = ConfusionMatrix(4)
    whole.update(np.concatenate([p for p, _ in pairs]), np.concatenate([g for _, g in pairs]))
    assert batched == whole


def test_merging_shards_equals_counting_everything_in_one_matrix():
    pairs = [random_pair(seed) for seed in range(4)]
    shards = [ConfusionMatrix(4), ConfusionMatrix(4)]
    whole = ConfusionMatrix(4)
    for i, (pred, gt) in enumerate(pairs):
        shards[i % 2].update(pred, gt)
        whole.update(pred, gt)
    assert shards[0].merge(shards[1]) == whole
    assert shards[0] + shards[1] == whole
    assert sum(shards) == whole


def test_array_round_trip_carries_unassigned_for_all_reduce():
    pred, gt = random_pair(1)
    pred[0, :5] = -1
    matrix = ConfusionMatrix(4)
    matrix.update(pred, gt)
    array = matrix.to_array()
    assert array.shape == (4, 5)
    assert ConfusionMatrix.from_array(array) == matrix


def test_dict_round_trip_through_json_restores_the_matrix():
    pred, gt = random_pair(2)
    pred[1, :3] = 255
    matrix = ConfusionMatrix(4)
    matrix.update(pred, gt)
    restored = ConfusionMatrix.from_dict(json.loads(json.dumps(matrix.to_dict())))
    assert restored == matrix


def test_from_dict_refuses_a_matrix_of_another_shape():
    data = ConfusionMatrix(4).to_dict()
    data["num_classes"] = 5
    with pytest.raises(ValueError, match="expected"):
        ConfusionMatrix.from_dict(data)


def test_merge_refuses_matrices_of_other_class_counts():
    with pytest.raises(ValueError, match="other class lists"):
        ConfusionMatrix(3).merge(ConfusionMatrix(4))


def test_update_refuses_prediction_and_label_of_different_shapes():
    with pytest.raises(ValueError, match="resize the prediction"):
        ConfusionMatrix(2).update(np.zeros((2, 3), int), np.zeros((3, 2), np.uint8))


def test_update_refuses_ground_truth_values_beyond_the_class_list():
    with pytest.raises(ValueError, match=r"values \[7\]"):
        ConfusionMatrix(3).update(np.zeros((1, 2), int), np.array([[0, 7]], dtype=np.uint8))


def test_update_refuses_float_predictions():
    with pytest.raises(ValueError, match="integer class indices"):
        ConfusionMatrix(3).update(np.zeros((1, 2)), np.zeros((1, 2), np.uint8))


def test_scores_agree_with_sklearn_jaccard_and_accuracy():
    pred, gt = random_pair(3)
    matrix = ConfusionMatrix(4)
    matrix.update(pred, gt)
    result = scores(matrix, NAMES)
    keep = gt != 255
    iou = jaccard_score(gt[keep], pred[keep], labels=range(4), average=None) * 100
    assert result["per_class_iou"] == pytest.approx(dict(zip(NAMES, iou, strict=True)))
    assert result["mIoU"] == pytest.approx(iou.mean())
    assert result["pixel_accuracy"] == pytest.approx(accuracy_score(gt[keep], pred[keep]) * 100)


def test_unassigned_pixels_are_misses_and_false_negatives_like_an_extra_label_in_sklearn():
    pred, gt = random_pair(4)
    pred[np.random.default_rng(5).random(pred.shape) < 0.3] = -1
    matrix = ConfusionMatrix(4)
    matrix.update(pred, gt)
    result = scores(matrix, NAMES)
    keep = gt != 255
    iou = jaccard_score(gt[keep], pred[keep], labels=range(4), average=None) * 100
    assert list(result["per_class_iou"].values()) == pytest.approx(iou)
    assert result["pixel_accuracy"] == pytest.approx(accuracy_score(gt[keep], pred[keep]) * 100)


def test_miou_averages_only_classes_present_in_ground_truth_or_prediction():
    gt = np.array([[0, 0, 1, 1]], dtype=np.uint8)
    pred = np.array([[0, 0, 1, 2]])  # class 2 predicted only, class 3 nowhere
    matrix = ConfusionMatrix(4)
    matrix.update(pred, gt)
    result = scores(matrix, NAMES)
    assert result["per_class_iou"] == {"road": 100.0, "sky": 50.0, "car": 0.0, "tree": None}
    assert result["mIoU"] == pytest.approx(50.0)
    assert result["num_classes_present"] == 3


def test_scores_of_an_empty_matrix_are_none_not_zero():
    result = scores(ConfusionMatrix(2), ["a", "b"])
    assert result["mIoU"] is None
    assert result["pixel_accuracy"] is None


def test_scores_refuse_a_cluster_matrix_that_was_not_matched():
    with pytest.raises(ValueError, match="hungarian_match"):
        scores(ConfusionMatrix(3, 5), ["a", "b", "c"])


def test_scores_refuse_a_class_name_count_that_differs_from_the_matrix():
    with pytest.raises(ValueError, match="3 class names"):
        scores(ConfusionMatrix(4), ["a", "b", "c"])


def test_hungarian_matching_recovers_a_permuted_prediction_exactly():
    rng = np.random.default_rng(6)
    gt = rng.integers(0, 4, (20, 20)).astype(np.uint8)
    permutation = np.array([2, 0, 3, 1])  # class c is predicted as cluster permutation[c]
    clusters = permutation[gt]
    matrix = ConfusionMatrix(4)
    matrix.update(clusters, gt)
    cluster_to_class = hungarian_match(matrix)
    np.testing.assert_array_equal(cluster_to_class[permutation], np.arange(4))
    assert scores(clusters_to_classes(matrix, cluster_to_class), NAMES)["mIoU"] == pytest.approx(100.0)


def test_hungarian_matching_maximises_matched_pixels_like_brute_force():
    counts = np.random.default_rng(7).integers(0, 50, (4, 4))
    mapping = hungarian_match(counts)
    best = max(sum(counts[c, k] for k, c in enumerate(p)) for p in itertools.permutations(range(4)))
    assert sum(counts[mapping[k], k] for k in range(4)) == best


@settings(max_examples=150, deadline=None)
@given(
    st.tuples(st.integers(1, 9), st.integers(1, 9)).flatmap(
        lambda shape: arrays(np.int64, shape, elements=st.one_of(st.integers(0, 3), st.integers(0, 10**12)))
    )
)
def test_hungarian_matching_is_one_to_one_and_as_good_as_scipy(counts):
    # small values make many ties, large ones check exact integer arithmetic
    mapping = hungarian_match(counts)
    classes, clusters = counts.shape
    matched = mapping[mapping >= 0]
    assert mapping.shape == (clusters,) and len(set(matched.tolist())) == len(matched) == min(classes, clusters)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    assert sum(int(counts[mapping[k], k]) for k in range(clusters) if mapping[k] >= 0) == int(counts[rows, cols].sum())


def test_hungarian_matching_of_171_classes_is_fast_enough_for_a_progress_bar():
    import time

    counts = np.random.default_rng(9).integers(0, 10**6, (171, 171))
    started = time.perf_counter()
    hungarian_match(counts)
    assert time.perf_counter() - started < 2.0


def test_more_clusters_than_classes_leaves_the_extra_clusters_unmatched():
    counts = np.array([[9, 0, 1], [0, 8, 2]])  # 2 classes, 3 clusters
    np.testing.assert_array_equal(hungarian_match(counts), [0, 1, -1])


def test_fewer_clusters_than_classes_leaves_classes_without_a_cluster():
    counts = np.array([[9, 0], [0, 1], [1, 8]])  # 3 classes, 2 clusters
    np.testing.assert_array_equal(hungarian_match(counts), [0, 2])


def test_cluster_matrix_remapped_equals_confusion_of_relabelled_predictions():
    rng = np.random.default_rng(8)
    gt = rng.integers(0, 3, (15, 15)).astype(np.uint8)
    gt[:2] = 255
    clusters = rng.integers(0, 5, (15, 15))
    clusters[3, :4] = -1
    cluster_matrix = ConfusionMatrix(3, 5)
    cluster_matrix.update(clusters, gt)
    mapping = hungarian_match(cluster_matrix)
    direct = ConfusionMatrix(3)
    direct.update(relabel(clusters, mapping), gt)
    assert clusters_to_classes(cluster_matrix, mapping) == direct


def test_relabel_marks_unmatched_and_out_of_range_clusters_minus_one():
    np.testing.assert_array_equal(relabel(np.array([[0, 1, 2, 9, -1]]), np.array([1, -1, 0])), [[1, -1, 0, -1, -1]])
