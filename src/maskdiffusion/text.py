"""Text conditioning: the prompts' token ids -> what the UNet reads, for one CLIP text encoder or SDXL's two.

Stable Diffusion 1.x/2.x read the last hidden state of one CLIP text encoder. SDXL reads the
penultimate hidden states of two (CLIP ViT-L and OpenCLIP bigG) concatenated, and takes the
second one's pooled, projected embedding plus the image's size and crop as added conditions.
Both tokenizers are CLIP's BPE but pad differently (``<|endoftext|>`` and ``!``), so each gets
its own ids; the class token spans must be the same in both, or the maps would mix words.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .prompts import ClassName, PromptBatch, VocabularyError, build_prompts


@dataclass(frozen=True)
class TextConditioning:
    """The encoded prompts.

    ``hidden``: ``(P, T, E)`` what cross-attention reads; ``pooled``: ``(P, E2)`` SDXL's pooled
    text embedding (``None`` for one-encoder models). Slicing selects prompts.
    """

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def __getitem__(self, prompts: slice) -> TextConditioning:
        return TextConditioning(self.hidden[prompts], None if self.pooled is None else self.pooled[prompts])

    def batch(self, prompts: int, views: int, dtype: torch.dtype) -> TextConditioning:
        """The first ``prompts`` prompts, repeated for ``views`` views (view-major), in ``dtype``."""
        pooled = None if self.pooled is None else self.pooled[:prompts].repeat(views, 1).to(dtype)
        return TextConditioning(self.hidden[:prompts].repeat(views, 1, 1).to(dtype), pooled)

    def added_conditions(self, view: tuple[int, int]) -> dict[str, torch.Tensor] | None:
        """SDXL's added UNet inputs for views of ``view = (height, width)`` pixels, uncropped (else ``None``)."""
        if self.pooled is None:
            return None
        height, width = view
        size = torch.tensor([height, width, 0, 0, height, width], dtype=self.pooled.dtype, device=self.pooled.device)
        return {"text_embeds": self.pooled, "time_ids": size.expand(self.pooled.shape[0], -1)}


def build_prompt_batches(
    tokenizers: Sequence[object], vocabulary: Sequence[ClassName], separator: str
) -> list[PromptBatch]:
    """One :class:`PromptBatch` per tokenizer; raise :class:`VocabularyError` if their class spans differ."""
    batches = [build_prompts(tokenizer, vocabulary, separator) for tokenizer in tokenizers]
    for other in batches[1:]:
        if other.spans != batches[0].spans:
            differing = next(
                cls.name for cls, a, b in zip(vocabulary, batches[0].spans, other.spans, strict=True) if a != b
            )
            raise VocabularyError(
                f"class {differing!r} is tokenised differently by this model's two tokenizers, so its attention "
                "cannot be read exactly: spell it with other words"
            )
    return batches


def encode(text_encoders: Sequence[torch.nn.Module], batches: Sequence[PromptBatch], device) -> TextConditioning:
    """Run the text encoder(s) on their prompt batches (``len(text_encoders) == len(batches)``)."""
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
