"""k-means on the denoiser's features (UNet decoder or transformer blocks), for unsupervised MaskDiffusion.

Our own small torch k-means (k-means++ seeding, then Lloyd iterations until no point
changes cluster) instead of a library one, because an evaluation must be bit-for-bit
repeatable: the seed fixes every random choice, ties go to the lowest cluster index, and
an emptied cluster is re-seeded with the point farthest from its centroid (no random
re-draw). The same points in the same order on the same device give the same centroids,
whichever process or run computes them.

Cluster labels are made the way the mask head makes class labels: a score per cluster on
the feature grid, upsampled bilinearly to the output size, then argmax. The score
``2 f.c - |c|^2`` is the negative squared distance up to the constant ``|f|^2``, and it is
affine in ``f``, so upsampling scores equals scoring upsampled features.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

from .views import upsample_rows

LABEL_ROWS = 256  # output rows labelled at a time, to bound memory on large images
DISTANCE_CHUNK = 65536  # points per distance block
DEFAULT_POOL_SIZE = 100_000  # feature samples pooled over a data set for one dataset-level k-means


def stable_seed(*parts: object) -> int:
    """A seed from strings/ints that is the same in every process (unlike ``hash``)."""
    return zlib.crc32("\x1f".join(str(p) for p in parts).encode("utf-8"))


def _nearest(points: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index ``(N,)`` int64 and squared distance ``(N,)`` of each point's nearest centroid."""
    norms = (centroids * centroids).sum(dim=1)
    index, distance = [], []
    for start in range(0, points.shape[0], DISTANCE_CHUNK):
        block = points[start : start + DISTANCE_CHUNK]
        squared = (block * block).sum(dim=1, keepdim=True) - 2.0 * block @ centroids.T + norms
        best, which = squared.min(dim=1)  # min returns the first (lowest) index on ties
        index.append(which)
        distance.append(best.clamp_min(0.0))
    return torch.cat(index), torch.cat(distance)


def _seed_centroids(points: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each new centre drawn with probability proportional to D^2."""
    count = points.shape[0]
    first = int(torch.randint(count, (1,), generator=generator))
    centres = [first]
    _, distance = _nearest(points, points[first : first + 1])
    for _ in range(1, k):
        weights = distance.double().cpu()
        if float(weights.sum()) <= 0.0:  # every point sits on a centre: any unused point will do
            unused = torch.ones(count, dtype=torch.bool)
            unused[centres] = False
            weights = unused.double()
        pick = int(torch.multinomial(weights, 1, generator=generator))
        centres.append(pick)
        _, new_distance = _nearest(points, points[pick : pick + 1])
        distance = torch.minimum(distance, new_distance)
    return points[centres].clone()


def kmeans(points: torch.Tensor, k: int, *, seed: int = 0, iterations: int = 100) -> torch.Tensor:
    """Cluster ``points`` into at most ``k`` groups.

    Arguments:
        points: ``(N, D)`` float; computed in float32 on its device.
        k: wanted number of clusters; fewer (``N``) are returned when ``N < k``.
        seed: fixes the k-means++ seeding.
        iterations: most Lloyd rounds (stops earlier once no assignment changes).

    Returns:
        ``(min(k, N), D)`` float32 centroids, on the points' device.
    """
    if points.ndim != 2 or points.shape[0] == 0:
        raise ValueError(f"k-means needs (N, D) points with N >= 1, got shape {tuple(points.shape)}")
    if k < 1:
        raise ValueError(f"k-means needs k >= 1 clusters, got {k}")
    points = points.float()
    k = min(k, points.shape[0])
    generator = torch.Generator().manual_seed(seed)
    centroids = _seed_centroids(points, k, generator)
    assignment = None
    for _ in range(iterations):
        new_assignment, distance = _nearest(points, centroids)
        if assignment is not None and torch.equal(new_assignment, assignment):
            break
        assignment = new_assignment
        sums = torch.zeros_like(centroids).index_add_(0, assignment, points)
        sizes = torch.bincount(assignment, minlength=k).to(points.dtype)
        empty = sizes == 0
        centroids = sums / sizes.clamp_min(1.0)[:, None]
        if empty.any():  # re-seed emptied clusters with the worst-served points, deterministically
            far = torch.argsort(distance, descending=True, stable=True)[: int(empty.sum())]
            centroids[empty] = points[far]
    return centroids


def cluster_scores(features: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """``(D, h, w)`` features, ``(K, D)`` centroids -> ``(K, h, w)`` float32 scores ``2 f.c - |c|^2``."""
    features = features.float()
    centroids = centroids.to(features)
    scores = 2.0 * torch.einsum("kd,dhw->khw", centroids, features)
    return scores - (centroids * centroids).sum(dim=1)[:, None, None]


def labels_from_scores(scores: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """``(K, h, w)`` scores -> ``(H, W)`` int64 argmax after bilinear upsampling to ``size``."""
    labels = np.empty(size, dtype=np.int64)
    for top in range(0, size[0], LABEL_ROWS):
        rows = slice(top, min(top + LABEL_ROWS, size[0]))
        labels[rows] = upsample_rows(scores.cpu(), size, rows).argmax(dim=0).numpy()
    return labels


def sample_pixels(features: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """``count`` feature vectors of distinct grid cells (all of them if fewer): ``(n, D)``.

    The cells are drawn with ``seed`` and kept in grid order, so an image always gives
    the same samples.
    """
    flat = features.flatten(1).T  # (h*w, D)
    if count >= flat.shape[0]:
        return flat.clone()
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(flat.shape[0], generator=generator)[:count].sort().values
    return flat[chosen.to(flat.device)]


def per_image_clusters(
    features: torch.Tensor, k: int, size: tuple[int, int], *, seed: int = 0, device: torch.device | None = None
) -> np.ndarray:
    """k-means on one image's feature grid, then its ``(H, W)`` int64 cluster labels."""
    points = features.flatten(1).T.to(device or features.device)
    centroids = kmeans(points, k, seed=seed)
    return labels_from_scores(cluster_scores(features, centroids.cpu()), size)
