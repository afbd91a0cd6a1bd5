"""Cross-attention transformers (DiT): PixArt-Σ.

``PixArtTransformer2DModel`` runs ``BasicTransformerBlock``s on one token grid at 1/16 of the view
(the VAE's 8 x a 2x2 patch): self-attention over the image, then cross-attention (``attn2``) to
T5's tokens with the prompt's padding masked, as its pipeline masks it. PixArt has no joint
attention, so its class maps are the cross-attention weights (``class_maps="attention"``),
captured by the same processor as a UNet's (:class:`~maskdiffusion.capture.CaptureProcessor`,
the mask added to the scores as the model adds it); features are the image tokens' output hidden
states of ``feature_blocks``. Latents are noised with the folder's own DDPM schedule.

``auto`` layers (not measured here: no real weights can be loaded): attention from the middle
third of the blocks (9-17 of PixArt-Σ's 28), features from the two blocks at half depth (13, 14),
where diffusion transformers' features are reported most semantic; GoCA weighs PixArt's layers
itself, which this fixed choice does not.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import suppress
from typing import ClassVar

import torch

from ..capture import CaptureProcessor, CaptureStore, PassComplete, installed
from ..precision import Precision
from ..presets import Preset
from ..prompts import ClassName, PromptBatch
from ..text import TextConditioning, build_prompt_batches, padding_mask, t5_hidden
from .base import Part, TransformerPass, block_hooks, per_prompt
from .noise import DDPMSchedule
from .transformer import TransformerBackbone


class PixArtBackbone(TransformerBackbone):
    """PixArt-Σ: ``PixArtTransformer2DModel`` with one T5 encoder (its padding masked)."""

    kind = "dit"
    parts: ClassVar[dict[str, Part]] = {
        "transformer": Part("diffusers", "PixArtTransformer2DModel"),
        "text_encoder": Part("transformers", "T5EncoderModel"),
        "tokenizer": Part("transformers", "T5TokenizerFast", weights=False),
    }
    text_parts = ("text_encoder",)
    tokenizer_parts = ("tokenizer",)

    def __init__(self, modules: dict[str, object], scheduler: dict, vae_factor: int, family):
        super().__init__(modules, scheduler, vae_factor, family)
        alphas = getattr(modules.get("scheduler"), "alphas_cumprod", None)
        self.schedule = DDPMSchedule(alphas) if alphas is not None else DDPMSchedule.from_config(scheduler)
        self.text_length = 300 if family.text_length is None else family.text_length

    @property
    def blocks(self) -> list[torch.nn.Module]:
        return list(self.transformer.transformer_blocks)

    @property
    def patch(self) -> int:
        return int(self.transformer.config.patch_size)

    def auto_attention_blocks(self) -> tuple[int, ...]:
        count = len(self.blocks)
        return tuple(range(count // 3, max(count // 3 + 1, 2 * count // 3)))

    def auto_feature_blocks(self) -> tuple[int, ...]:
        count = len(self.blocks)
        return tuple(sorted({max(count // 2 - 1, 0), count // 2}))

    def prompts(self, vocabulary: Sequence[ClassName], separator: str) -> list[PromptBatch]:
        return build_prompt_batches([self.tokenizer], vocabulary, separator, lengths=[self.text_length])

    def encode(self, batches: Sequence[PromptBatch], device: torch.device) -> TextConditioning:
        mask = padding_mask(batches[0], self.tokenizer).to(device)
        return TextConditioning(t5_hidden(self.text_encoder, batches[0].input_ids.to(device), mask), mask=mask)

    def class_weights(self, batches: Sequence[PromptBatch], preset: Preset, words: str) -> torch.Tensor:
        return batches[0].token_weights(words)

    def noise(self, latents: torch.Tensor, timestep: int, seed: int) -> torch.Tensor:
        return self.schedule.noise(latents, timestep, seed)

    def _added_conditions(self, batch: int, view: tuple[int, int], device) -> dict:
        """PixArt's size conditions: none for PixArt-Σ (its pipeline passes ``None``), else the view's
        resolution and aspect ratio, as PixArt-α's pipeline passes them."""
        if not self.transformer.use_additional_conditions:
            return {"resolution": None, "aspect_ratio": None}
        height, width = view
        return {
            "resolution": torch.tensor([[height, width]], dtype=torch.float32, device=device).expand(batch, -1),
            "aspect_ratio": torch.tensor([[height / width]], dtype=torch.float32, device=device).expand(batch, -1),
        }

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
        views, prompts = latents.shape[0], len(text)
        dtype = self.transformer.dtype
        view = self.view(latents)
        batch_text = text.batch(prompts, views, dtype)
        inputs = per_prompt(latents, prompts, dtype, precision)
        store = CaptureStore.for_view(view, preset)
        processors = {
            f"transformer_blocks.{i}.attn2.processor": CaptureProcessor([store], self.block)
            for i in preset.attention_blocks
        }
        raw: dict[int, torch.Tensor] = {}
        last = max([*preset.attention_blocks, *preset.feature_blocks])
        hooks = block_hooks(self.blocks, preset.feature_blocks, last, raw, stop=stop_early)
        result = TransformerPass(store, raw, (view[0] // self.block, view[1] // self.block))
        with installed(self.transformer, processors, hooks), suppress(PassComplete):
            result.output = self.transformer(
                inputs,
                encoder_hidden_states=batch_text.hidden,
                encoder_attention_mask=batch_text.mask,
                timestep=torch.full((inputs.shape[0],), timestep, device=inputs.device, dtype=torch.long),
                added_cond_kwargs=self._added_conditions(inputs.shape[0], view, inputs.device),
                return_dict=False,
            )[0]
        return result
