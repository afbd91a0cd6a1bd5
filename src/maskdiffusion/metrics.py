"""Data-set-level segmentation metrics: confusion matrix, mIoU, pixel accuracy, Hungarian matching.

Every number comes from ONE confusion matrix summed over the whole data set (not a mean of
per-image scores, which favours easy images and is not what the benchmarks report). Counts
are int64: 500 Cityscapes images at 2048x1024 are 10^9 pixels.

Pixels without a class. A pipeline may leave pixels unlabelled (``-1`` or ``255`` where no
class passes a score threshold, or a cluster that Hungarian matching left without a class).
Dropping them would inflate the scores and forcing them into some column would invent a
false positive for that class. So a prediction outside ``0..K-1`` goes into a separate
``unassigned`` count per ground-truth class: it is a miss for pixel accuracy and a false
negative for its ground-truth class's IoU, and no class's false positive.

Hungarian matching is done here in numpy (exact integer arithmetic), not with scipy: the
demo and the quality gate need it, and they run with the core dependencies only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

IGNORE_INDEX = 255


class ConfusionMatrix:
    """Counts of (ground truth, prediction) pixel pairs, accumulated over a data set.

    Attributes:
        counts: ``(C, K)`` int64; rows = ground-truth class, columns = predicted class
            (``K == C`` for class predictions, ``K`` = number of clusters when unsupervised).
        unassigned: ``(C,)`` int64; pixels of each ground-truth class whose prediction was
            outside ``0..K-1`` (see the module docstring).
        ignore_index: ground-truth value that is not counted at all.
    """

    def __init__(self, num_classes: int, num_predictions: int | None = None, ignore_index: int = IGNORE_INDEX):
        num_predictions = num_classes if num_predictions is None else num_predictions
        if num_classes < 1 or num_predictions < 1:
            raise ValueError(
                f"a confusion matrix needs at least one class and one prediction value, got "
                f"num_classes={num_classes}, num_predictions={num_predictions}"
            )
        self.counts = np.zeros((num_classes, num_predictions), dtype=np.int64)
        self.unassigned = np.zeros(num_classes, dtype=np.int64)
        self.ignore_index = int(ignore_index)

    @property
    def num_classes(self) -> int:
        return self.counts.shape[0]

    @property
    def num_predictions(self) -> int:
        return self.counts.shape[1]

    @property
    def num_pixels(self) -> int:
        """Pixels counted so far (ignored ground truth excluded, unassigned included)."""
        return int(self.counts.sum() + self.unassigned.sum())

    def update(self, prediction: np.ndarray, ground_truth: np.ndarray) -> None:
        """Add one image (or a batch) to the counts.

        Arguments:
            prediction: integer array, any shape, e.g. ``(H, W) int64``; values outside
                ``0..K-1`` (``-1``, ``255``) are counted as ``unassigned``.
            ground_truth: integer array of the same shape, e.g. ``(H, W) uint8``; values
                ``0..C-1`` or ``ignore_index``.
        """
        prediction = np.asarray(prediction)
        ground_truth = np.asarray(ground_truth)
        if prediction.shape != ground_truth.shape:
            raise ValueError(
                f"prediction shape {prediction.shape} differs from ground-truth shape "
                f"{ground_truth.shape}: resize the prediction to the label's size first"
            )
        for what, array in (("prediction", prediction), ("ground truth", ground_truth)):
            if not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
                raise ValueError(f"{what} must hold integer class indices, got dtype {array.dtype}")
        gt = ground_truth.reshape(-1).astype(np.int64)
        pred = prediction.reshape(-1).astype(np.int64)
        keep = gt != self.ignore_index
        gt, pred = gt[keep], pred[keep]
        bad = (gt < 0) | (gt >= self.num_classes)
        if bad.any():
            values = np.unique(gt[bad])[:10].tolist()
            raise ValueError(
                f"ground truth holds values {values} outside 0..{self.num_classes - 1} and the "
                f"ignore value {self.ignore_index}: the label and the class list do not match"
            )
        inside = (pred >= 0) & (pred < self.num_predictions)
        flat = gt[inside] * self.num_predictions + pred[inside]
        self.counts += np.bincount(flat, minlength=self.counts.size).reshape(self.counts.shape)
        self.unassigned += np.bincount(gt[~inside], minlength=self.num_classes)

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """A new matrix holding both matrices' counts (shards of one data set)."""
        if not isinstance(other, ConfusionMatrix):
            raise TypeError(f"can only merge a ConfusionMatrix, got {type(other).__name__}")
        if other.counts.shape != self.counts.shape or other.ignore_index != self.ignore_index:
            raise ValueError(
                f"cannot merge a {other.counts.shape} matrix (ignore {other.ignore_index}) into a "
                f"{self.counts.shape} matrix (ignore {self.ignore_index}): the runs used other class lists"
            )
        merged = self.copy()
        merged.counts += other.counts
        merged.unassigned += other.unassigned
        return merged

    def __add__(self, other: ConfusionMatrix) -> ConfusionMatrix:
        return self.merge(other)

    def __radd__(self, other: Any) -> ConfusionMatrix:
        # Lets ``sum(shards)`` work: sum() starts from 0.
        if isinstance(other, int) and other == 0:
            return self.copy()
        return self.merge(other)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, ConfusionMatrix)
            and self.ignore_index == other.ignore_index
            and np.array_equal(self.counts, other.counts)
            and np.array_equal(self.unassigned, other.unassigned)
        )

    __hash__ = None  # mutable

    def __repr__(self) -> str:
        return (
            f"ConfusionMatrix(num_classes={self.num_classes}, num_predictions={self.num_predictions}, "
            f"num_pixels={self.num_pixels})"
        )

    def copy(self) -> ConfusionMatrix:
        clone = ConfusionMatrix(self.num_classes, self.num_predictions, self.ignore_index)
        clone.counts[:] = self.counts
        clone.unassigned[:] = self.unassigned
        return clone

    def to_array(self) -> np.ndarray:
        """``(C, K + 1)`` int64: ``counts`` with ``unassigned`` as the last column.

        One contiguous array, so that an all-reduce (sum) over workers is a single call.
        """
        return np.concatenate([self.counts, self.unassigned[:, None]], axis=1)

    @classmethod
    def from_array(cls, array: np.ndarray, ignore_index: int = IGNORE_INDEX) -> ConfusionMatrix:
        """Inverse of :meth:`to_array`; ``array`` is ``(C, K + 1)`` integer."""
        array = np.asarray(array)
        if array.ndim != 2 or array.shape[1] < 2 or not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"expected a (C, K + 1) integer array, got shape {array.shape}, dtype {array.dtype}")
        matrix = cls(array.shape[0], array.shape[1] - 1, ignore_index)
        matrix.counts[:] = array[:, :-1]
        matrix.unassigned[:] = array[:, -1]
        return matrix

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (ints and lists of ints) for checkpoints and metrics.json."""
        return {
            "num_classes": self.num_classes,
            "num_predictions": self.num_predictions,
            "ignore_index": self.ignore_index,
            "counts": self.counts.tolist(),
            "unassigned": self.unassigned.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConfusionMatrix:
        """Inverse of :meth:`to_dict`; raises ``ValueError`` on a damaged or foreign dict."""
        try:
            matrix = cls(int(data["num_classes"]), int(data["num_predictions"]), int(data["ignore_index"]))
            counts = np.asarray(data["counts"], dtype=np.int64)
            unassigned = np.asarray(data["unassigned"], dtype=np.int64)
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"not a saved confusion matrix: {error!r}") from error
        if counts.shape != matrix.counts.shape or unassigned.shape != matrix.unassigned.shape:
            raise ValueError(
                f"saved confusion matrix has counts {counts.shape} and unassigned {unassigned.shape}, "
                f"expected {matrix.counts.shape} and {matrix.unassigned.shape}"
            )
        if (counts < 0).any() or (unassigned < 0).any():
            raise ValueError("saved confusion matrix holds negative counts")
        matrix.counts[:] = counts
        matrix.unassigned[:] = unassigned
        return matrix


def _as_matrix(matrix: ConfusionMatrix | np.ndarray) -> ConfusionMatrix:
    if isinstance(matrix, ConfusionMatrix):
        return matrix
    counts = np.asarray(matrix)
    if counts.ndim != 2 or not np.issubdtype(counts.dtype, np.integer):
        raise ValueError(f"expected a (C, K) integer count matrix, got shape {counts.shape}, dtype {counts.dtype}")
    wrapped = ConfusionMatrix(*counts.shape)
    wrapped.counts[:] = counts
    return wrapped


def scores(matrix: ConfusionMatrix | np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """mIoU, pixel accuracy and per-class IoU of a class-space confusion matrix.

    A class takes part in the mean when it occurs in the ground truth or in the prediction;
    a class that occurs in neither has IoU ``None`` and is left out (it cannot be scored).
    A predicted-only class scores 0 and counts. Unassigned pixels count as misses.

    Arguments:
        matrix: :class:`ConfusionMatrix` or ``(C, C)`` integer counts (rows = ground truth).
            A cluster matrix (``K != C``) must go through :func:`hungarian_match` and
            :func:`clusters_to_classes` first.
        class_names: ``C`` unique names, used as the keys of ``per_class_iou``.

    Returns:
        ``{"mIoU": float | None, "pixel_accuracy": float | None, "per_class_iou":
        {name: float | None}, "num_classes_present": int, "num_pixels": int}``; percentages;
        ``None`` where nothing was counted.
    """
    matrix = _as_matrix(matrix)
    names = list(class_names)
    if matrix.num_predictions != matrix.num_classes:
        raise ValueError(
            f"scores need a square class matrix, got {matrix.counts.shape}: match clusters to "
            "classes first (hungarian_match + clusters_to_classes)"
        )
    if len(names) != matrix.num_classes:
        raise ValueError(f"got {len(names)} class names for a {matrix.num_classes}-class matrix")
    if len(set(names)) != len(names):
        raise ValueError(f"class names must be unique, got {names}")

    counts = matrix.counts.astype(np.float64)
    hits = np.diag(counts)
    in_truth = counts.sum(axis=1) + matrix.unassigned
    in_prediction = counts.sum(axis=0)
    union = in_truth + in_prediction - hits
    present = union > 0
    iou = np.divide(hits, union, out=np.zeros_like(hits), where=present) * 100.0
    total = matrix.num_pixels
    return {
        "mIoU": float(iou[present].mean()) if present.any() else None,
        "pixel_accuracy": float(hits.sum() / total * 100.0) if total else None,
        "per_class_iou": {name: float(iou[c]) if present[c] else None for c, name in enumerate(names)},
        "num_classes_present": int(present.sum()),
        "num_pixels": total,
    }


def _min_cost_assignment(cost: np.ndarray) -> np.ndarray:
    """Column of each row of an ``(n, m)`` int64 ``cost`` (``n <= m``) minimising the total.

    The shortest-augmenting-path Hungarian algorithm with row/column potentials, O(n^2 m):
    rows are added one at a time and each is routed to a free column along the path of
    least reduced cost. Integer costs keep it exact; ties go to the lowest column index.
    """
    rows, cols = cost.shape
    unreachable = np.iinfo(np.int64).max // 4
    row_potential = np.zeros(rows + 1, dtype=np.int64)
    col_potential = np.zeros(cols + 1, dtype=np.int64)
    owner = np.zeros(cols + 1, dtype=np.int64)  # 1-based row holding each column (index 0: the row being added)
    previous = np.zeros(cols + 1, dtype=np.int64)  # the column before each one on the augmenting path
    for row in range(1, rows + 1):
        owner[0] = row
        column = 0
        slack = np.full(cols + 1, unreachable, dtype=np.int64)
        visited = np.zeros(cols + 1, dtype=bool)
        while owner[column]:  # until the path reaches a free column (owner[0] is the new row)
            visited[column] = True
            current = owner[column]
            reduced = cost[current - 1] - row_potential[current] - col_potential[1:]
            free = ~visited[1:]
            better = free & (reduced < slack[1:])
            slack[1:][better] = reduced[better]
            previous[1:][better] = column
            candidates = np.where(free, slack[1:], unreachable)
            following = int(np.argmin(candidates)) + 1
            delta = candidates[following - 1]
            row_potential[owner[visited]] += delta
            col_potential[visited] -= delta
            slack[1:][free] -= delta
            column = following
        while column:  # flip the path: every column on it passes to the row before
            before = previous[column]
            owner[column] = owner[before]
            column = before
    assignment = np.full(rows, -1, dtype=np.int64)
    taken = np.nonzero(owner[1:])[0]
    assignment[owner[1:][taken] - 1] = taken
    return assignment


def hungarian_match(matrix: ConfusionMatrix | np.ndarray) -> np.ndarray:
    """One-to-one cluster -> class assignment that maximises the matched pixels.

    Arguments:
        matrix: ``(C, K)`` counts, rows = ground-truth class, columns = cluster.

    Returns:
        ``(K,)`` int64 ``cluster_to_class``: the class of each cluster, ``-1`` for clusters
        left over when ``K > C``. With ``K == C`` it is a permutation of ``0..C-1``; with
        ``K < C`` some classes receive no cluster.
    """
    counts = _as_matrix(matrix).counts.astype(np.int64)
    cluster_to_class = np.full(counts.shape[1], -1, dtype=np.int64)
    if counts.shape[0] <= counts.shape[1]:
        chosen = _min_cost_assignment(-counts)  # the cluster of each class
        cluster_to_class[chosen] = np.arange(counts.shape[0])
    else:
        cluster_to_class[:] = _min_cost_assignment(-counts.T)  # the class of each cluster
    return cluster_to_class


def clusters_to_classes(matrix: ConfusionMatrix, cluster_to_class: np.ndarray) -> ConfusionMatrix:
    """The class-space ``(C, C)`` matrix of a ``(C, K)`` cluster matrix under a matching.

    Column ``k`` is added to column ``cluster_to_class[k]``; clusters mapped to ``-1`` (or
    any value outside ``0..C-1``) become ``unassigned``. Equals the confusion matrix of the
    relabelled predictions (:func:`relabel`), without a second pass over the images.
    """
    mapping = np.asarray(cluster_to_class, dtype=np.int64)
    if mapping.shape != (matrix.num_predictions,):
        raise ValueError(
            f"cluster_to_class has shape {mapping.shape}, expected ({matrix.num_predictions},): one class per cluster"
        )
    result = ConfusionMatrix(matrix.num_classes, matrix.num_classes, matrix.ignore_index)
    result.unassigned[:] = matrix.unassigned
    for cluster, target in enumerate(mapping):
        if 0 <= target < matrix.num_classes:
            result.counts[:, target] += matrix.counts[:, cluster]
        else:
            result.unassigned += matrix.counts[:, cluster]
    return result


def relabel(prediction: np.ndarray, cluster_to_class: np.ndarray) -> np.ndarray:
    """Cluster map -> class map under a matching (for figures and per-image scoring).

    Arguments:
        prediction: ``(H, W)`` integer cluster ids.
        cluster_to_class: ``(K,)`` int, as returned by :func:`hungarian_match`.

    Returns:
        ``(H, W)`` int64 class ids, ``-1`` for unmatched or out-of-range clusters.
    """
    mapping = np.asarray(cluster_to_class, dtype=np.int64)
    prediction = np.asarray(prediction).astype(np.int64)
    inside = (prediction >= 0) & (prediction < mapping.shape[0])
    return np.where(inside, mapping[np.clip(prediction, 0, mapping.shape[0] - 1)], -1)
