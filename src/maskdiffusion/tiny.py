"""Tiny Stable-Diffusion-shaped models with random weights, one per model family, for tests and the offline demo.

Each family keeps the topology of the real models it stands for (VAE factor 8, the real
CLIP tokenizer, the UNet's block layout, the scheduler configuration, the text encoders)
with a few channels per layer. The components are assembled into diffusers' own pipeline
and saved with its ``save_pretrained``, so a folder has exactly the layout a real
checkpoint has and loads through exactly the path real checkpoints take. The weights are
random: the models exercise the code, not segmentation quality, and their
``maskdiffusion.json`` says so (``"random_weights": true``) so results can warn about it.

Families (:data:`TINY_FAMILIES`):

- ``sd1``: SD 1.x (four levels, cross-attention on the first three and the mid block);
- ``sd2-v``: SD 2.x 768 (v-prediction, linear projections, heads per level, a wider
  GELU text encoder, ``"!"`` padding, a larger native size: 192 px against sd1's 128);
- ``three-level``: an SD-shaped UNet with three levels (no cross-attention at 1/64);
- ``no-mid``: a block-removed distilled UNet without a mid block (BK-SDM);
- ``sdxl``: SDXL (two text encoders, pooled text and size conditions added to the time
  embedding, cross-attention at 1/16 and 1/32 only, native 256 px);
- ``sd-turbo`` / ``sdxl-turbo``: SD-Turbo / SDXL-Turbo: their base model's shapes (SD 2.x
  base, SDXL) and what the hub snapshots of ``stabilityai/sd-turbo`` and
  ``stabilityai/sdxl-turbo`` hold besides: their scheduler configuration (Euler /
  Euler ancestral, epsilon, ``timestep_spacing="trailing"``), their model card's front
  matter and title (``README.md``) and, for SD-Turbo only, the ``_name_or_path`` its
  ``model_index.json`` carries (the converter's local folder). A download also sits in the
  hub cache under ``models--stabilityai--sd-turbo``: the hub id, not the folder, is what
  names it most reliably.

Transformer (DiT) families (:data:`TRANSFORMER_FAMILIES`, kept apart from the UNet ones above,
which are what maskdiffusion's segmenter reads), each with a T5 text encoder of width 64 and the
locally trained T5-style tokenizer (:mod:`maskdiffusion.t5_tokenizer`; T5's own vocabulary
cannot be downloaded here):

- ``sd3``: SD3 (``StableDiffusion3Pipeline``): an MMDiT (patch 2, 16 latent channels, four
  joint blocks, the last one ``context_pre_only``), CLIP-L-like and CLIP-G-like encoders with
  projections plus T5, the 16-channel VAE (shift and scaling factors, no quant convs) and the
  shift-3 flow-matching Euler schedule; native 128 px, position embeddings for up to 768 px;
- ``sd3.5``: SD3.5 (medium): SD3 with RMS-normed queries and keys and dual attention
  (a second self-attention) in the first blocks;
- ``flux-dev`` / ``flux-schnell``: FLUX.1 (``FluxPipeline``): double- then single-stream
  blocks over 2x2-packed latents (64 channels), rotary axes, CLIP-L (pooled) plus T5, FLUX's
  16-channel VAE (``sample_size`` 128 says the native size; the transformer has none); dev
  embeds the guidance scale and shifts its schedule by the image size, schnell does neither;
- ``pixart-sigma``: PixArt-Σ (``PixArtSigmaPipeline``): a DiT with adaLN-single, cross-attention
  to T5 (with its attention mask), learned variance (8 output channels), SDXL's VAE and
  DPM-Solver++ with linear betas; native 128 px.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .prompts import CLIP_CONTEXT, clip_tokenizer

SCALED_LINEAR_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "prediction_type": "epsilon",
}
SD_NOISE_SCHEDULE = {**SCALED_LINEAR_SCHEDULE, "clip_sample": False, "set_alpha_to_one": False}
SD2_V_SCHEDULE = {**SD_NOISE_SCHEDULE, "prediction_type": "v_prediction", "timestep_spacing": "leading"}
SDXL_SCHEDULE = {**SCALED_LINEAR_SCHEDULE, "timestep_spacing": "leading"}  # EulerDiscreteScheduler
TURBO_SCHEDULE = {**SCALED_LINEAR_SCHEDULE, "timestep_spacing": "trailing"}  # sd-turbo, sdxl-turbo
SD2_PAD_TOKEN = "!"  # OpenCLIP's tokenizer (SD 2.x, SDXL's tokenizer_2) pads with "!", CLIP's with <|endoftext|>
# Flow-matching schedules of the hub snapshots (stabilityai/stable-diffusion-3-medium-diffusers and 3.5-medium;
# black-forest-labs/FLUX.1-dev, FLUX.1-schnell), and the default DPM-Solver++ PixArt-Σ's converter saves.
SD3_SCHEDULE = {"num_train_timesteps": 1000, "shift": 3.0}
FLUX_DEV_SCHEDULE = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
FLUX_SCHNELL_SCHEDULE = {**FLUX_DEV_SCHEDULE, "shift": 1.0, "use_dynamic_shifting": False}
PIXART_SIGMA_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
    "algorithm_type": "dpmsolver++",
    "solver_order": 2,
    "solver_type": "midpoint",
    "lower_order_final": True,
    "timestep_spacing": "linspace",
    "steps_offset": 0,
}
# The 16-channel VAEs' latent statistics: latents = (mean - shift_factor) * scaling_factor.
SD3_VAE = {"scaling_factor": 1.5305, "shift_factor": 0.0609}
FLUX_VAE = {"scaling_factor": 0.3611, "shift_factor": 0.1159}
T5_WIDTH = 64  # the tiny T5 encoder's d_model (T5-XXL's is 4096), the transformers' joint_attention_dim

# stabilityai/sd-turbo's model_index.json (616 bytes, diffusers 0.24.0.dev0) names the folder it was converted in;
# stabilityai/sdxl-turbo's (685 bytes) has no _name_or_path.
SD_TURBO_NAME_OR_PATH = "/home/patrick/sd-turbo/"
SD_TURBO_CARD = "---\npipeline_tag: text-to-image\ninference: false\n---\n\n# SD-Turbo Model Card\n"
SDXL_TURBO_CARD = (
    "---\npipeline_tag: text-to-image\ninference: false\nlicense: other\nlicense_name: sai-nc-community\n"
    "license_link: https://huggingface.co/stabilityai/sdxl-turbo/blob/main/LICENSE.md\n---\n\n"
    "# SDXL-Turbo Model Card\n"
)


def save_model_index(folder: Path, *, text_encoder: str = "CLIPTextModel") -> None:
    """Write ``model_index.json`` so diffusers' StableDiffusionPipeline can load the folder too."""
    import diffusers

    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "vae": ["diffusers", "AutoencoderKL"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", text_encoder],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def _unet(**changes):
    """The sd1 tiny UNet (four levels, 32-64 channels, 16x16 latents = 128 px), with ``changes``."""
    from diffusers import UNet2DConditionModel

    config = {
        "sample_size": 16,
        "block_out_channels": (32, 32, 64, 64),
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "cross_attention_dim": 32,
        "attention_head_dim": 8,
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    }
    return UNet2DConditionModel(**{**config, **changes})


def _sd2_unet(**changes):
    """SD 2.x's UNet options: linear projections in the transformers, a head count per level."""
    return _unet(cross_attention_dim=48, attention_head_dim=(2, 2, 4, 4), use_linear_projection=True, **changes)


def _sdxl_unet(*, text_width: int, pooled_width: int, **changes):
    """SDXL's UNet: three levels, no cross-attention at the finest, pooled text + 6 size ids added to the time."""
    time_ids_width = 8
    return _unet(
        sample_size=32,
        block_out_channels=(32, 32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 2, 4),
        use_linear_projection=True,
        cross_attention_dim=text_width,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_ids_width,
        projection_class_embeddings_input_dim=6 * time_ids_width + pooled_width,
        **changes,
    )


def _vae(scaling_factor: float = 0.18215, **changes):
    """A factor-8 VAE (four levels) with 16-32 channels, 4 latent channels unless ``changes`` say otherwise."""
    from diffusers import AutoencoderKL

    config = {
        "block_out_channels": (16, 16, 32, 32),
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "layers_per_block": 1,
        "sample_size": 128,
        "scaling_factor": scaling_factor,
    }
    return AutoencoderKL(**{**config, **changes})


def _flow_vae(scaling_factor: float, shift_factor: float):
    """SD3's and FLUX's VAE: 16 latent channels, latents shifted before scaling, no 1x1 quant convs."""
    return _vae(
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        latent_channels=16,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def _tokenizer(pad_token: str | None = None):
    """A copy of the bundled CLIP tokenizer (the cached one is shared), optionally with another pad token."""
    tokenizer = copy.deepcopy(clip_tokenizer())
    if pad_token is not None:
        tokenizer.pad_token = pad_token
    return tokenizer


def _text_encoder(width: int, *, hidden_act: str = "quick_gelu", projection_dim: int | None = None):
    """A two-layer CLIP text encoder over the full CLIP vocabulary; with ``projection_dim``, one with a projection."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = clip_tokenizer()
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=2,
        hidden_act=hidden_act,
        max_position_embeddings=CLIP_CONTEXT,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=projection_dim or width,
    )
    return CLIPTextModel(config) if projection_dim is None else CLIPTextModelWithProjection(config)


def _t5_tokenizer():
    """A copy of the T5-style tokenizer (the cached one is shared)."""
    from .t5_tokenizer import t5_style_tokenizer

    return copy.deepcopy(t5_style_tokenizer())


def _t5_encoder():
    """A two-layer T5 v1.1 encoder (gated GELU, as SD3's, FLUX's and PixArt's T5-XXL) of width 64.

    Its embedding table is padded to a multiple of 128 rows, as T5's is (32,128 rows for 32,100 tokens).
    """
    from transformers import T5Config, T5EncoderModel

    tokenizer = _t5_tokenizer()
    config = T5Config(
        vocab_size=-(-len(tokenizer) // 128) * 128,
        d_model=T5_WIDTH,
        d_kv=16,
        d_ff=2 * T5_WIDTH,
        num_layers=2,
        num_heads=T5_WIDTH // 16,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config)


def _sd_pipeline(unet, text_encoder, tokenizer, scheduler):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=_vae(),
        unet=unet,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _sd1():
    from diffusers import DDIMScheduler

    return _sd_pipeline(_unet(), _text_encoder(32), _tokenizer(), DDIMScheduler(**SD_NOISE_SCHEDULE))


def _sd2_v():
    from diffusers import DDIMScheduler

    return _sd_pipeline(
        _sd2_unet(sample_size=24, upcast_attention=True),
        _text_encoder(48, hidden_act="gelu"),
        _tokenizer(SD2_PAD_TOKEN),
        DDIMScheduler(**SD2_V_SCHEDULE),
    )


def _three_level():
    from diffusers import DDIMScheduler

    unet = _unet(
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    return _sd_pipeline(unet, _text_encoder(32), _tokenizer(), DDIMScheduler(**SD_NOISE_SCHEDULE))


def _no_mid():
    from diffusers import DDIMScheduler

    return _sd_pipeline(_unet(mid_block_type=None), _text_encoder(32), _tokenizer(), DDIMScheduler(**SD_NOISE_SCHEDULE))


def _sd_turbo():
    from diffusers import EulerDiscreteScheduler

    return _sd_pipeline(
        _sd2_unet(),
        _text_encoder(48, hidden_act="gelu"),
        _tokenizer(SD2_PAD_TOKEN),
        EulerDiscreteScheduler(**TURBO_SCHEDULE),
    )


def _sdxl_pipeline(scheduler):
    """SDXL: CLIP ViT-L-like and OpenCLIP bigG-like encoders; the UNet reads both penultimate states, concatenated."""
    from diffusers import StableDiffusionXLPipeline

    width, width_2, pooled = 16, 32, 16
    return StableDiffusionXLPipeline(
        vae=_vae(scaling_factor=0.13025, force_upcast=True),
        text_encoder=_text_encoder(width),
        text_encoder_2=_text_encoder(width_2, hidden_act="gelu", projection_dim=pooled),
        tokenizer=_tokenizer(),
        tokenizer_2=_tokenizer(SD2_PAD_TOKEN),
        unet=_sdxl_unet(text_width=width + width_2, pooled_width=pooled),
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def _sdxl():
    from diffusers import EulerDiscreteScheduler

    return _sdxl_pipeline(EulerDiscreteScheduler(**SDXL_SCHEDULE))


def _sdxl_turbo():
    from diffusers import EulerAncestralDiscreteScheduler

    return _sdxl_pipeline(EulerAncestralDiscreteScheduler(**TURBO_SCHEDULE))


def _sd3(**transformer_changes):
    """SD3: CLIP-L-like and CLIP-G-like encoders (pooled outputs concatenated) and T5, one MMDiT over all three.

    The pipeline pads the two CLIP encoders' concatenated hidden states (16 + 32) to T5's width
    (64) and appends T5's states along the sequence: ``joint_attention_dim`` is T5's width.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    width, width_2 = 16, 32
    heads, head_dim = 4, 8
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=4,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=T5_WIDTH,
        caption_projection_dim=heads * head_dim,
        pooled_projection_dim=width + width_2,
        pos_embed_max_size=48,
        **transformer_changes,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULE),
        vae=_flow_vae(**SD3_VAE),
        text_encoder=_text_encoder(width, projection_dim=width),
        tokenizer=_tokenizer(),
        text_encoder_2=_text_encoder(width_2, hidden_act="gelu", projection_dim=width_2),
        tokenizer_2=_tokenizer(SD2_PAD_TOKEN),
        text_encoder_3=_t5_encoder(),
        tokenizer_3=_t5_tokenizer(),
    )


def _sd35():
    """SD3.5 (medium): SD3 with RMS-normed queries and keys and dual attention in the first blocks (0-12 of 24)."""
    return _sd3(qk_norm="rms_norm", dual_attention_layers=(0, 1))


def _flux(*, guidance_embeds: bool, schedule: dict):
    """FLUX.1: CLIP-L (pooled only) and T5, double-stream then single-stream blocks over 2x2-packed latents."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    clip_width = 32
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16 * 2 * 2,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=T5_WIDTH,
        pooled_projection_dim=clip_width,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    )
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**schedule),
        vae=_flow_vae(**FLUX_VAE),
        text_encoder=_text_encoder(clip_width),
        tokenizer=_tokenizer(),
        text_encoder_2=_t5_encoder(),
        tokenizer_2=_t5_tokenizer(),
        transformer=transformer,
    )


def _flux_dev():
    return _flux(guidance_embeds=True, schedule=FLUX_DEV_SCHEDULE)


def _flux_schnell():
    return _flux(guidance_embeds=False, schedule=FLUX_SCHNELL_SCHEDULE)


def _pixart_sigma():
    """PixArt-Σ: a DiT with cross-attention to T5 (masked), learned variance (8 output channels), SDXL's VAE."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    heads, head_dim = 2, 16
    transformer = PixArtTransformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        out_channels=8,
        num_layers=4,
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        cross_attention_dim=heads * head_dim,
        caption_channels=T5_WIDTH,
        norm_type="ada_norm_single",
        use_additional_conditions=False,
    )
    return PixArtSigmaPipeline(
        tokenizer=_t5_tokenizer(),
        text_encoder=_t5_encoder(),
        vae=_vae(scaling_factor=0.13025, force_upcast=True),
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(**PIXART_SIGMA_SCHEDULE),
    )


