"""UNet denoisers: Stable Diffusion 1.x/2.x, SDXL, distilled and Turbo UNets.

Cross-attention layers are chosen by their down-sampling factor relative to the view (so every
view size keeps the same layers), decoder features by up-block index; processors go on the
chosen layers only and hooks on the chosen up blocks, and the pass stops after the last block
needed, so the finest (most expensive) decoder level is skipped when nothing uses it. Latents
are noised as DDPM trained them, ``sqrt(a_t) x_0 + sqrt(1 - a_t) e`` with the folder's own
schedule. Prompts are CLIP's (one encoder; SDXL two, with its pooled embedding and the view's
size ids as added conditions).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..capture import CaptureProcessor, CaptureStore, PassComplete, features_on_grid, installed
from ..precision import Precision
from ..presets import AUTO, Preset
from ..prompts import ClassName, PromptBatch
from ..text import TextConditioning, build_prompt_batches, clip_length, encode_clip
from .base import Backbone, Part, PassSignals, check_unsupported, mean_over_prompts, per_prompt
from .noise import DDPMSchedule

AUTO_MIN_FACTOR = 32  # "auto" attention: layers with at most 16x16 queries at a 512 view (the reference's set)


@dataclass(frozen=True)
class UNetLayout:
    """Where the UNet's cross-attention layers sit.

    ``vae_factor``: pixels per latent cell; ``levels``: number of UNet resolutions;
    ``cross_attention`` / ``self_attention``: processor name -> down-sampling factor
    relative to the view.
    """

    vae_factor: int
    levels: int
    cross_attention: dict[str, int]
    self_attention: dict[str, int] = field(default_factory=dict)
    up_block_factors: tuple[int, ...] = ()  # factor of each up block's output (after its upsampler)

    @property
    def block(self) -> int:
        """Views must be multiples of this many pixels."""
        return self.vae_factor * 2 ** (self.levels - 1)

    @classmethod
    def of(cls, unet, vae_factor: int) -> UNetLayout:
        levels = len(unet.config.block_out_channels)
        factors: dict[str, dict[str, int]] = {".attn1.": {}, ".attn2.": {}}
        for name in unet.attn_processors:
            kind = next((k for k in factors if k in name), None)
            if kind is None:
                continue
            match = re.match(r"(down_blocks|up_blocks)\.(\d+)\.", name)
            if name.startswith("mid_block"):
                level = levels - 1
            elif match and match.group(1) == "down_blocks":
                level = int(match.group(2))
            elif match:
                level = levels - 1 - int(match.group(2))
            else:
                continue
            factors[kind][name] = vae_factor * 2**level
        outputs = []
        for index, block in enumerate(unet.up_blocks):
            level = levels - 1 - index - (1 if getattr(block, "upsamplers", None) else 0)
            outputs.append(vae_factor * 2 ** max(level, 0))
        return cls(
            vae_factor=vae_factor,
            levels=levels,
            cross_attention=factors[".attn2."],
            self_attention=factors[".attn1."],
            up_block_factors=tuple(outputs),
        )

    def auto_attention_factors(self) -> tuple[int, ...]:
        """``attention_factors="auto"``: every cross-attention level at factor >= :data:`AUTO_MIN_FACTOR`,
        or the coarsest level when there is none that coarse."""
        available = sorted(set(self.cross_attention.values()))
        if not available:
            raise ValueError("this UNet has no cross-attention layer: it cannot be prompted with class names")
        chosen = tuple(f for f in available if f >= AUTO_MIN_FACTOR)
        return chosen or (available[-1],)

    def auto_feature_blocks(self) -> tuple[int, ...]:
        """``feature_blocks="auto"``: the first up blocks whose outputs lie at twice and at once the VAE's
        factor (the decoder at 1/16 and 1/8 of the view in Stable Diffusion)."""
        chosen = []
        for factor in (2 * self.vae_factor, self.vae_factor):
            if factor in self.up_block_factors:
                chosen.append(self.up_block_factors.index(factor))
        if not chosen:
            raise ValueError(
                f"this UNet's up blocks output at factors {list(self.up_block_factors)}; none at "
                f"{2 * self.vae_factor} or {self.vae_factor}: set Preset.feature_blocks"
            )
        return tuple(chosen)

    def resolve(self, preset: Preset) -> Preset:
        """``preset`` with its ``"auto"`` layer fields replaced by this UNet's choice."""
        changes = {}
        if preset.attention_factors == AUTO:
            changes["attention_factors"] = self.auto_attention_factors()
        if preset.feature_blocks == AUTO:
            changes["feature_blocks"] = self.auto_feature_blocks()
        return preset.replace(**changes) if changes else preset

    def select(self, attention_factors: tuple[int, ...]) -> dict[str, int]:
        """Processors of the cross-attention layers at the given factors; error if a factor has none."""
        return _select(self.cross_attention, attention_factors, "cross-attention", "attention_factors")

    def select_self(self, self_attention_factors: tuple[int, ...]) -> dict[str, int]:
        """Processors of the self-attention layers at the given factors; error if a factor has none."""
        return _select(self.self_attention, self_attention_factors, "self-attention", "self_attention_factors")


