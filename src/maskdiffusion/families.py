"""Model families: which text-to-image model a folder (or a pipeline in memory) holds, and its presets.

A family is recognised from the components' own configurations (``unet/config.json`` or
``transformer/config.json``, ``scheduler/scheduler_config.json``, a second text encoder) and,
for distilled or Turbo checkpoints whose shapes are their base model's, from what the folder
says of itself: the hub id or folder name, or ``"family"`` in its ``maskdiffusion.json``.
:data:`FAMILIES` is the one registry: each family, its architecture (which backbone of
:mod:`maskdiffusion.backbones` runs it) and the preset fields it changes; the rules in
:data:`RULES` are tried in order, the first that matches wins. The view size every preset
starts from is the model's own native size, read from its configuration (the denoiser's
``sample_size`` x the VAE's factor: 512 for SD 1.x, 768 for SD 2.x-768, 1024 for SDXL, SD3
and PixArt-Σ, 512 for the Turbo models; FLUX's transformer has none, its VAE's says 1024).

Layers are not a family setting: the ``default`` and ``attention-only`` presets choose them
from the model (``"auto"``, see each backbone), so a family only says what the model was
trained for (its view size, its timesteps, its text length) and which class maps suit it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Family:
    """One kind of model.

    Attributes:
        name: registry key, written in results (``sd1``, ``sdxl``, ...).
        description: what it is, with example hub ids and their native view size.
        architecture: the backbone that runs it: ``unet``, ``sd3``, ``flux`` or ``pixart``.
        text_encoders: 1 (CLIP) or 2 (SDXL: CLIP ViT-L + OpenCLIP bigG, pooled embedding
            and size/crop conditions as added inputs); transformers list theirs in the backbone.
        text_length: T5 tokens per prompt (the ``max_sequence_length`` of the model's own
            pipeline); ``None`` for CLIP-only models (77).
        changes: preset fields the family sets in every named preset besides ``size``.
        preset_changes: fields it sets in one named preset only (preset name -> fields).
        tiny_encoder: the hub id of the tiny autoencoder (TAESD family, ``AutoencoderTiny``) whose
            latents live in this family's latent space, for ``encoder="tiny"``.
    """

    name: str
    description: str
    architecture: str = "unet"
    text_encoders: int = 1
    text_length: int | None = None
    changes: Mapping[str, Any] = field(default_factory=dict)
    preset_changes: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    tiny_encoder: str = "madebyollin/taesd"


# Turbo checkpoints (adversarial diffusion distillation) are trained to denoise in 1-4 steps
# at t in {999, 749, 499, 249}: 249 is the trained timestep that keeps most of the image.
TURBO_TIMESTEP = 249

# Transformers work on one token grid (factor 16 = VAE 8 x patch 2), so every preset takes its
# attention level and features there. Their default maps are ConceptAttention's concept outputs
# where the model has joint attention (Helbling et al.: ImageNet-Segmentation 71.0 vs 59.9 for
# FLUX's attention weights; multi-class VOC 51.4 vs 27.0); the reference preset keeps weights.
TRANSFORMER = {"attention_factors": "auto", "attention_blocks": "auto", "feature_blocks": "auto", "feature_factor": 16}
CONCEPT = {"default": {"class_maps": "concept"}, "attention-only": {"class_maps": "concept"}}

# Noise levels: the signal-to-noise ratio of the UNet default t = 250 (DIFT's most semantic SD
# features; sqrt(a) / sqrt(1 - a) = 1.44 in SD's schedule), in each model's own terms (flow
# matching: x_s = (1 - s) x_0 + s e with s = 0.410, i.e. t = 1000 u for the scheduler's shift
# s = shift u / (1 + (shift - 1) u); FLUX-dev shifts by its 1024-view token count, mu = 1.15;
# PixArt's DDPM schedule has the same ratio at t = 194). Not measured: no weights can be here.
# Tiny autoencoders (TAESD, madebyollin) trained into each VAE's latent space, for encoder="tiny"
TAESDXL, TAEF1 = "madebyollin/taesdxl", "madebyollin/taef1"

SD3_TIMESTEP, FLUX_DEV_TIMESTEP, FLUX_SCHNELL_TIMESTEP, PIXART_TIMESTEP = 188, 181, 410, 194

FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family("sd1", "Stable Diffusion 1.x, 512 (CompVis/stable-diffusion-v1-4, stable-diffusion-v1-5/...)"),
        Family("sd2", "Stable Diffusion 2.x base, 512 (stabilityai/stable-diffusion-2-1-base)"),
        Family("sd2-v", "v-prediction models: Stable Diffusion 2.x, 768 (stabilityai/stable-diffusion-2-1)"),
        Family(
            "sdxl",
            "Stable Diffusion XL, 1024 (stabilityai/stable-diffusion-xl-base-1.0)",
            text_encoders=2,
            tiny_encoder=TAESDXL,
        ),
        Family("distilled", "block-removed distilled UNets without a mid block, 512 (nota-ai/bk-sdm-small)"),
        Family("sd-turbo", "SD-Turbo, 512 (stabilityai/sd-turbo)", changes={"timestep": TURBO_TIMESTEP}),
        Family(
            "sdxl-turbo",
            "SDXL-Turbo, 512 (stabilityai/sdxl-turbo)",
            text_encoders=2,
            changes={"timestep": TURBO_TIMESTEP},
            tiny_encoder=TAESDXL,
        ),
        Family(
            "sd3",
            "Stable Diffusion 3 (MMDiT, joint attention), 1024 (stabilityai/stable-diffusion-3-medium-diffusers)",
            architecture="sd3",
            text_length=256,
            changes={**TRANSFORMER, "timestep": SD3_TIMESTEP},
            preset_changes=CONCEPT,
            tiny_encoder="madebyollin/taesd3",
        ),
        Family(
            "sd3.5",
            "Stable Diffusion 3.5 (MMDiT-X: dual attention, q/k RMS norms), 1024 "
            "(stabilityai/stable-diffusion-3.5-medium, stabilityai/stable-diffusion-3.5-large)",
            architecture="sd3",
            text_length=256,
            changes={**TRANSFORMER, "timestep": SD3_TIMESTEP},
            preset_changes=CONCEPT,
            tiny_encoder="madebyollin/taesd3",
        ),
        Family(
            "flux-dev",
            "FLUX.1 dev (double- then single-stream blocks, guidance embedding), 1024 (black-forest-labs/FLUX.1-dev)",
            architecture="flux",
            text_length=512,
            changes={**TRANSFORMER, "timestep": FLUX_DEV_TIMESTEP},
            preset_changes=CONCEPT,
            tiny_encoder=TAEF1,
        ),
        Family(
            "flux-schnell",
            "FLUX.1 schnell (timestep-distilled, no guidance embedding), 1024 (black-forest-labs/FLUX.1-schnell)",
            architecture="flux",
            text_length=256,
            changes={**TRANSFORMER, "timestep": FLUX_SCHNELL_TIMESTEP},
            preset_changes=CONCEPT,
            tiny_encoder=TAEF1,
        ),
        Family(
            "pixart-sigma",
            "PixArt-Σ (DiT, cross-attention to T5), 1024 (PixArt-alpha/PixArt-Sigma-XL-2-1024-MS)",
            architecture="pixart",
            text_length=300,
            changes={**TRANSFORMER, "timestep": PIXART_TIMESTEP},
            tiny_encoder=TAESDXL,  # PixArt-Σ's VAE is SDXL's
        ),
    )
}


# Which backbone runs a folder, from its denoiser's class (``_class_name`` of unet/ or transformer/config.json)
ARCHITECTURES = {
    "UNet2DConditionModel": "unet",
    "SD3Transformer2DModel": "sd3",
    "FluxTransformer2DModel": "flux",
    "PixArtTransformer2DModel": "pixart",
}


@dataclass(frozen=True)
class ModelDescription:
    """What :func:`detect` reads: the denoiser's and scheduler's configurations, and names.

    ``unet``: the denoiser's configuration (``unet/`` or ``transformer/``; its ``_class_name``
    says which); ``names``: the hub id, folder path and any ``_name_or_path`` the
    configurations carry (lower-cased when matched); ``declared``: ``"family"`` from
    ``maskdiffusion.json``.
    """

    unet: Mapping[str, Any]
    scheduler: Mapping[str, Any]
    two_text_encoders: bool
    names: tuple[str, ...] = ()
    declared: str | None = None

    @property
    def denoiser(self) -> str:
        """The denoiser's class name (``UNet2DConditionModel`` when the configuration names none)."""
        return str(self.unet.get("_class_name") or "UNet2DConditionModel")

    def named(self, *words: str) -> bool:
        return any(word in name.lower() for name in self.names for word in words)


