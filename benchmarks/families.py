"""Seconds and peak memory per view for every model family at its native size, on the CPU.

For each family of :data:`maskdiffusion.families.FAMILIES` a diffusers folder is built with
random weights in the shapes of the family's reference checkpoint (fixed seed, in the dtype
measured, one component at a time: one copy of the largest in memory), saved as safetensors in
a temporary folder and loaded by ``MaskDiffusion.from_pretrained`` in a fresh process, which
segments one random image of exactly native x native pixels with 10 classes and the ``default``
preset (warm-up, then the median of ``--repeats`` calls, latent cache off so every call encodes
its view). Each family builds and measures in processes of its own, so the peak resident set
(``ru_maxrss``) is that family's alone; the measuring process cannot take more than the memory
this machine had free (``RLIMIT_DATA``), so a misjudged family fails instead of pushing the
machine out of memory. Forward hooks time the text encoders (T5 per layer), the VAE encoder and
every denoiser block inside the calls.

A family whose weights (parameters and buffers, in the dtype measured) plus a view's activations
would not fit in ``--max-gib`` (24) GiB, or in the memory this machine has free, is built smaller,
and the results say how and why: first without an optional text encoder (SD3's T5: its pipeline
and maskdiffusion's backbone put zeros of T5's shape in its place, so the transformer's per-view
work is identical), then with its T5 encoders cut to :data:`T5_LAYERS` layers of the real width,
then, for FLUX, as a depth-reduced copy at true width (:data:`DEPTH_CUTS`: 4 double-stream and 2
single-stream blocks, so ``auto`` still chooses 4 concept blocks), whose measured per-block and
per-layer seconds extrapolate the real model's default pass (every block up to the last one
``auto`` chose) and its full pass (every block). A family that does not fit even so is skipped.

    python benchmarks/families.py                      # every family: ~80 min on 2 cores (transformers ~55)
    python benchmarks/families.py --families sd1 sdxl  # some of them
    python benchmarks/families.py --families sd3 --dtypes bfloat16

Writes ``benchmarks/results/families-cpu.md`` (rows of families not measured in a run are kept).

The shapes come from the checkpoints' own configuration files (``unet/config.json`` or
``transformer/config.json``, ``text_encoder*/config.json``, ``vae/config.json``,
``scheduler/scheduler_config.json``):

- sd1, ``stable-diffusion-v1-5/stable-diffusion-v1-5``: UNet 320/640/1280/1280, 2 layers per
  block, 8 heads, cross-attention 768, sample 64; CLIP ViT-L/14 text encoder (12 layers, 768
  wide, MLP 3072, 12 heads, quick GELU); VAE 128/256/512/512, scaling 0.18215.
- sd2, ``stabilityai/stable-diffusion-2-1-base``: the UNet with heads of 64 channels
  (``attention_head_dim`` [5, 10, 20, 20]), linear projections, cross-attention 1024, sample 64;
  OpenCLIP ViT-H text encoder (23 layers, 1024 wide, MLP 4096, 16 heads, GELU, "!" padding).
- sd2-v, ``stabilityai/stable-diffusion-2-1``: sd2's shapes with sample 96 (768 px),
  ``upcast_attention``, a DDIM scheduler with ``prediction_type="v_prediction"``.
- sdxl, ``stabilityai/stable-diffusion-xl-base-1.0``: UNet 320/640/1280 (no cross-attention at
  the finest level), ``transformer_layers_per_block`` [1, 2, 10], heads [5, 10, 20],
  cross-attention 2048, ``addition_embed_type="text_time"``, ``addition_time_embed_dim`` 256,
  ``projection_class_embeddings_input_dim`` 2816, sample 128; CLIP ViT-L plus OpenCLIP ViT-bigG
  with projection (32 layers, 1280 wide, MLP 5120, 20 heads, projection 1280); VAE scaling 0.13025.
- distilled, ``nota-ai/bk-sdm-small``: sd1's UNet with ``layers_per_block`` 1 and
  ``mid_block_type`` null (Nota-NetsPresso/BK-SDM ``src/unet_config/bk_small/config.json``).
- sd-turbo, ``stabilityai/sd-turbo``: sd2's shapes (its hub ``unet/config.json``: heads [5, 10, 20,
  20], cross-attention 1024), an Euler scheduler with ``timestep_spacing="trailing"``.
- sdxl-turbo, ``stabilityai/sdxl-turbo``: sdxl's shapes at sample 64 (512 px, the model card's
  resolution), Euler ancestral, ``timestep_spacing="trailing"`` (its ``scheduler_config.json``).

The transformer families' configurations are written from memory of the hub snapshots' files
(not fetched here: no hub access); their parameter counts reproduce the published totals
exactly (tests/test_bench_families.py says which and where from):

- sd3, ``stabilityai/stable-diffusion-3-medium-diffusers``: ``SD3Transformer2DModel`` sample 128,
  patch 2, in/out 16, 24 layers, 24 heads x 64, ``joint_attention_dim`` 4096,
  ``caption_projection_dim`` 1536, ``pooled_projection_dim`` 2048, ``pos_embed_max_size`` 192;
  VAE 128/256/512/512 with 16 latent channels, scaling 1.5305, shift 0.0609, no quant convs;
  CLIP ViT-L with projection (768) + OpenCLIP bigG with projection (1280, "!" padding);
  T5-v1.1-XXL encoder (``d_model`` 4096, ``d_kv`` 64, ``d_ff`` 10240, 24 layers, 64 heads,
  gated GELU, vocabulary 32128); FlowMatchEulerDiscreteScheduler, shift 3.0.
- sd3.5, ``stabilityai/stable-diffusion-3.5-medium``: sd3's shapes with ``dual_attention_layers``
  0..12, ``qk_norm="rms_norm"``, ``pos_embed_max_size`` 384 (same encoders, VAE and scheduler).
- flux-dev / flux-schnell, ``black-forest-labs/FLUX.1-dev`` / ``FLUX.1-schnell``:
  ``FluxTransformer2DModel`` patch 1, ``in_channels`` 64, 19 double-stream + 38 single-stream
  blocks, 24 heads x 128, ``joint_attention_dim`` 4096, ``pooled_projection_dim`` 768,
  ``axes_dims_rope`` (16, 56, 56), ``guidance_embeds`` true / false; sd3's VAE layout with
  scaling 0.3611, shift 0.1159, sample 1024 (the native size: the transformer has none); CLIP
  ViT-L without projection + T5-v1.1-XXL; flow matching with dynamic shift (dev) / shift 1 (schnell).
- pixart-sigma, ``PixArt-alpha/PixArt-Sigma-XL-2-1024-MS``: ``PixArtTransformer2DModel`` 28
  layers, 16 heads x 72, ``cross_attention_dim`` 1152, ``caption_channels`` 4096, sample 128,
  patch 2, in 4 / out 8, ``norm_type="ada_norm_single"``, ``use_additional_conditions`` false,
  ``interpolation_scale`` 2, GELU (tanh), attention bias, no elementwise norm affine; the SDXL
  VAE (scaling 0.13025); T5-v1.1-XXL encoder; DPMSolverMultistepScheduler, linear betas 1e-4..0.02.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import inspect
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from maskdiffusion.families import FAMILIES, native_size
from maskdiffusion.tiny import (
    FLUX_DEV_SCHEDULE,
    FLUX_SCHNELL_SCHEDULE,
    FLUX_VAE,
    PIXART_SIGMA_SCHEDULE,
    SD2_PAD_TOKEN,
    SD2_V_SCHEDULE,
    SD3_SCHEDULE,
    SD3_VAE,
    SD_NOISE_SCHEDULE,
    SDXL_SCHEDULE,
    TURBO_SCHEDULE,
)

CLASSES = "road, sidewalk, building, wall, fence, pole, traffic light, vegetation, sky, car"
GIB = 2**30
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ACTIVATIONS_1024 = 3 * GIB  # a 1024-pixel view's activations above the weights (SDXL float32: 2.8 GiB)
T5_LAYERS = 2  # T5 encoders that do not fit are cut to this many layers of the real width
# Depth-reduced copies of denoisers that do not fit: FLUX keeps 4 double-stream blocks (auto takes the last 4)
DEPTH_CUTS = {"FluxTransformer2DModel": {"num_layers": 4, "num_single_layers": 2}}

SD15_UNET = {
    "sample_size": 64,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
SD21_UNET = {
    **SD15_UNET,
    "cross_attention_dim": 1024,
    "attention_head_dim": (5, 10, 20, 20),
    "use_linear_projection": True,
}
SDXL_UNET = {
    "sample_size": 128,
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "use_linear_projection": True,
    "cross_attention_dim": 2048,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
}
SD3_TRANSFORMER = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 192,
}
SD35_MEDIUM_TRANSFORMER = {
    **SD3_TRANSFORMER,
    "pos_embed_max_size": 384,
    "qk_norm": "rms_norm",
    "dual_attention_layers": tuple(range(13)),
}
FLUX_TRANSFORMER = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
PIXART_SIGMA_TRANSFORMER = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 4,
    "out_channels": 8,
    "num_layers": 28,
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "cross_attention_dim": 1152,
    "caption_channels": 4096,
    "norm_type": "ada_norm_single",
    "use_additional_conditions": False,
    "interpolation_scale": 2,
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "num_embeds_ada_norm": 1000,
}
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
          "hidden_act": "quick_gelu", "projection_dim": 768}  # fmt: skip
OPENCLIP_H = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23, "num_attention_heads": 16,
              "hidden_act": "gelu", "projection_dim": 512}  # fmt: skip
OPENCLIP_BIGG = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
                 "hidden_act": "gelu", "projection_dim": 1280}  # fmt: skip
T5_XXL = {"vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
          "feed_forward_proj": "gated-gelu"}  # fmt: skip
SD_VAE = {
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
SDXL_VAE = {**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
FLOW_VAE = {**SDXL_VAE, "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False}
SD3_FLOW_VAE = {**FLOW_VAE, **SD3_VAE}
FLUX_FLOW_VAE = {**FLOW_VAE, **FLUX_VAE}


@dataclass(frozen=True)
class TextEncoder:
    """One text encoder (and its tokenizer) of a checkpoint.

    ``kind``: ``clip`` (``CLIPTextModel``), ``clip-projection`` (``CLIPTextModelWithProjection``)
    or ``t5`` (``T5EncoderModel``, with maskdiffusion's T5-style tokenizer: T5's own vocabulary
    cannot be downloaded here, the embedding table keeps T5's 32128 rows); ``pad_token``: a CLIP
    tokenizer's pad token where it is not CLIP's (OpenCLIP pads with "!").
    """

    label: str
    config: dict
    kind: str = "clip"
    pad_token: str | None = None

    @property
    def layers(self) -> int:
        return self.config["num_layers" if self.kind == "t5" else "num_hidden_layers"]

    def cut(self, layers: int) -> TextEncoder:
        key = "num_layers" if self.kind == "t5" else "num_hidden_layers"
        return dataclasses.replace(self, config={**self.config, key: layers})

    def tokenizer(self):
        if self.kind == "t5":
            from maskdiffusion.t5_tokenizer import t5_style_tokenizer

            return copy.deepcopy(t5_style_tokenizer())
        return _tokenizer(self.pad_token)

    def build(self) -> torch.nn.Module:
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

        from maskdiffusion.prompts import CLIP_CONTEXT, clip_tokenizer

        if self.kind == "t5":
            tokenizer = self.tokenizer()
            ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
            return T5EncoderModel(T5Config(**self.config, **ids, decoder_start_token_id=tokenizer.pad_token_id))
        tokenizer = clip_tokenizer()
        config = CLIPTextConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=CLIP_CONTEXT,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **self.config,
        )
        return CLIPTextModelWithProjection(config) if self.kind == "clip-projection" else CLIPTextModel(config)


CLIP_L_TEXT = TextEncoder("CLIP-L", CLIP_L)
CLIP_L_PROJECTION = TextEncoder("CLIP-L", CLIP_L, "clip-projection")
OPENCLIP_H_TEXT = TextEncoder("OpenCLIP-H", OPENCLIP_H, pad_token=SD2_PAD_TOKEN)
OPENCLIP_BIGG_PROJECTION = TextEncoder("OpenCLIP-bigG", OPENCLIP_BIGG, "clip-projection", SD2_PAD_TOKEN)
T5_XXL_TEXT = TextEncoder("T5-XXL", T5_XXL, "t5")
SD_OPTIONS = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
SDXL_OPTIONS = {"force_zeros_for_empty_prompt": True, "add_watermarker": False}


@dataclass(frozen=True)
class Shapes:
    """One family's reference checkpoint: its hub id, pipeline and the configurations its components are built from.

    ``denoiser``: the diffusers class of ``unet/`` or ``transformer/`` and ``config`` its
    configuration; ``text_encoders``: part name (``text_encoder``, ``text_encoder_2``, ...) ->
    encoder, each with the tokenizer of the same number; ``options``: the pipeline's other arguments.
    """

    hub_id: str
    pipeline: str
    denoiser: str
    config: dict
    text_encoders: dict[str, TextEncoder]
    scheduler: tuple[str, dict]
    vae: dict = field(default_factory=lambda: SD_VAE)
    options: dict = field(default_factory=dict)

    @property
    def denoiser_part(self) -> str:
        return "unet" if self.denoiser == "UNet2DConditionModel" else "transformer"

    @property
    def native_size(self) -> int:
        return native_size(self.config, self.vae)

    @property
    def transformer(self) -> bool:
        return self.denoiser_part == "transformer"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, values: dict) -> Shapes:
        encoders = {part: TextEncoder(**encoder) for part, encoder in values["text_encoders"].items()}
        return cls(**{**values, "text_encoders": encoders, "scheduler": tuple(values["scheduler"])})


def _sd(hub_id: str, unet: dict, text: TextEncoder, scheduler: tuple[str, dict], **changes) -> Shapes:
    """An SD 1.x / 2.x checkpoint (one text encoder)."""
    return Shapes(
        hub_id, "StableDiffusionPipeline", "UNet2DConditionModel", unet, {"text_encoder": text}, scheduler,
        options=SD_OPTIONS, **changes,
    )  # fmt: skip


def _sdxl(hub_id: str, unet: dict, scheduler: tuple[str, dict]) -> Shapes:
    texts = {"text_encoder": CLIP_L_TEXT, "text_encoder_2": OPENCLIP_BIGG_PROJECTION}
    return Shapes(
        hub_id, "StableDiffusionXLPipeline", "UNet2DConditionModel", unet, texts, scheduler, SDXL_VAE, SDXL_OPTIONS
    )


def _sd3(hub_id: str, transformer: dict) -> Shapes:
    texts = {
        "text_encoder": CLIP_L_PROJECTION,
        "text_encoder_2": OPENCLIP_BIGG_PROJECTION,
        "text_encoder_3": T5_XXL_TEXT,
    }
    scheduler = ("FlowMatchEulerDiscreteScheduler", SD3_SCHEDULE)
    return Shapes(
        hub_id, "StableDiffusion3Pipeline", "SD3Transformer2DModel", transformer, texts, scheduler, SD3_FLOW_VAE
    )


def _flux(hub_id: str, guidance: bool, schedule: dict) -> Shapes:
    config = {**FLUX_TRANSFORMER, "guidance_embeds": guidance}
    texts = {"text_encoder": CLIP_L_TEXT, "text_encoder_2": T5_XXL_TEXT}
    scheduler = ("FlowMatchEulerDiscreteScheduler", schedule)
    return Shapes(hub_id, "FluxPipeline", "FluxTransformer2DModel", config, texts, scheduler, FLUX_FLOW_VAE)


SHAPES: dict[str, Shapes] = {
    "sd1": _sd(
        "stable-diffusion-v1-5/stable-diffusion-v1-5", SD15_UNET, CLIP_L_TEXT, ("DDIMScheduler", SD_NOISE_SCHEDULE)
    ),
    "sd2": _sd(
        "stabilityai/stable-diffusion-2-1-base", SD21_UNET, OPENCLIP_H_TEXT, ("DDIMScheduler", SD_NOISE_SCHEDULE)
    ),
    "sd2-v": _sd(
        "stabilityai/stable-diffusion-2-1",
        {**SD21_UNET, "sample_size": 96, "upcast_attention": True},
        OPENCLIP_H_TEXT,
        ("DDIMScheduler", SD2_V_SCHEDULE),
        vae={**SD_VAE, "sample_size": 768},
    ),
    "sdxl": _sdxl("stabilityai/stable-diffusion-xl-base-1.0", SDXL_UNET, ("EulerDiscreteScheduler", SDXL_SCHEDULE)),
    "distilled": _sd(
        "nota-ai/bk-sdm-small",
        {**SD15_UNET, "layers_per_block": 1, "mid_block_type": None},
        CLIP_L_TEXT,
        ("DDIMScheduler", SD_NOISE_SCHEDULE),
    ),
    "sd-turbo": _sd("stabilityai/sd-turbo", SD21_UNET, OPENCLIP_H_TEXT, ("EulerDiscreteScheduler", TURBO_SCHEDULE)),
    "sdxl-turbo": _sdxl(
        "stabilityai/sdxl-turbo", {**SDXL_UNET, "sample_size": 64}, ("EulerAncestralDiscreteScheduler", TURBO_SCHEDULE)
    ),
    "sd3": _sd3("stabilityai/stable-diffusion-3-medium-diffusers", SD3_TRANSFORMER),
    "sd3.5": _sd3("stabilityai/stable-diffusion-3.5-medium", SD35_MEDIUM_TRANSFORMER),
    "flux-dev": _flux("black-forest-labs/FLUX.1-dev", True, FLUX_DEV_SCHEDULE),
    "flux-schnell": _flux("black-forest-labs/FLUX.1-schnell", False, FLUX_SCHNELL_SCHEDULE),
    "pixart-sigma": Shapes(
        "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS",
        "PixArtSigmaPipeline",
        "PixArtTransformer2DModel",
        PIXART_SIGMA_TRANSFORMER,
        {"text_encoder": T5_XXL_TEXT},
        ("DPMSolverMultistepScheduler", PIXART_SIGMA_SCHEDULE),
        SDXL_VAE,
    ),
}


def _tokenizer(pad_token: str | None = None):
    from maskdiffusion.prompts import clip_tokenizer

    tokenizer = copy.deepcopy(clip_tokenizer())
    if pad_token is not None:
        tokenizer.pad_token = pad_token
    return tokenizer


def _tokenizer_part(part: str) -> str:
    return part.replace("text_encoder", "tokenizer")


def module_builders(shapes: Shapes) -> dict[str, partial]:
    """Part name -> a function making that weighted component (denoiser, VAE, text encoders) from the torch seed."""
    import diffusers

    builders = {
        shapes.denoiser_part: partial(getattr(diffusers, shapes.denoiser), **shapes.config),
        "vae": partial(diffusers.AutoencoderKL, **shapes.vae),
    }
    return {**builders, **{part: encoder.build for part, encoder in shapes.text_encoders.items()}}


def build_modules(shapes: Shapes) -> dict[str, torch.nn.Module]:
    """The weighted components with random float32 weights from the torch seed.

    Under ``with torch.device("meta")`` nothing is allocated (for counting parameters).
    """
    return {part: build() for part, build in module_builders(shapes).items()}


@functools.cache
def _counts_of(shapes_json: str) -> dict[str, tuple[int, int]]:
    """Part -> (parameters, floating-point buffer values) of the shapes given as JSON, counted on the meta device."""
    counts = {}
    with torch.device("meta"):
        for part, build in module_builders(Shapes.from_json(json.loads(shapes_json))).items():
            module = build()
            buffers = sum(b.numel() for b in module.buffers() if b.is_floating_point())
            counts[part] = (sum(p.numel() for p in module.parameters()), buffers)
    return counts


def _counts(shapes: Shapes, buffers: bool) -> dict[str, int]:
    counts = _counts_of(json.dumps(shapes.to_json(), sort_keys=True))
    return {part: params + (extra if buffers else 0) for part, (params, extra) in counts.items()}


def parameter_counts(shapes: Shapes) -> dict[str, int]:
    """Parameters per component, counted on the meta device (no memory, no initialisation cost)."""
    return _counts(shapes, buffers=False)


def weight_bytes(shapes: Shapes, dtype: str = "float32") -> int:
    """Bytes of every component's parameters and floating-point buffers (SD3's position embedding) in ``dtype``."""
    return sum(_counts(shapes, buffers=True).values()) * DTYPES[dtype].itemsize


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Modules built inside are made in ``dtype`` directly (no float32 copy of a 9.5 GB T5 on the way)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def pipeline(shapes: Shapes, modules: dict[str, torch.nn.Module]):
    """The family's diffusers pipeline over ``modules``, with its tokenizers and scheduler; parts the
    shapes leave out (SD3 without T5) are ``None``, as the pipeline takes them."""
    import diffusers

    cls = getattr(diffusers, shapes.pipeline)
    scheduler_class, scheduler_config = shapes.scheduler
    kwargs = {**modules, "scheduler": getattr(diffusers, scheduler_class)(**scheduler_config), **shapes.options}
    kwargs.update({_tokenizer_part(part): encoder.tokenizer() for part, encoder in shapes.text_encoders.items()})
    for name, parameter in inspect.signature(cls.__init__).parameters.items():
        if name != "self" and name not in kwargs and parameter.default is inspect.Parameter.empty:
            kwargs[name] = None
    return cls(**kwargs)


def build_folder(shapes: Shapes, folder: Path, seed: int = 0, dtype: str = "float32") -> Path:
    """Save a diffusers pipeline of ``shapes`` with random weights in ``dtype`` (safetensors) in ``folder``.

    The pipeline's own ``model_index.json``, tokenizers and scheduler come from the pipeline built
    over meta-device modules; the weighted components are then made and saved one at a time.
    """
    from maskdiffusion.tiny import mark_random_weights

    folder = Path(folder)
    with torch.device("meta"):
        modules = build_modules(shapes)
    pipe = pipeline(shapes, modules)
    pipe.save_config(folder)
    for part in (*map(_tokenizer_part, shapes.text_encoders), "scheduler"):
        getattr(pipe, part).save_pretrained(folder / part)
    del pipe, modules
    torch.manual_seed(seed)
    for part, build in module_builders(shapes).items():
        with default_dtype(DTYPES[dtype]):
            module = build()
        module.save_pretrained(folder / part, safe_serialization=True)
        del module
    mark_random_weights(folder)
    return folder


@dataclass(frozen=True)
class Build:
    """What one measurement builds: family ``name``'s real shapes in ``dtype``, or a smaller copy.

    ``without``: optional text encoders left out (SD3's T5); ``t5_layers``: T5 encoders cut to
    this many layers (real width); ``depth``: denoiser configuration changes of a depth-reduced
    copy (:data:`DEPTH_CUTS`). ``real``: the family's shapes (default :data:`SHAPES`).
    """

    name: str
    dtype: str = "float32"
    without: tuple[str, ...] = ()
    t5_layers: int | None = None
    depth: dict = field(default_factory=dict)
    real: Shapes | None = None

    @property
    def reference(self) -> Shapes:
        return self.real or SHAPES[self.name]

    @property
    def shapes(self) -> Shapes:
        real = self.reference
        texts = {part: encoder for part, encoder in real.text_encoders.items() if part not in self.without}
        if self.t5_layers is not None:
            texts = {p: e.cut(self.t5_layers) if e.kind == "t5" else e for p, e in texts.items()}
        return dataclasses.replace(real, config={**real.config, **self.depth}, text_encoders=texts)

    def description(self) -> str:
        real, what = self.reference, []
        if self.depth:
            blocks = [f"{self.depth[k]} of {real.config[k]} {kind} blocks" for k, kind in _depth_names(real).items()]
            what.append(f"depth-reduced copy at true width: {', '.join(blocks)}")
        what += [f"without {part} ({real.text_encoders[part].label})" for part in self.without]
        if self.t5_layers is not None:
            cut = [e for p, e in real.text_encoders.items() if e.kind == "t5" and p not in self.without]
            what += [f"{e.label} cut to {self.t5_layers} of {e.layers} layers (real width)" for e in cut]
        return "; ".join(what) or "real shapes"

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "real": self.reference.to_json()}

    @classmethod
    def from_json(cls, values: dict) -> Build:
        return cls(**{**values, "without": tuple(values["without"]), "real": Shapes.from_json(values["real"])})


def _depth_names(shapes: Shapes) -> dict[str, str]:
    names = {"num_layers": "double-stream", "num_single_layers": "single-stream"}
    return {key: names.get(key, "") for key in DEPTH_CUTS.get(shapes.denoiser, {})}


def _required(shapes: Shapes, part: str) -> bool:
    """Whether maskdiffusion's backbone for these shapes needs ``part`` (SD3's T5 is optional)."""
    from maskdiffusion.backbones import BACKBONES
    from maskdiffusion.families import ARCHITECTURES

    architecture = ARCHITECTURES.get(shapes.denoiser, "unet")
    parts = BACKBONES[architecture].parts
    return part not in parts or parts[part].required


def candidates(name: str, dtype: str = "float32", real: Shapes | None = None) -> list[Build]:
    """The builds to try for family ``name``, largest first: real shapes, without optional T5, T5 cut, depth cut."""
    shapes = real or SHAPES[name]
    t5 = [part for part, encoder in shapes.text_encoders.items() if encoder.kind == "t5"]
    optional = tuple(part for part in t5 if not _required(shapes, part))
    required_t5 = T5_LAYERS if len(t5) > len(optional) else None
    builds = [Build(name, dtype, real=real)]
    if optional:
        builds.append(Build(name, dtype, without=optional, real=real))
    if required_t5:
        builds.append(Build(name, dtype, t5_layers=required_t5, real=real))
    cut = DEPTH_CUTS.get(shapes.denoiser)
    if cut:
        builds.append(Build(name, dtype, depth=cut, real=real))
        builds.append(Build(name, dtype, without=optional, t5_layers=required_t5, depth=cut, real=real))
    unique = {json.dumps(b.to_json(), sort_keys=True): b for b in builds}
    return list(unique.values())


def activation_bytes(size: int) -> int:
    """A size x size view's activations above the weights (scaled from a 1024-pixel view's)."""
    return ACTIVATIONS_1024 * size * size // 1024**2


def choose_build(
    name: str, dtype: str, *, max_bytes: int, available: int, real: Shapes | None = None
) -> tuple[Build | None, list[str]]:
    """The largest of :func:`candidates` that fits (``None`` if none does), and why each larger one did not."""
    reasons = []
    for build in candidates(name, dtype, real):
        shapes = build.shapes
        reason = memory_verdict(
            weight_bytes(shapes, dtype),
            max_bytes=max_bytes,
            available=available,
            activations=activation_bytes(shapes.native_size),
        )
        if reason is None:
            return build, reasons
        reasons.append(f"{build.description()}: {reason}")
    return None, reasons


def rss_bytes() -> int:
    with open("/proc/self/statm") as stats:
        return int(stats.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """This process's peak resident set so far (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(
    folder: str | os.PathLike, *, repeats: int = 3, threads: int = 2, dtype: str = "float32", through: bool = False
) -> dict:
    """Load ``folder`` in ``dtype`` with ``threads`` torch threads and :func:`time_views` it, with the load time."""
    from maskdiffusion import MaskDiffusion

    torch.set_num_threads(threads)
    start = time.perf_counter()
    seg = MaskDiffusion.from_pretrained(str(folder), device="cpu", dtype=dtype, cache_size=0)
    return {"load_seconds": time.perf_counter() - start, **time_views(seg, repeats=repeats, through=through)}


