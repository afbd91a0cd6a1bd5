"""Denoiser architectures behind one seam (:class:`~maskdiffusion.backbones.base.Backbone`), one module each.

:data:`BACKBONES` maps a family's ``architecture`` to its class: ``unet`` (Stable Diffusion
1.x/2.x, SDXL and their distilled and Turbo kinds), ``sd3`` and ``flux`` (joint-attention
transformers, :mod:`~maskdiffusion.backbones.mmdit`), ``pixart`` (a cross-attention transformer,
:mod:`~maskdiffusion.backbones.dit`).
"""

from __future__ import annotations

from .base import Backbone, Part, PassSignals
from .dit import PixArtBackbone
from .mmdit import FluxBackbone, SD3Backbone
from .unet import UNetBackbone

BACKBONES: dict[str, type[Backbone]] = {
    "unet": UNetBackbone,
    "sd3": SD3Backbone,
    "flux": FluxBackbone,
    "pixart": PixArtBackbone,
}

__all__ = ["BACKBONES", "Backbone", "Part", "PassSignals"]