@dataclass(frozen=True)
class TinyFamily:
    """How to build one family's tiny pipeline, and what its folder says about itself besides the weights.

    Attributes:
        build: makes the pipeline (random weights from the current torch seed).
        name_or_path: ``_name_or_path`` in ``model_index.json``, as the real snapshot's file has it.
        card: ``README.md`` (the model card's front matter and title, as the hub snapshot has).
    """

    build: Callable[[], object]
    name_or_path: str | None = None
    card: str | None = None


TINY_FAMILIES: dict[str, TinyFamily] = {
    "sd1": TinyFamily(_sd1),
    "sd2-v": TinyFamily(_sd2_v),
    "three-level": TinyFamily(_three_level),
    "no-mid": TinyFamily(_no_mid),
    "sdxl": TinyFamily(_sdxl),
    "sd-turbo": TinyFamily(_sd_turbo, name_or_path=SD_TURBO_NAME_OR_PATH, card=SD_TURBO_CARD),
    "sdxl-turbo": TinyFamily(_sdxl_turbo, card=SDXL_TURBO_CARD),
}
# Transformer (DiT) families: kept apart from the UNet families above, which maskdiffusion's segmenter reads.
TRANSFORMER_FAMILIES: dict[str, TinyFamily] = {
    "sd3": TinyFamily(_sd3),
    "sd3.5": TinyFamily(_sd35),
    "flux-dev": TinyFamily(_flux_dev),
    "flux-schnell": TinyFamily(_flux_schnell),
    "pixart-sigma": TinyFamily(_pixart_sigma),
}


