"""Model families and 'auto' layers, unit by unit: detection rules, native size, layer choice, folder overrides.

Detection is tested on hand-written :class:`~maskdiffusion.families.ModelDescription` s (one per
rule, each next to the near miss that must not match it) and on the key fields of the real hub
configurations; layer choice on the UNets of the tiny models of every family, loaded by
diffusers itself, and on the bundled toy model.
"""

from __future__ import annotations

import functools
import json
import re
import shutil

import numpy as np
import pytest

from maskdiffusion import MaskDiffusion
from maskdiffusion.backbones.unet import UNetLayout
from maskdiffusion.families import FAMILIES, TURBO_TIMESTEP, ModelDescription, detect, native_size
from maskdiffusion.loading import SETTINGS_FILE, folder_family, model_presets, read_settings, toy_model_path
from maskdiffusion.presets import AUTO, PRESETS

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SD_UNET = {"cross_attention_dim": 768, "mid_block_type": "UNetMidBlock2DCrossAttn", "sample_size": 64}
SD2_UNET = {**SD_UNET, "cross_attention_dim": 1024}
SDXL_UNET = {"cross_attention_dim": 2048, "addition_embed_type": "text_time", "sample_size": 128}
LEADING = {"prediction_type": "epsilon", "timestep_spacing": "leading"}
TRAILING = {"prediction_type": "epsilon", "timestep_spacing": "trailing"}
V_PREDICTION = {"prediction_type": "v_prediction", "timestep_spacing": "leading"}


def model(unet=SD_UNET, scheduler=LEADING, two_text_encoders=False, names=(), declared=None) -> ModelDescription:
    return ModelDescription(
        unet=unet, scheduler=scheduler, two_text_encoders=two_text_encoders, names=names, declared=declared
    )


@pytest.mark.parametrize(
    ("description", "family"),
    [
        # SDXL: two text encoders, or a UNet that adds pooled text + time ids to its time embedding
        (model(SDXL_UNET, two_text_encoders=True), "sdxl"),
        (model(SDXL_UNET), "sdxl"),
        (model(SD_UNET, two_text_encoders=True), "sdxl"),
        (model({**SD_UNET, "addition_embed_type": "text"}), "sd1"),  # another added embedding is not SDXL's
        # SDXL-Turbo: SDXL named so, or SDXL scheduled "trailing" with epsilon prediction
        (model(SDXL_UNET, two_text_encoders=True, names=("stabilityai/sdxl-turbo",)), "sdxl-turbo"),
        (model(SDXL_UNET, two_text_encoders=True, names=("/models/SDXL-Turbo-fp16",)), "sdxl-turbo"),
        (model(SDXL_UNET, TRAILING, two_text_encoders=True), "sdxl-turbo"),
        (model(SDXL_UNET, {"timestep_spacing": "trailing"}, two_text_encoders=True), "sdxl-turbo"),  # epsilon default
        (model(SDXL_UNET, {**TRAILING, "prediction_type": "v_prediction"}, two_text_encoders=True), "sdxl"),
        # SD-Turbo: named so, or "trailing" with epsilon prediction; trailing v-prediction is not Turbo
        (model(SD2_UNET, names=("stabilityai/sd-turbo",)), "sd-turbo"),
        (model(SD2_UNET, names=("", "/home/patrick/sd-turbo/")), "sd-turbo"),
        (model(SD2_UNET, TRAILING), "sd-turbo"),
        (model(SD2_UNET, {**TRAILING, "prediction_type": "v_prediction"}), "sd2-v"),
        # distilled: no mid block, or BK-SDM by name (whatever the case)
        (model({**SD_UNET, "mid_block_type": None}), "distilled"),
        (model(SD_UNET, names=("nota-ai/BK-SDM-Small",)), "distilled"),
        (model({key: v for key, v in SD_UNET.items() if key != "mid_block_type"}), "sd1"),  # absent = a mid block
        # SD 2.x: v-prediction (768), else a 1024-wide text encoder (base)
        (model(SD2_UNET, V_PREDICTION), "sd2-v"),
        (model(SD_UNET, V_PREDICTION), "sd2-v"),
        (model(SD2_UNET), "sd2"),
        # SD 1.x: everything else
        (model(SD_UNET), "sd1"),
        (model({}, {}), "sd1"),
        (model(SD_UNET, names=("runwayml/stable-diffusion-v1-5", "/tmp/turbine")), "sd1"),  # "turb" is not "turbo"
    ],
)
def test_each_rule_picks_its_family_and_its_near_misses_do_not(description, family):
    assert detect(description).name == family


def test_a_declared_family_wins_over_every_rule():
    assert detect(model(SDXL_UNET, TRAILING, two_text_encoders=True, declared="sd1")).name == "sd1"
    assert detect(model(SD_UNET, declared="sdxl-turbo")) is FAMILIES["sdxl-turbo"]


def test_a_declared_family_of_another_architecture_is_refused():
    with pytest.raises(ValueError, match=r"'sd3' is a sd3 model, but this folder's denoiser is a UNet2DConditionModel"):
        detect(model(declared="sd3"))


