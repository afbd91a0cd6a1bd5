"""What every backbone's pass captures, and how passes are averaged: model-independent pieces.

Attention is read through a diffusers attention processor installed on the chosen layers
only (every other layer keeps its fused SDPA kernel); features through forward hooks on the
chosen blocks. Once everything needed has been seen a hook raises :class:`PassComplete`, so
the rest of the model is skipped. :func:`installed` puts processors and hooks in place for
one pass and restores the model's own afterwards, whatever happens.

Attention maps are kept as logarithms in float32: ``exp`` maps are ``QK^T * scale``
itself, ``softmax`` maps are its log-softmax over the prompt tokens. Averages over heads,
layers and windows are taken as log-mean-exp with a shift that is added back exactly,
so exp scores never overflow in fp16/bf16 models and nothing is lost to a shift.

Self-attention is kept as probabilities, one ``(N, N)`` row-stochastic matrix per view
(the mean over heads and layers, on the grid of the finest chosen layer), and
:func:`propagate` spreads the class attention with it, ``A' = S^k A`` (as iSeg and
DiffSegmenter do). :func:`ensemble_passes` lists the passes of a multi-timestep,
multi-noise ensemble.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .presets import Preset
from .views import bilinear_matrix, resize_maps


class PassComplete(Exception):
    """Raised by a hook once every captured signal exists, to skip the rest of the model."""


@contextmanager
def installed(
    model,
    processors: dict[str, object],
    hooks: Sequence[tuple[torch.nn.Module, Callable]] = (),
    pre_hooks: Sequence[tuple[torch.nn.Module, Callable]] = (),
) -> Iterator[None]:
    """``model`` (a diffusers model with attention processors) with ``processors`` (name -> processor)
    installed over its own, forward ``hooks`` and ``pre_hooks`` (kwargs-aware) registered, for one pass.

    The model's own processors come back and every hook is removed afterwards, also when the
    pass fails, so a model shared with a pipeline is left as it was found.
    """
    original = model.attn_processors
    model.set_attn_processor({**original, **processors})
    handles = []
    try:
        handles += [module.register_forward_hook(hook) for module, hook in hooks]
        handles += [module.register_forward_pre_hook(hook, with_kwargs=True) for module, hook in pre_hooks]
        yield
    finally:
        for handle in handles:
            handle.remove()
        model.set_attn_processor(original)


def features_on_grid(raw: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``(B, D, h, w)`` activations -> float32, L2-normalised over channels, resized to ``grid``."""
    with torch.autocast(raw.device.type, enabled=False):
        return resize_maps(F.normalize(raw.float(), dim=1), grid)