class Stopwatch:
    """Wall seconds inside labelled modules during the calls it is active for (forward pre-hooks and hooks).

    Registered before a pass installs its own hooks, so a block's time ends before maskdiffusion's
    hook on it runs (which may stop the pass there).
    """

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.modules = modules
        self.starts: dict[str, list[float]] = {}
        self.ends: dict[str, list[float]] = {}
        self.handles: list = []

    def __enter__(self) -> Stopwatch:
        for label, module in self.modules.items():
            self.handles.append(module.register_forward_pre_hook(partial(self._mark, self.starts, label)))
            self.handles.append(module.register_forward_hook(partial(self._mark, self.ends, label)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    @staticmethod
    def _mark(marks: dict[str, list[float]], label: str, *args) -> None:
        marks.setdefault(label, []).append(time.perf_counter())

    def clear(self) -> None:
        self.starts.clear()
        self.ends.clear()

    def seconds(self, label: str) -> float:
        return sum(e - s for s, e in zip(self.starts.get(label, []), self.ends.get(label, []), strict=False))

    def chain(self, labels: list[str]) -> dict[str, float]:
        """Seconds of modules that run one after the other (a denoiser's blocks): from each one's start to the
        next one's (so the work between them, maskdiffusion's capture after a block, counts to it), the last
        one run to its own end."""
        seconds = {}
        for label, following in zip(labels, [*labels[1:], None], strict=False):
            starts = self.starts.get(label, [])
            if not starts:
                continue
            nexts = self.starts.get(following, []) if following else []
            ends = self.ends.get(label, [])
            seconds[label] = sum((nexts[k] if k < len(nexts) else ends[k]) - s for k, s in enumerate(starts))
        return seconds


def block_kinds(backbone) -> list[str]:
    """A kind per denoiser block, in forward order (empty for a UNet): what a block of each kind costs is
    measured once and extrapolated to the blocks of the same kind that did not run."""
    if backbone.kind == "unet":
        return []
    joint = len(getattr(backbone, "joint_blocks", backbone.blocks))
    kinds = []
    for index, block in enumerate(backbone.blocks):
        if backbone.kind == "dit":
            kinds.append("DiT")
        elif index >= joint:
            kinds.append("single-stream")
        elif backbone.family.architecture == "flux":
            kinds.append("double-stream")
        else:
            kinds.append("joint, dual attention" if getattr(block, "use_dual_attention", False) else "joint")
    return kinds


def through_preset(preset, blocks: int):
    """``preset`` with its last feature block moved to the model's last one: every block runs (to time them all)."""
    return preset.replace(feature_blocks=(*preset.feature_blocks[:-1], blocks - 1))


def _stopwatch(seg) -> tuple[Stopwatch, dict[str, list[str]]]:
    """Hooks on the text encoders (T5's layers too), the VAE encoder and the denoiser blocks; the labels by group."""
    backbone = seg.backbone
    modules, groups = {"vae": seg.vae.encoder}, {"text": [], "blocks": [], "t5": []}
    for part in backbone.text_parts:
        encoder = getattr(backbone, part, None)
        if encoder is None:
            continue
        modules[part] = encoder
        groups["text"].append(part)
        if type(encoder).__name__ == "T5EncoderModel":
            for index, layer in enumerate(encoder.encoder.block):
                modules[f"{part}.block.{index}"] = layer
            groups["t5"].append(part)
    if block_kinds(backbone):
        for index, block in enumerate(backbone.blocks):
            modules[f"block.{index}"] = block
            groups["blocks"].append(f"block.{index}")
    return Stopwatch(modules), groups


def _per_kind(kinds: list[str], seconds: dict[str, float]) -> dict[str, float]:
    """Mean seconds of a block of each kind that ran."""
    by_kind: dict[str, list[float]] = {}
    for index, kind in enumerate(kinds):
        if f"block.{index}" in seconds:
            by_kind.setdefault(kind, []).append(seconds[f"block.{index}"])
    return {kind: statistics.mean(values) for kind, values in by_kind.items()}


def time_views(seg, *, repeats: int, through: bool = False) -> dict:
    """Segment one random native x native image with ``seg``: seconds per view, where they go, and memory.

    Returns the family, dtype, native size, the layers "auto" chose, per-call seconds (after one
    warm-up call) and the CPU seconds per second they used; the median seconds of a call in each
    text encoder, the VAE encoder, the denoiser blocks and the rest; the kind of each block that
    ran and the mean seconds of a block of each kind; the text encoders' seconds in the warm-up
    (``prompt_encoding``: maskdiffusion encodes a class list once and keeps it, so the calls after
    it encode no prompts) and the seconds per T5 layer there (``t5_layer``; ``t5_layer_per_call``
    in the calls); the weights' bytes, the resident set now (after loading), the peak during the
    calls (sampled) and the process's peak (``ru_maxrss``: loading included). ``through``: also
    time ``repeats`` calls that run every block (:func:`through_preset`), for the kinds of block
    the default pass does not reach (after a warm-up call of their own).
    """
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench import PeakMemory  # beside this file

    after_load = rss_bytes()
    preset = seg.presets["default"]
    image = (np.random.default_rng(0).random((preset.size, preset.size, 3)) * 255).astype(np.uint8)
    kinds = block_kinds(seg.backbone)
    stopwatch, groups = _stopwatch(seg)
    seconds, cpu_seconds, view_peak, calls, through_calls = [], 0.0, 0, [], []
    with stopwatch:
        began = time.perf_counter()
        seg(image, CLASSES)  # warm-up, encoding the class list
        first = _breakdown(stopwatch, groups, kinds, time.perf_counter() - began)
        for _ in range(repeats):
            stopwatch.clear()
            with PeakMemory(torch.device("cpu")) as peak:
                began, began_cpu = time.perf_counter(), time.process_time()
                result = seg(image, CLASSES)
                seconds.append(time.perf_counter() - began)
                cpu_seconds += time.process_time() - began_cpu
            view_peak = max(view_peak, peak.peak)
            calls.append(_breakdown(stopwatch, groups, kinds, seconds[-1]))
        if through and kinds:
            everything = through_preset(preset, len(kinds))
            seg(image, CLASSES, preset=everything)  # warm-up of the blocks the default pass never ran
            for _ in range(repeats):
                stopwatch.clear()
                seg(image, CLASSES, preset=everything)
                through_calls.append(_breakdown(stopwatch, groups, kinds, 0.0))
    if result.labels.shape != (preset.size, preset.size):
        raise RuntimeError(f"labels of shape {result.labels.shape} for a {preset.size}-pixel view")
    per_block = _median_of(calls, "per_block")
    for kind, value in _median_of(through_calls, "per_block").items():
        per_block.setdefault(kind, value)  # kinds only the through calls reached
    modules = (seg.backbone.denoiser, seg.vae, *seg.text_encoders)
    return {
        "family": seg.family.name,
        "dtype": str(seg.dtype).removeprefix("torch."),
        "size": preset.size,
        "attention_factors": list(preset.attention_factors),
        "attention_blocks": list(preset.attention_blocks),
        "feature_blocks": list(preset.feature_blocks),
        "class_maps": preset.class_maps,
        "timestep": preset.timestep,
        "seconds": seconds,
        "median_seconds": statistics.median(seconds),
        "cores_busy": cpu_seconds / sum(seconds),  # below the thread count: the cores were shared (or idle)
        "timing": {
            "text": _median_of(calls, "text"),
            **{key: statistics.median(call[key] for call in calls) for key in ("vae", "blocks", "rest")},
        },
        "blocks_run": [kinds[int(label.split(".")[1])] for label in calls[-1]["ran"]],
        "per_block": per_block,
        "t5_layers": {part: len(getattr(seg.backbone, part).encoder.block) for part in groups["t5"]},
        "prompt_encoding": first["text"],
        "warm_up_seconds": first["total"],
        "t5_layer": first["t5_layer"],
        "t5_layer_per_call": _median_of(calls, "t5_layer"),
        "weights_bytes": sum(p.numel() * p.element_size() for m in modules for p in m.parameters()),
        "rss_after_load": after_load,
        "view_peak_rss": view_peak,
        "process_peak_rss": peak_rss_bytes(),
        "threads": torch.get_num_threads(),
    }


def _breakdown(stopwatch: Stopwatch, groups: dict[str, list[str]], kinds: list[str], total: float) -> dict:
    """One call's seconds: per text encoder, VAE encoder, denoiser blocks, the rest; per block kind and T5 layer."""
    text = {part: stopwatch.seconds(part) for part in groups["text"]}
    blocks = stopwatch.chain(groups["blocks"])
    t5_layer = {}
    for part in groups["t5"]:
        layers = [stopwatch.seconds(label) for label in stopwatch.modules if label.startswith(f"{part}.block.")]
        t5_layer[part] = statistics.mean(layers[1:] or layers)  # layer 0 also computes the position bias
    vae = stopwatch.seconds("vae")
    return {
        "text": text,
        "vae": vae,
        "blocks": sum(blocks.values()),
        "rest": total - sum(text.values()) - vae - sum(blocks.values()),
        "total": total,
        "ran": list(blocks),
        "per_block": _per_kind(kinds, blocks),
        "t5_layer": t5_layer,
    }


def _median_of(calls: list[dict], key: str) -> dict[str, float]:
    names = {name for call in calls for name in call[key]}
    return {name: statistics.median(call[key][name] for call in calls if name in call[key]) for name in sorted(names)}


def real_model(build: Build):
    """The real model's backbone on the meta device (no memory) and its ``default`` preset as ``auto`` resolves it."""
    import diffusers

    from maskdiffusion.backbones import BACKBONES
    from maskdiffusion.loading import family_presets

    real = build.reference
    family = FAMILIES[build.name]
    with torch.device("meta"):
        denoiser = getattr(diffusers, real.denoiser)(**real.config)
    factor = 2 ** (len(real.vae["block_out_channels"]) - 1)
    backbone = BACKBONES[family.architecture]({real.denoiser_part: denoiser}, real.scheduler[1], factor, family)
    return backbone, backbone.resolve(family_presets(family, real.native_size)["default"])


def extrapolate(row: dict, build: Build) -> dict:
    """Seconds of the real model, from a measured copy's per-block and per-layer seconds.

    ``default`` (per view): the measured median plus, for every kind of block, the blocks the real
    model's default pass runs (up to the last block its ``auto`` layers need) beyond those that ran
    here, times the measured seconds of such a block (plus cut T5 layers x their seconds, if the
    calls encoded prompts); ``full``: the default plus every block the default pass skips (``None``
    where a kind of block never ran here); ``prompt``: the class list's encoding, the cut T5 layers
    added at the measured seconds per layer. ``added`` / ``full_added`` / ``prompt_added``: what
    was added, in words; ``real_layers``: the real model's auto choice.
    """
    backbone, preset = real_model(build)
    kinds = block_kinds(backbone)
    stop = max([*preset.attention_blocks, *preset.feature_blocks])
    ran, default_kinds, all_kinds = Counter(row["blocks_run"]), Counter(kinds[: stop + 1]), Counter(kinds)
    per_block, added, prompt_added = row["per_block"], [], []
    default, prompt = row["median_seconds"], sum(row["prompt_encoding"].values())
    for kind, count in default_kinds.items():
        if count > ran[kind]:
            default += (count - ran[kind]) * per_block[kind]
            added.append(f"{count - ran[kind]} {kind} blocks x {per_block[kind]:.1f} s")
    real_texts = build.reference.text_encoders
    for part, layers in row["t5_layers"].items():
        missing, label = real_texts[part].layers - layers, real_texts[part].label
        if missing > 0:
            prompt += missing * row["t5_layer"][part]
            prompt_added.append(f"{missing} {label} layers x {row['t5_layer'][part]:.2f} s")
            if row["t5_layer_per_call"].get(part):
                default += missing * row["t5_layer_per_call"][part]
                added.append(f"{missing} {label} layers x {row['t5_layer_per_call'][part]:.2f} s")
    skipped = {kind: count - default_kinds[kind] for kind, count in all_kinds.items() if count > default_kinds[kind]}
    full = None
    if all(kind in per_block for kind in skipped):
        full = default + sum(count * per_block[kind] for kind, count in skipped.items())
    return {
        "default": default,
        "full": full,
        "prompt": prompt,
        "added": added,
        "full_added": [
            f"{count} {kind} blocks x {per_block.get(kind, float('nan')):.1f} s" for kind, count in skipped.items()
        ],
        "prompt_added": prompt_added,
        "real_layers": {
            "attention_blocks": list(preset.attention_blocks),
            "feature_blocks": list(preset.feature_blocks),
        },
    }


def available_bytes() -> int:
    """``MemAvailable`` of /proc/meminfo: what this machine can hand out now without swapping."""
    with open("/proc/meminfo") as info:
        for line in info:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def memory_verdict(weights: int, *, max_bytes: int, available: int, activations: int = 0) -> str | None:
    """Why a model with ``weights`` bytes of weights is not run here, or ``None`` if it is.

    The need is estimated as the weights plus a quarter (activations of one view and loading), or
    plus ``activations`` where that is more (a small model's 1024-pixel view).
    """
    need = weights + max(weights // 4, activations)
    if need > max_bytes:
        return (
            f"needs ~{need / GIB:.1f} GiB (weights {weights / GIB:.1f} GiB + activations) > {max_bytes / GIB:.0f} GiB"
        )
    if need > available:
        return f"needs ~{need / GIB:.1f} GiB; this machine had {available / GIB:.1f} GiB free"
    return None


def _limit_memory(limit: int | None) -> None:
    if limit is not None:
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


def _child(args: list[str], threads: int, memory_limit: int | None = None) -> None:
    """Run this script in a fresh process (its own peak memory), offline, with ``threads`` threads, its
    private memory capped at ``memory_limit`` bytes (an allocation past it fails there, not the machine)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), *args],
        check=True,
        env=env,
        preexec_fn=partial(_limit_memory, memory_limit),
    )


def run_family(
    name: str,
    workdir: Path,
    *,
    repeats: int,
    threads: int,
    tiny: bool = False,
    build: Build | None = None,
    memory_limit: int | None = None,
) -> dict:
    """Build family ``name``'s folder in one process, measure it in another, delete it; the measurements.

    ``build``: what to build (default: the real shapes in float32); a depth-reduced one is also
    timed through every block and :func:`extrapolate`-d. ``tiny``: build
    :func:`maskdiffusion.tiny.build_tiny_model`'s model of the family instead (tests).
    """
    build = build or Build(name)
    folder = workdir / (name if tiny else build.reference.hub_id.replace("/", "--"))
    out, spec = workdir / f"{name}.json", workdir / f"{name}.build.json"
    try:
        began = time.perf_counter()
        if tiny:
            _child(["--build", name, str(folder), "--tiny"], threads, memory_limit)
        else:
            spec.write_text(json.dumps(build.to_json()))
            _child(["--build", str(spec), str(folder)], threads, memory_limit)
        build_seconds = time.perf_counter() - began
        load_before = os.getloadavg()[0]
        measure_args = ["--measure", str(folder), str(out), "--repeats", str(repeats), "--threads", str(threads)]
        measure_args += ["--dtype", build.dtype, *(["--through"] if build.depth else [])]
        _child(measure_args, threads, memory_limit)
        row = json.loads(out.read_text())
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        out.unlink(missing_ok=True)
        spec.unlink(missing_ok=True)
    row = {**row, "name": name, "build_seconds": build_seconds, "load_1min": [load_before, os.getloadavg()[0]]}
    if not tiny:
        row["build"] = build.description()
        if build.shapes.transformer:
            row["extrapolated"] = extrapolate(row, build)
    return row


def cpu_description() -> tuple[str, list[str]]:
    """The CPU's model name and which of :data:`CPU_FLAGS` it has."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return model, [flag for flag in CPU_FLAGS if flag in flags]


def _layers(row: dict) -> str:
    attention = ", ".join(f"1/{f}" for f in row["attention_factors"])
    return f"cross-attention {attention}; features up_blocks {', '.join(map(str, row['feature_blocks']))}"


def _blocks(indices: list[int]) -> str:
    """``[8, 9, 10, 14]`` -> ``"8-10, 14"``."""
    runs: list[list[int]] = []
    for index in sorted(indices):
        if runs and index == runs[-1][-1] + 1:
            runs[-1].append(index)
        else:
            runs.append([index])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 2 else ", ".join(map(str, r)) for r in runs)


def _transformer_layers(row: dict) -> str:
    real = row.get("extrapolated", {}).get("real_layers")
    chosen = real or row
    text = (
        f"attention blocks {_blocks(chosen['attention_blocks'])}; features blocks {_blocks(chosen['feature_blocks'])}; "
        f"{row['class_maps']} maps"
    )
    if real and real != {k: row[k] for k in real}:
        text += f" (in the measured copy: blocks {_blocks(row['attention_blocks'])})"
    return text


UNET_HEADING = "## UNet families"
TRANSFORMER_HEADING = "## Transformer families (SD3 / SD3.5, FLUX.1, PixArt-Σ)"
ROWS_MARK = "<!-- families.py rows: "


def _header(rows: list[dict], threads: int, what: str) -> str:
    model, flags = cpu_description()
    loads = [load for row in rows for load in row.get("load_1min", [])]
    load = (
        f" 1-minute load average {min(loads):.2f}-{max(loads):.2f} before and after the measurements (this "
        "benchmark's own threads included)."
        if loads
        else ""
    )
    return (
        f"CPU: {model}, {os.cpu_count()} cores; ISA: {', '.join(flags) or 'none of ' + ', '.join(CPU_FLAGS)}. "
        f"Python {platform.python_version()}, torch {torch.__version__}, {threads} torch threads, {what}.{load}"
    )


def _unet_section(rows: list[dict], *, repeats: int, threads: int) -> list[str]:
    lines = [
        UNET_HEADING,
        "",
        _header([r for r in rows if "skipped" not in r], threads, "float32"),
        "",
        "Random weights in each family's real shapes (`benchmarks/families.py` cites the configs), saved as "
        "safetensors and loaded by `MaskDiffusion.from_pretrained` in a fresh process per family. One view = one "
        "random image of exactly native x native pixels, 10 classes, `default` preset (t and layers as the family "
        f"sets them), latent cache off; median of {repeats} calls after a warm-up. Cores busy: CPU seconds per "
        "second during the calls (below the thread count when other work shared the cores). Memory: float32 "
        "weights; peak resident set sampled during the calls; peak of the whole process (`ru_maxrss`, loading "
        "included).",
        "",
        "| family | shapes of | native size | layers chosen by auto | t | s / view (median) | min-max s | cores busy "
        "| weights GiB | peak RSS in a view GiB | process peak RSS GiB | load s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        name = row["name"] + ("" if row.get("dtype", "float32") == "float32" else f" ({row['dtype']})")
        if "skipped" in row:
            hub_id = SHAPES[row["name"]].hub_id if row["name"] in SHAPES else "-"
            lines.append(f"| {name} | {hub_id} | - | skipped: {row['skipped']} | | | | | | | | |")
            continue
        lines.append(
            f"| {name} | {row.get('hub_id', '-')} | {row['size']} | {_layers(row)} | {row['timestep']} "
            f"| {row['median_seconds']:.1f} | {min(row['seconds']):.1f}-{max(row['seconds']):.1f} "
            f"| {row['cores_busy']:.2f} "
            f"| {row['weights_bytes'] / GIB:.2f} | {row['view_peak_rss'] / GIB:.2f} "
            f"| {row['process_peak_rss'] / GIB:.2f} | {row['load_seconds']:.1f} |"
        )
    return lines


def _prompt_seconds(row: dict) -> str:
    """The text encoders' seconds encoding the class list (the warm-up call), T5 per layer, cut T5 extrapolated."""
    texts = SHAPES[row["name"]].text_encoders
    parts = []
    for part, seconds in row["prompt_encoding"].items():
        label = texts[part].label if part in texts else part
        if part in row["t5_layers"]:
            layers, real = row["t5_layers"][part], texts[part].layers if part in texts else None
            of = f"{layers} of {real} layers, " if real and real != layers else ""
            parts.append(f"{label} {seconds:.1f} ({of}{row['t5_layer'][part]:.2f} s / layer)")
        else:
            parts.append(f"{label} {seconds:.1f}")
    guess = row.get("extrapolated", {})
    cut = f"; ≈ {guess['prompt']:.0f} with every layer (extrapolated)" if guess.get("prompt_added") else ""
    return " + ".join(parts) + cut


def _block_seconds(row: dict) -> str:
    ran = Counter(row["blocks_run"])
    parts = [f"{ran[k]} {k}: {row['per_block'][k]:.1f} s each" for k in ran]
    parts += [
        f"{k}: {s:.1f} s each (timed in calls through every block)" for k, s in row["per_block"].items() if k not in ran
    ]
    return "; ".join(parts)


def _transformer_section(rows: list[dict], *, repeats: int, threads: int) -> list[str]:
    measured = [r for r in rows if "skipped" not in r]
    lines = [
        TRANSFORMER_HEADING,
        "",
        _header(measured, threads, "float32 and bfloat16 (native here: AVX512-BF16)"),
        "",
        "Random weights in each family's real shapes (`benchmarks/families.py` cites the configs; the parameter "
        "counts match the published totals, tests/test_bench_families.py), built and saved in the dtype measured, "
        "loaded by `MaskDiffusion.from_pretrained(dtype=...)` in a fresh process per row. One view = one random "
        "image of exactly native x native pixels, 10 classes, `default` preset (t and `auto` layers as the family "
        "and model set them; the pass stops after the last block they need), latent cache off; median of "
        f"{repeats} calls after a warm-up. maskdiffusion encodes a class list once and keeps it, so the calls after "
        "the warm-up run no text encoder: the text encoders' seconds in the warm-up are in their own column "
        "(paid once per class list; the first call also reads their memory-mapped weights in). Forward hooks "
        "time the text encoders (T5 per layer), the VAE encoder and each "
        "denoiser block (from its start to the next block's, so maskdiffusion's capture after a block counts to "
        "it); rest = the call minus those (noising, embeddings, mask head, labels).",
        "",
        "What does not fit in 24 GiB (weights + a view's activations) is built smaller, and the rows say so. SD3 "
        "in float32 is measured without `text_encoder_3` (T5-XXL alone is 19 GB in float32): SD3's pipeline and "
        "maskdiffusion's backbone then use zeros of T5's shape (256 tokens x 4096) in its place, so the "
        "transformer's per-view work is identical; only T5's own encoding of the class list is missing (the "
        f"bfloat16 row has it). Where T5 is required (PixArt-Σ, FLUX) and does not fit, it is cut to {T5_LAYERS} "
        "of its 24 layers at the real width, and its per-layer seconds extrapolate the encoding. FLUX.1 (12B) is "
        "measured as a depth-reduced copy at true width: 4 of 19 double-stream and 2 of 38 single-stream blocks "
        "(so `auto` still takes 4 concept blocks, here 0-3), real CLIP-L and T5 (cut in float32); its "
        "single-stream blocks are timed in extra calls whose last feature block is the last block. The "
        "extrapolations (marked ≈) add to the measured median the blocks the real model would run beyond those "
        "that ran here, times the measured seconds of a block of that kind: the default pass runs every block up "
        "to the last one `auto` needs (FLUX: its 19 double-stream blocks, none of the 38 single-stream ones), a "
        "full pass every block (FLUX: 19 + 38; SD3.5's blocks past 12 have no dual attention and were not timed). "
        "They are extrapolations, not measurements. A single-stream block costs about what a double-stream one "
        "does: it has half the weights, but every token goes through all of them (a double-stream block sends "
        "image and text tokens through separate weights).",
        "",
        "Memory: the weights' bytes as loaded (parameters; SD3's position table is a buffer on top); peak resident "
        "set sampled during the calls; peak of the whole process (`ru_maxrss`, loading included). The resident "
        "set can stay below the weights: the loaders leave the weights memory-mapped from the safetensors files, "
        "and the blocks a pass never runs (SD3's blocks 11-23) are never read in. For the same reason the first "
        "call's encoding of the class list includes reading the text encoders' weights from the page cache or disk, "
        "and varies with how much of the freshly written files the cache still holds. Cores busy below 2: other "
        "work (another engineer's tests) shared the two cores during the runs.",
        "",
        "| family | shapes of | dtype | built as | native size | layers chosen by auto | t | s / view (median) "
        "| min-max s | cores busy | weights GiB | peak RSS in a view GiB | process peak RSS GiB | load s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        hub_id = SHAPES[row["name"]].hub_id if row["name"] in SHAPES else "-"
        if "skipped" in row:
            lines.append(f"| {row['name']} | {hub_id} | {row['dtype']} | skipped: {row['skipped']} |" + " |" * 10)
            continue
        built = row.get("build", "real shapes") + (f"; {row['left_out']}" if row.get("left_out") else "")
        lines.append(
            f"| {row['name']} | {hub_id} | {row['dtype']} | {built} | {row['size']} | {_transformer_layers(row)} "
            f"| {row['timestep']} | {row['median_seconds']:.1f} | {min(row['seconds']):.1f}-{max(row['seconds']):.1f} "
            f"| {row['cores_busy']:.2f} | {row['weights_bytes'] / GIB:.2f} | {row['view_peak_rss'] / GIB:.2f} "
            f"| {row['process_peak_rss'] / GIB:.2f} | {row['load_seconds']:.1f} |"
        )
    lines += [
        "",
        "Where the seconds go (medians of the calls), and the real model's seconds per view:",
        "",
        "| family | dtype | encoding the class list (once) s | VAE encoder s / view | denoiser blocks "
        "| rest s / view | default pass s / view | full pass s / view |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in measured:
        timing, guess = row["timing"], row.get("extrapolated", {})
        default = f"{row['median_seconds']:.1f} (measured)"
        if guess.get("added"):
            default = f"≈ {guess['default']:.0f} (extrapolated: + {' + '.join(guess['added'])})"
        full = "-"
        if guess.get("full") is not None:
            full = f"≈ {guess['full']:.0f} (extrapolated: + {' + '.join(guess['full_added'])})"
            full = full if guess["full_added"] else default
        lines.append(
            f"| {row['name']} | {row['dtype']} | {_prompt_seconds(row)} | {timing['vae']:.1f} | {_block_seconds(row)} "
            f"| {timing['rest']:.1f} | {default} | {full} |"
        )
    return lines


def _sections(text: str) -> dict[str, str]:
    """A results page's ``## `` sections by heading line (each with its heading)."""
    sections, heading = {}, None
    for line in text.splitlines(keepends=True):
        if line.startswith("## "):
            heading = line.rstrip("\n")
            sections[heading] = ""
        if heading is not None:
            sections[heading] += line
    return sections


def _previous_rows(section: str) -> list[dict]:
    match = re.search(re.escape(ROWS_MARK) + r"(.*?) -->", section, re.S)
    return json.loads(match.group(1)) if match else []


def _key(row: dict) -> tuple[str, str]:
    return row["name"], row.get("dtype", "float32")


def report(rows: list[dict], skipped: dict, *, repeats: int, threads: int, previous: str | None = None) -> str:
    """The results page: a section per kind of family (header: CPU, software, load; a table row per family
    and dtype). ``skipped``: family (or ``(family, dtype)``) -> why. ``previous``: the page as it was;
    its sections without new rows are kept as they were, its rows of families not measured now kept."""
    skipped_rows = [
        {"name": key if isinstance(key, str) else key[0], "dtype": "float32" if isinstance(key, str) else key[1],
         "skipped": reason}
        for key, reason in skipped.items()
    ]  # fmt: skip
    order = {name: index for index, name in enumerate(SHAPES)}
    kept = _sections(previous or "")
    sections = {}
    for heading, transformer in ((UNET_HEADING, False), (TRANSFORMER_HEADING, True)):
        new = [
            r for r in [*rows, *skipped_rows] if (r["name"] in SHAPES and SHAPES[r["name"]].transformer) == transformer
        ]
        if not new:
            if heading in kept:
                sections[heading] = kept[heading].rstrip("\n")
            continue
        keys = {_key(r) for r in new}
        merged = [r for r in _previous_rows(kept.get(heading, "")) if _key(r) not in keys] + new
        merged.sort(key=lambda r: (order.get(r["name"], len(order)), list(DTYPES).index(r.get("dtype", "float32"))))
        render = _transformer_section if transformer else _unet_section
        lines = render(merged, repeats=repeats, threads=threads)
        lines += ["", ROWS_MARK + json.dumps(merged, separators=(",", ":")) + " -->"]
        sections[heading] = "\n".join(lines)
    title = "# Model families on the CPU: seconds and memory per view at the native size"
    return "\n\n".join([title, *sections.values()]) + "\n"


def default_dtypes(name: str) -> list[str]:
    """UNet families in float32 (their bfloat16 numbers are in cpu.md), transformers in float32 and bfloat16."""
    return list(DTYPES) if SHAPES[name].transformer else ["float32"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), help="default: UNets float32, transformers both")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-gib", type=float, default=24.0, help="build smaller (or skip) what would not fit")
    parser.add_argument("--workdir", default=None, help="where the temporary model folders go (default: $TMPDIR)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "families-cpu.md"))
    parser.add_argument("--build", nargs=2, metavar=("SPEC", "FOLDER"), help=argparse.SUPPRESS)
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--measure", nargs=2, metavar=("FOLDER", "JSON"), help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES), help=argparse.SUPPRESS)
    parser.add_argument("--through", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.build:
        spec, folder = args.build
        if args.tiny:
            from maskdiffusion.tiny import build_tiny_model

            build_tiny_model(folder, family=spec)
        else:
            build = Build.from_json(json.loads(Path(spec).read_text()))
            build_folder(build.shapes, Path(folder), dtype=build.dtype)
        return 0
    if args.measure:
        folder, out = args.measure
        row = measure(folder, repeats=args.repeats, threads=args.threads, dtype=args.dtype, through=args.through)
        Path(out).write_text(json.dumps(row))
        return 0

    from maskdiffusion.files import write_text

    rows, skipped = [], {}
    began = time.perf_counter()
    max_bytes = int(args.max_gib * GIB)
    workdir = Path(tempfile.mkdtemp(prefix="maskdiffusion-families-", dir=args.workdir))
    try:
        for name in args.families:
            shapes = SHAPES[name]
            for dtype in args.dtypes or default_dtypes(name):
                key = (name, dtype) if shapes.transformer else name
                available = available_bytes()
                build, reasons = choose_build(name, dtype, max_bytes=max_bytes, available=available)
                if build is None:
                    print(f"{name} {dtype}: skipped, {'; '.join(reasons)}", flush=True)
                    skipped[key] = "; ".join(reasons)
                    continue
                weights = weight_bytes(build.shapes, dtype)
                print(f"{name} {dtype}: {build.description()}, {weights / GIB:.2f} GiB of weights ...", flush=True)
                try:
                    limit = min(max_bytes, available - GIB // 2)
                    row = run_family(name, workdir, repeats=args.repeats, threads=args.threads, build=build,
                                     memory_limit=limit)  # fmt: skip
                except subprocess.CalledProcessError as error:  # e.g. out of memory: the others still run
                    print(f"{name} {dtype}: failed, {error}", flush=True)
                    step = "build" if "--build" in error.cmd else "measurement"
                    skipped[key] = f"failed: {build.description()}: {step} exited {error.returncode}"
                    continue
                if row["family"] != name or row["size"] != shapes.native_size or row["dtype"] != dtype:
                    raise RuntimeError(
                        f"{name}: loaded as family {row['family']!r} at {row['size']} px in {row['dtype']}, "
                        f"expected {name!r} at {shapes.native_size} in {dtype}"
                    )
                rows.append({**row, "hub_id": shapes.hub_id, "left_out": reasons[0] if reasons else ""})
                print(f"{name} {dtype}: {json.dumps(rows[-1])}", flush=True)
                print(
                    f"{name} {dtype}: {row['median_seconds']:.1f} s per view, peak "
                    f"{row['process_peak_rss'] / GIB:.2f} GiB ({(time.perf_counter() - began) / 60:.1f} min so far)",
                    flush=True,
                )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    out = Path(args.out)
    text = report(
        rows, skipped, repeats=args.repeats, threads=args.threads, previous=out.read_text() if out.exists() else None
    )
    print(text)
    print(f"benchmark took {(time.perf_counter() - began) / 60:.1f} min", flush=True)
    write_text(out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
