"""Capture cross-attention maps and decoder features in one UNet pass.

Cross-attention is read through a diffusers attention processor installed on the chosen
layers only (every other layer keeps its fused SDPA kernel); decoder features through
forward hooks on the chosen up blocks. Once everything needed has been seen the pass
stops, so the finest (most expensive) decoder level is skipped when nothing uses it.

Attention maps are kept as logarithms in float32: ``exp`` maps are ``QK^T * scale``
itself, ``softmax`` maps are its log-softmax over the prompt tokens. Averages over heads,
layers and windows are taken as log-mean-exp with a shift that is added back exactly,
so exp scores never overflow in fp16/bf16 models and nothing is lost to a shift.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .presets import Preset
from .views import resize_maps


@dataclass(frozen=True)
class UNetLayout:
    """Where the UNet's cross-attention layers sit.

    ``vae_factor``: pixels per latent cell; ``levels``: number of UNet resolutions;
    ``cross_attention``: processor name -> down-sampling factor relative to the view.
    """

    vae_factor: int
    levels: int
    cross_attention: dict[str, int]

    @property
    def block(self) -> int:
        """Views must be multiples of this many pixels."""
        return self.vae_factor * 2 ** (self.levels - 1)

    @classmethod
    def of(cls, unet, vae) -> UNetLayout:
        vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        levels = len(unet.config.block_out_channels)
        factors = {}
        for name in unet.attn_processors:
            if ".attn2." not in name:
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
            factors[name] = vae_factor * 2**level
        return cls(vae_factor=vae_factor, levels=levels, cross_attention=factors)

    def select(self, attention_factors: tuple[int, ...]) -> dict[str, int]:
        """Processors of the layers at the given factors; error if a factor has none."""
        available = sorted(set(self.cross_attention.values()))
        missing = [f for f in attention_factors if f not in available]
        if missing:
            raise ValueError(
                f"this UNet has no cross-attention layer at down-sampling factor(s) {missing}; "
                f"it has layers at {available} (set Preset.attention_factors accordingly)"
            )
        return {n: f for n, f in self.cross_attention.items() if f in attention_factors}


def _layer_stop_block(name: str) -> int:
    """Index of the up block that must run for layer ``name`` to have run (-1: before any)."""
    match = re.match(r"up_blocks\.(\d+)\.", name)
    return int(match.group(1)) if match else -1


@dataclass
class CaptureStore:
    """What one UNet pass leaves behind.

    ``attention``: one ``(B, K, h, w)`` float32 log-map per captured layer, resized to
    the common attention grid; ``features``: ``block -> (B, D, H, W)`` float32, each
    L2-normalised over channels.
    """

    view_size: tuple[int, int]
    attention_mode: str
    attention_grid: tuple[int, int]
    attention: list[torch.Tensor] = field(default_factory=list)
    features: dict[int, torch.Tensor] = field(default_factory=dict)
    keep_queries: bool = False
    queries: list[tuple[object, int, torch.Tensor]] = field(default_factory=list)

    def record(self, attn, query: torch.Tensor, scores: torch.Tensor, factor: int) -> None:
        """Called by :class:`CaptureProcessor` for every captured layer."""
        self.add_attention(scores, factor)
        if self.keep_queries:
            self.queries.append((attn, factor, query.float()))

    def add_attention(self, scores: torch.Tensor, factor: int) -> None:
        """``scores``: ``(B, heads, N, K)`` float32 ``QK^T * scale`` of one layer."""
        with torch.autocast(scores.device.type, enabled=False):  # maps stay float32 under autocast
            if self.attention_mode == "softmax":
                scores = scores.log_softmax(dim=-1)
            batch, heads, queries, keys = scores.shape
            rows, cols = self.view_size[0] // factor, self.view_size[1] // factor
            if rows * cols != queries:
                raise RuntimeError(f"layer at factor {factor} has {queries} queries, expected {rows}x{cols}")
            log_mean = torch.logsumexp(scores, dim=1) - math.log(heads)  # (B, N, K)
            log_mean = log_mean.transpose(1, 2).reshape(batch, keys, rows, cols)
            self.attention.append(resize_log_maps(log_mean, self.attention_grid))

    def layer_mean(self) -> torch.Tensor:
        """``(B, K, h, w)`` log of the mean over captured layers of the attention maps."""
        stacked = torch.stack(self.attention)
        return torch.logsumexp(stacked, dim=0) - math.log(len(self.attention))

    def attend(self, text: torch.Tensor) -> CaptureStore:
        """Attention of the stored queries to another prompt's keys, without a UNet pass.

        ``text``: ``(1, T, E)`` or ``(B, T, E)`` embeddings. Returns a store whose
        attention is what this pass would have recorded with ``text`` in the captured
        layers: exact where a layer's queries do not depend on the prompt (the first
        cross-attention layer), an approximation after it (those queries saw the
        pass's own prompt).
        """
        other = CaptureStore(self.view_size, self.attention_mode, self.attention_grid)
        for attn, factor, query in self.queries:
            context = attn.norm_encoder_hidden_states(text) if attn.norm_cross else text
            key = attn.to_k(context.to(attn.to_k.weight.dtype))
            key = key.view(key.shape[0], -1, attn.heads, query.shape[-1]).transpose(1, 2)
            if attn.norm_k is not None:
                key = attn.norm_k(key)
            with torch.autocast(query.device.type, enabled=False):
                other.add_attention(torch.matmul(query, key.float().transpose(-1, -2)) * attn.scale, factor)
        return other


def resize_log_maps(log_maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of maps given as logs ``(..., h, w)``, exact up to underflow."""
    if tuple(log_maps.shape[-2:]) == tuple(size):
        return log_maps
    shift = log_maps.amax(dim=(-2, -1), keepdim=True)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    return resize_maps(torch.exp(log_maps - shift), size).log() + shift


class CaptureProcessor:
    """Cross-attention processor that computes attention explicitly and records it.

    The output equals diffusers' stock processor (softmax(QK^T * scale) V); the scores
    are formed in float32 whatever the model's dtype.
    """

    def __init__(self, store_ref: list[CaptureStore], factor: int):
        self._store_ref = store_ref
        self.factor = factor

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is None or attention_mask is not None or attn.spatial_norm is not None:
            raise NotImplementedError("CaptureProcessor handles text cross-attention without masks only")
        residual = hidden_states
        if hidden_states.ndim == 4:
            raise NotImplementedError("CaptureProcessor expects (B, N, C) hidden states")
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        with torch.autocast(query.device.type, enabled=False):
            scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * attn.scale
        probs = scores.softmax(dim=-1)
        out = torch.matmul(probs.to(value.dtype), value)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        out = out / attn.rescale_output_factor
        self._store_ref[0].record(attn, query, scores, self.factor)
        return out


class _PassComplete(Exception):
    """Raised by a hook once every captured signal exists, to skip the rest of the UNet."""


class UNetCapture:
    """Runs a UNet once and returns its captured attention maps and features.

    Processors are installed for the duration of :meth:`run` and the model's own
    processors restored afterwards, so the UNet object is left as it was found.
    """

    def __init__(self, unet, vae, preset: Preset):
        self.unet = unet
        self.layout = UNetLayout.of(unet, vae)
        self.preset = preset
        self.layers = self.layout.select(preset.attention_factors)
        up_count = len(unet.up_blocks)
        bad = [b for b in preset.feature_blocks if not 0 <= b < up_count]
        if bad:
            raise ValueError(f"feature_blocks {bad} out of range: this UNet has up blocks 0..{up_count - 1}")
        stops = [_layer_stop_block(n) for n in self.layers]
        self.stop_block = max([*stops, *preset.feature_blocks])

    @contextmanager
    def _installed(
        self, store_ref: list[CaptureStore], features: dict[int, torch.Tensor], stop: bool
    ) -> Iterator[None]:
        original = self.unet.attn_processors
        processors = {
            name: CaptureProcessor(store_ref, self.layers[name]) if name in self.layers else proc
            for name, proc in original.items()
        }
        handles = []

        def feature_hook(index: int):
            def hook(module, args, output):
                if index in self.preset.feature_blocks:
                    features[index] = output
                if stop and index == self.stop_block:
                    raise _PassComplete

            return hook

        self.unet.set_attn_processor(processors)
        try:
            for index, block in enumerate(self.unet.up_blocks):
                if index in self.preset.feature_blocks or index == self.stop_block:
                    handles.append(block.register_forward_hook(feature_hook(index)))
            yield
        finally:
            for handle in handles:
                handle.remove()
            self.unet.set_attn_processor(original)

    @torch.no_grad()
    def run(
        self,
        latents: torch.Tensor,
        timestep: int,
        text: torch.Tensor,
        *,
        stop_early: bool = True,
        keep_queries: bool = False,
    ) -> tuple[CaptureStore, torch.Tensor | None]:
        """One pass over ``latents`` ``(B, c, h, w)`` with ``text`` ``(B, T, E)``.

        Returns the store (attention log-maps on the 1/``attention_factor`` grid,
        features on the 1/``feature_factor`` grid, and with ``keep_queries`` the captured
        layers' queries for :meth:`CaptureStore.attend`) and the UNet output (``None``
        when the pass stopped early).
        """
        view = (latents.shape[-2] * self.layout.vae_factor, latents.shape[-1] * self.layout.vae_factor)
        grid = (view[0] // self.preset.attention_factor, view[1] // self.preset.attention_factor)
        store = CaptureStore(
            view_size=view, attention_mode=self.preset.attention_mode, attention_grid=grid, keep_queries=keep_queries
        )
        raw: dict[int, torch.Tensor] = {}
        output = None
        with self._installed([store], raw, stop_early), suppress(_PassComplete):
            output = self.unet(latents, timestep, encoder_hidden_states=text, return_dict=False)[0]
        feature_grid = (view[0] // self.preset.feature_factor, view[1] // self.preset.feature_factor)
        with torch.autocast(latents.device.type, enabled=False):
            for index in self.preset.feature_blocks:
                normalised = F.normalize(raw[index].float(), dim=1)
                store.features[index] = resize_maps(normalised, feature_grid)
        return store, output
