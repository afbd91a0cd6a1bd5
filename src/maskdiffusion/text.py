"""Text conditioning: the prompts' token ids -> what a denoiser reads, for every text encoder kind.

Stable Diffusion 1.x/2.x read the last hidden state of one CLIP text encoder. SDXL and SD3 read
the penultimate hidden states of two (CLIP ViT-L and OpenCLIP bigG) concatenated, with pooled,
projected embeddings; SD3, FLUX and PixArt-Σ also (FLUX and PixArt only) read a T5 encoder's
last hidden state. Tokenizers of one model may pad differently (``<|endoftext|>`` and ``!``) and
T5's have no BOS, so each gets its own ids; tokenizers whose ids sit at the same key positions
(SDXL's and SD3's two CLIPs, concatenated along the width) must give every class the same
span, or the maps would mix words. Which encoder reads which tokenizer is the backbone's
business (:mod:`maskdiffusion.backbones`); the pieces here are shared.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .prompts import CLIP_CONTEXT, ClassName, PromptBatch, VocabularyError, pack_prompts


@dataclass(frozen=True)
class TextConditioning:
    """The encoded prompts.

    ``hidden``: ``(P, T, E)`` the text sequence the denoiser attends to; ``pooled``: ``(P, E2)``
    a pooled text embedding (SDXL, SD3, FLUX; ``None`` otherwise); ``mask``: ``(P, T)`` 1 for
    the prompt's tokens, 0 for padding (PixArt masks its T5 padding; ``None``: no mask);
    ``words``: ``(C, P, T)`` each class's share of each text position (the mean over its
    tokens and synonyms), for backbones that take the classes' own tokens out of the prompt
    (concept streams; ``None`` where unused). Slicing selects prompts.
    """

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    words: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def __getitem__(self, prompts: slice) -> TextConditioning:
        return TextConditioning(
            self.hidden[prompts],
            None if self.pooled is None else self.pooled[prompts],
            None if self.mask is None else self.mask[prompts],
            None if self.words is None else self.words[:, prompts],
        )

    def batch(self, prompts: int, views: int, dtype: torch.dtype) -> TextConditioning:
        """The first ``prompts`` prompts, repeated for ``views`` views (view-major), in ``dtype`` (not the mask)."""
        pooled = None if self.pooled is None else self.pooled[:prompts].repeat(views, 1).to(dtype)
        mask = None if self.mask is None else self.mask[:prompts].repeat(views, 1)
        return TextConditioning(self.hidden[:prompts].repeat(views, 1, 1).to(dtype), pooled, mask)


def build_prompt_batches(
    tokenizers: Sequence[object],
    vocabulary: Sequence[ClassName],
    separator: str,
    *,
    lengths: Sequence[int | None] | None = None,
    groups: Sequence[int] | None = None,
) -> list[PromptBatch]:
    """One :class:`PromptBatch` per tokenizer, the same classes in the same prompts (:func:`pack_prompts`).

    ``lengths``: ids per prompt of each tokenizer (``None``: its own context); ``groups``:
    tokenizers with the same group number read the same key positions, so their class spans
    must agree (default: all of them, as SDXL's two CLIPs); :class:`VocabularyError` if not.
    """
    batches = pack_prompts(tokenizers, vocabulary, separator, lengths)
    groups = list(groups) if groups is not None else [0] * len(batches)
    for index, other in enumerate(batches):
        first = batches[groups.index(groups[index])]
        if other.spans != first.spans:
            differing = next(cls.name for cls, a, b in zip(vocabulary, first.spans, other.spans, strict=True) if a != b)
            raise VocabularyError(
                f"class {differing!r} is tokenised differently by this model's tokenizers, so its attention "
                "cannot be read exactly: spell it with other words"
            )
    return batches


def clip_length(tokenizer, encoder: torch.nn.Module) -> int:
    """Ids per CLIP prompt: the tokenizer's context, never past the encoder's position embeddings (a
    tokenizer saved without ``model_max_length`` says 10^30)."""
    positions = int(getattr(encoder.config, "max_position_embeddings", CLIP_CONTEXT))
    return min(int(tokenizer.model_max_length), positions)


def clip_hidden_and_pooled(encoder: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P, 77, E)`` penultimate hidden states and ``(P, E2)`` pooled embedding of a CLIP text encoder
    (the projected ``text_embeds`` of one with a projection, else the pooler output), as SDXL and SD3 read them."""
    output = encoder(ids, output_hidden_states=True)
    pooled = getattr(output, "text_embeds", None)
    return output.hidden_states[-2], output.pooler_output if pooled is None else pooled


def encode_clip(text_encoders: Sequence[torch.nn.Module], batches: Sequence[PromptBatch], device) -> TextConditioning:
    """SD 1.x/2.x (one encoder: its last hidden state) or SDXL (two: penultimate states concatenated,
    the second's pooled embedding); ``len(text_encoders) == len(batches)``."""
    if len(text_encoders) == 1:
        return TextConditioning(text_encoders[0](batches[0].input_ids.to(device))[0])
    states, pooled = [], None
    for encoder, prompts in zip(text_encoders, batches, strict=True):
        output = encoder(prompts.input_ids.to(device), output_hidden_states=True)
        states.append(output.hidden_states[-2])
        pooled = getattr(output, "text_embeds", None)
    if pooled is None:
        raise ValueError("the second text encoder gives no pooled embedding (an SDXL model needs a projection)")
    return TextConditioning(torch.cat(states, dim=-1), pooled)


def t5_hidden(encoder: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``(P, T, E)`` last hidden state of a T5 encoder (``mask``: attend to the prompt only, as PixArt does)."""
    return encoder(ids, attention_mask=mask)[0]


def padding_mask(batch: PromptBatch, tokenizer) -> torch.Tensor:
    """``(P, T)`` int64: 1 up to and including each prompt's EOS, 0 on the padding after it."""
    ids = batch.input_ids
    positions = torch.arange(ids.shape[1])
    ends = (ids == tokenizer.eos_token_id).int().argmax(dim=1)
    return (positions[None, :] <= ends[:, None]).long()
