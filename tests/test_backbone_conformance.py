"""The transformer backbones against the models' own math: SD3 / SD3.5, FLUX.1 dev / schnell and PixArt-Σ.

Every expected value is recomputed here from the diffusers model's own modules and tensors, read with
forward (pre-)hooks during a plain diffusers forward of the same inputs with the model's own attention
processors: the block's normalised inputs, its conditioning ``temb``, FLUX's RoPE. The projections, q/k
norms, RoPE (``diffusers.models.embeddings.apply_rotary_emb``), modulations and softmaxes are then
applied by hand; nothing of maskdiffusion's processors or helpers is called for an expected value.
The transformers' inputs are built as the models' own pipelines build them (FLUX's packing and position
ids with ``FluxPipeline``'s static helpers) and the noise level from the folder's scheduler configuration.

Tolerances (float32 on the CPU, one torch thread): attention probabilities 1e-4 relative, 1e-6 absolute;
concept probabilities 1e-5 absolute; the model's output 1e-5; noised latents 1e-6.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from maskdiffusion import MaskDiffusion
from maskdiffusion.prompts import parse_classes

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLASSES = ["sky", "traffic light", "road|street"]  # a one-token word, a two-word class, a synonym
SIZE = 128  # the tiny models' native view: an 8x8 token grid (VAE 8 x patch 2)
GRID = SIZE // 16
FLUX_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale
PIXART_MASK_BIAS = -10000.0  # what PixArtTransformer2DModel adds to the scores of padded keys


@pytest.fixture(scope="module")
def segmenter_of(tiny_family_model):
    """``segmenter_of(family)``: the family's tiny model loaded on the CPU (no latent cache), once per module."""

    def load(family: str) -> MaskDiffusion:
        return MaskDiffusion.from_pretrained(str(tiny_family_model(family)), device="cpu", cache_size=0)

    return functools.cache(load)


# -- inputs, built as the models' pipelines build them ---------------------------------------------------------