@pytest.mark.parametrize("declared", ["sd4", "SDXL", "", 5, ["sdxl"], {"name": "sdxl"}])
def test_an_unknown_declared_family_is_a_value_error_naming_every_choice(declared):
    with pytest.raises(ValueError, match='"family"') as error:
        detect(model(declared=declared))
    assert all(name in str(error.value) for name in FAMILIES)


@pytest.mark.parametrize(
    ("unet", "family", "size"),
    [  # the key fields of the hub snapshots' unet/config.json (the VAE is SD's four-level one in all)
        ({**SD_UNET, "sample_size": 64}, "sd1", 512),  # stable-diffusion-v1-5
        ({**SD2_UNET, "sample_size": 64}, "sd2", 512),  # stable-diffusion-2-1-base
        ({**SD2_UNET, "sample_size": 96}, "sd2-v", 768),  # stable-diffusion-2-1 (v_prediction)
        ({**SDXL_UNET, "sample_size": 128}, "sdxl", 1024),  # stable-diffusion-xl-base-1.0
    ],
)
def test_native_size_is_the_unet_sample_size_times_the_vae_factor(unet, family, size):
    vae = {"block_out_channels": [128, 256, 512, 512]}
    scheduler = V_PREDICTION if family == "sd2-v" else LEADING
    assert detect(model(unet, scheduler, two_text_encoders=family == "sdxl")).name == family
    assert native_size(unet, vae) == size


def test_native_size_reads_other_vae_factors_and_non_square_samples():
    assert native_size({"sample_size": 64}, {"block_out_channels": [64, 128, 256]}) == 256  # factor 4
    assert native_size({"sample_size": [96, 64]}, {"block_out_channels": [1, 2, 3, 4]}) == 512  # the short side
    assert native_size({}, {}) == 512  # SD's when nothing is said


def layout_of(folder) -> UNetLayout:
    """The :class:`UNetLayout` of a model folder's UNet (with its VAE's factor), loaded by diffusers."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    factor = 2 ** (len(AutoencoderKL.from_pretrained(folder / "vae").config.block_out_channels) - 1)
    return UNetLayout.of(UNet2DConditionModel.from_pretrained(folder / "unet"), factor)


@pytest.fixture(scope="module")
def layout(tiny_family_model):
    """``layout(family)``: the :class:`UNetLayout` of a tiny family's model, loaded once."""
    return functools.cache(lambda family: layout_of(tiny_family_model(family)))


AUTO_LAYERS = {  # family -> (attention factors, feature blocks) the "auto" rule picks
    "sd1": ((32, 64), (1, 2)),
    "sd2-v": ((32, 64), (1, 2)),
    "sd-turbo": ((32, 64), (1, 2)),
    "three-level": ((32,), (0, 1)),  # its coarsest level is 1/32; up_blocks[0] already outputs at 1/16
    "no-mid": ((32,), (1, 2)),  # no mid block: nothing at 1/64
    "sdxl": ((32,), (0, 1)),
    "sdxl-turbo": ((32,), (0, 1)),
}


def test_auto_layers_cover_every_tiny_family():
    from maskdiffusion.tiny import TINY_FAMILIES

    assert set(AUTO_LAYERS) == set(TINY_FAMILIES)


@pytest.mark.parametrize("family", list(AUTO_LAYERS))
def test_auto_layers_are_the_coarse_cross_attention_and_the_decoder_at_1_16_and_1_8(family, layout):
    unet_layout = layout(family)
    attention, features = AUTO_LAYERS[family]
    assert unet_layout.auto_attention_factors() == attention
    assert unet_layout.auto_feature_blocks() == features
    assert [unet_layout.up_block_factors[b] for b in features] == [16, 8]
    resolved = unet_layout.resolve(PRESETS["default"])
    assert (resolved.attention_factors, resolved.feature_blocks) == (attention, features)
    assert unet_layout.select(attention)  # layers exist at every chosen factor


def test_resolve_keeps_fixed_layers_and_every_other_field(layout):
    no_mid = layout("no-mid")
    reference = PRESETS["reference"]
    assert no_mid.resolve(reference) is reference  # nothing "auto": nothing changes, even layers it lacks
    default = PRESETS["default"]
    assert (default.attention_factors, default.feature_blocks) == (AUTO, AUTO)
    half = default.replace(feature_blocks=(2,))
    resolved = no_mid.resolve(half)
    assert resolved == half.replace(attention_factors=(32,))


def test_a_unet_without_cross_attention_that_coarse_gets_its_coarsest_level():
    """The bundled toy model's cross-attention sits at 1/4, 1/8 and 1/16 of the view: 'auto' takes 1/16."""
    toy = layout_of(toy_model_path())
    assert sorted(set(toy.cross_attention.values())) == [4, 8, 16]
    assert toy.auto_attention_factors() == (16,)
    hand_made = UNetLayout(vae_factor=8, levels=2, cross_attention={"a.attn2.": 8, "b.attn2.": 16})
    assert hand_made.auto_attention_factors() == (16,)


