"""Joint-attention transformers (MMDiT): Stable Diffusion 3 / 3.5 and FLUX.1 dev and schnell.

Image and text tokens attend to each other in one softmax: SD3's ``JointTransformerBlock``
concatenates ``[image, text]``, FLUX's double-stream ``FluxTransformerBlock`` ``[text, image]``
(with RoPE from position ids on both), and FLUX's single-stream blocks then run one sequence
``[text, image]``. Blocks are indexed in forward order (FLUX: the 19 double-stream blocks, then
the 38 single-stream ones); every block works on one token grid, at 1/16 of the view (the VAE's
8 x a 2x2 patch), so ``attention_factors`` is that one level.

Class maps, both fed to the same mask head (prototypes + EM) with the image tokens' output
hidden states of ``feature_blocks`` as features:

- ``class_maps="attention"``: the weights of image queries on each class's text keys, recomputed
  from the block's own q and k (after its q/k norms and, in FLUX, RoPE), averaged over heads and
  ``attention_blocks``. ``attention_mode="softmax"`` takes the softmax over the prompt's text keys
  only: the model's joint softmax renormalised to the text, so a pixel's map does not depend on
  how much it attends to the image itself (as a UNet's cross-attention, over the prompt's tokens,
  padding included as the model reads it); ``"exp"`` keeps ``exp(q . k / sqrt(d))``.
- ``class_maps="concept"`` (ConceptAttention, Helbling et al. 2025; our implementation): the
  classes' own tokens (taken from the encoded prompt, as the context embedder projects them) are
  an extra stream that runs through every joint block up to the last of ``attention_blocks``,
  projected and modulated with the text branch's weights; its queries attend to [its keys + the
  image's keys], and no image or prompt token attends to it, so the model's pass is unchanged.
  In each of ``attention_blocks`` the map is, per image token, the softmax over classes of
  ``<class output, image output>``: the attention outputs before the output projection, a
  class's output the mean over its tokens (all its span, synonyms averaged). Only joint blocks
  have a text branch: FLUX's single-stream blocks give attention weights only.

``auto`` layers (not measured here: no real weights can be loaded): SD3 takes the three blocks
around 3/8 of its depth (Seg4Diff found block 9 of SD3-medium's 24 the one whose image-to-text
attention segments); FLUX the last four of its double-stream blocks (ConceptAttention's choice,
blocks 15-18 of 19); features the same blocks' image tokens. The pass stops after the last block
needed, so FLUX's 38 single-stream blocks never run by default.

Latents are noised as the models were trained, ``x_s = (1 - s) x_0 + s e``
(:class:`~maskdiffusion.backbones.noise.FlowSchedule`); FLUX packs them 2x2 into 64-channel
tokens with image position ids, and FLUX-dev reads a guidance embedding (its pipeline's default
3.5).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..capture import CaptureStore, PassComplete, installed
from ..precision import Precision
from ..presets import Preset
from ..prompts import ClassName, PromptBatch
from ..text import TextConditioning, build_prompt_batches, clip_hidden_and_pooled, clip_length, t5_hidden
from .base import Part, TransformerPass, block_hooks, check_blocks, concatenated_weights, per_prompt
from .noise import FlowSchedule
from .transformer import TransformerBackbone

SEG4DIFF_DEPTH = 3 / 8  # Seg4Diff: block 9 of SD3-medium's 24
CONCEPT_BLOCKS = 4  # ConceptAttention: the last 4 of FLUX's 19 double-stream blocks
FLUX_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale, what FLUX-dev's guidance embedding reads


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``(B, N, H * d)`` -> ``(B, H, N, d)``."""
    return x.unflatten(-1, (-1, head_dim)).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """``(B, H, N, d)`` -> ``(B, N, H * d)``."""
    return x.transpose(1, 2).flatten(2)


def _norm(module, x: torch.Tensor) -> torch.Tensor:
    return x if module is None else module(x)


