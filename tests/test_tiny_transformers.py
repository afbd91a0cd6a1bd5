"""The tiny transformer (DiT) models (SD3, SD3.5, FLUX.1 dev and schnell, PixArt-Σ) and their T5-style tokenizer.

Each folder is loaded by diffusers' generic ``DiffusionPipeline.from_pretrained`` and denoises one
step through the family's own pipeline; what makes each family what it is (the last SD3 block
without a text output, SD3.5's dual attention, FLUX's guidance embedding and dynamic shifting,
PixArt's learned variance) is asserted from the loaded modules and the saved configs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from maskdiffusion.t5_tokenizer import t5_style_tokenizer, training_words, vocabulary
from maskdiffusion.tiny import TINY_FAMILIES, TRANSFORMER_FAMILIES, build_tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PIPELINE_CLASS = {
    "sd3": "StableDiffusion3Pipeline",
    "sd3.5": "StableDiffusion3Pipeline",
    "flux-dev": "FluxPipeline",
    "flux-schnell": "FluxPipeline",
    "pixart-sigma": "PixArtSigmaPipeline",
}
SD3_COMPONENTS = {
    "transformer": "SD3Transformer2DModel",
    "vae": "AutoencoderKL",
    "text_encoder": "CLIPTextModelWithProjection",
    "text_encoder_2": "CLIPTextModelWithProjection",
    "text_encoder_3": "T5EncoderModel",
    "tokenizer": "CLIPTokenizer",
    "tokenizer_2": "CLIPTokenizer",
    "tokenizer_3": "T5Tokenizer",  # transformers 5: T5TokenizerFast is T5Tokenizer
    "scheduler": "FlowMatchEulerDiscreteScheduler",
}
FLUX_COMPONENTS = {
    "transformer": "FluxTransformer2DModel",
    "vae": "AutoencoderKL",
    "text_encoder": "CLIPTextModel",
    "text_encoder_2": "T5EncoderModel",
    "tokenizer": "CLIPTokenizer",
    "tokenizer_2": "T5Tokenizer",
    "scheduler": "FlowMatchEulerDiscreteScheduler",
}
COMPONENTS = {
    "sd3": SD3_COMPONENTS,
    "sd3.5": SD3_COMPONENTS,
    "flux-dev": FLUX_COMPONENTS,
    "flux-schnell": FLUX_COMPONENTS,
    "pixart-sigma": {
        "transformer": "PixArtTransformer2DModel",
        "vae": "AutoencoderKL",
        "text_encoder": "T5EncoderModel",
        "tokenizer": "T5Tokenizer",
        "scheduler": "DPMSolverMultistepScheduler",
    },
}
# One step at 128 px: SD3 and PixArt give (batch, channels, 16, 16); FLUX gives its packed latents,
# one row per 2x2 latent patch: (batch, (128 / 16) ** 2, 16 * 4). PixArt's resolution binning
# knows only 256-2048 px models (sample_size 32-256): it is turned off for the 128 px tiny model.
DENOISE = {
    "sd3": ({"guidance_scale": 2.0}, (1, 16, 16, 16)),
    "sd3.5": ({"guidance_scale": 2.0}, (1, 16, 16, 16)),
    "flux-dev": ({"guidance_scale": 3.5}, (1, 64, 64)),
    "flux-schnell": ({"guidance_scale": 0.0}, (1, 64, 64)),
    "pixart-sigma": ({"guidance_scale": 4.5, "use_resolution_binning": False}, (1, 4, 16, 16)),
}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".msgpack", ".h5")
UNSEEN = ["Eiffel Tower", "xylophone", "AT&T", "R2-D2", "café crème", "naïve", "Zürich 2024"]


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


def saved_config(folder: Path, part: str) -> dict:
    name = "scheduler_config.json" if part == "scheduler" else "config.json"
    return json.loads((folder / part / name).read_text())


def denoise(pipe, family: str, prompt: str) -> torch.Tensor:
    options, _ = DENOISE[family]
    return pipe(
        prompt,
        num_inference_steps=1,
        height=128,
        width=128,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
        **options,
    ).images


def class_words() -> list[str]:
    """Every benchmark class word (synonyms too), read here from the class files, not through the code under test."""
    folder = Path(__file__).resolve().parents[1] / "src" / "maskdiffusion" / "classnames"
    lines = [line.split("#", 1)[0].strip() for path in sorted(folder.glob("*.txt")) for line in path.open()]
    return [word.strip() for line in lines if line for word in line.split("|")]


def test_transformer_families_are_the_expected_ones_and_apart_from_the_unet_ones():
    assert set(TRANSFORMER_FAMILIES) == set(PIPELINE_CLASS) == set(COMPONENTS) == set(DENOISE)
    assert not set(TRANSFORMER_FAMILIES) & set(TINY_FAMILIES)


def test_an_unknown_family_is_refused_naming_the_transformer_families_too(tmp_path):
    with pytest.raises(ValueError, match=r"unknown tiny model family 'sd4'.*sd1.*sd3, sd3\.5, flux-dev, flux-schnell"):
        build_tiny_model(tmp_path / "model", family="sd4")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("family", list(TRANSFORMER_FAMILIES))
def test_folder_loads_as_its_pipeline_with_the_intended_components(family, loaded, tiny_family_model):
    pipe, folder = loaded(family), tiny_family_model(family)
    assert type(pipe).__name__ == PIPELINE_CLASS[family]
    present = {name: type(part).__name__ for name, part in pipe.components.items() if part is not None}
    assert present == COMPONENTS[family]
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == PIPELINE_CLASS[family]
    assert json.loads((folder / "maskdiffusion.json").read_text())["random_weights"] is True


@pytest.mark.parametrize("family", list(TRANSFORMER_FAMILIES))
def test_weights_are_safetensors_only(family, tiny_family_model):
    folder = tiny_family_model(family)
    weights = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name.endswith(WEIGHT_SUFFIXES))
    models = [part for part in COMPONENTS[family] if not part.startswith(("tokenizer", "scheduler"))]
    names = {part: "model" if part.startswith("text_encoder") else "diffusion_pytorch_model" for part in models}
    assert weights == sorted(f"{part}/{name}.safetensors" for part, name in names.items())
    assert len(weights) == {"sd3": 5, "sd3.5": 5, "pixart-sigma": 3}.get(family, 4)


@pytest.mark.parametrize("family", list(TRANSFORMER_FAMILIES))
def test_pipeline_denoises_one_step_to_finite_latents_that_follow_the_prompt(family, loaded):
    pipe = loaded(family)
    _, shape = DENOISE[family]
    latents = denoise(pipe, family, "a photo of a cat")
    assert tuple(latents.shape) == shape
    assert torch.isfinite(latents).all()
    assert torch.equal(latents, denoise(pipe, family, "a photo of a cat"))
    assert not torch.allclose(latents, denoise(pipe, family, "road and traffic light"))  # the text reaches the model


@pytest.mark.parametrize("family", list(TRANSFORMER_FAMILIES))
def test_t5_encoder_is_t5_v1_1_shaped_over_the_t5_style_tokenizer(family, loaded):
    pipe = loaded(family)
    t5 = {"sd3": "text_encoder_3", "sd3.5": "text_encoder_3", "pixart-sigma": "text_encoder"}.get(
        family, "text_encoder_2"
    )
    encoder, tokenizer = getattr(pipe, t5), getattr(pipe, t5.replace("text_encoder", "tokenizer"))
    assert encoder.config.feed_forward_proj == "gated-gelu"
    assert encoder.config.d_model == 64
    assert (encoder.config.pad_token_id, encoder.config.eos_token_id) == (0, 1)
    assert encoder.config.vocab_size % 128 == 0  # padded, as T5's 32,128 rows for 32,100 tokens
    assert len(tokenizer) <= encoder.config.vocab_size < len(tokenizer) + 128
    assert tokenizer.get_vocab() == t5_style_tokenizer().get_vocab()


@pytest.mark.parametrize("family", ["sd3", "sd3.5"])
def test_sd3_shapes_connect_the_three_text_encoders_to_the_mmdit(family, loaded, tiny_family_model):
    pipe = loaded(family)
    transformer, clip_l, clip_g, t5 = pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3
    config = transformer.config
    assert [block.context_pre_only for block in transformer.transformer_blocks] == [False, False, False, True]
    assert (config.patch_size, config.in_channels, config.out_channels, config.sample_size) == (2, 16, 16, 16)
    assert config.joint_attention_dim == t5.config.d_model
    assert config.caption_projection_dim == config.num_attention_heads * config.attention_head_dim
    assert config.pooled_projection_dim == clip_l.config.projection_dim + clip_g.config.projection_dim
    assert clip_l.config.hidden_size + clip_g.config.hidden_size <= t5.config.d_model  # padded to T5's width
    assert (clip_l.config.hidden_act, clip_g.config.hidden_act) == ("quick_gelu", "gelu")
    assert config.pos_embed_max_size * config.patch_size * pipe.vae_scale_factor >= 256
    assert (pipe.tokenizer.pad_token, pipe.tokenizer_2.pad_token) == ("<|endoftext|>", "!")
    vae = saved_config(tiny_family_model(family), "vae")
    assert {k: vae[k] for k in ("latent_channels", "scaling_factor", "shift_factor")} == {
        "latent_channels": 16,
        "scaling_factor": 1.5305,
        "shift_factor": 0.0609,
    }
    assert not vae["use_quant_conv"] and not vae["use_post_quant_conv"]
    assert pipe.vae.quant_conv is None and pipe.vae.post_quant_conv is None
    assert pipe.vae_scale_factor == 8
    scheduler = saved_config(tiny_family_model(family), "scheduler")
    assert (scheduler["_class_name"], scheduler["shift"], scheduler["use_dynamic_shifting"]) == (
        "FlowMatchEulerDiscreteScheduler",
        3.0,
        False,
    )


def test_sd3_5_adds_dual_attention_and_rms_qk_norm_to_sd3(loaded, tiny_family_model):
    sd3, sd35 = loaded("sd3").transformer, loaded("sd3.5").transformer
    assert tuple(sd35.config.dual_attention_layers) == (0, 1)
    assert [block.attn2 is not None for block in sd35.transformer_blocks] == [True, True, False, False]
    assert sd35.config.qk_norm == "rms_norm"
    assert all(type(block.attn.norm_q).__name__ == "RMSNorm" for block in sd35.transformer_blocks)
    assert tuple(sd3.config.dual_attention_layers) == () and sd3.config.qk_norm is None
    assert all(block.attn2 is None and block.attn.norm_q is None for block in sd3.transformer_blocks)
    first, second = (saved_config(tiny_family_model(f), "transformer") for f in ("sd3", "sd3.5"))
    differ = {key for key in first.keys() | second.keys() if first.get(key) != second.get(key)}
    assert differ == {"dual_attention_layers", "qk_norm"}


@pytest.mark.parametrize("family", ["flux-dev", "flux-schnell"])
def test_flux_shapes_pack_16_channel_latents_and_read_pooled_clip_and_t5(family, loaded, tiny_family_model):
    pipe = loaded(family)
    config = pipe.transformer.config
    assert config.patch_size == 1
    assert config.in_channels == 4 * pipe.vae.config.latent_channels == 64
    assert sum(config.axes_dims_rope) == config.attention_head_dim
    assert config.joint_attention_dim == pipe.text_encoder_2.config.d_model
    assert config.pooled_projection_dim == pipe.text_encoder.config.hidden_size
    assert (len(pipe.transformer.transformer_blocks), len(pipe.transformer.single_transformer_blocks)) == (2, 2)
    assert "sample_size" not in saved_config(tiny_family_model(family), "transformer")
    vae = saved_config(tiny_family_model(family), "vae")
    assert {k: vae[k] for k in ("latent_channels", "scaling_factor", "shift_factor", "sample_size")} == {
        "latent_channels": 16,
        "scaling_factor": 0.3611,
        "shift_factor": 0.1159,
        "sample_size": 128,
    }
    assert not vae["use_quant_conv"] and not vae["use_post_quant_conv"]
    assert pipe.vae_scale_factor == 8


def test_flux_dev_embeds_guidance_and_shifts_dynamically_schnell_neither(loaded, tiny_family_model):
    dev, schnell = loaded("flux-dev").transformer, loaded("flux-schnell").transformer
    assert dev.config.guidance_embeds is True and schnell.config.guidance_embeds is False
    assert type(dev.time_text_embed).__name__ == "CombinedTimestepGuidanceTextProjEmbeddings"
    assert type(schnell.time_text_embed).__name__ == "CombinedTimestepTextProjEmbeddings"
    common = {"base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}
    for family, shift, dynamic in [("flux-dev", 3.0, True), ("flux-schnell", 1.0, False)]:
        scheduler = saved_config(tiny_family_model(family), "scheduler")
        assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler"
        assert (scheduler["shift"], scheduler["use_dynamic_shifting"]) == (shift, dynamic)
        assert {k: scheduler[k] for k in common} == common


def test_pixart_sigma_learns_its_variance_and_keeps_pixart_sigmas_configuration(loaded, tiny_family_model):
    pipe, folder = loaded("pixart-sigma"), tiny_family_model("pixart-sigma")
    config = pipe.transformer.config
    assert (config.in_channels, config.out_channels) == (4, 8)  # epsilon and variance
    assert (config.sample_size, config.patch_size, config.norm_type) == (16, 2, "ada_norm_single")
    assert config.use_additional_conditions is False
    assert not hasattr(pipe.transformer.adaln_single.emb, "resolution_embedder")  # no size/aspect micro-conditions
    assert config.caption_channels == pipe.text_encoder.config.d_model
    assert config.cross_attention_dim == config.num_attention_heads * config.attention_head_dim
    vae = saved_config(folder, "vae")
    assert (vae["latent_channels"], vae["scaling_factor"], vae.get("shift_factor")) == (4, 0.13025, None)
    scheduler = saved_config(folder, "scheduler")
    expected = {
        "_class_name": "DPMSolverMultistepScheduler",
        "beta_schedule": "linear",
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "algorithm_type": "dpmsolver++",
        "solver_order": 2,
    }
    assert {k: scheduler[k] for k in expected} == expected


@pytest.mark.parametrize("family", list(TRANSFORMER_FAMILIES))
def test_weights_and_tokenizers_are_seeded(family, tmp_path):
    from safetensors.torch import load_file

    def build(seed: int, name: str) -> dict[str, dict[str, torch.Tensor] | bytes]:
        folder = build_tiny_model(tmp_path / name, seed=seed, family=family)
        files = sorted(folder.rglob("*.safetensors")) + sorted(folder.rglob("tokenizer.json"))
        return {
            str(p.relative_to(folder)): load_file(p) if p.suffix == ".safetensors" else p.read_bytes() for p in files
        }

    first, again, other = build(0, "a"), build(0, "b"), build(1, "c")
    assert first.keys() == again.keys() == other.keys()
    for name in first:
        if name.endswith(".safetensors"):
            assert first[name].keys() == again[name].keys()
            assert all(torch.equal(first[name][k], again[name][k]) for k in first[name]), name
            assert not all(torch.equal(first[name][k], other[name][k]) for k in first[name]), name
        else:
            assert first[name] == again[name] == other[name], name  # tokenizers do not depend on the seed


# The T5-style tokenizer.


def test_tokenizer_has_t5s_special_tokens_and_ids():
    tokenizer = t5_style_tokenizer()
    assert (tokenizer.pad_token, tokenizer.eos_token, tokenizer.unk_token) == ("<pad>", "</s>", "<unk>")
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer.bos_token is None and tokenizer.bos_token_id is None
    assert tokenizer.model_max_length == 512
    size = len(tokenizer)
    assert 500 < size < 4096
    sentinels = tokenizer.convert_ids_to_tokens(list(range(size - 8, size)))
    assert sentinels == [f"<extra_id_{i}>" for i in reversed(range(8))]  # <extra_id_0> last, as in T5
    assert tokenizer.convert_tokens_to_ids("▁") == 3
    assert tokenizer is t5_style_tokenizer()  # cached


@pytest.mark.parametrize("text", ["x", "road", "a photo of a cat", "Eiffel Tower", "<extra_id_0> sky"])
def test_every_text_ends_with_one_eos_and_no_bos(text):
    tokenizer = t5_style_tokenizer()
    ids = tokenizer(text).input_ids
    assert ids[-1] == 1 and ids.count(1) == 1
    assert ids[:-1] == tokenizer(text, add_special_tokens=False).input_ids
    assert 1 not in ids[:-1] and 0 not in ids


def test_padding_pads_with_id_0_and_masks_the_padding():
    batch = t5_style_tokenizer()(["a cat", "road and traffic light"], padding="max_length", max_length=8)
    for ids, mask in zip(batch.input_ids, batch.attention_mask, strict=True):
        length = ids.index(1) + 1
        assert ids[length:] == [0] * (8 - length)
        assert mask == [1] * length + [0] * (8 - length)


def test_words_get_t5s_word_prefix_and_training_words_are_one_piece():
    tokenizer = t5_style_tokenizer()
    assert tokenizer.convert_ids_to_tokens(tokenizer("road", add_special_tokens=False).input_ids) == ["▁road"]
    for word in training_words():
        pieces = tokenizer.convert_ids_to_tokens(tokenizer(word, add_special_tokens=False).input_ids)
        assert pieces == [f"▁{word}"], word
    for word in UNSEEN:
        pieces = tokenizer.convert_ids_to_tokens(tokenizer(word, add_special_tokens=False).input_ids)
        assert pieces[0].startswith("▁"), word
        assert "<unk>" not in pieces, word
        assert tokenizer.decode(tokenizer(word).input_ids, skip_special_tokens=True) == word


def test_training_words_cover_class_names_toy_world_and_filler():
    from maskdiffusion.toyworld.world import CLASS_NAMES, COLOURS, PATTERNS

    words = set(training_words())
    assert {"road", "traffic", "light", "and", "a", "the", "of", "photo"} <= words
    assert {word for name in class_words() for word in name.split()} <= words
    assert {word for name in [*CLASS_NAMES, *COLOURS, *PATTERNS] for word in name.split()} <= words
    vocab = t5_style_tokenizer().get_vocab()
    assert set("".join(words)) <= set(vocab)  # every training character is a piece


def test_words_tokenised_alone_and_joined_by_the_separator_give_the_joined_texts_ids():
    """What lets a prompt be built from each class's own ids: T5 splits at spaces before anything else."""
    tokenizer = t5_style_tokenizer()

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    names = class_words() + UNSEEN
    assert len(names) > 500
    separator = ids(" and ")
    assert separator == ids("and")
    generator = torch.Generator().manual_seed(0)
    groups = [names[i : i + 5] for i in range(0, len(names), 5)]
    groups += [[names[i] for i in torch.randperm(len(names), generator=generator)[:8].tolist()] for _ in range(100)]
    for group in groups:
        joined = [i for position, name in enumerate(group) for i in (separator if position else []) + ids(name)]
        assert joined == ids(" and ".join(group)), group


