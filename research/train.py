"""Train the toy world's text-to-image latent diffusion model (images and captions only).

``python -m research.train --out DIR`` runs two phases and saves a folder in
the diffusers Stable-Diffusion layout (``vae/ unet/ text_encoder/ tokenizer/ scheduler/
model_index.json``) plus ``maskdiffusion.json`` (recommended segmentation settings):

1. an ``AutoencoderKL`` with a factor-4 latent (64x64 images -> 16x16x4 latents: a factor-8
   VAE would leave 8x8 latents, too coarse for several objects);
2. a ``UNet2DConditionModel`` with cross-attention at 16x16, 8x8 and the 4x4 mid block,
   jointly with a one-layer ``CLIPTextModel`` fed by the real CLIP tokenizer.

The model never sees a label map. Besides the denoising loss, an optional *binding margin*
asks the right caption to denoise better than the same caption with two objects' pattern
words swapped: plain denoising settles on a bag of words (issue 5), and the swap test is
the cheapest caption-only signal that a word must be routed to its own object.

Every random draw of step ``k`` is seeded by ``(seed, k)``, and checkpoints (written
atomically every ``--checkpoint-minutes``) hold models, optimisers and EMA weights, so a run
killed at any point and restarted with the same command continues where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from maskdiffusion.prompts import CLIP_CONTEXT, clip_tokenizer
from maskdiffusion.tiny import SD_NOISE_SCHEDULE, save_model_index
from maskdiffusion.toyworld.world import (
    CLASS_NAMES,
    IMAGE_SIZE,
    Scene,
    make_caption,
    make_scene,
    swap_patterns,
    train_seed,
)

CHECKPOINT = "checkpoint.pt"
MODEL_DIR = "model"
LATENTS = "latents.pt"


@dataclass(frozen=True)
class TrainConfig:
    """Shapes and schedule of a run. Stored in the checkpoint; a resumed run keeps them."""

    seed: int = 0
    image_size: int = IMAGE_SIZE
    num_scenes: int = 20000
    # autoencoder
    vae_channels: tuple[int, ...] = (32, 64, 64)
    vae_steps: int = 1500
    vae_batch: int = 16
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    # unet + text encoder
    unet_channels: tuple[int, ...] = (64, 128, 128)
    unet_heads: int = 4
    text_width: int = 32
    text_layers: int = 1
    text_heads: int = 2
    steps: int = 6000
    batch: int = 32
    lr: float = 5e-4
    warmup: int = 200
    p_uncond: float = 0.1
    mid_t_fraction: float = 0.5  # share of timesteps drawn from mid_t_range, the rest uniform
    mid_t_range: tuple[int, ...] = (200, 700)
    binding_weight: float = 0.0
    binding_margin: float = 0.1  # relative: swapped-caption loss should exceed right by 10%
    binding_fraction: float = 0.5  # share of the batch that also runs the swapped caption
    binding_start: int = 0  # step where the margin term starts (ramped in over binding_ramp)
    binding_ramp: int = 1
    ema_decay: float = 0.999
    p_attributes: float = 1.0  # share of caption phrases that name colours and patterns
    freeze_positions: int = 0  # 1: text position embeddings fixed at zero (word keys ignore order)
    class_attention_weight: float = 0.0  # weight of the pixel/class-word information prior
    mosaic_fraction: float = 0.0  # share of samples made of two scenes' halves (two backgrounds)
    absent_class_weight: float = 0.0  # weight of the "pixels do not read classes the caption lacks" term

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in known})


# ----------------------------------------------------------------------------- models


def build_vae(cfg: TrainConfig):
    """A factor-``2**(len(vae_channels)-1)`` AutoencoderKL with 4 latent channels."""
    from diffusers import AutoencoderKL

    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=cfg.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=16 if min(cfg.vae_channels) % 16 == 0 else 8,
        sample_size=cfg.image_size,
    )


def vae_factor(cfg: TrainConfig) -> int:
    return 2 ** (len(cfg.vae_channels) - 1)


def build_unet(cfg: TrainConfig):
    """Cross-attention on every level but the coarsest, plus the mid block."""
    from diffusers import UNet2DConditionModel

    n = len(cfg.unet_channels)
    return UNet2DConditionModel(
        sample_size=cfg.image_size // vae_factor(cfg),
        in_channels=4,
        out_channels=4,
        block_out_channels=cfg.unet_channels,
        layers_per_block=1,
        norm_num_groups=16 if min(cfg.unet_channels) % 16 == 0 else 8,
        cross_attention_dim=cfg.text_width,
        attention_head_dim=cfg.unet_heads,  # diffusers' legacy name: the number of heads
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
    )


def build_text_encoder(cfg: TrainConfig):
    """A small CLIPTextModel over the full CLIP vocabulary (so the real tokenizer fits)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = clip_tokenizer()
    model = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=cfg.text_width,
            intermediate_size=cfg.text_width * 2,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=cfg.text_heads,
            max_position_embeddings=CLIP_CONTEXT,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    )
    if cfg.freeze_positions:
        positions = model.embeddings.position_embedding.weight
        with torch.no_grad():
            positions.zero_()
        positions.requires_grad_(False)
    return model


