"""PAMR: the fast refinement equals a direct, slow implementation of the formula; bands equal the whole image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from maskdiffusion import MaskDiffusion, Preset
from maskdiffusion.pamr import EPS, LAMBDA, refine, refined_rows
from maskdiffusion.pipeline import LABEL_ROWS


def slow_pamr(scores: np.ndarray, image: np.ndarray, steps: int, dilations: list[int]) -> np.ndarray:
    """The definition, pixel by pixel: a softmax over each pixel's 3x3 rings at the dilations of
    -mean_c |I_c(i) - I_c(j)| / (LAMBDA * std_c(neighbours of i) + EPS), borders repeated."""
    _, height, width = image.shape

    def at(array, y, x):
        return array[..., min(max(y, 0), height - 1), min(max(x, 0), width - 1)]

    ring = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    neighbours = [(d * dy, d * dx) for d in dilations for dy, dx in ring]
    weights = np.zeros((height, width, len(neighbours)))
    for y in range(height):
        for x in range(width):
            colours = np.array([at(image, y + dy, x + dx) for dy, dx in neighbours])  # (K, 3)
            spread = colours.std(axis=0)
            kernel = -(np.abs(colours - image[:, y, x]) / (LAMBDA * spread + EPS)).mean(axis=1)
            weights[y, x] = np.exp(kernel - kernel.max()) / np.exp(kernel - kernel.max()).sum()
    refined = scores.astype(np.float64)
    for _ in range(steps):
        new = np.zeros_like(refined)
        for y in range(height):
            for x in range(width):
                new[:, y, x] = sum(
                    w * at(refined, y + dy, x + dx) for w, (dy, dx) in zip(weights[y, x], neighbours, strict=True)
                )
        refined = new
    return refined


def test_refinement_equals_the_slow_direct_formula():
    rng = np.random.default_rng(0)
    image = rng.random((3, 9, 11)).astype(np.float32)
    image[:, :, 6:] += 0.8  # an edge
    scores = rng.random((3, 9, 11)).astype(np.float32)
    fast = refine(torch.from_numpy(scores), torch.from_numpy(image), steps=3, dilations=(1, 2))
    np.testing.assert_allclose(fast.numpy(), slow_pamr(scores, image, 3, [1, 2]), rtol=1e-5, atol=1e-6)


def test_refinement_keeps_scores_on_their_side_of_an_edge():
    image = torch.zeros(3, 20, 20)
    image[:, :, 10:] = 1.0  # black | white
    scores = torch.zeros(2, 20, 20)
    scores[0, :, :10], scores[1, :, 10:] = 1.0, 1.0
    noisy = scores + 0.4 * torch.rand(2, 20, 20, generator=torch.Generator().manual_seed(0))
    refined = refine(
        noisy, image + 0.01 * torch.rand(3, 20, 20, generator=torch.Generator().manual_seed(1)), 10, (1, 2)
    )
    assert (refined.argmax(dim=0) == scores.argmax(dim=0)).all()
    assert refined[:, :, :8].std(dim=(1, 2)).max() < 0.8 * noisy[:, :, :8].std(dim=(1, 2)).max()  # smoothed inside


def test_a_band_with_its_halo_equals_the_whole_image_refined():
    rng = np.random.default_rng(1)
    picture = Image.fromarray((rng.random((70, 40, 3)) * 255).astype(np.uint8))
    grid = torch.from_numpy(rng.random((4, 9, 5)).astype(np.float32))
    steps, dilations = 3, (1, 3)
    whole = refined_rows(grid, picture, slice(0, 70), steps, dilations)
    for rows in (slice(0, 16), slice(16, 40), slice(40, 70), slice(30, 31)):
        band = refined_rows(grid, picture, rows, steps, dilations)
        torch.testing.assert_close(band, whole[:, rows], rtol=1e-5, atol=1e-6)


def test_the_pipeline_labels_the_refined_scores_and_bands_large_images(tiny_model, monkeypatch):
    from maskdiffusion import pamr, pipeline

    seg = MaskDiffusion.from_pretrained(str(tiny_model), device="cpu", preset=Preset(size=64))
    rng = np.random.default_rng(2)
    image = (rng.random((LABEL_ROWS + 40, 64, 3)) * 255).astype(np.uint8)  # two bands of rows
    plain = seg(image, ["road", "sky"])
    preset = seg.preset.replace(refinement_on_image="pamr", image_refine_steps=2, image_refine_dilations=(1, 2))
    calls = []
    monkeypatch.setattr(pipeline, "refined_rows", lambda *a: calls.append(a[2]) or pamr.refined_rows(*a))
    refined = seg(image, ["road", "sky"], preset=preset)
    assert calls == [slice(0, LABEL_ROWS), slice(LABEL_ROWS, LABEL_ROWS + 40)]
    picture = Image.fromarray(image)
    whole = refine(
        torch.from_numpy(plain.scores), pamr.image_tensor(picture, slice(0, picture.height)), 2, (1, 2)
    ).argmax(dim=0)
    np.testing.assert_array_equal(refined.labels, whole.numpy())
    assert refined.summary()["settings"]["refinement_on_image"] == "pamr"


def test_labels_refine_only_the_present_classes_and_equal_refining_all_of_them():
    """Absent classes cannot be labels and PAMR works on each class's map alone: leaving them out is exact."""
    from maskdiffusion import pamr
    from maskdiffusion.pipeline import _labels
    from maskdiffusion.views import upsample_rows

    rng = np.random.default_rng(3)
    picture = Image.fromarray((rng.random((40, 48, 3)) * 255).astype(np.uint8))
    scores = torch.from_numpy(rng.random((5, 10, 12))).float()
    present = torch.tensor([True, False, True, True, False])
    preset = Preset(refinement_on_image="pamr", image_refine_steps=3, image_refine_dilations=(1, 2))
    whole = slice(0, picture.height)
    upsampled = upsample_rows(scores, (picture.height, picture.width), whole)
    every_class = refine(upsampled, pamr.image_tensor(picture, whole), 3, (1, 2))
    expected = every_class.masked_fill(~present[:, None, None], -torch.inf).argmax(dim=0)
    labels = _labels(scores, picture, preset, present)
    np.testing.assert_array_equal(labels, expected.numpy())
    assert set(np.unique(labels)) <= {0, 2, 3}
    plain = _labels(scores, picture, Preset(), present)
    np.testing.assert_array_equal(plain, upsampled.masked_fill(~present[:, None, None], -torch.inf).argmax(0))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"refinement_on_image": "crf"}, r"refinement_on_image must be 'none' or 'pamr'"),
        ({"image_refine_steps": 0}, r"image_refine_steps must be a whole number from 1 to 50"),
        ({"image_refine_dilations": (1, 1)}, r"image_refine_dilations must be distinct"),
        (
            {"image_refine_dilations": (65,)},
            r"image_refine_dilations must be distinct distances in pixels from 1 to 64",
        ),
    ],
)
def test_bad_refinement_settings_are_refused_by_name(changes, message):
    with pytest.raises(ValueError, match=message):
        Preset(**changes)
