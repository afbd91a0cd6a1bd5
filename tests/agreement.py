"""What is promised across batch shapes, threads and CPUs: equal up to floating-point noise.

oneDNN/MKL kernels pick other blockings for other batch sizes and instruction sets, so
the same image can get scores that differ in the last bits. Labels may then differ only
where the two best classes are that close.
"""

from __future__ import annotations

import numpy as np

SCORE_TOLERANCE = 1e-4  # absolute, on cosine scores in [-1, 1]


def top_two_margin(scores: np.ndarray) -> np.ndarray:
    """``(H, W)`` gap between the best and second-best class score of ``(C, H, W)`` scores."""
    if scores.shape[0] < 2:
        return np.full(scores.shape[1:], np.inf, dtype=scores.dtype)
    top = np.partition(scores, -2, axis=0)
    return top[-1] - top[-2]


def assert_labels_equal_except_near_ties(
    labels: np.ndarray, expected: np.ndarray, scores: np.ndarray, tolerance: float = SCORE_TOLERANCE
) -> None:
    """Labels equal wherever ``expected``'s scores have a top-two gap above ``2 * tolerance``."""
    differ = labels != expected
    clear = top_two_margin(scores) > 2 * tolerance
    bad = differ & clear
    assert not bad.any(), (
        f"{int(bad.sum())} of {labels.size} labels differ where the best class leads by more than "
        f"{2 * tolerance:g} ({int(differ.sum())} differ in all)"
    )
