"""The tiny random models of every family (``maskdiffusion.tiny``): real diffusers checkpoints of their family's shape.

Each folder is loaded by diffusers' own ``DiffusionPipeline.from_pretrained`` (which picks the
pipeline class from ``model_index.json``) and denoises one step, so the folders are what the
families' real downloads are, only small; the layout each family stands for (levels,
cross-attention factors, mid block, text encoders, scheduler) is asserted from the loaded
modules, not from our own builder's arguments.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from maskdiffusion.tiny import TINY_FAMILIES, TinyFamily, build_tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PIPELINE_CLASS = {
    "sd1": "StableDiffusionPipeline",
    "sd2-v": "StableDiffusionPipeline",
    "three-level": "StableDiffusionPipeline",
    "no-mid": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sd-turbo": "StableDiffusionPipeline",
    "sdxl-turbo": "StableDiffusionXLPipeline",
}
# What the hub snapshots of stabilityai/sd-turbo and stabilityai/sdxl-turbo say of themselves besides their hub id:
# model_index.json's _name_or_path (SDXL-Turbo's has none) and the model card's title.
TURBO = {
    "sd-turbo": ("/home/patrick/sd-turbo/", "# SD-Turbo Model Card"),
    "sdxl-turbo": (None, "# SDXL-Turbo Model Card"),
}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".msgpack", ".h5")


@pytest.fixture(scope="module")
def loaded(tiny_family_model):
    """``loaded(family)``: the family's folder loaded by diffusers' generic ``DiffusionPipeline``, once per module."""
    from diffusers import DiffusionPipeline

    pipes = {}

    def load(family: str):
        if family not in pipes:
            pipes[family] = DiffusionPipeline.from_pretrained(tiny_family_model(family))
        return pipes[family]

    return load


def native_size(pipe) -> int:
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


def cross_attention_factors(pipe) -> list[int]:
    """Down-sampling factors (relative to the image) of the UNet's cross-attention levels, the mid block included."""
    unet, factor = pipe.unet, pipe.vae_scale_factor
    factors = [factor * 2**level for level, block in enumerate(unet.down_blocks) if hasattr(block, "attentions")]
    if unet.mid_block is not None and hasattr(unet.mid_block, "attentions"):
        factors.append(factor * 2 ** (len(unet.down_blocks) - 1))
    return sorted(set(factors))


def test_every_family_has_an_expected_pipeline_class():
    assert set(PIPELINE_CLASS) == set(TINY_FAMILIES)