def noise_scheduler():
    """The DDPM noise schedule of training (SD's), as the DDIMScheduler that gets saved."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SD_NOISE_SCHEDULE)


# ----------------------------------------------------------------------------- data


class Tokens:
    """Caption -> ``(77,)`` CLIP ids, memoised (the Python BPE is slow; captions repeat)."""

    def __init__(self) -> None:
        self.tokenizer = clip_tokenizer()
        self._cache: dict[str, torch.Tensor] = {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        rows = []
        for text in captions:
            ids = self._cache.get(text)
            if ids is None:
                ids = self.tokenizer(
                    text, padding="max_length", max_length=CLIP_CONTEXT, truncation=True, return_tensors="pt"
                ).input_ids[0]
                self._cache[text] = ids
            rows.append(ids)
        return torch.stack(rows)


def make_dataset(cfg: TrainConfig) -> list[Scene]:
    """The training scenes (seeds ``0..num_scenes-1``), regenerated identically on resume."""
    return [make_scene(train_seed(i), cfg.image_size) for i in range(cfg.num_scenes)]


def images_tensor(scenes: list[Scene]) -> torch.Tensor:
    """``(N, 3, H, W) float32`` in [-1, 1], the VAE's input range."""
    arr = np.stack([s.image for s in scenes]).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def step_rng(cfg: TrainConfig, phase: int, step: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, phase, step])


def captions_for(
    scenes: list[Scene], rng: np.random.Generator, p_uncond: float, p_attributes: float = 1.0
) -> tuple[list[str], list[str]]:
    """A fresh caption per scene and its pattern-swapped twin ('' when no swap is possible).

    Captions are re-drawn every step (template, word order, part of the scene), so the model
    sees many sentences per image; ``p_uncond`` of them are empty (for guidance at sampling).
    """
    right, swapped = [], []
    for scene in scenes:
        cseed = int(rng.integers(2**31))
        if rng.random() < p_uncond:
            right.append("")
            swapped.append("")
            continue
        text = make_caption(scene.background, scene.objects, cseed, scene.background_colour, p_attributes)
        right.append(text)
        twin = ""
        if len(scene.objects) >= 2:
            i, j = rng.permutation(len(scene.objects))[:2]
            other = make_caption(
                scene.background,
                swap_patterns(scene.objects, int(i), int(j)),
                cseed,
                scene.background_colour,
                p_attributes,
            )
            if other != text:
                twin = other
        swapped.append(twin)
    return right, swapped


def mosaic(
    first: Scene,
    second: Scene,
    latents: tuple[torch.Tensor, torch.Tensor],
    rng: np.random.Generator,
    p_attributes: float,
) -> tuple[torch.Tensor, str]:
    """One training sample made of two scenes: ``first``'s left (or top) half, ``second``'s other.

    Scenes of the world have one background each, so their captions never make a pixel choose
    between two background words, yet the segmentation prompt lists all of them. A two-scene
    mosaic names two backgrounds (and more shapes), so a pixel must read the right one. The
    latent halves are cut at the middle (the factor-4 latent is local), and each half's caption
    names the objects whose centre lies in it.
    """
    axis = int(rng.integers(2))  # 0: left | right, 1: top | bottom
    half = latents[0].shape[-1] // 2
    x0 = latents[0].clone()
    if axis == 0:
        x0[..., half:] = latents[1][..., half:]
    else:
        x0[..., half:, :] = latents[1][..., half:, :]
    middle = first.image.shape[0] / 2
    parts = []
    for scene, keep_low in ((first, True), (second, False)):
        kept = [o for o in scene.objects if ((o.cx if axis == 0 else o.cy) < middle) == keep_low]
        cseed = int(rng.integers(2**31))
        if kept:
            parts.append(make_caption(scene.background, kept, cseed, scene.background_colour, p_attributes))
        else:
            parts.append(scene.background)
    if rng.random() < 0.5:
        parts.reverse()
    return x0, (" and " if rng.random() < 0.5 else ", ").join(parts)