@dataclass
class CaptureStore:
    """What one pass leaves behind.

    ``attention``: one ``(B, K, h, w)`` float32 log-map per captured layer, resized to
    the common attention grid; ``features``: ``block -> (B, D, H, W)`` float32, each
    L2-normalised over channels; ``self_attention_sum``: ``(B, N, N)`` float32 sum over
    the captured self-attention layers of their head-mean probabilities on
    ``self_attention_grid`` (``N`` = its cells), ``self_attention_layers`` how many.
    """

    view_size: tuple[int, int]
    attention_mode: str
    attention_grid: tuple[int, int]
    attention: list[torch.Tensor] = field(default_factory=list)
    features: dict[int, torch.Tensor] = field(default_factory=dict)
    keep_queries: bool = False
    queries: list[tuple[object, int, torch.Tensor]] = field(default_factory=list)
    self_attention_grid: tuple[int, int] | None = None
    self_attention_sum: torch.Tensor | None = None
    self_attention_layers: int = 0

    @classmethod
    def for_view(cls, view: tuple[int, int], preset: Preset, *, keep_queries: bool = False) -> CaptureStore:
        """An empty store for views of ``view = (height, width)`` pixels, on the preset's grids."""
        finest = min(preset.self_attention_factors, default=None)
        return cls(
            view_size=view,
            attention_mode=preset.attention_mode,
            attention_grid=(view[0] // preset.attention_factor, view[1] // preset.attention_factor),
            keep_queries=keep_queries,
            self_attention_grid=None if finest is None else (view[0] // finest, view[1] // finest),
        )

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
            log_mean = torch.logsumexp(scores, dim=1) - math.log(scores.shape[1])  # (B, N, K)
            self.add_log_maps(log_mean, factor)

    def add_log_maps(self, log_maps: torch.Tensor, factor: int) -> None:
        """``log_maps``: ``(B, N, K)`` float32 logs of one layer's maps over its ``N`` queries at ``factor``."""
        batch, queries, keys = log_maps.shape
        rows, cols = self.view_size[0] // factor, self.view_size[1] // factor
        if rows * cols != queries:
            raise RuntimeError(f"layer at factor {factor} has {queries} queries, expected {rows}x{cols}")
        with torch.autocast(log_maps.device.type, enabled=False):
            grid = log_maps.float().transpose(1, 2).reshape(batch, keys, rows, cols)
            self.attention.append(resize_log_maps(grid, self.attention_grid))

    def layer_mean(self) -> torch.Tensor:
        """``(B, K, h, w)`` log of the mean over captured layers of the attention maps."""
        stacked = torch.stack(self.attention)
        return torch.logsumexp(stacked, dim=0) - math.log(len(self.attention))

    def add_self_attention(self, probs: torch.Tensor, factor: int) -> None:
        """``probs``: ``(B, N, N)`` float32 head-mean self-attention probabilities of one layer."""
        rows, cols = self.view_size[0] // factor, self.view_size[1] // factor
        if rows * cols != probs.shape[-1] or self.self_attention_grid is None:
            raise RuntimeError(f"self-attention at factor {factor}: {probs.shape[-1]} tokens, expected {rows}x{cols}")
        with torch.autocast(probs.device.type, enabled=False):  # stays float32 under autocast
            probs = regrid_self_attention(probs.float(), (rows, cols), self.self_attention_grid)
        self.self_attention_sum = probs if self.self_attention_sum is None else self.self_attention_sum.add_(probs)
        self.self_attention_layers += 1

    def self_attention_mean(self) -> torch.Tensor | None:
        """``(B, N, N)`` mean over captured layers (and heads) of the self-attention, or ``None``."""
        if self.self_attention_sum is None:
            return None
        return self.self_attention_sum / self.self_attention_layers

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


def regrid_self_attention(probs: torch.Tensor, grid: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
    """``(B, N, N)`` self-attention on ``grid`` as ``(B, M, M)`` on the finer ``target`` grid.

    Queries are resized bilinearly (each fine cell takes the blend of its coarse cells'
    rows); each coarse key's mass is split evenly over the fine cells it covers. Rows stay
    probability distributions, and ``S A`` reads the class attention averaged over the
    coarse layer's cells, as the coarse layer saw it.
    """
    if tuple(grid) == tuple(target):
        return probs
    (rows, cols), (fine_rows, fine_cols) = grid, target
    if fine_rows % rows or fine_cols % cols:
        raise RuntimeError(f"self-attention grid {grid} does not divide the finest chosen grid {target}")
    step_r, step_c = fine_rows // rows, fine_cols // cols
    up_r, up_c = bilinear_matrix(fine_rows, rows).to(probs), bilinear_matrix(fine_cols, cols).to(probs)
    batch = probs.shape[0]
    keys = probs.view(batch, rows, cols, rows, cols)
    keys = keys.repeat_interleave(step_r, dim=3).repeat_interleave(step_c, dim=4) / (step_r * step_c)
    fine = torch.einsum("Rr,Cc,brcxy->bRCxy", up_r, up_c, keys)
    return fine.reshape(batch, fine_rows * fine_cols, fine_rows * fine_cols)


def propagate(log_maps: torch.Tensor, self_attention: torch.Tensor, grid: tuple[int, int], steps: int) -> torch.Tensor:
    """``S^k A`` of maps given as logs, as logs.

    Arguments:
        log_maps: ``(B, ..., h, w)`` float32 logs of attention maps.
        self_attention: ``(B, N, N)`` row-stochastic ``S`` on ``grid`` (``N`` cells);
            ``S[i, j]``: how much cell ``i`` attends to cell ``j``.
        steps: ``k``.

    Each map is shifted by its maximum before ``exp`` (values <= 1, and ``S`` only
    averages them, so nothing overflows), resized to ``grid``, multiplied by ``S`` ``k``
    times, resized back to ``(h, w)``; the shift is added back to the log: exact up to
    underflow.
    """
    with torch.autocast(log_maps.device.type, enabled=False):
        size = tuple(log_maps.shape[-2:])
        shift = log_maps.amax(dim=(-2, -1), keepdim=True)
        shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
        maps = resize_maps(torch.exp(log_maps - shift), grid)
        flat = maps.reshape(maps.shape[0], -1, grid[0] * grid[1])  # (B, M, N)
        transposed = self_attention.float().transpose(1, 2)
        for _ in range(steps):
            flat = torch.bmm(flat, transposed)  # A'(i) = sum_j S[i, j] A(j)
        return resize_maps(flat.reshape(maps.shape), size).log() + shift


def ensemble_passes(preset: Preset) -> list[tuple[int, int, int]]:
    """``(timestep, seed, weight)`` of every pass per view a preset asks for.

    The timestep and each of ``ensemble_timesteps``, each with seeds ``seed``,
    ``seed + 1``, ... (``noise_samples`` of them). At timestep 0 no noise is added, so its
    seeds would give the same pass: it runs once with weight ``noise_samples``.
    """
    passes = []
    for timestep in (preset.timestep, *preset.ensemble_timesteps):
        if timestep == 0:
            passes.append((0, preset.seed, preset.noise_samples))
        else:
            passes.extend((timestep, preset.seed + i, 1) for i in range(preset.noise_samples))
    return passes


class PassAverage:
    """Weighted average of several passes' signals: attention log-maps as log-mean-exp
    (like heads and layers), features and self-attention as plain means. Running sums, so
    memory does not grow with the number of passes; one pass of weight 1 comes back as it went in.
    """

    def __init__(self):
        self.total = 0.0
        self.sums: list[torch.Tensor | None] = [None, None, None]

    def add(
        self, attention: torch.Tensor, features: torch.Tensor, self_attention: torch.Tensor | None, *, weight: float
    ) -> None:
        terms = [
            attention + math.log(weight),
            features * weight,
            None if self_attention is None else self_attention * weight,
        ]
        if self.total:
            log_sum, feature_sum, self_sum = self.sums
            terms = [
                torch.logaddexp(log_sum, terms[0]),
                feature_sum + terms[1],
                None if self_sum is None else self_sum + terms[2],
            ]
        self.sums = terms
        self.total += weight

    def mean(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Attention log-maps, features and self-attention (or ``None``), averaged."""
        if not self.total:
            raise RuntimeError("no pass was added")
        log_sum, feature_sum, self_sum = self.sums
        return (
            log_sum - math.log(self.total),
            feature_sum / self.total,
            None if self_sum is None else self_sum / self.total,
        )


def resize_log_maps(log_maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of maps given as logs ``(..., h, w)``, exact up to underflow."""
    if tuple(log_maps.shape[-2:]) == tuple(size):
        return log_maps
    shift = log_maps.amax(dim=(-2, -1), keepdim=True)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    return resize_maps(torch.exp(log_maps - shift), size).log() + shift


class CaptureProcessor:
    """Attention processor that computes attention explicitly and records it.

    Installed on a cross-attention layer (text keys) it records the scores; on a
    self-attention layer (``self_attention=True``) the head-mean probabilities, formed one
    head at a time so memory stays at one ``(B, N, N)`` matrix. The output equals
    diffusers' stock processor (softmax(QK^T * scale + mask) V); the scores are formed in
    float32 whatever the model's dtype. An attention mask (PixArt's padded T5 prompt: 0 to
    keep a key, -10000 to drop it) is added to the recorded scores as the model adds it.
    """

    def __init__(self, store_ref: list[CaptureStore], factor: int, *, self_attention: bool = False):
        self._store_ref = store_ref
        self.factor = factor
        self.self_attention = self_attention

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if (encoder_hidden_states is None) != self.self_attention:
            raise NotImplementedError(f"CaptureProcessor(self_attention={self.self_attention}) got the other kind")
        if attn.spatial_norm is not None:
            raise NotImplementedError("CaptureProcessor handles attention without spatial norms only")
        residual = hidden_states
        if hidden_states.ndim == 4:
            raise NotImplementedError("CaptureProcessor expects (B, N, C) hidden states")
        batch = hidden_states.shape[0]
        if attention_mask is not None:
            if self.self_attention:
                raise NotImplementedError("CaptureProcessor handles self-attention without masks only")
            keys = encoder_hidden_states.shape[1]
            attention_mask = attn.prepare_attention_mask(attention_mask, keys, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, keys).float()
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
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
        if self.self_attention:
            out = self._attend_self(query, key, value, attn.scale)
        else:
            with torch.autocast(query.device.type, enabled=False):
                scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * attn.scale
                if attention_mask is not None:
                    scores = scores + attention_mask
            probs = scores.softmax(dim=-1)
            out = torch.matmul(probs.to(value.dtype), value)
            self._store_ref[0].record(attn, query, scores, self.factor)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _attend_self(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
        """``(B, heads, N, d)`` output; records the head-mean probabilities, one head at a time."""
        outputs, total = [], None
        for head in range(query.shape[1]):
            with torch.autocast(query.device.type, enabled=False):
                scores = torch.matmul(query[:, head].float(), key[:, head].float().transpose(-1, -2)) * scale
                probs = scores.softmax(dim=-1)
                del scores
                total = probs if total is None else total.add_(probs)
            outputs.append(torch.matmul(probs.to(value.dtype), value[:, head]))
        self._store_ref[0].add_self_attention(total / query.shape[1], self.factor)
        return torch.stack(outputs, dim=1)
