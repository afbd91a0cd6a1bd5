"""Model families: which Stable Diffusion a folder (or a pipeline in memory) holds, and its presets.

A family is recognised from the components' own configurations (``unet/config.json``,
``scheduler/scheduler_config.json``, a second text encoder) and, for distilled or Turbo
checkpoints whose shapes are their base model's, from what the folder says of itself: the
hub id or folder name, or ``"family"`` in its ``maskdiffusion.json``. :data:`FAMILIES` is
the one registry: each family and the preset fields it changes; the rules in :data:`RULES`
are tried in order, the first that matches wins. The view size every preset starts from is
the model's own native size, read from its configuration (UNet ``sample_size`` x the VAE's
factor: 512 for SD 1.x, 768 for SD 2.x-768, 1024 for SDXL, 512 for the Turbo models).

Layers are not a family setting: the ``default`` and ``attention-only`` presets choose them
from the UNet (``"auto"``, see :meth:`maskdiffusion.capture.UNetLayout.auto_attention_factors`),
so a family only says what the model was trained for (its view size, its timesteps).
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
        text_encoders: 1 (CLIP) or 2 (SDXL: CLIP ViT-L + OpenCLIP bigG, pooled embedding
            and size/crop conditions as added inputs).
        changes: preset fields the family sets in every named preset besides ``size``.
    """

    name: str
    description: str
    text_encoders: int = 1
    changes: Mapping[str, Any] = field(default_factory=dict)


# Turbo checkpoints (adversarial diffusion distillation) are trained to denoise in 1-4 steps
# at t in {999, 749, 499, 249}: 249 is the trained timestep that keeps most of the image.
TURBO_TIMESTEP = 249

FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family("sd1", "Stable Diffusion 1.x, 512 (CompVis/stable-diffusion-v1-4, stable-diffusion-v1-5/...)"),
        Family("sd2", "Stable Diffusion 2.x base, 512 (stabilityai/stable-diffusion-2-1-base)"),
        Family("sd2-v", "v-prediction models: Stable Diffusion 2.x, 768 (stabilityai/stable-diffusion-2-1)"),
        Family("sdxl", "Stable Diffusion XL, 1024 (stabilityai/stable-diffusion-xl-base-1.0)", text_encoders=2),
        Family("distilled", "block-removed distilled UNets without a mid block, 512 (nota-ai/bk-sdm-small)"),
        Family("sd-turbo", "SD-Turbo, 512 (stabilityai/sd-turbo)", changes={"timestep": TURBO_TIMESTEP}),
        Family(
            "sdxl-turbo",
            "SDXL-Turbo, 512 (stabilityai/sdxl-turbo)",
            text_encoders=2,
            changes={"timestep": TURBO_TIMESTEP},
        ),
    )
}


@dataclass(frozen=True)
class ModelDescription:
    """What :func:`detect` reads: the UNet's and scheduler's configurations, and names.

    ``names``: the hub id, folder path and any ``_name_or_path`` the configurations carry
    (lower-cased when matched); ``declared``: ``"family"`` from ``maskdiffusion.json``.
    """

    unet: Mapping[str, Any]
    scheduler: Mapping[str, Any]
    two_text_encoders: bool
    names: tuple[str, ...] = ()
    declared: str | None = None

    def named(self, *words: str) -> bool:
        return any(word in name.lower() for name in self.names for word in words)


def _is_sdxl(model: ModelDescription) -> bool:
    return model.two_text_encoders or model.unet.get("addition_embed_type") == "text_time"


def _is_turbo(model: ModelDescription) -> bool:
    """Named so, or scheduled as both Turbo snapshots are: "trailing" timesteps with epsilon prediction
    (stabilityai/sd-turbo and sdxl-turbo's scheduler configs; SD 1.x/2.x and SDXL ship "leading")."""
    trailing = model.scheduler.get("timestep_spacing") == "trailing"
    return model.named("turbo") or (trailing and model.scheduler.get("prediction_type", "epsilon") == "epsilon")


RULES: list[tuple[str, Callable[[ModelDescription], bool]]] = [
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
        return FAMILIES[model.declared]
    return FAMILIES[next(name for name, rule in RULES if rule(model))]


def native_size(unet: Mapping[str, Any], vae: Mapping[str, Any]) -> int:
    """The view size a model was trained at: the UNet's ``sample_size`` in latent cells x the VAE's factor."""
    sample = unet.get("sample_size") or 64
    if isinstance(sample, (list, tuple)):
        sample = min(sample)
    return int(sample) * 2 ** (len(vae.get("block_out_channels") or (0, 0, 0, 0)) - 1)


def family_changes(family: Family, size: int) -> dict[str, Any]:
    """The fields a family sets in every named preset, with the model's native view ``size``."""
    return {"size": size, **family.changes}
