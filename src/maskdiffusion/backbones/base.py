"""The seam between the pipeline and a denoiser architecture: what a backbone must say and do.

The pipeline's straight line is the same for every model (views -> VAE latents -> one pass of
the backbone -> mask head -> Result). What differs between a UNet and a transformer lives
behind :class:`Backbone`: which parts a model folder holds, which layers exist and at what
grid (``resolve`` / ``check`` of a preset's layer fields), how prompts are tokenised and
encoded, how a clean latent is noised at the preset's noise level in the model's own terms,
and how one pass captures class maps and grouping features.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..capture import CaptureStore, PassComplete, features_on_grid
from ..families import Family
from ..precision import Precision
from ..presets import Preset
from ..prompts import ClassName, PromptBatch
from ..text import TextConditioning


@dataclass(frozen=True)
class Part:
    """One component a model folder holds: its subfolder's loader class (``library.name``).

    ``weights``: the subfolder holds ``.safetensors`` weights (a tokenizer does not);
    ``required``: the model cannot run without it.
    """

    library: str
    name: str
    weights: bool = True
    required: bool = True


@dataclass
class PassSignals:
    """What one pass over a batch of views leaves for the mask head.

    ``attention``: ``(V, P, K, h, w)`` float32 log-maps on the attention grid (mean over heads
    and captured layers) over the ``K`` keys of each of the ``P`` prompts (text tokens, or
    classes for concept maps: :meth:`Backbone.class_weights` says how keys make classes);
    ``features``: ``(V, D, hf, wf)`` float32 (mean over the prompts' passes);
    ``self_attention``: ``(V, N, N)`` row-stochastic self-attention on the finest chosen
    self-attention grid, or ``None``.
    """

    attention: torch.Tensor
    features: torch.Tensor
    self_attention: torch.Tensor | None = None


class Backbone(ABC):
    """A denoiser and its text encoders, behind the one interface the pipeline uses.

    Subclasses set the class attributes and implement the abstract methods; the parts are
    plain attributes named as in diffusers folders (``unet`` / ``transformer``,
    ``text_encoder``, ``tokenizer``, ...).
    """

    kind: ClassVar[str]  # "unet", "mmdit" or "dit": recorded in results
    denoiser_part: ClassVar[str]  # "unet" or "transformer"
    parts: ClassVar[dict[str, Part]]  # what a folder of this architecture holds, besides vae/ and scheduler/
    text_parts: ClassVar[tuple[str, ...]]  # text encoders, in the order their tokenizers are listed
    tokenizer_parts: ClassVar[tuple[str, ...]]

    def __init__(self, modules: dict[str, object], scheduler: dict, vae_factor: int, family: Family):
        for name in self.parts:
            setattr(self, name, modules.get(name))
        self.scheduler_config = dict(scheduler)
        self.vae_factor = vae_factor
        self.family = family

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self, self.denoiser_part)

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [m for m in (getattr(self, name) for name in self.text_parts) if m is not None]

    @property
    def tokenizers(self) -> list[object]:
        return [t for t in (getattr(self, name) for name in self.tokenizer_parts) if t is not None]

    def view(self, latents: torch.Tensor) -> tuple[int, int]:
        """``(height, width)`` in pixels of the views whose latents are ``latents`` ``(..., h, w)``."""
        return latents.shape[-2] * self.vae_factor, latents.shape[-1] * self.vae_factor

    def modules(self) -> dict[str, torch.nn.Module]:
        """The backbone's torch modules by part name (denoiser and text encoders)."""
        return {n: m for n in self.parts if isinstance(m := getattr(self, n), torch.nn.Module)}

    @property
    @abstractmethod
    def block(self) -> int:
        """View sides must be multiples of this many pixels."""

    # -- presets ------------------------------------------------------------------

    @abstractmethod
    def resolve(self, preset: Preset) -> Preset:
        """``preset`` with its ``"auto"`` layer fields replaced by this model's choice."""

    @abstractmethod
    def check(self, preset: Preset) -> None:
        """Raise ``ValueError`` naming the field when a (resolved) preset asks for what this model does not have."""

    @abstractmethod
    def noise_level(self, timestep: int, view: tuple[int, int]) -> dict:
        """What ``timestep`` means for this model at views of ``view = (height, width)`` pixels, for records."""

    # -- text -----------------------------------------------------------------------

    @abstractmethod
    def prompts(self, vocabulary: Sequence[ClassName], separator: str) -> list[PromptBatch]:
        """One :class:`PromptBatch` per tokenizer, the classes packed into the same prompts in all."""

    @abstractmethod
    def encode(self, batches: Sequence[PromptBatch], device: torch.device) -> TextConditioning:
        """The prompts' conditioning, as this model's own pipeline computes it."""

    @abstractmethod
    def class_weights(self, batches: Sequence[PromptBatch], preset: Preset, words: str) -> torch.Tensor:
        """``(C, P, K)`` float32 weights of each class over the keys :meth:`run`'s maps are over.

        ``words``: ``"mean"`` (a word's map is the mean of its tokens') or ``"sum"`` (the mass
        of its tokens), as :meth:`~maskdiffusion.prompts.PromptBatch.token_weights`.
        """

    # -- one pass -------------------------------------------------------------------

    @abstractmethod
    def noise(self, latents: torch.Tensor, timestep: int, seed: int) -> torch.Tensor:
        """``latents`` ``(V, c, h, w)`` at ``timestep``: the same noise, seeded by ``seed``, for every view."""

    @abstractmethod
    def run(
        self, latents: torch.Tensor, timestep: int, text: TextConditioning, preset: Preset, precision: Precision
    ) -> PassSignals:
        """One pass over noised ``latents`` ``(V, c, h, w)`` for every (view, prompt) pair of ``text``."""

    @abstractmethod
    def compile(self, compile_fn: Callable[[torch.nn.Module], torch.nn.Module]) -> None:
        """Wrap the denoiser's heavy, hook-free parts in ``compile_fn`` (``torch.compile``)."""


def per_prompt(latents: torch.Tensor, passes: int, dtype: torch.dtype, precision: Precision) -> torch.Tensor:
    """``(V, ...)`` latents repeated for ``passes`` prompts each (view-major), in ``dtype`` and memory layout."""
    return precision.layout(latents.repeat_interleave(passes, dim=0).to(dtype))


def mean_over_prompts(signal: torch.Tensor | None, views: int, passes: int) -> torch.Tensor | None:
    """``(V * passes, ...)`` -> ``(V, ...)``: the mean over each view's prompt passes (each saw the same image)."""
    if signal is None:
        return None
    return signal.view(views, passes, *signal.shape[1:]).mean(dim=1)


def concatenated_weights(batches: Sequence[PromptBatch], words: str) -> torch.Tensor:
    """``(C, P, K1 + K2 + ...)`` class weights over key sequences made of several tokenizers' prompts
    laid end to end (SD3: CLIP then T5). ``"sum"``: the class's mass in all of them; ``"mean"``: the
    mean over them of each one's word maps."""
    weights = torch.cat([batch.token_weights(words) for batch in batches], dim=-1)
    return weights if words == "sum" else weights / len(batches)


def check_unsupported(preset: Preset, what: str, **allowed) -> None:
    """Refuse preset fields this model cannot do: ``allowed`` maps a field to the only value it may have."""
    for name, value in allowed.items():
        if getattr(preset, name) != value:
            raise ValueError(f"{name} {getattr(preset, name)!r}: {what} (use {value!r} for this model)")


def check_blocks(values: Sequence[int], count: int, field: str, what: str) -> None:
    """Block indices must exist: ``ValueError`` naming ``field`` and the range otherwise."""
    bad = [b for b in values if not 0 <= b < count]
    if bad:
        raise ValueError(f"{field} {bad} out of range: this model has {what} 0..{count - 1}")


def token_features(tokens: torch.Tensor, rows: int, cols: int, grid: tuple[int, int]) -> torch.Tensor:
    """A transformer block's image tokens ``(B, rows * cols, D)`` (row-major) -> ``(B, D, *grid)`` features,
    L2-normalised over channels."""
    batch, count, width = tokens.shape
    if count != rows * cols:
        raise RuntimeError(f"a block gave {count} image tokens, expected {rows}x{cols}")
    return features_on_grid(tokens.transpose(1, 2).reshape(batch, width, rows, cols), grid)


@dataclass
class TransformerPass:
    """What one capturing pass of a transformer leaves: the store, each wanted block's image tokens
    ``(B, N, D)``, the token grid ``(rows, cols)`` and the model's output (``None`` if it stopped early)."""

    store: CaptureStore
    tokens: dict[int, torch.Tensor]
    grid: tuple[int, int]
    output: torch.Tensor | None = None

    def features(self, blocks: Sequence[int], grid: tuple[int, int]) -> torch.Tensor:
        """``(B, D, *grid)`` the blocks' image tokens, each L2-normalised, concatenated over channels."""
        return torch.cat([token_features(self.tokens[b], *self.grid, grid) for b in blocks], dim=1)


def block_hooks(
    blocks: Sequence[torch.nn.Module],
    wanted: Sequence[int],
    last: int,
    raw: dict[int, torch.Tensor],
    after: Callable[[int, torch.nn.Module], None] | None = None,
    *,
    stop: bool = True,
) -> list[tuple[torch.nn.Module, Callable]]:
    """Forward hooks on transformer blocks ``0..last``: keep the image tokens of the ``wanted`` blocks in
    ``raw`` (a block's output, or its second item: SD3 and FLUX blocks return ``(text, image)``), call
    ``after(index, block)`` on every hooked block, and (``stop``) end the pass after block ``last``."""

    def hook_of(index: int) -> Callable:
        def hook(module, args, output):
            if index in wanted:
                raw[index] = output[1] if isinstance(output, tuple) else output
            if after is not None:
                after(index, module)
            if stop and index == last:
                raise PassComplete

        return hook

    return [(block, hook_of(i)) for i, block in enumerate(blocks) if i <= last]