def _is_sdxl(model: ModelDescription) -> bool:
    return model.two_text_encoders or model.unet.get("addition_embed_type") == "text_time"


def _is(model: ModelDescription, denoiser: str) -> bool:
    return model.denoiser == denoiser


def _is_sd35(model: ModelDescription) -> bool:
    """SD3.5's MMDiT-X: dual attention layers (medium) or q/k RMS norms (large, medium); SD3 has neither."""
    return bool(model.unet.get("dual_attention_layers")) or model.unet.get("qk_norm") is not None


def _is_turbo(model: ModelDescription) -> bool:
    """Named so, or scheduled as both Turbo snapshots are: "trailing" timesteps with epsilon prediction
    (stabilityai/sd-turbo and sdxl-turbo's scheduler configs; SD 1.x/2.x and SDXL ship "leading")."""
    trailing = model.scheduler.get("timestep_spacing") == "trailing"
    return model.named("turbo") or (trailing and model.scheduler.get("prediction_type", "epsilon") == "epsilon")


RULES: list[tuple[str, Callable[[ModelDescription], bool]]] = [
    ("flux-dev", lambda m: _is(m, "FluxTransformer2DModel") and bool(m.unet.get("guidance_embeds"))),
    ("flux-schnell", lambda m: _is(m, "FluxTransformer2DModel")),
    ("sd3.5", lambda m: _is(m, "SD3Transformer2DModel") and _is_sd35(m)),
    ("sd3", lambda m: _is(m, "SD3Transformer2DModel")),
    ("pixart-sigma", lambda m: _is(m, "PixArtTransformer2DModel")),
    ("sdxl-turbo", lambda m: _is_sdxl(m) and _is_turbo(m)),
    ("sdxl", _is_sdxl),
    ("sd-turbo", _is_turbo),
    ("distilled", lambda m: m.unet.get("mid_block_type", "UNetMidBlock2DCrossAttn") is None or m.named("bk-sdm")),
    ("sd2-v", lambda m: m.scheduler.get("prediction_type") == "v_prediction"),
    ("sd2", lambda m: m.unet.get("cross_attention_dim") == 1024),
    ("sd1", lambda m: True),
]


