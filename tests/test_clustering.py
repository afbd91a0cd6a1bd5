"""k-means for unsupervised MaskDiffusion: separation, repeatability, edge cases, cluster labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from maskdiffusion.clustering import (
    cluster_scores,
    kmeans,
    labels_from_scores,
    per_image_clusters,
    sample_pixels,
    stable_seed,
)


def blobs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three tight, far-apart groups of 50 points in 8-D, and each point's group."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.eye(8)[:3] * 10
    groups = torch.arange(3).repeat_interleave(50)
    return centres[groups] + 0.1 * torch.randn(150, 8, generator=generator), groups


def test_kmeans_recovers_well_separated_groups():
    points, groups = blobs()
    centroids = kmeans(points, 3, seed=0)
    assignment = torch.cdist(points, centroids).argmin(dim=1)
    # one cluster per group, whatever the numbering
    pairs = {(int(g), int(a)) for g, a in zip(groups, assignment, strict=True)}
    assert len(pairs) == 3 and len({a for _, a in pairs}) == 3


def test_kmeans_is_bit_for_bit_repeatable_with_a_seed():
    points, _ = blobs()
    noisy = points + torch.randn(150, 8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(kmeans(noisy, 5, seed=3), kmeans(noisy, 5, seed=3))


def test_kmeans_with_fewer_points_than_clusters_returns_one_centroid_per_point():
    points = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    centroids = kmeans(points, 5)
    assert centroids.shape == (2, 2)
    assert sorted(centroids.tolist()) == points.tolist()


def test_kmeans_on_identical_points_does_not_fail():
    centroids = kmeans(torch.ones(10, 4), 3)
    assert centroids.shape == (3, 4) and torch.equal(centroids, torch.ones(3, 4))


def test_kmeans_refuses_empty_input_and_zero_clusters():
    with pytest.raises(ValueError, match="N >= 1"):
        kmeans(torch.zeros(0, 3), 2)
    with pytest.raises(ValueError, match="k >= 1"):
        kmeans(torch.zeros(4, 3), 0)


def test_cluster_scores_rank_centroids_like_squared_distance():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(6, 4, 5, generator=generator)
    centroids = torch.randn(3, 6, generator=generator)
    scores = cluster_scores(features, centroids)
    distance = torch.cdist(features.flatten(1).T, centroids) ** 2  # (h*w, K)
    assert torch.equal(scores.flatten(1).T.argmax(dim=1), distance.argmin(dim=1))


def test_labels_from_scores_equal_argmax_of_bilinear_upsampling():
    scores = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(2))
    expected = F.interpolate(scores[None], size=(30, 50), mode="bilinear", align_corners=False)[0].argmax(dim=0)
    labels = labels_from_scores(scores, (30, 50))
    assert labels.dtype == np.int64 and (labels == expected.numpy()).mean() > 0.999


def test_sample_pixels_is_fixed_by_its_seed_and_takes_distinct_cells():
    features = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(2, 4, 4)
    first, again = sample_pixels(features, 5, seed=7), sample_pixels(features, 5, seed=7)
    assert torch.equal(first, again) and first.shape == (5, 2)
    assert len({tuple(row.tolist()) for row in first}) == 5
    assert sample_pixels(features, 100, seed=7).shape == (16, 2)  # all cells when asked for more


def test_stable_seed_is_the_same_in_every_process():
    # crc32 of the joined parts: a constant, unlike hash() which is salted per process
    assert stable_seed(0, "img0") == stable_seed(0, "img0") == 1565297515
    assert stable_seed(0, "img0") != stable_seed(1, "img0")


def test_per_image_clusters_split_an_image_of_two_halves():
    features = torch.zeros(3, 4, 8)
    features[0, :, :4] = 1.0  # left half
    features[1, :, 4:] = 1.0  # right half
    labels = per_image_clusters(features, 2, (8, 16))
    assert labels.shape == (8, 16)
    assert len(np.unique(labels[:, :6])) == 1 and len(np.unique(labels[:, 10:])) == 1
    assert labels[0, 0] != labels[0, -1]
