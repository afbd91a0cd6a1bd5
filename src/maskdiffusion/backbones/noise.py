"""How a clean latent is noised at a preset's ``timestep``, in each model's own training terms.

A preset's ``timestep`` t (0-999) is always an index into the model's training schedule; what
it means depends on how the model was trained, and :meth:`level` says it for the records:

- :class:`DDPMSchedule` (the UNets, PixArt-Σ): ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) e`` with
  the folder's own cumulative alphas ``a_t``; the denoiser reads ``t``.
- :class:`FlowSchedule` (SD3, FLUX: rectified flow): ``x_s = (1 - s) x_0 + s e`` with
  ``s = shift(u)``, ``u = t / 1000``, shifted as the folder's ``FlowMatchEulerDiscreteScheduler``
  shifts its sigmas: ``shift u / (1 + (shift - 1) u)``, or with dynamic shifting (FLUX-dev)
  ``e^mu / (e^mu + 1/u - 1)``, ``mu`` interpolated from the view's image-token count between
  ``base_image_seq_len`` and ``max_image_seq_len``, as the pipeline computes it. The denoiser
  reads ``1000 s`` (SD3) or ``s`` (FLUX), as its pipeline passes it.

t = 0 is the clean latent in both. The noise is drawn on the CPU from the preset's seed, the
same for every view, so results do not depend on the device or the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def seeded_noise(latents: torch.Tensor, seed: int) -> torch.Tensor:
    """``(1, c, h, w)`` standard normal noise from ``seed`` (on the CPU, so every device draws the same)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((1, *latents.shape[1:]), generator=generator).to(latents)


class DDPMSchedule:
    """Variance-preserving noise with a scheduler configuration's cumulative alphas."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        self.alphas_cumprod = alphas_cumprod.detach().to("cpu", torch.float32)

    @classmethod
    def from_config(cls, config: dict) -> DDPMSchedule:
        """The schedule of a scheduler configuration (any diffusers DDPM-family scheduler's betas)."""
        from diffusers import DDPMScheduler

        known = {k: v for k, v in config.items() if not k.startswith("_") and k != "set_alpha_to_one"}
        return cls(DDPMScheduler.from_config(known).alphas_cumprod)

    @property
    def steps(self) -> int:
        return len(self.alphas_cumprod)

    def noise(self, latents: torch.Tensor, timestep: int, seed: int) -> torch.Tensor:
        if not timestep:
            return latents
        alpha = self.alphas_cumprod[timestep].to(latents)
        return alpha.sqrt() * latents + (1 - alpha).sqrt() * seeded_noise(latents, seed)

    def level(self, timestep: int, tokens: int) -> dict:
        return {"schedule": "ddpm", "timestep": timestep, "alpha_bar": round(float(self.alphas_cumprod[timestep]), 6)}


@dataclass(frozen=True)
class FlowSchedule:
    """Rectified-flow noise, shifted as a ``FlowMatchEulerDiscreteScheduler`` configuration says."""

    steps: int = 1000
    shift: float = 1.0
    dynamic: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_tokens: int = 256
    max_tokens: int = 4096

    @classmethod
    def from_config(cls, config: dict) -> FlowSchedule:
        if config.get("time_shift_type", "exponential") != "exponential" and config.get("use_dynamic_shifting"):
            raise ValueError(
                f"scheduler time_shift_type {config['time_shift_type']!r} is not supported: only 'exponential'"
            )
        return cls(
            steps=int(config.get("num_train_timesteps", 1000)),
            shift=float(config.get("shift", 1.0)),
            dynamic=bool(config.get("use_dynamic_shifting", False)),
            base_shift=float(config.get("base_shift") or 0.5),
            max_shift=float(config.get("max_shift") or 1.15),
            base_tokens=int(config.get("base_image_seq_len") or 256),
            max_tokens=int(config.get("max_image_seq_len") or 4096),
        )

    def sigma(self, timestep: int, tokens: int) -> float:
        """``s`` of ``timestep`` for views of ``tokens`` image tokens (only dynamic shifting reads it)."""
        u = timestep / self.steps
        if u <= 0:
            return 0.0
        if self.dynamic:
            slope = (self.max_shift - self.base_shift) / (self.max_tokens - self.base_tokens)
            mu = self.base_shift + slope * (tokens - self.base_tokens)
            return math.exp(mu) / (math.exp(mu) + (1 / u - 1))
        return self.shift * u / (1 + (self.shift - 1) * u)

    def noise(self, latents: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
        if not sigma:
            return latents
        return (1 - sigma) * latents + sigma * seeded_noise(latents, seed)

    def level(self, timestep: int, tokens: int) -> dict:
        return {"schedule": "flow-matching", "timestep": timestep, "sigma": round(self.sigma(timestep, tokens), 6)}