def build_tiny_model(folder: str | os.PathLike, *, seed: int = 0, family: str = "sd1") -> Path:
    """Build the tiny random model of ``family`` (in :data:`TINY_FAMILIES` or :data:`TRANSFORMER_FAMILIES`) into
    ``folder`` (created; replaced atomically) and return it."""
    families = {**TINY_FAMILIES, **TRANSFORMER_FAMILIES}
    if family not in families:
        raise ValueError(f"unknown tiny model family {family!r}: choose one of {', '.join(families)}")
    kind = families[family]
    folder = Path(folder)
    torch.manual_seed(seed)
    pipe = kind.build()
    if kind.name_or_path is not None:
        pipe.register_to_config(_name_or_path=kind.name_or_path)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=folder.parent))
    try:
        pipe.save_pretrained(staging, safe_serialization=True)
        if kind.card is not None:
            (staging / "README.md").write_text(kind.card)
        mark_random_weights(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if folder.exists():
        shutil.rmtree(folder)
    staging.rename(folder)
    return folder


def build_tiny_encoder(
    folder: str | os.PathLike,
    *,
    latent_channels: int = 4,
    scaling_factor: float = 1.0,
    shift_factor: float = 0.0,
    seed: int = 0,
) -> Path:
    """A tiny random ``AutoencoderTiny`` (TAESD's layout: factor 8, four encoder levels of 8 channels) saved by
    its own ``save_pretrained``, for tests of ``encoder="tiny"``; TAESD's own factors are scaling 1, shift 0."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    encoder = AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
        latent_channels=latent_channels,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    )
    folder = Path(folder)
    encoder.save_pretrained(folder, safe_serialization=True)
    return folder


def mark_random_weights(folder: Path) -> None:
    """Set ``"random_weights": true`` in the folder's ``maskdiffusion.json`` (created if absent; other keys kept)."""
    from .files import write_json
    from .model_card import SETTINGS_FILE, read_settings

    write_json(folder / SETTINGS_FILE, {**read_settings(folder), "random_weights": True})


def cache_dir() -> Path:
    """Where maskdiffusion keeps what it builds (``$MASKDIFFUSION_CACHE`` or ``~/.cache/maskdiffusion``)."""
    root = os.environ.get("MASKDIFFUSION_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "maskdiffusion"


def tiny_model_path() -> Path:
    """The tiny random model in the cache, built on first use.

    A cache built before models carried a card gets ``"random_weights": true`` added; one
    whose settings file cannot be read is built again.
    """
    from .model_card import model_card

    folder = cache_dir() / "tiny-random-sd"
    if not (folder / "model_index.json").exists():
        return build_tiny_model(folder)
    try:
        marked = model_card(folder).random_weights
    except ValueError:
        return build_tiny_model(folder)
    if not marked:
        mark_random_weights(folder)
    return folder
