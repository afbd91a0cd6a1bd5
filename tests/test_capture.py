import copy

import pytest
import torch

from maskdiffusion.backbones.unet import UNetCapture, UNetLayout
from maskdiffusion.presets import PRESETS


@pytest.fixture(scope="module")
def unet(segmenter):
    return segmenter.unet


def inputs(seed=0, batch=2, size=128):
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, size // 8, size // 8, generator=gen)
    text = torch.randn(batch, 77, 32, generator=gen)
    return latents, text


def test_layers_are_chosen_by_down_sampling_factor(unet):
    layout = UNetLayout.of(unet, 8)
    assert layout.block == 64
    assert sorted(set(layout.cross_attention.values())) == [8, 16, 32, 64]
    chosen = layout.select((32, 64))
    # the reference's set: two down 1/32 (one per block here), the mid 1/64, the up 1/32 layers
    assert all(f in (32, 64) for f in chosen.values())
    assert any(n.startswith("mid_block") for n in chosen)
    assert any(n.startswith("down_blocks.2") for n in chosen) and any(n.startswith("up_blocks.1") for n in chosen)
    with pytest.raises(ValueError, match=r"has layers at \[8, 16, 32, 64\]"):
        layout.select((128,))


def test_capture_leaves_the_unet_output_unchanged(unet):
    latents, text = inputs()
    with torch.no_grad():
        stock = unet(latents, 10, encoder_hidden_states=text).sample
    preset = PRESETS["default"].replace(attention_factors=(8, 16, 32, 64))
    store, captured = UNetCapture(unet, 8, preset).run(latents, 10, text, stop_early=False)
    torch.testing.assert_close(captured, stock, rtol=1e-4, atol=1e-5)
    assert len(store.attention) == len(UNetLayout.of(unet, 8).cross_attention)
    # the model's own processors are back in place afterwards
    assert all(type(p).__name__ != "CaptureProcessor" for p in unet.attn_processors.values())


def test_stopping_early_captures_the_same_signals(unet):
    latents, text = inputs(1)
    capture = UNetCapture(unet, 8, PRESETS["default"])
    early, output = capture.run(latents, 0, text)
    full, _ = capture.run(latents, 0, text, stop_early=False)
    assert output is None
    assert capture.stop_block == 2
    for a, b in zip(early.attention, full.attention, strict=True):
        torch.testing.assert_close(a, b)
    for block in (1, 2):
        torch.testing.assert_close(early.features[block], full.features[block])


def test_features_are_unit_norm_on_the_feature_grid(unet):
    latents, text = inputs(2)
    store, _ = UNetCapture(unet, 8, PRESETS["default"]).run(latents, 0, text)
    native = store.features[2]  # up_blocks[2] already works at 1/8
    assert native.shape[-2:] == (128 // 8, 128 // 8)
    torch.testing.assert_close(native.norm(dim=1), torch.ones(2, 16, 16), rtol=1e-4, atol=1e-4)
    upsampled = store.features[1]  # 1/16, interpolated: blends of unit vectors
    assert upsampled.shape[-2:] == (16, 16) and upsampled.norm(dim=1).max() <= 1.0 + 1e-4


def test_softmax_maps_are_probabilities_over_the_prompt_tokens(unet):
    latents, text = inputs(3)
    preset = PRESETS["default"].replace(attention_mode="softmax", attention_factors=(64,), attention_factor=64)
    store, _ = UNetCapture(unet, 8, preset).run(latents, 0, text)
    probs = store.layer_mean().exp()  # (B, 77, 2, 2): the mid layer at its own size
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(2, 2, 2), rtol=1e-4, atol=1e-4)


def test_exp_maps_equal_exp_of_scaled_scores_for_one_layer(unet):
    latents, text = inputs(4, batch=1)
    preset = PRESETS["reference"].replace(attention_factors=(64,), attention_factor=64)
    recorded = {}

    def grab(module, args, kwargs, output):
        recorded["hidden"] = args[0] if args else kwargs["hidden_states"]

    attn = unet.mid_block.attentions[0].transformer_blocks[0].attn2
    handle = attn.register_forward_hook(grab, with_kwargs=True)
    try:
        store, _ = UNetCapture(unet, 8, preset).run(latents, 0, text)
    finally:
        handle.remove()
    q = attn.to_q(recorded["hidden"]).view(1, -1, attn.heads, 8).transpose(1, 2)
    k = attn.to_k(text).view(1, -1, attn.heads, 8).transpose(1, 2)
    expected = (q @ k.transpose(-1, -2) * attn.scale).exp().mean(dim=1)  # (1, N, 77)
    got = store.layer_mean().exp().flatten(2).transpose(1, 2)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_exp_maps_do_not_overflow_with_huge_logits(unet):
    loud = copy.deepcopy(unet)
    for module in loud.modules():
        if hasattr(module, "to_q") and module.is_cross_attention:
            module.to_q.weight.data *= 400.0  # QK^T * scale now reaches hundreds: exp overflows fp32
    latents, text = inputs(5)
    store, _ = UNetCapture(loud, 8, PRESETS["reference"]).run(latents, 0, text)
    logs = store.layer_mean()
    assert logs.max() > 89.0  # exp of this is inf in float32 ...
    assert not torch.isnan(logs).any() and torch.isfinite(logs.amax(dim=(2, 3))).all()  # ... but no overflow here