def _rotate(x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """RoPE on ``(B, H, N, d)`` with ``(cos, sin)`` of ``(N, d)`` (FLUX); none without."""
    if rotary is None:
        return x
    from diffusers.models.embeddings import apply_rotary_emb

    return apply_rotary_emb(x, rotary, sequence_dim=2)


@dataclass
class ConceptStream:
    """The classes' tokens on their way through the joint blocks.

    ``hidden``: ``(B, Nc, D)`` their states (every batch item starts from the same tokens);
    ``weights``: ``(C, Nc)`` each class's share of each token (rows sum to 1).
    """

    hidden: torch.Tensor
    weights: torch.Tensor


@dataclass
class JointPass:
    """What one pass shares between the attention processors and the block hooks.

    ``maps``: blocks whose class maps are recorded; ``concepts``: the concept stream (``None``
    for attention weights), run through the joint blocks ``0..last_concept``; ``kept``: a
    joint block's image keys, values and attention output, for the concept step after it;
    ``temb``: the block's conditioning, from its pre-hook.
    """

    store: CaptureStore
    factor: int
    text_length: int
    image_first: bool
    maps: frozenset[int]
    class_maps: str
    concepts: ConceptStream | None = None
    last_concept: int = -1
    kept: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict)
    inputs: dict[int, dict] = field(default_factory=dict)

    def joint(self, index: int, image: tuple[torch.Tensor, ...], text: tuple[torch.Tensor, ...]):
        """Joint attention of one block: ``image`` / ``text`` ``(q, k, v)``, each ``(B, H, N, d)``, after
        norms and RoPE. Returns the image and text attention outputs ``(B, H, N, d)`` as the model's
        own processor computes them (one SDPA over the concatenated sequence, in the model's order)."""
        first, second = (image, text) if self.image_first else (text, image)
        out = F.scaled_dot_product_attention(*(torch.cat([a, b], dim=2) for a, b in zip(first, second, strict=True)))
        split = first[0].shape[2]
        out_first, out_second = out[:, :, :split], out[:, :, split:]
        image_out, text_out = (out_first, out_second) if self.image_first else (out_second, out_first)
        if self.class_maps == "attention" and index in self.maps:
            self.record(image[0], text[1])
        if self.concepts is not None and index <= self.last_concept:
            self.kept[index] = (image[1], image[2], image_out)
        return image_out, text_out

    def single(self, index: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """A FLUX single-stream block's attention over ``[text, image]`` ``(B, H, T + N, d)``."""
        if index in self.maps:
            self.record(query[:, :, self.text_length :], key[:, :, : self.text_length])
        return F.scaled_dot_product_attention(query, key, value)

    def record(self, image_queries: torch.Tensor, text_keys: torch.Tensor) -> None:
        """Attention weights of image queries on the text keys (``QK^T / sqrt(d)``, float32)."""
        with torch.autocast(image_queries.device.type, enabled=False):
            scale = image_queries.shape[-1] ** -0.5
            scores = torch.matmul(image_queries.float(), text_keys.float().transpose(-1, -2)) * scale
            self.store.add_attention(scores, self.factor)

    def concept_step(self, index: int, block) -> None:
        """Run the concept stream through joint block ``index`` (after the block ran), recording its maps."""
        if self.concepts is None or index > self.last_concept:
            return
        image_key, image_value, image_out = self.kept.pop(index)
        inputs = self.inputs.pop(index)
        temb, rotary = inputs["temb"], inputs.get("image_rotary_emb")
        attn, stream = block.attn, self.concepts.hidden
        last = getattr(block, "context_pre_only", False)  # SD3's last block: the text branch ends in its attention
        if last:
            normed = block.norm1_context(stream, temb)
        else:
            normed, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1_context(stream, emb=temb)
        head_dim = image_key.shape[-1]
        text_rotary = None
        if rotary is not None:  # the text's own position (FLUX's text ids: all zero), for every concept token
            count = stream.shape[1]
            text_rotary = tuple(part[:1].expand(count, -1) for part in rotary)
        query = _rotate(_norm(attn.norm_added_q, _heads(attn.add_q_proj(normed), head_dim)), text_rotary)
        key = _rotate(_norm(attn.norm_added_k, _heads(attn.add_k_proj(normed), head_dim)), text_rotary)
        value = _heads(attn.add_v_proj(normed), head_dim)
        out = F.scaled_dot_product_attention(
            query, torch.cat([key, image_key], dim=2), torch.cat([value, image_value], dim=2)
        )
        concept_out = _merge(out)  # (B, Nc, H * d)
        if index in self.maps:
            self.record_concepts(concept_out, _merge(image_out))
        if not last:
            stream = stream + gate_msa.unsqueeze(1) * attn.to_add_out(concept_out)
            normed = block.norm2_context(stream) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
            stream = stream + gate_mlp.unsqueeze(1) * block.ff_context(normed)
        self.concepts.hidden = stream

    def record_concepts(self, concept_out: torch.Tensor, image_out: torch.Tensor) -> None:
        """Per image token, log-softmax over classes of ``<class output, image output>`` (float32)."""
        with torch.autocast(concept_out.device.type, enabled=False):
            classes = torch.einsum("cn,bnd->bcd", self.concepts.weights.to(concept_out.device), concept_out.float())
            logits = torch.matmul(image_out.float(), classes.transpose(1, 2))  # (B, N, C)
            self.store.add_log_maps(logits.log_softmax(dim=-1), self.factor)


class SD3JointProcessor:
    """SD3's joint attention (``JointAttnProcessor2_0``'s computation), through :meth:`JointPass.joint`."""

    def __init__(self, state: JointPass, index: int):
        self.state, self.index = state, index

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if encoder_hidden_states is None or attention_mask is not None:
            raise NotImplementedError("SD3JointProcessor handles joint attention without masks only")
        head_dim = attn.to_k.out_features // attn.heads
        image = [_heads(proj(hidden_states), head_dim) for proj in (attn.to_q, attn.to_k, attn.to_v)]
        text = [_heads(proj(encoder_hidden_states), head_dim) for proj in (attn.add_q_proj, attn.add_k_proj)]
        text.append(_heads(attn.add_v_proj(encoder_hidden_states), head_dim))
        image[0], image[1] = _norm(attn.norm_q, image[0]), _norm(attn.norm_k, image[1])
        text[0], text[1] = _norm(attn.norm_added_q, text[0]), _norm(attn.norm_added_k, text[1])
        image_out, text_out = self.state.joint(self.index, tuple(image), tuple(text))
        hidden = attn.to_out[1](attn.to_out[0](_merge(image_out).to(image[0].dtype)))
        text_hidden = _merge(text_out).to(image[0].dtype)
        return hidden, text_hidden if attn.context_pre_only else attn.to_add_out(text_hidden)


class FluxJointProcessor:
    """FLUX's attention (``FluxAttnProcessor``'s computation): double-stream blocks through
    :meth:`JointPass.joint`, single-stream ones through :meth:`JointPass.single`."""

    def __init__(self, state: JointPass, index: int):
        self.state, self.index = state, index

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if attention_mask is not None or getattr(attn, "fused_projections", False):
            raise NotImplementedError(
                "FluxJointProcessor handles unfused projections without masks only (unfuse_qkv_projections())"
            )
        head_dim = attn.head_dim
        q, k, v = (_heads(proj(hidden_states), head_dim) for proj in (attn.to_q, attn.to_k, attn.to_v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if attn.added_kv_proj_dim is None:  # single-stream: one sequence [text, image]
            q, k = _rotate(q, image_rotary_emb), _rotate(k, image_rotary_emb)
            return _merge(self.state.single(self.index, q, k, v)).to(q.dtype)
        tq, tk = (_heads(proj(encoder_hidden_states), head_dim) for proj in (attn.add_q_proj, attn.add_k_proj))
        tv = _heads(attn.add_v_proj(encoder_hidden_states), head_dim)
        tq, tk = attn.norm_added_q(tq), attn.norm_added_k(tk)
        length = tq.shape[2]
        q, k = (
            _rotate(torch.cat([tq, q], dim=2), image_rotary_emb),
            _rotate(torch.cat([tk, k], dim=2), image_rotary_emb),
        )
        image = (q[:, :, length:], k[:, :, length:], v)
        text = (q[:, :, :length], k[:, :, :length], tv)
        image_out, text_out = self.state.joint(self.index, image, text)
        hidden = attn.to_out[1](attn.to_out[0](_merge(image_out).to(q.dtype).contiguous()))
        return hidden, attn.to_add_out(_merge(text_out).to(q.dtype).contiguous())


class MMDiTBackbone(TransformerBackbone):
    """What SD3 and FLUX share: joint blocks, concept streams, flow matching; subclasses say the rest."""

    kind = "mmdit"
    supports_concepts = True
    processor: ClassVar[type]
    image_first: ClassVar[bool]

    def __init__(self, modules: dict[str, object], scheduler: dict, vae_factor: int, family):
        super().__init__(modules, scheduler, vae_factor, family)
        self.schedule = FlowSchedule.from_config(scheduler)
        self.text_length = 256 if family.text_length is None else family.text_length

    @property
    def joint_blocks(self) -> list[torch.nn.Module]:
        return list(self.transformer.transformer_blocks)

    @property
    def blocks(self) -> list[torch.nn.Module]:
        """Every block in forward order (FLUX: double-stream, then single-stream)."""
        return [*self.joint_blocks, *getattr(self.transformer, "single_transformer_blocks", [])]

    def _block_name(self, index: int) -> str:
        joint = len(self.joint_blocks)
        if index < joint:
            return f"transformer_blocks.{index}.attn.processor"
        return f"single_transformer_blocks.{index - joint}.attn.processor"

    @property
    def patch(self) -> int:
        return 2

    def auto_feature_blocks(self) -> tuple[int, ...]:
        return self.auto_attention_blocks()

    def check(self, preset: Preset) -> None:
        super().check(preset)
        if preset.class_maps == "concept":
            joint = "joint (double-stream) blocks, the only ones with a text branch for concept streams,"
            check_blocks(preset.attention_blocks, len(self.joint_blocks), "attention_blocks", joint)

    def noise(self, latents: torch.Tensor, timestep: int, seed: int) -> torch.Tensor:
        view = self.view(latents)
        return self.schedule.noise(latents, self.schedule.sigma(timestep, self.tokens(view)), seed)

    def class_weights(self, batches: Sequence[PromptBatch], preset: Preset, words: str) -> torch.Tensor:
        if preset.class_maps == "concept":  # every prompt's pass carries every class's stream: the mean over them
            classes, prompts = len(batches[0].spans), batches[0].num_prompts
            return torch.eye(classes)[:, None, :].expand(classes, prompts, classes) / prompts
        return self.key_weights(batches, words)

    def key_weights(self, batches: Sequence[PromptBatch], words: str) -> torch.Tensor:
        """``(C, P, K)`` weights of each class over the text sequence the blocks read."""
        raise NotImplementedError

    def _concepts(self, text: TextConditioning, batch: int) -> ConceptStream:
        """The classes' tokens as the context embedder projects them, for ``batch`` items."""
        words = text.words  # (C, P, K)
        classes, prompts, keys = words.shape
        positions = words.permute(1, 2, 0).reshape(prompts * keys, classes).sum(dim=1).nonzero().flatten()
        embedded = self.transformer.context_embedder(text.hidden.to(self.transformer.dtype))  # (P, K, D)
        tokens = embedded.reshape(prompts * keys, -1)[positions]
        weights = words.reshape(classes, prompts * keys)[:, positions]
        return ConceptStream(tokens[None].expand(batch, -1, -1).contiguous(), weights.float())

    def forward_inputs(
        self, latents: torch.Tensor, sigma: float, text: TextConditioning
    ) -> tuple[dict, tuple[int, int]]:
        """The transformer's keyword arguments for one batch, and the token grid ``(rows, cols)``."""
        raise NotImplementedError

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
        kwargs, grid = self.forward_inputs(
            per_prompt(latents, prompts, dtype, precision),
            self.schedule.sigma(timestep, self.tokens(view)),
            text.batch(prompts, views, dtype),
        )
        concept = preset.class_maps == "concept"
        last_concept = max(preset.attention_blocks) if concept else -1
        state = JointPass(
            store=CaptureStore.for_view(view, preset),
            factor=self.block,
            text_length=text.hidden.shape[1],
            image_first=self.image_first,
            maps=frozenset(preset.attention_blocks),
            class_maps=preset.class_maps,
            concepts=self._concepts(text, views * prompts) if concept else None,
            last_concept=last_concept,
        )
        captured = set(preset.attention_blocks) | set(range(last_concept + 1))
        processors = {self._block_name(i): self.processor(state, i) for i in sorted(captured)}
        blocks, raw = self.blocks, {}
        last = max([*preset.attention_blocks, *preset.feature_blocks])
        hooks = block_hooks(blocks, preset.feature_blocks, last, raw, after=state.concept_step, stop=stop_early)
        pre_hooks = [(blocks[i], _keep_inputs(state, i)) for i in range(last_concept + 1)]
        result = TransformerPass(state.store, raw, grid)
        with installed(self.transformer, processors, hooks, pre_hooks), suppress(PassComplete):
            result.output = self.transformer(**kwargs, return_dict=False)[0]
        return result


def _keep_inputs(state: JointPass, index: int) -> Callable:
    """A forward pre-hook keeping a joint block's keyword inputs (its ``temb``, FLUX's RoPE) for the concept step."""

    def hook(module, args, kwargs):
        state.inputs[index] = kwargs

    return hook


class SD3Backbone(MMDiTBackbone):
    """Stable Diffusion 3 / 3.5: ``SD3Transformer2DModel``; CLIP-L + CLIP-G (penultimate states side by
    side, padded to T5's width, then T5's tokens on the sequence; pooled embeddings concatenated)."""

    processor = SD3JointProcessor
    image_first = True
    parts: ClassVar[dict[str, Part]] = {
        "transformer": Part("diffusers", "SD3Transformer2DModel"),
        "text_encoder": Part("transformers", "CLIPTextModelWithProjection"),
        "text_encoder_2": Part("transformers", "CLIPTextModelWithProjection"),
        "text_encoder_3": Part("transformers", "T5EncoderModel", required=False),
        "tokenizer": Part("transformers", "CLIPTokenizer", weights=False),
        "tokenizer_2": Part("transformers", "CLIPTokenizer", weights=False),
        "tokenizer_3": Part("transformers", "T5TokenizerFast", weights=False, required=False),
    }
    text_parts = ("text_encoder", "text_encoder_2", "text_encoder_3")
    tokenizer_parts = ("tokenizer", "tokenizer_2", "tokenizer_3")

    @property
    def patch(self) -> int:
        return int(self.transformer.config.patch_size)

    @property
    def max_size(self) -> int | None:
        limit = self.transformer.config.get("pos_embed_max_size")
        return None if limit is None else int(limit) * self.block

    def auto_attention_blocks(self) -> tuple[int, ...]:
        count = len(self.joint_blocks)
        centre = round(SEG4DIFF_DEPTH * count)
        return tuple(i for i in (centre - 1, centre, centre + 1) if 0 <= i < count)

    @property
    def _t5(self) -> bool:
        return self.text_encoder_3 is not None and self.tokenizer_3 is not None

    def prompts(self, vocabulary: Sequence[ClassName], separator: str) -> list[PromptBatch]:
        tokenizers = [self.tokenizer, self.tokenizer_2, *([self.tokenizer_3] if self._t5 else [])]
        lengths = [clip_length(self.tokenizer, self.text_encoder), clip_length(self.tokenizer_2, self.text_encoder_2)]
        lengths = [*lengths, self.text_length][: len(tokenizers)]
        return build_prompt_batches(tokenizers, vocabulary, separator, lengths=lengths, groups=[0, 0, 1])

    def encode(self, batches: Sequence[PromptBatch], device: torch.device) -> TextConditioning:
        first, pooled_first = clip_hidden_and_pooled(self.text_encoder, batches[0].input_ids.to(device))
        second, pooled_second = clip_hidden_and_pooled(self.text_encoder_2, batches[1].input_ids.to(device))
        width = self.transformer.config.joint_attention_dim
        clip = F.pad(torch.cat([first, second], dim=-1), (0, width - first.shape[-1] - second.shape[-1]))
        if self._t5:
            t5 = t5_hidden(self.text_encoder_3, batches[2].input_ids.to(device)).to(clip.dtype)
        else:  # as the pipeline does without T5: zeros in its place
            t5 = torch.zeros(clip.shape[0], self.text_length, width, dtype=clip.dtype, device=device)
        return TextConditioning(
            torch.cat([clip, t5], dim=-2),
            torch.cat([pooled_first, pooled_second], dim=-1),
            words=self.key_weights(batches, "mean"),
        )

    def key_weights(self, batches: Sequence[PromptBatch], words: str) -> torch.Tensor:
        """CLIP's 77 positions (both CLIPs' spans agree), then T5's (zero weight where the model has no T5)."""
        segments = [batches[0], *([batches[2]] if self._t5 else [])]
        weights = concatenated_weights(segments, words)
        return weights if self._t5 else F.pad(weights, (0, self.text_length))

    def forward_inputs(self, latents, sigma, text):
        batch = latents.shape[0]
        timestep = torch.full((batch,), 1000 * sigma, device=latents.device)  # float32, as the pipeline's
        kwargs = {
            "hidden_states": latents,
            "encoder_hidden_states": text.hidden,
            "pooled_projections": text.pooled,
            "timestep": timestep,
        }
        return kwargs, (latents.shape[-2] // self.patch, latents.shape[-1] // self.patch)


class FluxBackbone(MMDiTBackbone):
    """FLUX.1: ``FluxTransformer2DModel``; CLIP-L's pooled embedding + T5's sequence (position ids zero),
    latents packed 2x2 with image position ids; dev's guidance embedding."""

    processor = FluxJointProcessor
    image_first = False
    parts: ClassVar[dict[str, Part]] = {
        "transformer": Part("diffusers", "FluxTransformer2DModel"),
        "text_encoder": Part("transformers", "CLIPTextModel"),
        "text_encoder_2": Part("transformers", "T5EncoderModel"),
        "tokenizer": Part("transformers", "CLIPTokenizer", weights=False),
        "tokenizer_2": Part("transformers", "T5TokenizerFast", weights=False),
    }
    text_parts = ("text_encoder", "text_encoder_2")
    tokenizer_parts = ("tokenizer", "tokenizer_2")

    def auto_attention_blocks(self) -> tuple[int, ...]:
        count = len(self.joint_blocks)
        return tuple(range(max(0, count - CONCEPT_BLOCKS), count))

    def prompts(self, vocabulary: Sequence[ClassName], separator: str) -> list[PromptBatch]:
        """T5's prompts (the only sequence FLUX reads); CLIP reads their text for its pooled embedding."""
        return build_prompt_batches([self.tokenizer_2], vocabulary, separator, lengths=[self.text_length])

    def encode(self, batches: Sequence[PromptBatch], device: torch.device) -> TextConditioning:
        clip_ids = self.tokenizer(
            list(batches[0].texts),
            padding="max_length",
            max_length=clip_length(self.tokenizer, self.text_encoder),
            truncation=True,
            return_tensors="pt",
        ).input_ids
        pooled = self.text_encoder(clip_ids.to(device)).pooler_output
        hidden = t5_hidden(self.text_encoder_2, batches[0].input_ids.to(device))
        return TextConditioning(hidden, pooled, words=self.key_weights(batches, "mean"))

    def key_weights(self, batches: Sequence[PromptBatch], words: str) -> torch.Tensor:
        return batches[0].token_weights(words)

    def forward_inputs(self, latents, sigma, text):
        batch, channels, height, width = latents.shape
        rows, cols = height // 2, width // 2
        packed = latents.reshape(batch, channels, rows, 2, cols, 2).permute(0, 2, 4, 1, 3, 5)
        packed = packed.reshape(batch, rows * cols, channels * 4)
        image_ids = torch.zeros(rows, cols, 3, device=latents.device)
        image_ids[..., 1] += torch.arange(rows, device=latents.device)[:, None]
        image_ids[..., 2] += torch.arange(cols, device=latents.device)[None, :]
        kwargs = {
            "hidden_states": packed,
            "encoder_hidden_states": text.hidden,
            "pooled_projections": text.pooled,
            "timestep": torch.full((batch,), sigma, device=latents.device),
            "img_ids": image_ids.reshape(rows * cols, 3).to(latents.dtype),
            "txt_ids": torch.zeros(text.hidden.shape[1], 3, device=latents.device, dtype=latents.dtype),
        }
        if self.transformer.config.guidance_embeds:
            kwargs["guidance"] = torch.full((batch,), FLUX_GUIDANCE, device=latents.device, dtype=torch.float32)
        return kwargs, (rows, cols)