def pixels(count: int, seed: int = 0) -> torch.Tensor:
    """``(count, 3, SIZE, SIZE)`` smooth random views in [-1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand((count, 3, 8, 8), generator=generator) * 2 - 1
    return F.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear", align_corners=False)


def prompts(seg: MaskDiffusion, classes=CLASSES):
    batches = seg.build_prompts(parse_classes(classes), seg.preset.separator)
    text = seg.encode_prompts(batches)
    assert len(text) == 1  # one prompt holds the three classes
    return batches, text


def scheduler_config(seg: MaskDiffusion) -> dict:
    return json.loads((Path(seg.model_id) / "scheduler" / "scheduler_config.json").read_text())


def flow_sigma(config: dict, timestep: int, tokens: int) -> tuple[float, float | None]:
    """``(s, mu)``: the flow-matching noise level of ``timestep`` for views of ``tokens`` image tokens, as
    ``FlowMatchEulerDiscreteScheduler`` shifts ``u = t / 1000`` (``mu``: dynamic shifting's, else ``None``)."""
    u = timestep / config["num_train_timesteps"]
    if config.get("use_dynamic_shifting"):
        base, top = config["base_image_seq_len"], config["max_image_seq_len"]
        mu = config["base_shift"] + (config["max_shift"] - config["base_shift"]) * (tokens - base) / (top - base)
        return math.exp(mu) / (math.exp(mu) + (1 / u - 1)), mu
    shift = config["shift"]
    return shift * u / (1 + (shift - 1) * u), None


def sd3_inputs(latents: torch.Tensor, text, sigma: float) -> dict:
    batch = latents.shape[0]
    return {
        "hidden_states": latents,
        "encoder_hidden_states": text.hidden.expand(batch, -1, -1),
        "pooled_projections": text.pooled.expand(batch, -1),
        "timestep": torch.full((batch,), 1000 * sigma),  # StableDiffusion3Pipeline passes 1000 s
    }


def flux_inputs(transformer, latents: torch.Tensor, text, sigma: float) -> dict:
    from diffusers import FluxPipeline

    batch, channels, height, width = latents.shape
    kwargs = {
        "hidden_states": FluxPipeline._pack_latents(latents, batch, channels, height, width),
        "encoder_hidden_states": text.hidden.expand(batch, -1, -1),
        "pooled_projections": text.pooled.expand(batch, -1),
        "timestep": torch.full((batch,), sigma),  # FluxPipeline passes t / 1000 = s
        "img_ids": FluxPipeline._prepare_latent_image_ids(
            batch, height // 2, width // 2, latents.device, latents.dtype
        ),
        "txt_ids": torch.zeros(text.hidden.shape[1], 3),
    }
    if transformer.config.guidance_embeds:
        kwargs["guidance"] = torch.full((batch,), FLUX_GUIDANCE)
    return kwargs


def pixart_inputs(latents: torch.Tensor, text, timestep: int) -> dict:
    batch = latents.shape[0]
    return {
        "hidden_states": latents,
        "encoder_hidden_states": text.hidden.expand(batch, -1, -1),
        "encoder_attention_mask": text.mask.expand(batch, -1),
        "timestep": torch.full((batch,), timestep, dtype=torch.long),
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
    }


def plain_inputs(seg: MaskDiffusion, latents: torch.Tensor, text, timestep: int) -> dict:
    """The transformer's keyword arguments for ``latents`` at ``timestep``, as the family's pipeline passes them."""
    family = seg.family.name
    if family == "pixart-sigma":
        return pixart_inputs(latents, text, timestep)
    sigma, _ = flow_sigma(scheduler_config(seg), timestep, GRID * GRID)
    if family.startswith("flux"):
        return flux_inputs(seg.transformer, latents, text, sigma)
    return sd3_inputs(latents, text, sigma)


@contextmanager
def recording(modules: dict[str, torch.nn.Module]) -> Iterator[dict[str, dict]]:
    """Forward pre-hooks keeping each module's inputs under its name: its keyword arguments and ``"args"``."""
    seen: dict[str, dict] = {}

    def keep(name: str) -> Callable:
        def hook(module, args, kwargs):
            seen[name] = {**kwargs, "args": args}

        return hook

    handles = [module.register_forward_pre_hook(keep(name), with_kwargs=True) for name, module in modules.items()]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def block_of(transformer, index: int) -> torch.nn.Module:
    """Block ``index`` in forward order (FLUX: double-stream blocks, then single-stream ones)."""
    joint = list(transformer.transformer_blocks)
    return joint[index] if index < len(joint) else transformer.single_transformer_blocks[index - len(joint)]


def attention_of(transformer, index: int) -> torch.nn.Module:
    """The attention module whose image queries read the text keys in block ``index`` (PixArt: ``attn2``)."""
    block = block_of(transformer, index)
    return block.attn2 if type(transformer).__name__ == "PixArtTransformer2DModel" else block.attn


def hook_count(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``(B, N, H * d)`` -> ``(B, N, H, d)``."""
    return x.unflatten(-1, (-1, head_dim))


def on_grid(maps: torch.Tensor) -> torch.Tensor:
    """``(B, N, K)`` per-token maps (row-major tokens) -> ``(B, K, GRID, GRID)``."""
    return maps.transpose(1, 2).reshape(maps.shape[0], maps.shape[2], GRID, GRID)


# -- 1. attention weights --------------------------------------------------------------------------------------


def image_text_scores(transformer, index: int, inputs: dict, text_length: int) -> torch.Tensor:
    """``(B, H, N, T)`` ``q_img . k_txt / sqrt(d)`` of block ``index``, from its attention module's own inputs."""
    attn = attention_of(transformer, index)
    name = type(transformer).__name__
    hidden = inputs["hidden_states"] if "hidden_states" in inputs else inputs["args"][0]  # PixArt: positional
    if name == "SD3Transformer2DModel":  # JointAttnProcessor2_0: [image, text], q/k norms per head
        head_dim = attn.to_k.out_features // attn.heads
        query = split_heads(attn.to_q(hidden), head_dim)
        key = split_heads(attn.add_k_proj(inputs["encoder_hidden_states"]), head_dim)
        query = query if attn.norm_q is None else attn.norm_q(query)
        key = key if attn.norm_added_k is None else attn.norm_added_k(key)
    elif name == "FluxTransformer2DModel":  # FluxAttnProcessor: RoPE over the [text, image] positions
        from diffusers.models.embeddings import apply_rotary_emb

        cos, sin = inputs["image_rotary_emb"]
        head_dim = attn.head_dim
        query = attn.norm_q(split_heads(attn.to_q(hidden), head_dim))
        if attn.added_kv_proj_dim is None:  # single-stream: one sequence [text, image]
            assert hidden.shape[1] == text_length + GRID * GRID
            key = attn.norm_k(split_heads(attn.to_k(hidden), head_dim))
            query, key = query[:, text_length:], key[:, :text_length]
        else:
            key = attn.norm_added_k(split_heads(attn.add_k_proj(inputs["encoder_hidden_states"]), head_dim))
        query = apply_rotary_emb(query, (cos[text_length:], sin[text_length:]), sequence_dim=1)
        key = apply_rotary_emb(key, (cos[:text_length], sin[:text_length]), sequence_dim=1)
    else:  # PixArt's cross-attention (AttnProcessor2_0) with the padding bias PixArt adds
        assert attn.norm_q is None and attn.norm_k is None and not attn.norm_cross
        head_dim = attn.to_k.out_features // attn.heads
        query = split_heads(attn.to_q(hidden), head_dim)
        key = split_heads(attn.to_k(inputs["encoder_hidden_states"]), head_dim)
    assert query.shape[1] == GRID * GRID and key.shape[1] == text_length
    return torch.einsum("bnhd,bthd->bhnt", query.float(), key.float()) / math.sqrt(head_dim)


ATTENTION_CASES = {
    "sd3": (1, 3),  # a joint block and the last, context_pre_only one
    "sd3.5": (1,),  # RMS q/k norms and a second (self-)attention in the block
    "flux-schnell": (1, 2),  # the last double-stream block and the first single-stream one
    "flux-dev": (0, 3),  # the first double-stream block and the last single-stream one
    "pixart-sigma": (1, 2),  # cross-attention to a padded T5 prompt
}


@pytest.mark.parametrize("mode", ["softmax", "exp"])
@pytest.mark.parametrize("family", list(ATTENTION_CASES))
@torch.no_grad()
def test_attention_weights_equal_a_recomputation_from_the_blocks_own_q_and_k(family, mode, segmenter_of):
    seg = segmenter_of(family)
    blocks = ATTENTION_CASES[family]
    _, text = prompts(seg)
    latents = seg.encode_views(pixels(2))
    timestep = seg.preset.timestep
    transformer = seg.transformer
    with recording({str(i): attention_of(transformer, i) for i in blocks}) as seen:
        transformer(**plain_inputs(seg, latents, text, timestep), return_dict=False)
    preset = seg.preset.replace(
        class_maps="attention",
        attention_mode=mode,
        attention_normalization="max" if mode == "exp" else "probabilities",  # exp scores are no probabilities
        attention_blocks=blocks,
        feature_blocks=blocks[:1],
    )
    captured = seg.backbone.capture(latents, timestep, text, preset, seg.precision)
    assert len(captured.store.attention) == len(blocks)

    length = text.hidden.shape[1]
    bias = None
    if family == "pixart-sigma":
        assert 0 < int(text.mask.sum()) < length  # the prompt is padded
        bias = (1 - text.mask.float()) * PIXART_MASK_BIAS  # (1, T): as PixArtTransformer2DModel turns the mask
        for index in blocks:  # the bias the model's cross-attention read
            torch.testing.assert_close(seen[str(index)]["attention_mask"], bias[:, None].expand(2, -1, -1))
    for j, index in enumerate(blocks):
        scores = image_text_scores(transformer, index, seen[str(index)], length)
        if bias is not None:
            scores = scores + bias[:, None, None, :]
        weights = scores.softmax(dim=-1) if mode == "softmax" else scores.exp()
        expected = on_grid(weights.mean(dim=1))  # (B, T, h, w): mean over heads
        got = captured.store.attention[j].exp()
        assert got.shape == (2, length, GRID, GRID)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
        if mode == "softmax":
            torch.testing.assert_close(got.sum(dim=1), torch.ones(2, GRID, GRID), rtol=0, atol=1e-5)
        if bias is not None:
            padded = text.mask[0] == 0
            assert got[:, padded].max() < (1e-30 if mode == "exp" else 1e-6)  # exp(-10000 + s) is 0 in float32
            assert got[:, ~padded].min() > 0


# -- 2. concept maps -------------------------------------------------------------------------------------------


def class_token_weights(seg: MaskDiffusion, batches, keep=lambda c, synonym, token: True):
    """``(positions, (C, Nc) weights)``: the text positions of the classes' words and each class's share of
    each, the mean over a word's tokens, synonyms equal (SD3: its CLIP and T5 segments equal, T5's positions
    after CLIP's 77). ``keep(class, synonym, token)``: which of a word's tokens count (for variants)."""
    if seg.family.name.startswith("sd3"):
        segments = [(batches[0], 0), (batches[2], batches[0].input_ids.shape[1])]
    else:
        segments = [(batches[0], 0)]
    shares: dict[int, dict[int, float]] = {}
    classes = len(batches[0].spans)
    for c in range(classes):
        for batch, offset in segments:
            words = [
                [offset + p for k, p in enumerate(range(span.start, span.stop)) if keep(c, s, k)]
                for s, span in enumerate(batch.spans[c])
            ]
            words = [w for w in words if w]
            for word in words:
                for position in word:
                    share = shares.setdefault(position, {})
                    share[c] = share.get(c, 0.0) + 1.0 / (len(segments) * len(words) * len(word))
    positions = sorted(shares)
    weights = torch.tensor([[shares[p].get(c, 0.0) for p in positions] for c in range(classes)])
    return positions, weights


def concept_maps(seg: MaskDiffusion, text, seen: dict, maps_at, positions, weights) -> list[torch.Tensor]:
    """ConceptAttention's class maps, by hand: the classes' tokens (the context embedder's projection of the
    prompt's states at their positions) run through the joint blocks with the text branch's weights; their
    queries attend to [their keys + the image's keys]; per image token, softmax over classes of
    <mean class attention output, image attention output> (both before the output projections)."""
    from diffusers.models.embeddings import apply_rotary_emb

    transformer = seg.transformer
    flux = type(transformer).__name__ == "FluxTransformer2DModel"
    length = text.hidden.shape[1]
    batch = seen["attn0"]["hidden_states"].shape[0]
    stream = transformer.context_embedder(text.hidden)[0, positions].expand(batch, -1, -1)
    count = stream.shape[1]
    text_rotary = transformer.pos_embed(torch.zeros(count, 3)) if flux else None  # text ids are all zero
    maps = []
    for i in range(max(maps_at) + 1):
        block, attn = transformer.transformer_blocks[i], transformer.transformer_blocks[i].attn
        temb, inputs = seen[f"block{i}"]["temb"], seen[f"attn{i}"]
        image_out = seen[f"out{i}"]["args"][0]  # (B, N, H * d): the image's joint attention output
        last = bool(getattr(block, "context_pre_only", False))
        if last:
            normed = block.norm1_context(stream, temb)
        else:
            normed, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1_context(stream, emb=temb)
        head_dim = attn.to_k.out_features // attn.heads
        query, key = split_heads(attn.add_q_proj(normed), head_dim), split_heads(attn.add_k_proj(normed), head_dim)
        value = split_heads(attn.add_v_proj(normed), head_dim)
        query = query if attn.norm_added_q is None else attn.norm_added_q(query)
        key = key if attn.norm_added_k is None else attn.norm_added_k(key)
        image = inputs["hidden_states"]
        image_key = split_heads(attn.to_k(image), head_dim)
        image_key = image_key if attn.norm_k is None else attn.norm_k(image_key)
        image_value = split_heads(attn.to_v(image), head_dim)
        if flux:
            cos, sin = inputs["image_rotary_emb"]
            image_key = apply_rotary_emb(image_key, (cos[length:], sin[length:]), sequence_dim=1)
            query = apply_rotary_emb(query, text_rotary, sequence_dim=1)
            key = apply_rotary_emb(key, text_rotary, sequence_dim=1)
        keys, values = torch.cat([key, image_key], dim=1), torch.cat([value, image_value], dim=1)
        probs = (torch.einsum("bqhd,bkhd->bhqk", query, keys) / math.sqrt(head_dim)).softmax(dim=-1)
        out = torch.einsum("bhqk,bkhd->bqhd", probs, values).flatten(2)  # (B, Nc, H * d)
        if i in maps_at:
            classes = torch.einsum("cn,bnd->bcd", weights, out)
            maps.append(on_grid(torch.einsum("bnd,bcd->bnc", image_out, classes).softmax(dim=-1)))
        if not last:
            stream = stream + gate_msa[:, None] * attn.to_add_out(out)
            normed = block.norm2_context(stream) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
            stream = stream + gate_mlp[:, None] * block.ff_context(normed)
    return maps


CONCEPT_CASES = {"sd3": (1, 3), "flux-schnell": (0, 1)}  # SD3's 3: the last, context_pre_only block


@pytest.mark.parametrize("family", list(CONCEPT_CASES))
@torch.no_grad()
def test_concept_maps_equal_the_written_formula_over_each_classs_whole_span_and_synonyms(family, segmenter_of):
    seg = segmenter_of(family)
    blocks = CONCEPT_CASES[family]
    batches, text = prompts(seg)
    latents = seg.encode_views(pixels(2, seed=1))
    timestep = seg.preset.timestep
    transformer = seg.transformer
    watched = {}
    for i in range(max(blocks) + 1):
        block = transformer.transformer_blocks[i]
        watched |= {f"block{i}": block, f"attn{i}": block.attn, f"out{i}": block.attn.to_out[0]}
    with recording(watched) as seen:
        transformer(**plain_inputs(seg, latents, text, timestep), return_dict=False)
    preset = seg.preset.replace(
        class_maps="concept", attention_mode="softmax", attention_blocks=blocks, feature_blocks=blocks[:1]
    )
    captured = seg.backbone.capture(latents, timestep, text, preset, seg.precision)
    got = [m.exp() for m in captured.store.attention]
    assert [m.shape for m in got] == [(2, len(CLASSES), GRID, GRID)] * len(blocks)

    positions, weights = class_token_weights(seg, batches)
    spans = batches[0].spans
    assert [len(s) for s in spans] == [1, 1, 2] and spans[1][0].stop - spans[1][0].start == 2
    expected = concept_maps(seg, text, seen, blocks, positions, weights)
    for mine, theirs in zip(expected, got, strict=True):
        torch.testing.assert_close(theirs, mine, rtol=0, atol=1e-5)
        torch.testing.assert_close(theirs.sum(dim=1), torch.ones(2, GRID, GRID), rtol=0, atol=1e-5)

    # the formula over part of a class's words is not what was captured: the whole span and both synonyms count
    variants = {
        1: lambda c, synonym, token: c != 1 or token == 0,  # "traffic light" by "traffic" alone
        2: lambda c, synonym, token: c != 2 or synonym == 0,  # "road|street" by "road" alone
    }
    for c, keep in variants.items():
        partial = concept_maps(seg, text, seen, blocks, *class_token_weights(seg, batches, keep))
        gap = max(float((p[:, c] - g[:, c]).abs().max()) for p, g in zip(partial, got, strict=True))
        assert gap > 1e-3, f"class {CLASSES[c]!r}: the captured map does not depend on its other tokens"


# -- 3. the model's own pass -----------------------------------------------------------------------------------


PASS_CASES = [
    ("sd3", "attention", (1, 3)),
    ("sd3", "concept", (1, 3)),
    ("sd3.5", "concept", (0, 1)),
    ("flux-dev", "attention", (1, 2)),
    ("flux-schnell", "concept", (0, 1)),
    ("pixart-sigma", "attention", (1, 2)),
]


@pytest.mark.parametrize(("family", "maps", "blocks"), PASS_CASES)
@torch.no_grad()
def test_capturing_leaves_the_models_output_processors_and_hooks_as_they_were(family, maps, blocks, segmenter_of):
    seg = segmenter_of(family)
    _, text = prompts(seg)
    latents = seg.encode_views(pixels(2, seed=2))
    timestep = seg.preset.timestep
    transformer = seg.transformer
    processors, hooks = dict(transformer.attn_processors), hook_count(transformer)
    plain = transformer(**plain_inputs(seg, latents, text, timestep), return_dict=False)[0]
    preset = seg.preset.replace(
        class_maps=maps, attention_mode="softmax", attention_blocks=blocks, feature_blocks=blocks[-1:]
    )
    for stop_early in (False, True):
        captured = seg.backbone.capture(latents, timestep, text, preset, seg.precision, stop_early=stop_early)
        if not stop_early:
            assert captured.output is not None and captured.output.shape == plain.shape
            torch.testing.assert_close(captured.output, plain, rtol=1e-5, atol=1e-5)
        after = transformer.attn_processors
        assert after.keys() == processors.keys()
        assert all(after[name] is processor for name, processor in processors.items())
        assert hook_count(transformer) == hooks
    again = transformer(**plain_inputs(seg, latents, text, timestep), return_dict=False)[0]
    assert torch.equal(again, plain)


# -- 4. batches and determinism --------------------------------------------------------------------------------


def images() -> list[np.ndarray]:
    """Two 128-px square images and a 128x192 one (two views)."""
    rng = np.random.default_rng(3)
    shapes = [(128, 128), (128, 128), (128, 192)]
    return [rng.integers(0, 256, (*shape, 3), dtype=np.uint8) for shape in shapes]


def assert_same_segmentation(one, other, *, exact: bool) -> None:
    """The same labels, scores, class maps and features: bit for bit (``exact``), or to 1e-4 / 1e-5 with labels
    equal wherever the top two scores are more than 1e-4 apart."""
    assert one.classes == other.classes and one.absent == other.absent
    if exact:
        assert torch.equal(one.grid_scores, other.grid_scores) and torch.equal(one.features, other.features)
        assert np.array_equal(one.attention, other.attention) and np.array_equal(one.labels, other.labels)
        return
    torch.testing.assert_close(one.grid_scores, other.grid_scores, rtol=0, atol=1e-4)
    np.testing.assert_allclose(one.attention, other.attention, rtol=0, atol=1e-5)
    torch.testing.assert_close(one.features, other.features, rtol=0, atol=1e-5)
    scores = np.sort(one.scores, axis=0)
    clear = scores[-1] - scores[-2] >= 1e-4
    assert np.array_equal(one.labels[clear], other.labels[clear])


@pytest.mark.parametrize("timestep", [0, 400])
@pytest.mark.parametrize("family", ["flux-schnell", "pixart-sigma"])
def test_a_batch_equals_one_image_at_a_time_and_runs_repeat_exactly(family, timestep, segmenter_of):
    seg = segmenter_of(family)
    preset = seg.preset.replace(timestep=timestep, seed=5)
    pictures = images()
    assert seg.batch_size >= 4  # the three images' four views share one batch
    together = seg.segment_batch(pictures, CLASSES, preset=preset, keep_features=True)
    # the images' own results differ by far more than the tolerances: a mix-up of views would show
    assert float((together[0].features - together[1].features).abs().max()) > 1e-3
    for picture, batched in zip(pictures, together, strict=True):
        alone = seg.segment_batch([picture], CLASSES, preset=preset, keep_features=True)[0]
        assert_same_segmentation(alone, batched, exact=False)
    again = seg.segment_batch(pictures, CLASSES, preset=preset, keep_features=True)
    for first, second in zip(together, again, strict=True):
        assert_same_segmentation(first, second, exact=True)


# -- 5. flow-matching noise ------------------------------------------------------------------------------------


@pytest.mark.parametrize("timestep", [250, 800])
@pytest.mark.parametrize("family", ["sd3", "flux-dev", "flux-schnell"])
@torch.no_grad()
def test_the_transformer_reads_flow_matching_noised_latents_and_its_own_timestep(family, timestep, segmenter_of):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    seg = segmenter_of(family)
    config = scheduler_config(seg)
    sigma, mu = flow_sigma(config, timestep, GRID * GRID)
    assert (mu is not None) == (family == "flux-dev")
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)  # my s against the scheduler's own shift
    scheduler.set_timesteps(sigmas=[timestep / 1000], mu=mu)
    assert float(scheduler.sigmas[0]) == pytest.approx(sigma, rel=1e-6)

    _, text = prompts(seg)
    clean = seg.encode_views(pixels(2, seed=4))
    seed = 11
    noise = torch.randn((1, *clean.shape[1:]), generator=torch.Generator().manual_seed(seed))
    expected = (1 - sigma) * clean + sigma * noise  # the same noise for both views
    preset = seg.preset.replace(timestep=timestep, seed=seed)
    with recording({"transformer": seg.transformer}) as seen:
        seg.capture(clean, text, preset)
    received = seen["transformer"]
    if family.startswith("flux"):
        batch, channels, height, width = expected.shape
        expected = FluxPipeline._pack_latents(expected, batch, channels, height, width)
        read = sigma
    else:
        read = 1000 * sigma
    torch.testing.assert_close(received["hidden_states"], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(received["timestep"].float(), torch.full((2,), read), rtol=1e-6, atol=0)
