import numpy as np
import pytest
import torch

from maskdiffusion import Preset, mask_head
from maskdiffusion.mask_head import (
    LOG_FLOOR,
    class_attention,
    confident_weights,
    em_posterior,
    product_of_experts,
    refine,
    segment_scores,
    supported_classes,
)


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


# -- the head options of a preset, each against its plain formula -----------------------------


def random_head_inputs(seed=0, classes=4, dim=6, size=(5, 7)):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(dim, *size, generator=gen)
    attention = torch.rand(classes, *size, generator=gen) ** 3
    return features, attention


def test_probability_attention_is_the_weighted_sum_of_token_probabilities_and_calibration_divides_it():
    gen = torch.Generator().manual_seed(4)
    logs = torch.randn(5, 4, 6, generator=gen).log_softmax(dim=0)  # softmax maps: probabilities over tokens
    weights = torch.tensor([[1.0, 0, 0, 0, 0], [0, 1.0, 1.0, 0, 0], [0, 0, 0, 0.5, 0.5]])
    linear = torch.einsum("ct,thw->chw", weights.double(), logs.double().exp())
    torch.testing.assert_close(class_attention(logs, weights, normalization="probabilities").double(), linear)
    scale = torch.tensor([0.5, 2.0, 4.0])
    calibrated = class_attention(logs, weights, normalization="calibrated", scale=scale)
    torch.testing.assert_close(calibrated.double(), linear / scale.double()[:, None, None])
    with pytest.raises(ValueError, match="normalization"):
        class_attention(logs, weights, normalization="softmax")


def test_support_keeps_classes_that_win_enough_cells_and_always_one():
    _, attention = random_head_inputs(1)
    wins = np.bincount(attention.flatten(1).argmax(0).numpy(), minlength=4)
    for cells in (1, 3, 8):
        expected = wins >= cells
        if not expected.any():
            expected[wins.argmax()] = True
        assert supported_classes(attention, cells).tolist() == expected.tolist()
    assert supported_classes(attention, 10**6).sum() == 1  # never an image without a class


def test_confident_weights_keep_a_class_only_where_it_wins_among_present_classes():
    _, attention = random_head_inputs(2)
    present = torch.tensor([True, False, True, True])
    kept = confident_weights(attention, present).numpy()
    a = attention.numpy()
    winner = np.where(present.numpy()[:, None, None], a, -np.inf).argmax(axis=0)
    for c in range(4):
        np.testing.assert_array_equal(kept[c], np.where(winner == c, a[c], 0.0))
    assert not kept[1].any()


def test_product_of_experts_adds_the_weighted_log_attention():
    features, attention = random_head_inputs(3)
    attention[0, 0, 0] = 0.0  # floored, not -inf
    cosine = mask_head(features[None], attention[None])[0]
    poe = product_of_experts(cosine, attention, 0.3)
    expected = cosine.double().numpy() + 0.3 * np.log(np.maximum(attention.double().numpy(), LOG_FLOOR))
    np.testing.assert_allclose(poe.double().numpy(), expected, rtol=1e-5, atol=1e-5)


def em_in_numpy(f, a, protos, present, steps, kappa, beta):
    """The vMF-mixture EM written out in float64 (independent of em_posterior)."""
    f = f.reshape(f.shape[0], -1)
    prior = beta * np.log(np.maximum(a.reshape(a.shape[0], -1), LOG_FLOOR))
    log_w = np.where(present, -np.log(present.sum()), -np.inf)
    mu = protos / np.linalg.norm(protos, axis=1, keepdims=True)

    def posterior():
        logits = log_w[:, None] + prior + kappa * mu @ f
        logits -= logits.max(axis=0, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=0, keepdims=True)

    for _ in range(steps):
        r = posterior()
        mu = r @ f.T
        mu /= np.maximum(np.linalg.norm(mu, axis=1, keepdims=True), 1e-12)  # an absent class's zero stays zero
        log_w = np.where(present, np.log(np.maximum(r.mean(axis=1), 1e-300)), -np.inf)
    return posterior().reshape(a.shape)


@pytest.mark.parametrize("steps", [0, 1, 5])
def test_em_posterior_equals_the_written_out_mixture_em(steps):
    features, attention = random_head_inputs(5)
    unit = torch.nn.functional.normalize(features, dim=0)
    protos = attention.flatten(1) @ unit.flatten(1).T
    present = torch.tensor([True, True, False, True])
    ours = em_posterior(unit, attention, protos, present, steps=steps, concentration=8.0, prior_weight=1.5)
    expected = em_in_numpy(unit.double().numpy(), attention.double().numpy(), protos.double().numpy(),
                           present.numpy(), steps, 8.0, 1.5)  # fmt: skip
    np.testing.assert_allclose(ours.double().numpy(), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ours.sum(dim=0).numpy(), 1.0, atol=1e-5)
    assert not ours[2].any()  # an absent class gets no probability


def test_segment_scores_composes_the_options_as_the_preset_says():
    features, attention = random_head_inputs(6)
    base = Preset(attention_mode="softmax", attention_normalization="probabilities")
    plain = segment_scores(features, attention, base)
    torch.testing.assert_close(plain.scores, mask_head(features[None], attention[None])[0])
    assert plain.present.all()
    dot = segment_scores(features, attention, base.replace(scoring="dot")).scores
    torch.testing.assert_close(dot, mask_head(features[None], attention[None], normalize_prototypes=False)[0])
    poe = segment_scores(features, attention, base.replace(scoring="poe", poe_weight=0.2)).scores
    torch.testing.assert_close(poe, product_of_experts(plain.scores, attention, 0.2))
    alone = segment_scores(features, attention, base.replace(scoring="attention"))
    torch.testing.assert_close(alone.scores, attention)
    supported = base.replace(class_presence="support", presence_min_cells=6, prototype_cells="confident")
    head = segment_scores(features, attention, supported)
    present = supported_classes(attention, 6)
    assert head.present.tolist() == present.tolist()
    weights = confident_weights(attention, present)
    torch.testing.assert_close(head.scores, mask_head(features[None], weights[None])[0])
    em = segment_scores(features, attention, base.replace(refinement="em", refine_steps=3, em_concentration=5.0))
    unit = torch.nn.functional.normalize(features, dim=0)
    expected = em_posterior(unit, attention, attention.flatten(1) @ unit.flatten(1).T, torch.ones(4, dtype=torch.bool),
                            steps=3, concentration=5.0, prior_weight=2.0)  # fmt: skip
    torch.testing.assert_close(em.scores, expected)