def test_auto_layers_a_unet_cannot_have_are_clear_errors():
    no_text = UNetLayout(vae_factor=8, levels=4, cross_attention={}, up_block_factors=(32, 16, 8, 8))
    with pytest.raises(ValueError, match="no cross-attention layer: it cannot be prompted"):
        no_text.auto_attention_factors()
    coarse_decoder = UNetLayout(vae_factor=8, levels=2, cross_attention={"a": 8}, up_block_factors=(64, 32))
    with pytest.raises(ValueError, match=r"output at factors \[64, 32\]; none at 16 or 8: set Preset.feature_blocks"):
        coarse_decoder.auto_feature_blocks()


@pytest.mark.parametrize(("family", "layers"), [("no-mid", [8, 16, 32]), ("sdxl", [16, 32])])
def test_reference_preset_fails_clearly_where_the_unet_lacks_its_fixed_layers(family, layers, tiny_family_model):
    seg = MaskDiffusion.from_pretrained(str(tiny_family_model(family)), device="cpu")
    image = np.full((64, 96, 3), 128, np.uint8)
    message = (
        rf"this UNet has no cross-attention layer at down-sampling factor\(s\) \[64\]; it has layers at "
        rf"{re.escape(str(layers))} \(set Preset.attention_factors accordingly\)"
    )
    with pytest.raises(ValueError, match=message):
        seg(image, classes=["sky", "sand"], preset="reference")
    with pytest.raises(ValueError, match=message):
        MaskDiffusion.from_pretrained(seg.model_id, device="cpu", preset="reference")
    result = seg(image, classes=["sky", "sand"])  # the default preset's "auto" layers work on the same model
    assert result.labels.shape == (64, 96)


def copy_with_settings(source, target, settings: dict):
    shutil.copytree(source, target)
    (target / SETTINGS_FILE).write_text(json.dumps({**read_settings(source), **settings}))
    return target


def test_a_folders_declared_family_is_honoured(tiny_family_model, tmp_path):
    folder = copy_with_settings(tiny_family_model("sd1"), tmp_path / "model", {"family": "sd-turbo"})
    assert folder_family(tiny_family_model("sd1"), read_settings(tiny_family_model("sd1")))[0].name == "sd1"
    family, size = folder_family(folder, read_settings(folder))
    assert (family.name, size) == ("sd-turbo", 128)
    seg = MaskDiffusion.from_pretrained(str(folder), device="cpu")
    assert seg.family is FAMILIES["sd-turbo"]
    assert {name: preset.timestep for name, preset in seg.presets.items()} == dict.fromkeys(PRESETS, TURBO_TIMESTEP)
    assert seg.card.random_weights  # the folder's other settings are still read


def test_a_folders_preset_overrides_win_over_its_family(tiny_family_model, tmp_path):
    settings = {"family": "sd-turbo", "presets": {"default": {"timestep": 100}}}
    folder = copy_with_settings(tiny_family_model("sd1"), tmp_path / "model", settings)
    presets = model_presets(folder, read_settings(folder), folder_family(folder, read_settings(folder)))
    assert presets["default"].timestep == 100
    assert presets["reference"].timestep == TURBO_TIMESTEP
    assert presets["default"].size == presets["reference"].size == 128


@pytest.mark.parametrize("declared", ["sd4", ["sdxl"]])
def test_a_bad_declared_family_names_the_settings_file(declared, tiny_family_model, tmp_path):
    folder = copy_with_settings(tiny_family_model("sd1"), tmp_path / "model", {"family": declared})
    where = re.escape(f"model settings file {str(folder / SETTINGS_FILE)!r}")
    with pytest.raises(ValueError, match=rf'{where}: "family" .* is not one of sd1, sd2, sd2-v, sdxl, distilled'):
        MaskDiffusion.from_pretrained(str(folder), device="cpu")


def test_only_the_folders_own_name_says_what_it_is_not_its_parents(tiny_family_model, tmp_path):
    parent = tmp_path / "my-turbo-experiments" / "bk-sdm-notes"
    plain = shutil.copytree(tiny_family_model("sd1"), parent / "sd15")
    assert folder_family(plain, read_settings(plain))[0].name == "sd1"
    named = shutil.copytree(tiny_family_model("sd1"), tmp_path / "sd-turbo-copy")
    assert folder_family(named, read_settings(named))[0].name == "sd-turbo"


def test_a_half_precision_vae_that_asks_for_upcast_stays_in_float32(tiny_family_model, tmp_path):
    import torch

    from maskdiffusion.loading import load_components

    folder = shutil.copytree(tiny_family_model("sdxl"), tmp_path / "xl")
    config = folder / "vae" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "force_upcast": True}))
    loaded = load_components(folder, device=torch.device("cpu"), dtype=torch.float16)
    assert loaded.vae.dtype == torch.float32 and loaded.backbone.unet.dtype == torch.float16
    config.write_text(json.dumps({**json.loads(config.read_text()), "force_upcast": False}))
    assert load_components(folder, device=torch.device("cpu"), dtype=torch.float16).vae.dtype == torch.float16
