"""A tiny Stable-Diffusion-shaped model with random weights, for tests and the offline demo.

Same topology as SD 1.x (factor-8 VAE, four UNet levels with cross-attention on the
first three and the mid block, CLIP text encoder, the real CLIP tokenizer), with a few
channels per layer, saved in the diffusers folder layout so it loads through exactly
the path real checkpoints take. Its weights are random: it exercises the code, not
segmentation quality, and its ``maskdiffusion.json`` says so (``"random_weights": true``)
so results can warn about it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from .prompts import CLIP_CONTEXT, clip_tokenizer

SD_NOISE_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


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


def build_tiny_model(folder: str | os.PathLike, *, seed: int = 0) -> Path:
    """Build the tiny random model into ``folder`` (created; replaced atomically) and return it."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    torch.manual_seed(seed)
    tokenizer = clip_tokenizer()
    width = 32
    unet = UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=width,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=128,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=width,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=CLIP_CONTEXT,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=folder.parent))
    unet.save_pretrained(staging / "unet")
    vae.save_pretrained(staging / "vae")
    text_encoder.save_pretrained(staging / "text_encoder")
    tokenizer.save_pretrained(staging / "tokenizer")
    DDIMScheduler(**SD_NOISE_SCHEDULE).save_pretrained(staging / "scheduler")
    save_model_index(staging)
    mark_random_weights(staging)
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    staging.rename(folder)
    return folder


def mark_random_weights(folder: Path) -> None:
    """Set ``"random_weights": true`` in the folder's ``maskdiffusion.json`` (created if absent; other keys kept)."""
    from .files import write_json
    from .loading import SETTINGS_FILE, read_settings

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
    from .loading import model_card

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