@pytest.mark.parametrize("family", list(TINY_FAMILIES))
def test_folder_loads_as_its_diffusers_pipeline_and_denoises_one_step(family, loaded):
    pipe = loaded(family)
    assert type(pipe).__name__ == PIPELINE_CLASS[family]
    size = native_size(pipe)
    latents = pipe(
        prompt="a cat",
        num_inference_steps=1,
        output_type="latent",
        height=size,
        width=size,
        generator=torch.Generator().manual_seed(0),
    ).images
    assert latents.shape == (1, 4, size // 8, size // 8)
    assert torch.isfinite(latents).all()


def test_native_size_follows_the_model(loaded):
    assert {family: loaded(family).vae_scale_factor for family in TINY_FAMILIES} == dict.fromkeys(TINY_FAMILIES, 8)
    assert {family: native_size(loaded(family)) for family in TINY_FAMILIES} == {
        "sd1": 128,
        "sd2-v": 192,
        "three-level": 128,
        "no-mid": 128,
        "sdxl": 256,
        "sd-turbo": 128,
        "sdxl-turbo": 256,
    }


def test_cross_attention_sits_where_each_family_has_it(loaded):
    """SD: 1/8-1/64 (mid block at 1/64); three levels: no 1/64; SDXL: 1/16 and 1/32 only."""
    assert {family: cross_attention_factors(loaded(family)) for family in TINY_FAMILIES} == {
        "sd1": [8, 16, 32, 64],
        "sd2-v": [8, 16, 32, 64],
        "three-level": [8, 16, 32],
        "no-mid": [8, 16, 32],
        "sdxl": [16, 32],
        "sd-turbo": [8, 16, 32, 64],
        "sdxl-turbo": [16, 32],
    }


def test_three_level_unet_has_three_levels_and_a_cross_attention_mid_block(loaded):
    unet = loaded("three-level").unet
    assert [type(b).__name__ for b in unet.down_blocks] == [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ]
    assert [type(b).__name__ for b in unet.up_blocks] == ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
    assert type(unet.mid_block).__name__ == "UNetMidBlock2DCrossAttn"


def test_no_mid_unet_has_no_mid_block_and_four_levels(loaded, tiny_family_model):
    unet = loaded("no-mid").unet
    assert unet.mid_block is None
    assert len(unet.down_blocks) == len(unet.up_blocks) == 4
    assert json.loads((tiny_family_model("no-mid") / "unet" / "config.json").read_text())["mid_block_type"] is None


def test_sd2_v_folder_says_v_prediction_and_has_sd2_shapes(loaded, tiny_family_model):
    scheduler = json.loads((tiny_family_model("sd2-v") / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"
    assert scheduler["timestep_spacing"] == "leading"
    pipe, sd1 = loaded("sd2-v"), loaded("sd1")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert sd1.scheduler.config.prediction_type == "epsilon"
    assert pipe.unet.config.use_linear_projection and not sd1.unet.config.use_linear_projection
    assert list(pipe.unet.config.attention_head_dim) == [2, 2, 4, 4]  # a head count per level, as SD 2.x
    assert pipe.text_encoder.config.hidden_size == pipe.unet.config.cross_attention_dim == 48
    assert sd1.text_encoder.config.hidden_size == sd1.unet.config.cross_attention_dim == 32
    assert (pipe.tokenizer.pad_token, sd1.tokenizer.pad_token) == ("!", "<|endoftext|>")


@pytest.mark.parametrize("family", ["sdxl", "sdxl-turbo"])
def test_sdxl_unet_reads_both_text_encoders_and_the_added_conditions(family, loaded, tiny_family_model):
    pipe = loaded(family)
    unet, first, second = pipe.unet, pipe.text_encoder, pipe.text_encoder_2
    assert (type(first).__name__, type(second).__name__) == ("CLIPTextModel", "CLIPTextModelWithProjection")
    assert [type(b).__name__ for b in unet.down_blocks] == [
        "DownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
    ]
    assert unet.config.cross_attention_dim == first.config.hidden_size + second.config.hidden_size
    assert unet.config.addition_embed_type == "text_time"
    pooled_and_time_ids = 6 * unet.config.addition_time_embed_dim + second.config.projection_dim
    assert unet.config.projection_class_embeddings_input_dim == pooled_and_time_ids
    assert unet.add_embedding.linear_1.in_features == pooled_and_time_ids
    assert list(unet.config.transformer_layers_per_block) == [1, 1, 2]
    assert pipe.vae.config.scaling_factor == 0.13025
    assert json.loads((tiny_family_model(family) / "model_index.json").read_text())["force_zeros_for_empty_prompt"]


@pytest.mark.parametrize("family", ["sdxl", "sdxl-turbo"])
def test_sdxl_tokenizers_agree_on_class_names_and_differ_only_in_padding(family, loaded):
    pipe = loaded(family)
    first, second = pipe.tokenizer, pipe.tokenizer_2
    assert (first.pad_token, second.pad_token) == ("<|endoftext|>", "!")
    assert first.pad_token_id != second.pad_token_id
    for name in ["cat", "traffic light", "Eiffel Tower", "fire hydrant", "AT&T"]:
        assert first(name, add_special_tokens=False).input_ids == second(name, add_special_tokens=False).input_ids
        padded = [t(name, padding="max_length", max_length=77).input_ids for t in (first, second)]
        differ = [i for i, (a, b) in enumerate(zip(*padded, strict=True)) if a != b]
        assert differ, name
        assert all(padded[0][i] == first.pad_token_id and padded[1][i] == second.pad_token_id for i in differ)


@pytest.mark.parametrize(
    ("family", "scheduler"),
    [
        ("sdxl", "EulerDiscreteScheduler"),
        ("sd-turbo", "EulerDiscreteScheduler"),
        ("sdxl-turbo", "EulerAncestralDiscreteScheduler"),
    ],
)
def test_euler_schedulers_carry_their_hub_configuration(family, scheduler, tiny_family_model):
    config = json.loads((tiny_family_model(family) / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == scheduler
    expected = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1}
    assert {key: config[key] for key in expected} == expected
    assert config["prediction_type"] == "epsilon"
    assert config["timestep_spacing"] == ("leading" if family == "sdxl" else "trailing")


@pytest.mark.parametrize(("family", "base"), [("sd-turbo", "sd2-v"), ("sdxl-turbo", "sdxl")])
def test_turbo_folders_say_so_as_a_hub_download_does_and_keep_their_base_shapes(family, base, tiny_family_model):
    folder = tiny_family_model(family)
    name_or_path, title = TURBO[family]
    assert json.loads((folder / "model_index.json").read_text()).get("_name_or_path") == name_or_path
    card = (folder / "README.md").read_text()
    assert card.startswith("---\npipeline_tag: text-to-image\ninference: false\n")
    assert f"\n---\n\n{title}\n" in card
    unet, base_unet = (json.loads((f / "unet" / "config.json").read_text()) for f in (folder, tiny_family_model(base)))
    shape_keys = [
        "block_out_channels",
        "down_block_types",
        "up_block_types",
        "attention_head_dim",
        "cross_attention_dim",
    ]
    assert {k: unet[k] for k in shape_keys} == {k: base_unet[k] for k in shape_keys}
    assert unet["use_linear_projection"] is True


@pytest.mark.parametrize("family", [f for f in TINY_FAMILIES if f not in TURBO])
def test_only_turbo_folders_mention_turbo(family, tiny_family_model):
    folder = tiny_family_model(family)
    texts = [p for p in folder.rglob("*") if p.suffix in (".json", ".md") and p.name != "tokenizer.json"]  # not vocab
    assert texts
    assert not [str(p.relative_to(folder)) for p in texts if "turbo" in p.read_text().lower()]
    assert not (folder / "README.md").exists()


@pytest.mark.parametrize("family", list(TINY_FAMILIES))
def test_weights_are_safetensors_only_and_pass_the_loaders_check(family, tiny_family_model):
    from maskdiffusion.loading import check_weights, model_card

    folder = tiny_family_model(family)
    weights = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name.endswith(WEIGHT_SUFFIXES))
    parts = ["unet", "vae", "text_encoder"] + (
        ["text_encoder_2"] if PIPELINE_CLASS[family].endswith("XLPipeline") else []
    )
    names = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model"}
    assert weights == sorted(f"{part}/{names.get(part, 'model')}.safetensors" for part in parts)
    check_weights(folder)
    assert model_card(folder).random_weights is True


def test_weights_are_seeded(tmp_path):
    from safetensors.torch import load_file

    def unet_weights(seed: int, name: str) -> dict:
        folder = build_tiny_model(tmp_path / name, seed=seed, family="no-mid")
        return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")

    first, again, other = unet_weights(0, "a"), unet_weights(0, "b"), unet_weights(1, "c")
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_unknown_family_is_refused_with_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match=r"unknown tiny model family 'sd4'.*sd1, sd2-v, three-level, no-mid, sdxl"):
        build_tiny_model(tmp_path / "model", family="sd4")
    assert not list(tmp_path.iterdir())


def test_failed_build_leaves_the_existing_folder_and_no_staging(tmp_path, monkeypatch):
    class FullDisk:
        def register_to_config(self, **_):
            pass

        def save_pretrained(self, folder: Path, **_):
            (Path(folder) / "model_index.json").write_text("{}")
            raise OSError("No space left on device")

    existing = tmp_path / "model"
    existing.mkdir()
    (existing / "model_index.json").write_text('{"old": true}')
    monkeypatch.setitem(TINY_FAMILIES, "full-disk", TinyFamily(FullDisk, name_or_path="x/y"))
    with pytest.raises(OSError, match="No space left"):
        build_tiny_model(existing, family="full-disk")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert json.loads((existing / "model_index.json").read_text()) == {"old": True}


@pytest.mark.parametrize("family", list(TURBO))
def test_a_turbo_model_in_the_hub_cache_is_found_by_its_hub_id_offline(family, hub_cached):
    from maskdiffusion.loading import resolve_model_folder

    snapshot = hub_cached(family, f"stabilityai/{family}")
    folder = resolve_model_folder(f"stabilityai/{family}", local_files_only=True)
    assert Path(folder) == snapshot
    assert f"models--stabilityai--{family}" in Path(folder).parts