def detect(model: ModelDescription) -> Family:
    """The family of ``model``: the declared one, else the first of :data:`RULES` that matches."""
    if model.declared is not None:
        if not isinstance(model.declared, str) or model.declared not in FAMILIES:  # a JSON list is unhashable
            raise ValueError(f'"family" {model.declared!r} is not one of {", ".join(FAMILIES)}')
        declared = FAMILIES[model.declared]
        architecture = ARCHITECTURES.get(model.denoiser)
        if architecture is not None and declared.architecture != architecture:
            same = ", ".join(f.name for f in FAMILIES.values() if f.architecture == architecture)
            raise ValueError(
                f'"family" {model.declared!r} is a {declared.architecture} model, but this folder\'s denoiser is a '
                f"{model.denoiser}: declare one of {same}"
            )
        return declared
    return FAMILIES[next(name for name, rule in RULES if rule(model))]


def native_size(unet: Mapping[str, Any], vae: Mapping[str, Any]) -> int:
    """The view size a model was trained at: the denoiser's ``sample_size`` in latent cells x the VAE's
    factor; where the denoiser has none (FLUX), the VAE's own ``sample_size`` in pixels; else 512."""

    def short_side(sample) -> int:
        return int(min(sample) if isinstance(sample, (list, tuple)) else sample)

    if unet.get("sample_size"):
        return short_side(unet["sample_size"]) * 2 ** (len(vae.get("block_out_channels") or (0, 0, 0, 0)) - 1)
    return short_side(vae.get("sample_size") or 512)


def family_changes(family: Family, size: int, preset: str = "default") -> dict[str, Any]:
    """The fields a family sets in named preset ``preset``, with the model's native view ``size``."""
    return {"size": size, **family.changes, **family.preset_changes.get(preset, {})}
