"""Issue 12's opt-in capture options: self-attention propagation (S^k A) and timestep / noise ensembles.

Each is checked against its plain formula computed here, independently of the processors:
self-attention as softmax(QK^T * scale) of the layer's own inputs (forward hooks), noise as
the schedule's formula, averages as explicit log-mean-exp / mean of single passes.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from agreement import SCORE_TOLERANCE, assert_labels_equal_except_near_ties

from maskdiffusion.backbones.unet import UNetCapture, UNetLayout
from maskdiffusion.capture import ensemble_passes, propagate, regrid_self_attention
from maskdiffusion.presets import MAX_PASSES, MAX_SELF_ATTENTION_TOKENS, PRESETS, Preset
from maskdiffusion.prompts import build_prompts, parse_classes

CLASSES = ["road", "traffic light", "car", "sky"]
LONG = [f"word{i}" for i in range(40)]  # two prompts
# every field these tests rely on, spelled out: the shipped presets' values may change
BASE = Preset(
    size=128,
    timestep=0,
    seed=0,
    attention_mode="softmax",
    attention_factors=(16, 32),
    attention_factor=16,
    feature_blocks=(1, 2),
    feature_factor=8,
)


def latents_of(views=2, size=128, seed=0):
    return torch.randn(views, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(seed))


def text_of(segmenter, names):
    return segmenter.encode_prompts(build_prompts(segmenter.tokenizer, parse_classes(names)))


def picture(rng, height, width):
    return (rng.random((height, width, 3)) * 255).astype(np.uint8)


class SelfAttentionProbe:
    """Records the inputs of the self-attention layers at ``factors`` and recomputes their softmax itself."""

    def __init__(self, unet, vae, factors):
        layers = UNetLayout.of(unet, 8).select_self(factors)
        self.modules = {unet.get_submodule(name.removesuffix(".processor")): f for name, f in layers.items()}
        self.inputs = []

    def __enter__(self):
        self.handles = [m.register_forward_hook(self._grab, with_kwargs=True) for m in self.modules]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()

    def _grab(self, module, args, kwargs, output):
        self.inputs.append((module, args[0] if args else kwargs["hidden_states"]))

    @torch.no_grad()
    def matrices(self):
        """Per recorded call: factor and ``(B, N, N)`` head-mean softmax(QK^T * scale)."""
        out = []
        for attn, hidden in self.inputs:
            batch, tokens, _ = hidden.shape
            q = attn.to_q(hidden).view(batch, tokens, attn.heads, -1).transpose(1, 2)
            k = attn.to_k(hidden).view(batch, tokens, attn.heads, -1).transpose(1, 2)
            out.append((self.modules[attn], (q @ k.transpose(-1, -2) * attn.scale).softmax(dim=-1).mean(dim=1)))
        return out


# -- self-attention capture -------------------------------------------------------------


def test_self_attention_is_captured_on_the_chosen_layers_only_and_leaves_the_output_unchanged(segmenter):
    unet = segmenter.unet
    latents, text = latents_of(), torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        stock = unet(latents, 10, encoder_hidden_states=text).sample
    preset = BASE.replace(self_attention_factors=(16,))
    seen = {}

    def installed(module, args, output):
        seen.update(
            {n: type(p).__name__ + str(getattr(p, "self_attention", "")) for n, p in unet.attn_processors.items()}
        )

    handle = unet.mid_block.register_forward_hook(installed)
    try:
        store, captured = UNetCapture(unet, 8, preset).run(latents, 10, text, stop_early=False)
    finally:
        handle.remove()
    torch.testing.assert_close(captured, stock, rtol=1e-4, atol=1e-5)
    layout = UNetLayout.of(unet, 8)
    chosen = {n for n, f in layout.self_attention.items() if f == 16}
    assert len(chosen) == 3 and store.self_attention_layers == 3  # down_blocks.1 + two up_blocks.2 layers
    assert {n for n, kind in seen.items() if kind == "CaptureProcessorTrue"} == chosen
    others = {n for n in seen if n not in chosen and n not in layout.select(BASE.attention_factors)}
    assert others and all(seen[n] == "AttnProcessor2_0" for n in others)  # the fused kernel everywhere else
    assert all(type(p).__name__ == "AttnProcessor2_0" for p in unet.attn_processors.values())  # restored


def test_captured_self_attention_is_the_mean_over_heads_and_layers_of_the_softmax(segmenter):
    preset = BASE.replace(self_attention_factors=(16,))
    latents, text = latents_of(seed=2), torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(3))
    with SelfAttentionProbe(segmenter.unet, segmenter.vae, (16,)) as probe:
        store, _ = UNetCapture(segmenter.unet, segmenter.vae_factor, preset).run(latents, 0, text)
    expected = torch.stack([s for _, s in probe.matrices()]).mean(dim=0)
    captured = store.self_attention_mean()
    assert captured.shape == (2, 64, 64) and captured.dtype == torch.float32  # 8x8 cells at 1/16 of 128
    torch.testing.assert_close(captured, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(captured.sum(dim=-1), torch.ones(2, 64), rtol=1e-5, atol=1e-5)


def test_self_attention_stays_float32_probabilities_under_bfloat16_autocast(segmenter):
    preset = BASE.replace(self_attention_factors=(16, 32))  # the 1/32 layer is regridded: einsum under autocast
    latents, text = latents_of(seed=9), torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        store, _ = UNetCapture(segmenter.unet, segmenter.vae_factor, preset).run(latents, 0, text)
    captured = store.self_attention_mean()
    assert captured.dtype == torch.float32 and store.self_attention_layers == 6
    torch.testing.assert_close(captured.sum(dim=-1), torch.ones(2, 64), rtol=0, atol=1e-5)  # bf16 sums miss by ~1e-2


def test_a_coarser_layer_joins_the_finest_grid_reading_block_averages():
    # S_fine A = upsample(S_coarse (A averaged over each coarse cell)): rows stay distributions
    coarse = torch.rand(2, 16, 16).softmax(dim=-1)  # 4x4 grid
    fine = regrid_self_attention(coarse, (4, 4), (8, 8))
    assert fine.shape == (2, 64, 64)
    torch.testing.assert_close(fine.sum(dim=-1), torch.ones(2, 64))
    maps = torch.rand(2, 5, 8, 8)
    block_mean = F.avg_pool2d(maps, 2).flatten(2)  # (2, 5, 16)
    expected = F.interpolate(
        torch.einsum("bij,bmj->bmi", coarse, block_mean).view(2, 5, 4, 4), size=(8, 8), mode="bilinear"
    )
    got = torch.einsum("bij,bmj->bmi", fine, maps.flatten(2)).view(2, 5, 8, 8)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("steps", [1, 3])
def test_propagate_is_s_to_the_k_times_the_maps_in_log_space_without_overflow(steps):
    gen = torch.Generator().manual_seed(0)
    s = torch.rand(2, 16, 16, generator=gen).softmax(dim=-1)
    logs = torch.randn(2, 3, 4, 4, generator=gen)
    expected = torch.einsum("bij,bmj->bmi", torch.linalg.matrix_power(s, steps), logs.exp().flatten(2)).log()
    torch.testing.assert_close(propagate(logs, s, (4, 4), steps).flatten(2), expected, rtol=1e-5, atol=1e-5)
    loud = logs * 300.0  # exp scores in the hundreds: exp overflows float32 ...
    out = propagate(loud, s, (4, 4), steps)
    assert torch.isfinite(out).all()  # ... but not here; and the shift comes back exactly:
    shift = loud.amax(dim=(-2, -1), keepdim=True)
    torch.testing.assert_close(out - shift, propagate(loud - shift, s, (4, 4), steps), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("factor, steps", [(16, 2), (8, 1)])
def test_pipeline_propagation_equals_s_to_the_k_times_the_plain_attention(segmenter, factor, steps):
    # two views, two prompts (a long vocabulary in "batch" mode): S is the mean over each view's prompt passes
    latents, text = latents_of(seed=4), text_of(segmenter, LONG)
    plain, plain_features = segmenter.capture(latents, text, BASE)
    option = BASE.replace(self_attention_factors=(factor,), propagation_steps=steps)
    with SelfAttentionProbe(segmenter.unet, segmenter.vae, (factor,)) as probe:
        propagated, features = segmenter.capture(latents, text, option)
    side = 128 // factor
    s = torch.stack([m for _, m in probe.matrices()]).mean(dim=0).view(2, 2, side**2, side**2).mean(dim=1)
    maps = F.interpolate(plain.exp().flatten(0, 2)[:, None], size=(side, side), mode="bilinear")
    maps = maps.view(2, -1, side**2)
    for _ in range(steps):
        maps = torch.einsum("vij,vmj->vmi", s, maps)
    back = F.interpolate(maps.view(-1, 1, side, side), size=(8, 8), mode="bilinear", antialias=True)
    expected = back.view(plain.shape).log()
    assert propagated.shape == plain.shape == (2, 2, 77, 8, 8)
    torch.testing.assert_close(propagated, expected, rtol=1e-4, atol=1e-4)
    assert (propagated - plain).abs().max() > 1e-2  # the option really changes the maps
    torch.testing.assert_close(features, plain_features, rtol=1e-4, atol=1e-5)  # and nothing else


def test_propagation_over_two_layer_sizes_uses_their_mean_on_the_finest_grid(segmenter):
    latents, text = latents_of(seed=5), text_of(segmenter, CLASSES)
    plain, _ = segmenter.capture(latents, text, BASE)
    with SelfAttentionProbe(segmenter.unet, segmenter.vae, (8, 16)) as probe:
        both, _ = segmenter.capture(latents, text, BASE.replace(self_attention_factors=(16, 8)))
    fine = [regrid_self_attention(m, (128 // f,) * 2, (16, 16)) for f, m in probe.matrices()]
    assert len(fine) == 6  # three layers at 1/8, three at 1/16
    torch.testing.assert_close(both, propagate(plain, torch.stack(fine).mean(dim=0), (16, 16), 1), rtol=1e-4, atol=1e-4)


# -- ensembles --------------------------------------------------------------------------


def test_ensemble_passes_list_each_timestep_and_seed_once():
    preset = BASE.replace(timestep=300, seed=7, ensemble_timesteps=(200,), noise_samples=2)
    assert ensemble_passes(preset) == [(300, 7, 1), (300, 8, 1), (200, 7, 1), (200, 8, 1)]
    # at timestep 0 no noise is added: its seeds are one pass, weighted as many
    zero = BASE.replace(timestep=0, ensemble_timesteps=(100,), noise_samples=3)
    assert ensemble_passes(zero) == [(0, 0, 3), (100, 0, 1), (100, 1, 1), (100, 2, 1)]
    assert ensemble_passes(BASE) == [(0, 0, 1)]


def test_one_noised_pass_equals_the_schedules_formula(segmenter):
    latents, text = latents_of(seed=6), text_of(segmenter, CLASSES)
    preset = BASE.replace(timestep=300, seed=11)
    attention, features = segmenter.capture(latents, text, preset)
    noise = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(11))
    alpha = segmenter.backbone.schedule.alphas_cumprod[300]
    noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise  # the same noise for every view
    store, _ = UNetCapture(segmenter.unet, segmenter.vae_factor, preset).run(noisy, 300, text.hidden.expand(2, -1, -1))
    torch.testing.assert_close(attention, store.layer_mean().view(2, 1, 77, 8, 8), rtol=0, atol=0)
    expected_features = torch.cat([store.features[b] for b in preset.feature_blocks], dim=1)
    torch.testing.assert_close(features, expected_features, rtol=0, atol=0)


@pytest.mark.parametrize(
    "changes, singles",
    [
        ({"timestep": 300, "ensemble_timesteps": (200,)}, [(300, 0, 1), (200, 0, 1)]),
        ({"timestep": 300, "seed": 5, "noise_samples": 3}, [(300, 5, 1), (300, 6, 1), (300, 7, 1)]),
        ({"timestep": 0, "ensemble_timesteps": (200,), "noise_samples": 2}, [(0, 0, 2), (200, 0, 1), (200, 1, 1)]),
    ],
)
def test_an_ensemble_equals_the_explicit_average_of_its_single_passes(segmenter, changes, singles):
    latents, text = latents_of(size=64, seed=7), text_of(segmenter, LONG)  # two prompts: features = their mean too
    calls = []
    handle = segmenter.unet.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        attention, features = segmenter.capture(latents, text, BASE.replace(**changes))
        assert len(calls) == len(singles)  # timestep 0's seeds are one pass
    finally:
        handle.remove()
    runs = [(segmenter.capture(latents, text, BASE.replace(timestep=t, seed=s)), w) for t, s, w in singles]
    total = sum(w for _, w in runs)
    log_mean = torch.logsumexp(torch.stack([a + math.log(w) for (a, _), w in runs]), dim=0) - math.log(total)
    feature_mean = sum(f * w for (_, f), w in runs) / total
    torch.testing.assert_close(attention, log_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(features, feature_mean, rtol=1e-5, atol=1e-6)
    assert (attention - runs[0][0][0]).abs().max() > 1e-3  # the other passes really count


def test_the_named_presets_run_one_unet_pass_per_batch(segmenter, rng):
    calls = []
    handle = segmenter.unet.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        for name in segmenter.presets:
            segmenter(picture(rng, 64, 64), CLASSES, preset=segmenter.presets[name].replace(size=64))
    finally:
        handle.remove()
    assert len(calls) == len(segmenter.presets)


def test_propagation_with_an_ensemble_uses_the_mean_self_attention_of_all_passes(segmenter):
    latents, text = latents_of(seed=8), text_of(segmenter, CLASSES)
    ensemble = BASE.replace(timestep=300, ensemble_timesteps=(100,))
    plain, _ = segmenter.capture(latents, text, ensemble)
    with SelfAttentionProbe(segmenter.unet, segmenter.vae, (16,)) as probe:
        both, _ = segmenter.capture(latents, text, ensemble.replace(self_attention_factors=(16,)))
    matrices = [m for _, m in probe.matrices()]
    assert len(matrices) == 6  # three layers x two passes
    torch.testing.assert_close(
        both, propagate(plain, torch.stack(matrices).mean(dim=0), (8, 8), 1), rtol=1e-4, atol=1e-4
    )


# -- through segment_batch ---------------------------------------------------------------

OPTIONS = {
    "propagation": {"self_attention_factors": (16, 32), "propagation_steps": 2},
    "ensemble": {"timestep": 300, "ensemble_timesteps": (200,), "noise_samples": 2},
    "both": {"timestep": 100, "noise_samples": 2, "self_attention_factors": (16,)},
}


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_options_batched_equal_one_by_one(segmenter, rng, option):
    # the same tolerance as the plain pipeline (tests/agreement.py): other batch shapes may change last bits
    preset = BASE.replace(**OPTIONS[option])
    images = [picture(rng, 128, 128), picture(rng, 90, 300), picture(rng, 200, 150)]  # 1 + 3 + 2 views
    together = segmenter.segment_batch(images, CLASSES, preset=preset)
    for image, batched in zip(images, together, strict=True):
        alone = segmenter(image, CLASSES, preset=preset)
        np.testing.assert_allclose(alone.scores, batched.scores, rtol=0, atol=SCORE_TOLERANCE)
        np.testing.assert_allclose(alone.attention, batched.attention, rtol=1e-4, atol=1e-5)
        assert_labels_equal_except_near_ties(batched.labels, alone.labels, alone.scores)


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_options_are_deterministic_and_change_the_result(segmenter, rng, option):
    image = picture(rng, 128, 200)
    preset = BASE.replace(**OPTIONS[option])
    first, second = segmenter(image, CLASSES, preset=preset), segmenter(image, CLASSES, preset=preset)
    np.testing.assert_array_equal(first.labels, second.labels)
    np.testing.assert_array_equal(first.scores, second.scores)
    np.testing.assert_array_equal(first.attention, second.attention)
    plain = segmenter(image, CLASSES, preset=BASE.replace(timestep=preset.timestep))
    assert not np.allclose(plain.attention, first.attention, rtol=1e-3, atol=0)
    assert first.timings["seconds"] > 0


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_options_work_with_both_long_vocabulary_modes(segmenter, rng, option):
    from maskdiffusion.datasets import COCOSTUFF171_CLASSES

    image = picture(rng, 64, 96)
    preset = BASE.replace(size=64, **OPTIONS[option])
    shared = preset.replace(long_vocabulary="shared-queries")
    # one prompt: shared queries are the batch pass itself
    a, b = segmenter(image, CLASSES, preset=preset), segmenter(image, CLASSES, preset=shared)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_allclose(a.attention, b.attention, rtol=1e-5, atol=1e-6)
    names = list(COCOSTUFF171_CLASSES)
    for chosen in (preset, shared):
        result = segmenter(image, names, preset=chosen)
        assert result.attention.shape == (171, 4, 8) and np.isfinite(result.attention).all()
        assert result.labels.shape == (64, 96)


# -- settings ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"self_attention_factors": (4,)}, r"self_attention_factors \[4\].*16384 cells.*cap is 4096 cells.*>= 8"),
        ({"size": 1024, "self_attention_factors": (8,)}, r"self_attention_factors \[8\].*use factors >= 16"),
        ({"self_attention_factors": (16, 16)}, r"self_attention_factors must be distinct down-sampling factors"),
        ({"self_attention_factors": 16}, r"self_attention_factors must be a list of 1 to 16"),
        ({"self_attention_factors": (0,)}, r"self_attention_factors must be distinct .* from 1 to size"),
        ({"propagation_steps": 0}, r"propagation_steps must be a whole number from 1 to 10, got 0"),
        ({"propagation_steps": 11}, r"propagation_steps must be a whole number from 1 to 10"),
        ({"ensemble_timesteps": (1000,)}, r"ensemble_timesteps must be distinct timesteps from 0 to 999"),
        ({"timestep": 200, "ensemble_timesteps": (200,)}, r"ensemble_timesteps .* other than timestep \(200\)"),
        ({"ensemble_timesteps": (5, 5)}, r"ensemble_timesteps must be distinct"),
        ({"ensemble_timesteps": 300}, r"ensemble_timesteps must be a list"),
        ({"noise_samples": 0}, r"noise_samples must be a whole number from 1 to 16, got 0"),
        ({"noise_samples": 2.0}, r"noise_samples must be a whole number"),
        ({"ensemble_timesteps": (1, 2, 3), "noise_samples": 5}, r"ask for 20 passes per view; at most 16"),
        ({"seed": 2**64 - 1, "noise_samples": 2}, r"noise_samples must be at most 1 with seed"),
    ],
)
def test_bad_option_values_are_refused_naming_field_and_range(changes, message):
    with pytest.raises(ValueError, match=message):
        BASE.replace(**{"size": 512, **changes})
    with pytest.raises(ValueError, match=message):
        Preset.from_dict({**BASE.replace(size=512).to_dict(), **changes})


def test_option_limits_are_accepted_and_json_lists_normalised():
    side = math.isqrt(MAX_SELF_ATTENTION_TOKENS)
    assert BASE.replace(size=512, self_attention_factors=(512 // side,)).self_attention_factors == (8,)
    preset = Preset.from_dict(
        {"timestep": 50, "ensemble_timesteps": [np.int64(100), 999], "noise_samples": np.int32(5)}
    )
    assert preset.ensemble_timesteps == (100, 999) and preset.noise_samples == 5 and type(preset.noise_samples) is int
    assert len(ensemble_passes(preset)) == 3 * 5 <= MAX_PASSES
    for off in (Preset(), *PRESETS.values()):  # both options are opt-in
        assert off.self_attention_factors == () and off.ensemble_timesteps == () and off.noise_samples == 1


def test_the_model_must_have_the_layers_and_timesteps_asked_for(segmenter, rng, monkeypatch):
    image = picture(rng, 64, 64)
    with pytest.raises(ValueError, match=r"no self-attention layer at down-sampling factor\(s\) \[4\].*8, 16, 32, 64"):
        segmenter(image, CLASSES, preset=BASE.replace(size=64, self_attention_factors=(4,)))
    shorter = segmenter.backbone.schedule.alphas_cumprod[:500]  # a model with a shorter schedule
    monkeypatch.setattr(segmenter.backbone.schedule, "alphas_cumprod", shorter)
    with pytest.raises(ValueError, match=r"timestep\(s\) \[600\] past this model's noise schedule: use 0 to 499"):
        segmenter(image, CLASSES, preset=BASE.replace(timestep=100, ensemble_timesteps=(200, 600)))