def sample_timesteps(cfg: TrainConfig, n: int, rng: np.random.Generator) -> torch.Tensor:
    uniform = rng.integers(0, 1000, n)
    mid = rng.integers(cfg.mid_t_range[0], cfg.mid_t_range[1], n)
    pick = rng.random(n) < cfg.mid_t_fraction
    return torch.from_numpy(np.where(pick, mid, uniform)).long()


# ----------------------------------------------------------------------------- checkpoints


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def log_line(out: Path, record: dict) -> None:
    """Append one JSON line to ``train_log.jsonl`` and echo it (losses are the run's record)."""
    with open(out / "train_log.jsonl", "a") as handle:
        handle.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)


class EMA:
    """Exponential moving average of parameters, with the usual warm-up of the decay."""

    def __init__(self, modules: list[torch.nn.Module], decay: float) -> None:
        self.decay = decay
        self.shadow = [p.detach().clone() for m in modules for p in m.parameters()]

    @torch.no_grad()
    def update(self, modules: list[torch.nn.Module], step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for s, p in zip(self.shadow, (p for m in modules for p in m.parameters()), strict=True):
            s.mul_(d).add_(p.detach(), alpha=1 - d)

    @torch.no_grad()
    def copy_to(self, modules: list[torch.nn.Module]) -> None:
        for s, p in zip(self.shadow, (p for m in modules for p in m.parameters()), strict=True):
            p.copy_(s)


def optimiser_step(opt, params: list[torch.Tensor], loss: torch.Tensor, cfg, step: int) -> float:
    """One AdamW step at step ``step``'s learning rate (linear warm-up over ``cfg.warmup``, then a cosine
    to 0.1x ``cfg.lr`` at ``cfg.steps``), gradients clipped to norm 1; returns that rate."""
    lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) * (0.55 + 0.45 * math.cos(math.pi * step / cfg.steps))
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return lr


# ----------------------------------------------------------------------------- phases


