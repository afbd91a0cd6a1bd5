"""What every transformer backbone shares: one token grid, blocks chosen by index, one capturing pass.

A diffusion transformer patchifies the latent once and runs its blocks on that one grid (1/16
of the view in SD3, FLUX and PixArt), so the only attention level is the grid itself
(``attention_factors`` resolves to it) and layers are blocks in forward order. A subclass says
which blocks exist, which it picks for ``"auto"``, and how one capturing pass runs
(:meth:`TransformerBackbone.capture`); the mask head's signals are then the same for all:
the store's attention log-maps, averaged over blocks, and the chosen blocks' image tokens.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable

import torch

from ..precision import Precision
from ..presets import AUTO, Preset
from ..text import TextConditioning
from .base import Backbone, PassSignals, TransformerPass, check_blocks, check_unsupported, mean_over_prompts

UNET_ONLY = "self-attention propagation and shared queries are UNet options"


class TransformerBackbone(Backbone):
    """A transformer denoiser (``transformer/`` in its folder) behind the backbone seam."""

    denoiser_part = "transformer"
    supports_concepts = False  # joint-attention models run concept streams (class_maps="concept")

    @property
    @abstractmethod
    def blocks(self) -> list[torch.nn.Module]:
        """Every block, in forward order."""

    @property
    @abstractmethod
    def patch(self) -> int:
        """Latent cells per token side."""

    @abstractmethod
    def auto_attention_blocks(self) -> tuple[int, ...]:
        """``attention_blocks="auto"``: the blocks whose attention gives the class maps."""

    @abstractmethod
    def auto_feature_blocks(self) -> tuple[int, ...]:
        """``feature_blocks="auto"``: the blocks whose image tokens are the features."""

    @abstractmethod
    def capture(
        self,
        latents: torch.Tensor,
        timestep: int,
        text: TextConditioning,
        preset: Preset,
        precision: Precision,
        *,
        stop_early: bool = True,
    ) -> TransformerPass:
        """One pass over ``latents`` ``(V, c, h, w)`` for every (view, prompt) pair of ``text``, processors and
        hooks installed; with ``stop_early=False`` it runs to the end and keeps the model's output."""

    @property
    def block(self) -> int:
        return self.vae_factor * self.patch

    @property
    def max_size(self) -> int | None:
        """The largest view side the model's position embedding covers (``None``: no limit)."""
        return None

    def resolve(self, preset: Preset) -> Preset:
        changes = {}
        if preset.attention_factors == AUTO:
            changes["attention_factors"] = (self.block,)
        if preset.attention_blocks == AUTO:
            changes["attention_blocks"] = self.auto_attention_blocks()
        if preset.feature_blocks == AUTO:
            changes["feature_blocks"] = self.auto_feature_blocks()
        return preset.replace(**changes) if changes else preset

    def check(self, preset: Preset) -> None:
        check_unsupported(
            preset,
            f"a transformer's blocks all work on one token grid, at 1/{self.block} of the view; {UNET_ONLY}",
            attention_factors=(self.block,),
            self_attention_factors=(),
            long_vocabulary="batch",
        )
        if not self.supports_concepts:
            check_unsupported(preset, "concept streams need joint attention (SD3, FLUX)", class_maps="attention")
        check_blocks(preset.attention_blocks, len(self.blocks), "attention_blocks", "blocks")
        check_blocks(preset.feature_blocks, len(self.blocks), "feature_blocks", "blocks")
        steps = self.schedule.steps
        late = [t for t in (preset.timestep, *preset.ensemble_timesteps) if t >= steps]
        if late:
            raise ValueError(f"timestep(s) {late} past this model's noise schedule: use 0 to {steps - 1}")
        if self.max_size is not None and preset.size > self.max_size:
            raise ValueError(
                f"size {preset.size} is past what this model's position embedding covers: at most {self.max_size}"
            )

    def tokens(self, view: tuple[int, int]) -> int:
        """Image tokens of a view of ``view = (height, width)`` pixels."""
        return (view[0] // self.block) * (view[1] // self.block)

    def noise_level(self, timestep: int, view: tuple[int, int]) -> dict:
        return self.schedule.level(timestep, self.tokens(view))

    def run(
        self, latents: torch.Tensor, timestep: int, text: TextConditioning, preset: Preset, precision: Precision
    ) -> PassSignals:
        views, prompts = latents.shape[0], len(text)
        captured = self.capture(latents, timestep, text, preset, precision)
        view = self.view(latents)
        grid = (view[0] // preset.feature_factor, view[1] // preset.feature_factor)
        attention = captured.store.layer_mean()
        return PassSignals(
            attention=attention.reshape(views, prompts, *attention.shape[-3:]),
            features=mean_over_prompts(captured.features(preset.feature_blocks, grid), views, prompts),
        )

    def compile(self, compile_fn: Callable[[torch.nn.Module], torch.nn.Module]) -> None:
        """The blocks' feed-forward layers (no processor or hook lives in them)."""
        for block in self.blocks:
            for name in ("ff", "ff_context"):
                if getattr(block, name, None) is not None:
                    setattr(block, name, compile_fn(getattr(block, name)))
