import numpy as np
import pytest
import torch

from maskdiffusion import mask_head
from maskdiffusion.mask_head import class_attention, refine


def planted_scene(seed=0, classes=4, dim=16, size=24):
    """Features: one direction per region + noise; attention: a small blob inside each region."""
    gen = torch.Generator().manual_seed(seed)
    truth = torch.zeros(size, size, dtype=torch.long)
    truth[: size // 2, size // 2 :] = 1
    truth[size // 2 :, : size // 2] = 2
    truth[size // 2 :, size // 2 :] = 3
    centres = torch.randn(classes, dim, generator=gen)
    features = centres[truth].permute(2, 0, 1) + 0.3 * torch.randn(dim, size, size, generator=gen)
    attention = torch.full((classes, size, size), 0.05)
    quarter = size // 4
    for c, (top, left) in enumerate([(0, 0), (0, size // 2), (size // 2, 0), (size // 2, size // 2)]):
        attention[c, top + 2 : top + 2 + quarter, left + 2 : left + 2 + quarter] = 1.0
    return features[None] * 5.0, attention[None], truth


def test_mask_head_recovers_a_planted_segmentation_exactly():
    features, attention, truth = planted_scene()
    scores = mask_head(features, attention)
    assert scores.shape == (1, 4, 24, 24)
    assert torch.equal(scores[0].argmax(dim=0), truth)


def test_scores_are_cosine_similarities_in_minus_one_one():
    features, attention, _ = planted_scene(seed=3)
    scores = mask_head(features, attention)
    assert scores.abs().max() <= 1.0 + 1e-5


def reference_formula(features, attention):
    """The reference head written out pixel by pixel in float64 (independent of mask_head)."""
    f = features[0].double().numpy()
    a = attention[0].double().numpy()
    dim, h, w = f.shape
    f = f / np.linalg.norm(f, axis=0, keepdims=True)
    out = np.zeros(a.shape)
    for c in range(a.shape[0]):
        proto = np.zeros(dim)
        for y in range(h):
            for x in range(w):
                proto += a[c, y, x] * f[:, y, x]
        proto /= a[c].sum()
        for y in range(h):
            for x in range(w):
                out[c, y, x] = float(f[:, y, x] @ proto)
    return out


def test_reference_mode_equals_the_reference_formula_on_random_tensors():
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(1, 7, 6, 5, generator=gen)
    attention = torch.rand(1, 3, 6, 5, generator=gen)
    attention = attention / attention.amax(dim=(2, 3), keepdim=True)
    ours = mask_head(features, attention, normalize_prototypes=False)[0].double().numpy()
    np.testing.assert_allclose(ours, reference_formula(features, attention), rtol=1e-5, atol=1e-6)


def test_cosine_mode_divides_by_the_prototype_norm():
    gen = torch.Generator().manual_seed(2)
    features = torch.randn(1, 7, 6, 5, generator=gen)
    attention = torch.rand(1, 3, 6, 5, generator=gen)
    dot = mask_head(features, attention, normalize_prototypes=False)[0].double().numpy()
    f = features[0].double().numpy()
    f = f / np.linalg.norm(f, axis=0, keepdims=True)
    a = attention[0].double().numpy()
    protos = np.einsum("chw,dhw->cd", a, f) / a.sum(axis=(1, 2))[:, None]
    cosine = mask_head(features, attention)[0].double().numpy()
    np.testing.assert_allclose(cosine, dot / np.linalg.norm(protos, axis=1)[:, None, None], rtol=1e-5, atol=1e-6)


def test_mask_head_rejects_mismatched_sizes():
    with pytest.raises(ValueError, match="spatial size"):
        mask_head(torch.randn(1, 4, 8, 8), torch.rand(1, 2, 4, 4))


def test_class_attention_averages_token_maps_and_max_normalises():
    gen = torch.Generator().manual_seed(0)
    logs = torch.randn(5, 4, 6, generator=gen)
    weights = torch.tensor([[1.0, 0, 0, 0, 0], [0, 0.5, 0.5, 0, 0], [0, 0, 0, 0.25, 0.75]])
    maps = class_attention(logs, weights)
    linear = torch.einsum("ct,thw->chw", weights.double(), logs.double().exp())
    expected = linear / linear.amax(dim=(1, 2), keepdim=True)
    torch.testing.assert_close(maps.double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.allclose(maps.amax(dim=(1, 2)), torch.ones(3))


def test_class_attention_is_exact_for_logits_that_would_overflow_exp():
    gen = torch.Generator().manual_seed(0)
    logs = torch.randn(3, 4, 4, generator=gen)
    weights = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    shifted = logs + torch.tensor([500.0, 500.0, -300.0])[:, None, None]  # exp(500) is inf in fp32
    maps = class_attention(shifted, weights)
    assert torch.isfinite(maps).all()
    torch.testing.assert_close(maps[1], class_attention(logs, weights)[1])
    # 500 + x in float32 keeps x to ~3e-5 (its ulp): that is the input's own precision.
    torch.testing.assert_close(maps[0], class_attention(logs, weights)[0], rtol=1e-4, atol=1e-4)


def test_refinement_keeps_a_clean_segmentation_and_fixes_weak_attention():
    features, attention, truth = planted_scene(seed=5)
    weak = attention.clone()
    weak[0, 0] += 0.6  # class 0 attention leaks everywhere
    scores = refine(features, mask_head(features, weak), 2, normalize_prototypes=True)
    assert (scores[0].argmax(dim=0) == truth).float().mean() == 1.0