def train_vae(
    cfg: TrainConfig, out: Path, images: torch.Tensor, state: dict, every_s: float, log_every: int = 50
) -> None:
    vae = build_vae(cfg)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    step = 0
    if state.get("phase") == "vae":
        vae.load_state_dict(state["vae"])
        opt.load_state_dict(state["vae_opt"])
        step = state["step"]
    last_save = time.time()
    t0 = time.time()
    recs: list[float] = []
    kls: list[float] = []
    vae.train()
    while step < cfg.vae_steps:
        rng = step_rng(cfg, 1, step)
        idx = torch.from_numpy(rng.integers(0, len(images), cfg.vae_batch))
        x = images[idx]
        torch.manual_seed(cfg.seed * 1_000_003 + step)
        posterior = vae.encode(x).latent_dist
        # Decode the mean plus a little noise: the segmenter only ever uses the posterior
        # mean, and sampling at the initial unit variance drowns the signal for hundreds of
        # steps.
        z = posterior.mean + 0.05 * torch.randn_like(posterior.mean)
        recon = vae.decode(z).sample
        rec = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x)
        kl = posterior.kl().mean() / x[0].numel()
        loss = rec + cfg.kl_weight * kl
        warm = min(1.0, (step + 1) / max(1, min(50, cfg.vae_steps // 10)))
        lr = cfg.vae_lr * warm * 0.5 * (1 + math.cos(math.pi * step / cfg.vae_steps))
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        recs.append(rec.item())
        kls.append(kl.item())
        if step % log_every == 0 or step == cfg.vae_steps:
            log_line(
                out,
                {
                    "phase": "vae",
                    "step": step,
                    "rec": round(float(np.mean(recs)), 5),
                    "kl": round(float(np.mean(kls)), 3),
                    "s_per_step": round((time.time() - t0) / len(recs), 3),
                },
            )
            recs, kls = [], []
            t0 = time.time()
        if time.time() - last_save > every_s and step < cfg.vae_steps:
            _atomic_save(
                {
                    "config": dataclasses.asdict(cfg),
                    "phase": "vae",
                    "step": step,
                    "vae": vae.state_dict(),
                    "vae_opt": opt.state_dict(),
                },
                out / CHECKPOINT,
            )
            last_save = time.time()
    vae.eval()
    with torch.no_grad():
        means = vae.encode(images[:2048]).latent_dist.mean
    scaling = float(1.0 / means.std())
    vae.register_to_config(scaling_factor=scaling)
    state.clear()
    state.update(
        {
            "config": dataclasses.asdict(cfg),
            "phase": "unet",
            "step": 0,
            "vae": vae.state_dict(),
            "scaling_factor": scaling,
        }
    )
    _atomic_save(state, out / CHECKPOINT)
    log_line(out, {"phase": "vae", "done": True, "scaling_factor": scaling})


def encode_latents(cfg: TrainConfig, state: dict, images: torch.Tensor, cache: Path) -> tuple[object, torch.Tensor]:
    """Posterior means x scaling factor of every training image: what the segmenter feeds the UNet.

    Cached in ``cache`` (keyed by the autoencoder's scaling factor and the scene count), since
    encoding 20k images costs minutes on one core.
    """
    vae = build_vae(cfg)
    vae.load_state_dict(state["vae"])
    vae.register_to_config(scaling_factor=state["scaling_factor"])
    vae.eval().requires_grad_(False)
    key = {"scaling_factor": state["scaling_factor"], "num_scenes": len(images), "seed": cfg.seed}
    if cache.exists():
        saved = torch.load(cache, map_location="cpu", weights_only=False)
        if saved["key"] == key:
            return vae, saved["latents"]
    with torch.no_grad():
        latents = torch.cat([vae.encode(images[i : i + 256]).latent_dist.mean for i in range(0, len(images), 256)])
    latents = latents * state["scaling_factor"]
    _atomic_save({"key": key, "latents": latents}, cache)
    return vae, latents


class ClassAttentionPrior:
    """Cross-attention processor that also scores how the caption's *class words* share the image.

    Plain denoising is content with a bag of words: every pixel reads every word a little and
    the convolutions sort it out, so no attention map is tied to its object (issue 5); asking
    only for sharp attention collapses every pixel onto one word. This term is the mutual
    information between pixels and the caption's class words (the attention restricted to
    class-name tokens, a multi-token name summed, renormalised): mean per-pixel entropy minus
    the entropy of the image's mean. Minimising it asks each pixel to read one named class
    and every named class to be read somewhere; the denoising loss decides which pixel reads
    which. It sees the caption and the attention only: never a label map.
    """

    def __init__(self, owner: dict) -> None:
        self.owner = owner  # {"classes": (B, T, K) float or None, "terms": list}

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        v = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = torch.softmax(q @ k.transpose(1, 2) * attn.scale, dim=-1)
        classes = self.owner.get("classes")
        if classes is not None:
            self.owner["terms"].append(pixel_class_information(probs, classes.repeat_interleave(attn.heads, 0)))
        vocabulary = self.owner.get("vocabulary")
        if vocabulary is not None:
            words, word_class, present = vocabulary
            keys = attn.head_to_batch_dim(attn.to_k(words[None]))  # (heads, W, d)
            logits = q.unflatten(0, (-1, attn.heads)) @ keys.transpose(1, 2)[None] * attn.scale  # (B, h, N, W)
            self.owner["absent"].append(absent_class_mass(logits, word_class, present))
        out = attn.batch_to_head_dim(probs @ v)
        return attn.to_out[1](attn.to_out[0](out))


def pixel_class_information(probs: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Mean over images with >= 2 named classes of (mean pixel entropy - entropy of the mean).

    ``probs``: ``(B, N, T)`` attention; ``classes``: ``(B, T, K)`` 0/1 token -> class.
    """
    named = classes.sum(1) > 0  # (B, K)
    usable = named.sum(1) >= 2
    if not usable.any():
        return probs.new_zeros(())
    pc = (probs[usable] @ classes[usable]).clamp_min(1e-8) * named[usable, None, :]
    pc = pc / pc.sum(-1, keepdim=True)
    pixel = -(pc * pc.clamp_min(1e-8).log()).sum(-1).mean(-1)
    mean = pc.mean(1)
    marginal = -(mean * mean.clamp_min(1e-8).log()).sum(-1)
    return (pixel - marginal).mean()


def absent_class_mass(logits: torch.Tensor, word_class: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """``-log P(a class the caption names)`` per pixel, averaged, over the whole class vocabulary.

    ``logits``: ``(B, h, N, W)`` query-key scores against every class-name token of the world;
    ``word_class``: ``(W,)`` class of each token; ``present``: ``(B, K)`` classes the caption
    names. A class's score is the log-sum-exp of its tokens'. This is what the segmentation
    prompt asks of the attention (a pixel's own class must beat every other class word), taught
    from the caption alone: which classes it names, never where.
    """
    k = present.shape[1]
    per_class = torch.stack([logits[..., word_class == c].logsumexp(-1) for c in range(k)], -1)  # (B,h,N,K)
    log_p = per_class.log_softmax(-1)
    named = present[:, None, None, :]
    usable = present.any(1)
    if not usable.any():
        return logits.new_zeros(())
    picked = log_p.masked_fill(~named, -torch.inf).logsumexp(-1)  # (B, h, N)
    return -picked[usable].mean()


def install_class_attention_prior(unet) -> dict:
    """Put :class:`ClassAttentionPrior` on every cross-attention layer; return its shared state."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    owner: dict = {"classes": None, "terms": [], "vocabulary": None, "absent": []}
    unet.set_attn_processor(
        {
            name: ClassAttentionPrior(owner) if name.endswith("attn2.processor") else AttnProcessor2_0()
            for name in unet.attn_processors
        }
    )
    return owner


def class_token_table(tokenizer) -> dict[int, int]:
    """Token id -> class index for the words of the world's class names ("brick wall": two ids)."""
    table: dict[int, int] = {}
    for index, name in enumerate(CLASS_NAMES):
        for token in tokenizer(name, add_special_tokens=False).input_ids:
            table[token] = index
    return table


def class_tokens(ids: torch.Tensor, table: dict[int, int]) -> torch.Tensor:
    """``(B, T, K)`` float: which class (if any) each caption token names."""
    out = torch.zeros(*ids.shape, len(CLASS_NAMES))
    for token, index in table.items():
        out[..., index] += (ids == token).float()
    return out


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((pred - target) ** 2).flatten(1).mean(1)


def train_unet(
    cfg: TrainConfig,
    out: Path,
    scenes: list[Scene],
    latents: torch.Tensor,
    state: dict,
    every_s: float,
    log_every: int = 50,
    stop_at: int | None = None,
) -> tuple:
    unet, text = build_unet(cfg), build_text_encoder(cfg)
    if "init_unet" in state and "unet" not in state:
        unet.load_state_dict(state["init_unet"])
    params = [p for m in (unet, text) for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    ema = EMA([unet, text], cfg.ema_decay)
    step = state.get("step", 0)
    if "unet" in state:
        unet.load_state_dict(state["unet"])
        text.load_state_dict(state["text"])
        if "opt" in state:  # absent when continuing an exported model: the optimiser starts afresh
            opt.load_state_dict(state["opt"])
        ema.shadow = state["ema"]
    sched = noise_scheduler()
    alphas = sched.alphas_cumprod.float()
    tokens = Tokens()
    use_prior = cfg.class_attention_weight > 0 or cfg.absent_class_weight > 0
    prior = install_class_attention_prior(unet) if use_prior else None
    table = class_token_table(tokens.tokenizer)
    vocabulary_ids = torch.tensor([[tokens.tokenizer.bos_token_id, *table]])
    vocabulary_class = torch.tensor(list(table.values()))
    unet.train()
    text.train()
    last_save, t0 = time.time(), time.time()
    meter: dict[str, list[float]] = {"loss": [], "margin": [], "gap": [], "prior": [], "absent": []}
    last = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    while step < last:
        rng = step_rng(cfg, 2, step)
        idx = rng.integers(0, len(scenes), cfg.batch)
        batch_scenes = [scenes[i] for i in idx]
        right, swapped = captions_for(batch_scenes, rng, cfg.p_uncond, cfg.p_attributes)
        x0 = latents[torch.from_numpy(idx)]
        for k in np.flatnonzero(rng.random(cfg.batch) < cfg.mosaic_fraction):
            if not right[k]:
                continue
            j = int(rng.integers(len(scenes)))
            x0[k], right[k] = mosaic(batch_scenes[k], scenes[j], (x0[k], latents[j]), rng, cfg.p_attributes)
            swapped[k] = ""
        t = sample_timesteps(cfg, cfg.batch, rng)
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        noise = torch.randn(x0.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise

        use = [k for k, s in enumerate(swapped) if s][: max(0, int(cfg.batch * cfg.binding_fraction))]
        ramp = min(1.0, max(0.0, (step - cfg.binding_start + 1) / max(1, cfg.binding_ramp)))
        binding_weight = cfg.binding_weight * ramp
        if binding_weight > 0 and use:
            ids = tokens(right + [swapped[k] for k in use])
            sel = torch.tensor(use)
            x_in = torch.cat([xt, xt[sel]])
            t_in = torch.cat([t, t[sel]])
        else:
            ids = tokens(right)
            x_in, t_in, sel = xt, t, None
        cond = text(ids)[0]
        if prior is not None:
            named = class_tokens(ids, table)
            prior["classes"] = named if cfg.class_attention_weight > 0 else None
            prior["terms"] = []
            prior["absent"] = []
            if cfg.absent_class_weight > 0:
                words = text(vocabulary_ids)[0][0, 1:]  # (W, width): every class-name token
                present = named.sum(1) > 0  # (B, K)
                prior["vocabulary"] = (words, vocabulary_class, present)
        pred = unet(x_in, t_in, encoder_hidden_states=cond).sample
        losses = per_sample_mse(pred[: cfg.batch], noise)
        loss = losses.mean()
        if prior is not None and prior["terms"]:
            information = torch.stack(prior["terms"]).mean()
            loss = loss + cfg.class_attention_weight * information
            meter["prior"].append(information.item())
        if prior is not None and prior["absent"]:
            absent = torch.stack(prior["absent"]).mean()
            loss = loss + cfg.absent_class_weight * absent
            meter["absent"].append(absent.item())
        if sel is not None:
            l_swap = per_sample_mse(pred[cfg.batch :], noise[sel])
            l_right = losses[sel]
            rel = (l_swap - l_right) / l_right.detach().clamp_min(1e-4)
            margin = F.relu(cfg.binding_margin - rel).mean()
            loss = loss + binding_weight * margin
            meter["margin"].append(margin.item())
            meter["gap"].append(rel.mean().item())
        lr = optimiser_step(opt, params, loss, cfg, step)
        ema.update([unet, text], step)
        meter["loss"].append(losses.mean().item())
        step += 1
        if step % log_every == 0 or step == cfg.steps:
            record = {
                "phase": "unet",
                "step": step,
                "lr": round(lr, 6),
                "s_per_step": round((time.time() - t0) / max(1, len(meter["loss"])), 3),
            }
            record.update({k: round(float(np.mean(v)), 5) for k, v in meter.items() if v})
            log_line(out, record)
            meter = {k: [] for k in meter}
            t0 = time.time()
        if time.time() - last_save > every_s or step == last:
            state.update(
                {
                    "phase": "unet",
                    "step": step,
                    "unet": unet.state_dict(),
                    "text": text.state_dict(),
                    "opt": opt.state_dict(),
                    "ema": ema.shadow,
                }
            )
            _atomic_save(state, out / CHECKPOINT)
            last_save = time.time()
    ema.copy_to([unet, text])
    return unet, text


# ----------------------------------------------------------------------------- export


RECOMMENDED_PRESET = {
    "size": 64,
    "timestep": 250,
    "attention_mode": "softmax",
    "attention_normalization": "probabilities",
    "attention_factors": [8, 16],
    "attention_factor": 4,
    "feature_blocks": [1],
    "feature_factor": 4,
    "refinement": "em",
    "refine_steps": 10,
    "em_concentration": 30.0,
    "em_prior_weight": 3.0,
    "refinement_on_image": "pamr",
}
"""The shipped model's settings: the best mask head of a grid on held-out stream 3 (never the gate's
stream 0) over timestep, attention layers, normalisation and EM weights, then PAMR with the paper's
10 steps and dilations 1, 2, 4, 8 (+2.1 mIoU on stream 3, held on stream 4; docs/ablation.md)."""

ATTENTION_ONLY_PRESET = {
    "size": 64,
    "timestep": 200,
    "attention_mode": "softmax",
    "attention_normalization": "probabilities",
    "attention_factors": [8],
    "attention_factor": 4,
    "feature_blocks": [1],
    "feature_factor": 4,
    "scoring": "attention",
}
"""The strongest attention-only baseline of a grid on held-out stream 3 (raw softmax probabilities;
docs/ablation.md): what the quality gate's head must beat."""

REFERENCE_PRESET = {
    "size": 64,
    "attention_factors": [8, 16],
    "attention_factor": 4,
    "feature_blocks": [1, 2],
    "feature_factor": 4,
}
"""The reference mask head on this model: its coarse layers (the analogue of SD's 16x16 + 8x8)."""


def models_from_checkpoint(path: Path | dict, *, use_ema: bool = True) -> tuple:
    """``(cfg, vae, unet, text_encoder)`` from a checkpoint file or its loaded state (EMA weights
    by default), in eval mode."""
    state = path if isinstance(path, dict) else torch.load(path, map_location="cpu", weights_only=False)
    cfg = TrainConfig.from_dict(state["config"])
    vae = build_vae(cfg)
    vae.load_state_dict(state["vae"])
    vae.register_to_config(scaling_factor=state["scaling_factor"])
    unet, text = build_unet(cfg), build_text_encoder(cfg)
    if "unet" in state:
        unet.load_state_dict(state["unet"])
        text.load_state_dict(state["text"])
        if use_ema:
            _load_ema(state["ema"], [unet, text])
    return cfg, vae.eval(), unet.eval(), text.eval()


def _load_ema(shadow: list[torch.Tensor], modules: list[torch.nn.Module]) -> None:
    with torch.no_grad():
        for s, p in zip(shadow, (p for m in modules for p in m.parameters()), strict=True):
            p.copy_(s)


def export_model(folder: Path, vae, unet, text, *, preset: dict | None = None, notes: dict | None = None) -> Path:
    """Save a diffusers Stable-Diffusion folder (+ ``maskdiffusion.json``), replacing ``folder`` atomically."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".toy-", dir=folder.parent))
    vae.save_pretrained(staging / "vae", safe_serialization=True)
    unet.save_pretrained(staging / "unet", safe_serialization=True)
    text.save_pretrained(staging / "text_encoder", safe_serialization=True)
    clip_tokenizer().save_pretrained(staging / "tokenizer")
    noise_scheduler().save_pretrained(staging / "scheduler")
    save_model_index(staging)
    chosen = dict(preset or RECOMMENDED_PRESET)
    # ``presets`` is what maskdiffusion.loading reads (field overrides per named preset);
    # ``preset`` repeats the recommended settings on their own; ``vocabulary`` is the model
    # card's list of the words it was trained on (warnings for any other word).
    info: dict = {
        "preset": chosen,
        "presets": {
            "default": chosen,
            "attention-only": dict(ATTENTION_ONLY_PRESET),
            "reference": dict(REFERENCE_PRESET),
        },
        "vocabulary": list(CLASS_NAMES),
    }
    if notes:
        info["notes"] = notes
    (staging / "maskdiffusion.json").write_text(json.dumps(info, indent=2))
    if folder.exists():
        shutil.rmtree(folder)
    staging.rename(folder)
    return folder


# ----------------------------------------------------------------------------- main


def run(
    cfg: TrainConfig,
    out: Path,
    *,
    checkpoint_minutes: float = 3.0,
    export: bool = True,
    init_vae: Path | None = None,
    init_unet: Path | None = None,
    continue_from: Path | None = None,
    continue_model: Path | None = None,
    stop_at: int | None = None,
    log_every: int = 50,
) -> Path:
    """Train (or resume) into ``out``; return the exported model folder.

    ``init_vae``: a checkpoint whose trained autoencoder is reused (the VAE phase is skipped),
    so experiments on the UNet share one autoencoder. ``init_unet``: a checkpoint whose
    (EMA) UNet starts this run; the text encoder starts fresh (its shape may differ).
    ``continue_from``: another run's checkpoint whose whole state (models, optimiser, EMA,
    step) this run continues from under *this* configuration (a new stage of training with
    other losses). ``continue_model``: an exported model folder (``OUT/model``, e.g. the bundled
    toy model) whose weights, training configuration and step this run continues, to
    ``cfg.steps``; the optimiser starts afresh and the EMA from the exported (EMA) weights.
    ``stop_at``: end (checkpointed) at that step instead of ``cfg.steps``.
    """
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / CHECKPOINT
    state: dict = {}
    if not ckpt.exists() and init_vae is not None:
        source = torch.load(init_vae, map_location="cpu", weights_only=False)
        if "scaling_factor" not in source:
            raise ValueError(f"--init-vae {init_vae}: that checkpoint has not finished its VAE phase yet")
        vae_channels = tuple(source["config"]["vae_channels"])
        cfg = dataclasses.replace(cfg, vae_channels=vae_channels, vae_steps=source["config"]["vae_steps"])
        state = {
            "config": dataclasses.asdict(cfg),
            "phase": "unet",
            "step": 0,
            "vae": source["vae"],
            "scaling_factor": source["scaling_factor"],
        }
        if init_unet is not None:
            _, _, unet, _ = models_from_checkpoint(Path(init_unet))
            state["init_unet"] = unet.state_dict()
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        _atomic_save(state, ckpt)
        if (Path(init_vae).parent / LATENTS).exists():
            shutil.copyfile(Path(init_vae).parent / LATENTS, out / LATENTS)
    if not ckpt.exists() and continue_from is not None:
        state = torch.load(continue_from, map_location="cpu", weights_only=False)
        if state.get("phase") != "unet":
            raise ValueError(f"--continue-from {continue_from}: that run has not reached its UNet phase")
        source = TrainConfig.from_dict(state["config"])
        cfg = dataclasses.replace(cfg, vae_channels=source.vae_channels, vae_steps=source.vae_steps)
        state["config"] = dataclasses.asdict(cfg)
        (out / "config.json").write_text(json.dumps(state["config"], indent=2))
        _atomic_save(state, ckpt)
        if (Path(continue_from).parent / LATENTS).exists():
            shutil.copyfile(Path(continue_from).parent / LATENTS, out / LATENTS)
    if not ckpt.exists() and continue_model is not None:
        state, cfg = state_from_model(Path(continue_model), steps=cfg.steps)
        (out / "config.json").write_text(json.dumps(state["config"], indent=2))
        _atomic_save(state, ckpt)
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        saved = TrainConfig.from_dict(state["config"])
        if saved != cfg:
            print(f"resuming with the checkpoint's configuration (command-line differs): {saved}")
            cfg = saved
        log_line(out, {"resume": True, "phase": state["phase"], "step": state["step"]})
    else:
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    torch.manual_seed(cfg.seed)
    scenes = make_dataset(cfg)
    images = images_tensor(scenes)
    every_s = checkpoint_minutes * 60
    if state.get("phase", "vae") == "vae":
        train_vae(cfg, out, images, state, every_s, log_every)
    vae, latents = encode_latents(cfg, state, images, out / LATENTS)
    del images
    unet, text = train_unet(cfg, out, scenes, latents, state, every_s, log_every, stop_at)
    if not export:
        return out
    return export_model(
        out / MODEL_DIR,
        vae,
        unet.eval(),
        text.eval(),
        notes={"train_config": dataclasses.asdict(cfg), "steps": state["step"]},
    )


def state_from_model(folder: Path, *, steps: int) -> tuple[dict, TrainConfig]:
    """A UNet-phase training state (and its configuration, trained on to ``steps``) from an exported model."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    notes = json.loads((folder / "maskdiffusion.json").read_text()).get("notes", {})
    if "train_config" not in notes or "steps" not in notes:
        raise ValueError(f"{folder}: its maskdiffusion.json has no notes.train_config / notes.steps to continue from")
    cfg = dataclasses.replace(TrainConfig.from_dict(notes["train_config"]), steps=steps)
    if steps <= notes["steps"]:
        raise ValueError(f"--steps {steps} must be past the model's own {notes['steps']} steps")
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    text = CLIPTextModel.from_pretrained(folder / "text_encoder")
    return {
        "config": dataclasses.asdict(cfg),
        "phase": "unet",
        "step": notes["steps"],
        "vae": vae.state_dict(),
        "scaling_factor": vae.config.scaling_factor,
        "unet": unet.state_dict(),
        "text": text.state_dict(),
        "ema": [p.detach().clone() for m in (unet, text) for p in m.parameters()],
    }, cfg


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="run folder (checkpoint, log, model/)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--checkpoint-minutes", type=float, default=3.0)
    parser.add_argument(
        "--init-vae", type=Path, default=None, help="reuse the trained autoencoder of another run's checkpoint.pt"
    )
    parser.add_argument(
        "--init-unet", type=Path, default=None, help="start the UNet from another run's checkpoint.pt (EMA weights)"
    )
    parser.add_argument(
        "--continue-from",
        type=Path,
        default=None,
        help="continue another run's checkpoint.pt (models, optimiser, EMA, step) with this command's settings",
    )
    parser.add_argument(
        "--continue-model",
        type=Path,
        default=None,
        help="continue an exported model folder (weights, training configuration, step) to --steps",
    )
    parser.add_argument("--stop-at", type=int, default=None, help="stop (checkpointed) at this step")
    parser.add_argument(
        "--export-only", action="store_true", help="write OUT/model from the current checkpoint (EMA weights) and exit"
    )
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        if isinstance(field.default, tuple):
            parser.add_argument(flag, type=int, nargs="+", default=list(field.default))
        else:
            parser.add_argument(flag, type=type(field.default), default=field.default)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = TrainConfig.from_dict({f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    if args.export_only:
        state = torch.load(args.out / CHECKPOINT, map_location="cpu", weights_only=False)
        saved, vae, unet, text = models_from_checkpoint(state)
        notes = {"train_config": dataclasses.asdict(saved), "steps": state["step"]}
        print(export_model(args.out / MODEL_DIR, vae, unet, text, notes=notes))
        return
    print(
        run(
            cfg,
            args.out,
            checkpoint_minutes=args.checkpoint_minutes,
            init_vae=args.init_vae,
            init_unet=args.init_unet,
            continue_from=args.continue_from,
            continue_model=args.continue_model,
            stop_at=args.stop_at,
        )
    )


if __name__ == "__main__":
    main()