def test_vocabulary_is_the_same_in_fresh_processes():
    """The Unigram trainer's last bits (and hash order) change between processes; the vocabulary must not."""
    code = "import json; from maskdiffusion.t5_tokenizer import vocabulary; print(json.dumps(vocabulary()))"
    here = json.loads(json.dumps(vocabulary()))
    for seed in ("1", "2"):
        run = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        )
        assert json.loads(run.stdout) == here


@pytest.mark.parametrize("loader", ["T5TokenizerFast", "AutoTokenizer"])
def test_saved_tokenizer_loads_back_identically(loader, tmp_path):
    import transformers

    tokenizer = t5_style_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    again = getattr(transformers, loader).from_pretrained(tmp_path)
    assert type(again) is type(tokenizer)
    assert again.get_vocab() == tokenizer.get_vocab()
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    assert again.all_special_tokens == tokenizer.all_special_tokens
    assert (again.pad_token_id, again.eos_token_id, again.unk_token_id, again.bos_token_id) == (0, 1, 2, None)
    assert again.model_max_length == 512
    texts = ["road and traffic light", "Eiffel Tower  x", "a cat <extra_id_3> dog", *UNSEEN]
    assert (
        again(texts, padding="max_length", max_length=24).input_ids
        == tokenizer(texts, padding="max_length", max_length=24).input_ids
    )