def _select(layers: dict[str, int], factors: tuple[int, ...], kind: str, field_name: str) -> dict[str, int]:
    available = sorted(set(layers.values()))
    missing = [f for f in factors if f not in available]
    if missing:
        raise ValueError(
            f"this UNet has no {kind} layer at down-sampling factor(s) {missing}; "
            f"it has layers at {available} (set Preset.{field_name} accordingly)"
        )
    return {n: f for n, f in layers.items() if f in factors}


def _layer_stop_block(name: str) -> int:
    """Index of the up block that must run for layer ``name`` to have run (-1: before any)."""
    match = re.match(r"up_blocks\.(\d+)\.", name)
    return int(match.group(1)) if match else -1


class UNetCapture:
    """Runs a UNet once and returns its captured attention maps, self-attention and features.

    Processors are installed for the duration of :meth:`run` and the model's own
    processors restored afterwards, so the UNet object is left as it was found.
    """

    def __init__(self, unet, vae_factor: int, preset: Preset):
        self.unet = unet
        self.layout = UNetLayout.of(unet, vae_factor)
        self.preset = preset = self.layout.resolve(preset)
        self.layers = self.layout.select(preset.attention_factors)
        self.self_layers = self.layout.select_self(preset.self_attention_factors)
        up_count = len(unet.up_blocks)
        bad = [b for b in preset.feature_blocks if not 0 <= b < up_count]
        if bad:
            raise ValueError(f"feature_blocks {bad} out of range: this UNet has up blocks 0..{up_count - 1}")
        stops = [_layer_stop_block(n) for n in (*self.layers, *self.self_layers)]
        self.stop_block = max([*stops, *preset.feature_blocks])

    @torch.no_grad()
    def run(
        self,
        latents: torch.Tensor,
        timestep: int,
        text: torch.Tensor,
        *,
        stop_early: bool = True,
        keep_queries: bool = False,
        added_conditions: dict[str, torch.Tensor] | None = None,
    ) -> tuple[CaptureStore, torch.Tensor | None]:
        """One pass over ``latents`` ``(B, c, h, w)`` with ``text`` ``(B, T, E)`` (and SDXL's
        ``added_conditions``: pooled text embeddings and size/crop ids).

        Returns the store (attention log-maps on the 1/``attention_factor`` grid,
        features on the 1/``feature_factor`` grid, self-attention of the
        ``self_attention_factors`` layers on the finest one's grid, and with
        ``keep_queries`` the captured layers' queries for :meth:`CaptureStore.attend`) and
        the UNet output (``None`` when the pass stopped early).
        """
        view = (latents.shape[-2] * self.layout.vae_factor, latents.shape[-1] * self.layout.vae_factor)
        store = CaptureStore.for_view(view, self.preset, keep_queries=keep_queries)
        store_ref = [store]
        processors = {name: CaptureProcessor(store_ref, factor) for name, factor in self.layers.items()}
        processors.update(
            {name: CaptureProcessor(store_ref, f, self_attention=True) for name, f in self.self_layers.items()}
        )
        raw: dict[int, torch.Tensor] = {}
        hooks = [
            (block, self._feature_hook(index, raw, stop_early))
            for index, block in enumerate(self.unet.up_blocks)
            if index in self.preset.feature_blocks or index == self.stop_block
        ]
        output = None
        with installed(self.unet, processors, hooks), suppress(PassComplete):
            output = self.unet(
                latents, timestep, encoder_hidden_states=text, added_cond_kwargs=added_conditions, return_dict=False
            )[0]
        feature_grid = (view[0] // self.preset.feature_factor, view[1] // self.preset.feature_factor)
        for index in self.preset.feature_blocks:
            store.features[index] = features_on_grid(raw[index], feature_grid)
        return store, output

    def _feature_hook(self, index: int, raw: dict[int, torch.Tensor], stop: bool) -> Callable:
        def hook(module, args, output):
            if index in self.preset.feature_blocks:
                raw[index] = output
            if stop and index == self.stop_block:
                raise PassComplete

        return hook


def ddpm_schedule(scheduler, config: dict) -> DDPMSchedule:
    """The noise schedule of a pipeline's scheduler in memory, else of a folder's scheduler configuration
    (Stable Diffusion's when the folder has none)."""
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if alphas is not None:
        return DDPMSchedule(alphas)
    if not config:
        from ..tiny import SD_NOISE_SCHEDULE

        config = SD_NOISE_SCHEDULE
    return DDPMSchedule.from_config(config)


def added_conditions(text: TextConditioning, view: tuple[int, int]) -> dict[str, torch.Tensor] | None:
    """SDXL's added UNet inputs for views of ``view = (height, width)`` pixels, uncropped (else ``None``)."""
    if text.pooled is None:
        return None
    height, width = view
    size = torch.tensor([height, width, 0, 0, height, width], dtype=text.pooled.dtype, device=text.pooled.device)
    return {"text_embeds": text.pooled, "time_ids": size.expand(text.pooled.shape[0], -1)}


class UNetBackbone(Backbone):
    """A diffusers ``UNet2DConditionModel`` with one CLIP text encoder (SD 1.x/2.x) or two (SDXL)."""

    kind = "unet"
    denoiser_part = "unet"
    parts: ClassVar[dict[str, Part]] = {
        "unet": Part("diffusers", "UNet2DConditionModel"),
        "text_encoder": Part("transformers", "CLIPTextModel"),
        "tokenizer": Part("transformers", "CLIPTokenizer", weights=False),
        "text_encoder_2": Part("transformers", "CLIPTextModelWithProjection", required=False),
        "tokenizer_2": Part("transformers", "CLIPTokenizer", weights=False, required=False),
    }
    text_parts = ("text_encoder", "text_encoder_2")
    tokenizer_parts = ("tokenizer", "tokenizer_2")

    def __init__(self, modules: dict[str, object], scheduler: dict, vae_factor: int, family):
        super().__init__(modules, scheduler, vae_factor, family)
        self.schedule = ddpm_schedule(modules.get("scheduler"), scheduler)
        self.layout = UNetLayout.of(self.unet, vae_factor)

    @property
    def block(self) -> int:
        return self.layout.block

    def resolve(self, preset: Preset) -> Preset:
        return self.layout.resolve(preset)

    def check(self, preset: Preset) -> None:
        check_unsupported(
            preset,
            "a UNet takes every cross-attention layer at attention_factors and has no concept streams",
            attention_blocks=AUTO,
            class_maps="attention",
        )
        steps = self.schedule.steps
        late = [t for t in (preset.timestep, *preset.ensemble_timesteps) if t >= steps]
        if late:
            raise ValueError(f"timestep(s) {late} past this model's noise schedule: use 0 to {steps - 1}")
        self.layout.select(preset.attention_factors)
        self.layout.select_self(preset.self_attention_factors)
        up_count = len(self.unet.up_blocks)
        bad = [b for b in preset.feature_blocks if not 0 <= b < up_count]
        if bad:
            raise ValueError(f"feature_blocks {bad} out of range: this UNet has up blocks 0..{up_count - 1}")

    def noise_level(self, timestep: int, view: tuple[int, int]) -> dict:
        return self.schedule.level(timestep, 0)

    def prompts(self, vocabulary: Sequence[ClassName], separator: str) -> list[PromptBatch]:
        pairs = zip(self.tokenizers, self.text_encoders, strict=True)
        return build_prompt_batches(self.tokenizers, vocabulary, separator, lengths=[clip_length(*p) for p in pairs])

    def encode(self, batches: Sequence[PromptBatch], device: torch.device) -> TextConditioning:
        return encode_clip(self.text_encoders, batches, device)

    def class_weights(self, batches: Sequence[PromptBatch], preset: Preset, words: str) -> torch.Tensor:
        return batches[0].token_weights(words)  # SDXL's two tokenizers give the same spans

    def noise(self, latents: torch.Tensor, timestep: int, seed: int) -> torch.Tensor:
        return self.schedule.noise(latents, timestep, seed)

    def run(
        self, latents: torch.Tensor, timestep: int, text: TextConditioning, preset: Preset, precision: Precision
    ) -> PassSignals:
        """With several prompts (``batch``), features and self-attention are the mean over the prompts'
        passes of a view; ``shared-queries`` runs the first prompt and attends the others from its
        stored queries (:meth:`~maskdiffusion.capture.CaptureStore.attend`)."""
        views, prompts = latents.shape[0], len(text)
        shared = preset.long_vocabulary == "shared-queries" and prompts > 1
        passes = 1 if shared else prompts
        batch_text = text.batch(passes, views, self.unet.dtype)
        view = self.view(latents)
        store, _ = UNetCapture(self.unet, self.vae_factor, preset).run(
            per_prompt(latents, passes, self.unet.dtype, precision),
            timestep,
            batch_text.hidden,
            keep_queries=shared,
            added_conditions=added_conditions(batch_text, view),
        )
        attention = store.layer_mean()
        if shared:
            attention = torch.stack(
                [attention, *(store.attend(text.hidden[p : p + 1]).layer_mean() for p in range(1, prompts))], 1
            )
        features = torch.cat([store.features[b] for b in preset.feature_blocks], dim=1)
        return PassSignals(
            attention=attention.reshape(views, prompts, *attention.shape[-3:]),
            features=mean_over_prompts(features, views, passes),
            self_attention=mean_over_prompts(store.self_attention_mean(), views, passes),
        )

    def compile(self, compile_fn: Callable[[torch.nn.Module], torch.nn.Module]) -> None:
        """The ResNet blocks (no attention processors or hooks live in them)."""
        for block in (*self.unet.down_blocks, *self.unet.up_blocks):
            for index, resnet in enumerate(block.resnets):
                block.resnets[index] = compile_fn(resnet)
