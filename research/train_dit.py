"""Train the toy world's joint-attention transformer (SD3-shaped MM-DiT) on the bundled toy VAE's latents.

``python -m research.train_dit --out DIR`` trains, from images and captions only (never a label
map), and exports a diffusers ``StableDiffusion3Pipeline`` folder (``transformer/ vae/
text_encoder/ text_encoder_2/ tokenizer/ tokenizer_2/ scheduler/``, no T5) plus
``maskdiffusion.json``:

- the denoiser is diffusers' ``SD3Transformer2DModel`` (joint attention over [image, text], patch 1
  on the 16x16x4 latents of the bundled toy UNet's own autoencoder, which is reused as it is);
- the text encoders are two small ``CLIPTextModelWithProjection`` (SD3 reads the penultimate
  states of both, side by side, and their pooled embeddings) over a CLIP tokenizer restricted to
  the world's words (:mod:`research.toy_tokenizer`), their position embeddings frozen at zero, so
  a word's key is the word alone (what the toy UNet taught: a word encoder that cannot mix);
- flow matching as SD3 trains it: ``x_t = (1 - t) x_0 + t e`` with logit-normal ``t``, the
  velocity ``e - x_0`` as target, the timestep ``1000 t``;
- the caption-only attention terms the toy UNet needed, moved to joint attention: the
  pixel / class-word information prior on the attention of image queries to the caption's
  class-name tokens, and the absent-class term on the concept maps of the world's whole
  vocabulary (``maskdiffusion.backbones.mmdit``'s concept streams, run with gradients): each
  pixel's class probabilities should sit on the classes its caption names; which classes the
  caption names is all it uses, never where they are;
- vocabulary-conditioned samples (``p_vocabulary``): at segmentation the image tokens read the
  prompt of the whole vocabulary, not a caption, so on a share of the samples the denoiser is
  conditioned on that prompt while the absent-class term still uses the caption's classes (else
  image tokens learn to read presence from the caption and the vocabulary's maps at test time
  are not the ones trained); on those samples ``absent_attention_weight`` puts the same term on
  the attention weights of image queries to the prompt's class-name tokens, and the prior's
  classes are still the caption's;
- two-scene mosaics (two backgrounds in one sample), as for the UNet.

Every random draw of step ``k`` is seeded by ``(seed, k)``; checkpoints (models, optimiser, EMA,
step) are written atomically every ``--checkpoint-minutes`` and the same command continues a
killed run; ``--init CHECKPOINT`` starts a new run from another run's EMA weights; ``--stop-at``
ends a stage at a step, ``--export-only`` writes ``OUT/model`` from the checkpoint's EMA weights.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from maskdiffusion.backbones.base import block_hooks
from maskdiffusion.backbones.mmdit import JointPass, SD3Backbone, SD3JointProcessor, _keep_inputs
from maskdiffusion.capture import CaptureStore, installed
from maskdiffusion.families import FAMILIES
from maskdiffusion.loading import toy_model_path
from maskdiffusion.presets import Preset
from maskdiffusion.prompts import CLIP_CONTEXT, PromptBatch, parse_classes
from maskdiffusion.text import TextConditioning
from maskdiffusion.toyworld.world import CLASS_NAMES, Scene
from research.toy_tokenizer import toy_clip_tokenizer
from research.train import (
    EMA,
    _atomic_save,
    captions_for,
    class_token_table,
    class_tokens,
    images_tensor,
    log_line,
    make_dataset,
    mosaic,
    optimiser_step,
    per_sample_mse,
    pixel_class_information,
    step_rng,
)

CHECKPOINT = "checkpoint.pt"
MODEL_DIR = "model"
LATENTS = "latents.pt"
VAE_FACTOR = 4  # the toy autoencoder: 64x64 images -> 16x16 latents


@dataclass(frozen=True)
class DiTConfig:
    """Shapes and schedule of a run; stored in the checkpoint, a resumed run keeps them."""

    seed: int = 0
    num_scenes: int = 10000
    width: int = 96  # transformer inner width (heads x 32)
    layers: int = 6
    text_width: int = 32  # each of the two text encoders
    steps: int = 8000
    batch: int = 16
    lr: float = 5e-4
    warmup: int = 200
    p_uncond: float = 0.1
    p_attributes: float = 0.0  # captions of class names only, as the toy UNet's last stages
    logit_mean: float = 0.0
    logit_std: float = 1.0
    ema_decay: float = 0.999
    mosaic_fraction: float = 0.5
    class_attention_weight: float = 0.003
    absent_class_weight: float = 0.03
    absent_attention_weight: float = 0.0  # the absent-class term on the attention weights (vocabulary rows)
    p_vocabulary: float = 0.5  # share of samples conditioned on the segmentation prompt instead of their caption
    init: str = ""  # a checkpoint whose EMA weights a fresh run starts from (its optimiser starts afresh)

    @classmethod
    def from_dict(cls, values: dict) -> DiTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


# ----------------------------------------------------------------------------- models


def build_text_encoder(cfg: DiTConfig, tokenizer):
    """A one-layer CLIP text encoder with a projection; positions frozen at zero (a word's key is the word)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    model = CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg.text_width,
            intermediate_size=2 * cfg.text_width,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=CLIP_CONTEXT,
            projection_dim=cfg.text_width,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    positions = model.text_model.embeddings.position_embedding.weight
    with torch.no_grad():
        positions.zero_()
    positions.requires_grad_(False)
    return model


def build_transformer(cfg: DiTConfig):
    """SD3's MM-DiT at toy size: patch 1 on 16x16 latents, joint blocks of ``width`` (heads of 32)."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=16,
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=cfg.layers,
        attention_head_dim=32,
        num_attention_heads=cfg.width // 32,
        joint_attention_dim=2 * cfg.text_width,
        caption_projection_dim=cfg.width,
        pooled_projection_dim=2 * cfg.text_width,
        pos_embed_max_size=32,  # views up to 128 px
    )


def flow_scheduler():
    """What the folder says about its noise: rectified flow, no shift (a 16x16 latent needs none)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=1.0)


def toy_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(toy_model_path() / "vae").eval().requires_grad_(False)


@dataclass
class Models:
    transformer: torch.nn.Module
    text_encoder: torch.nn.Module
    text_encoder_2: torch.nn.Module
    tokenizer: object

    def trained(self) -> list[torch.nn.Module]:
        return [self.transformer, self.text_encoder, self.text_encoder_2]

    def backbone(self) -> SD3Backbone:
        """The segmenter's own SD3 backbone over these modules (no T5: ``text_length`` 0)."""
        family = dataclasses.replace(FAMILIES["sd3"], text_length=0)
        parts = {
            "transformer": self.transformer,
            "text_encoder": self.text_encoder,
            "text_encoder_2": self.text_encoder_2,
            "tokenizer": self.tokenizer,
            "tokenizer_2": self.tokenizer,
        }
        return SD3Backbone(parts, dict(flow_scheduler().config), VAE_FACTOR, family)


def build_models(cfg: DiTConfig) -> Models:
    tokenizer = toy_clip_tokenizer()
    return Models(
        build_transformer(cfg), build_text_encoder(cfg, tokenizer), build_text_encoder(cfg, tokenizer), tokenizer
    )


# ----------------------------------------------------------------------------- the attention terms


class TrainingPass(JointPass):
    """A concept-stream pass (the vocabulary's maps) that also keeps the caption attention of every block."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.caption_maps: list[torch.Tensor] = []

    def joint(self, index, image, text):
        out = super().joint(index, image, text)
        scale = image[0].shape[-1] ** -0.5
        scores = torch.matmul(image[0].float(), text[1].float().transpose(-1, -2)) * scale  # (B, H, N, T)
        self.caption_maps.append(scores.softmax(dim=-1).mean(dim=1))  # (B, N, T): over the caption's tokens
        return out


def vocabulary_prompt(backbone: SD3Backbone) -> tuple[TextConditioning, torch.Tensor]:
    """The segmentation prompt of the world's 8 class names, as segmentation builds it: its conditioning
    ``(1, T, E)`` (with the classes' spans) and its ids ``(1, T)``."""
    batches = backbone.prompts(parse_classes(list(CLASS_NAMES)), " and ")
    return backbone.encode(batches, torch.device("cpu")), batches[0].input_ids


def caption_conditioning(backbone: SD3Backbone, ids: torch.Tensor):
    """SD3's conditioning of captions (both CLIPs read the same ids)."""
    batch = PromptBatch(input_ids=ids, spans=(), texts=())
    return backbone.encode([batch, batch], torch.device("cpu"))


def sample_t(cfg: DiTConfig, n: int, rng: np.random.Generator) -> torch.Tensor:
    """Logit-normal flow times in (0, 1), as SD3 samples them."""
    return torch.from_numpy(1 / (1 + np.exp(-rng.normal(cfg.logit_mean, cfg.logit_std, n)))).float()


# ----------------------------------------------------------------------------- training


def encode_latents(vae, scenes: list[Scene], cache: Path) -> torch.Tensor:
    """The bundled toy VAE's scaled posterior means of every training scene (cached, keyed by the scenes' seeds)."""
    seeds = [scene.seed for scene in scenes]
    key = {
        "num_scenes": len(scenes),
        "seeds": [seeds[0], seeds[-1]],
        "scaling_factor": float(vae.config.scaling_factor),
    }
    if cache.exists():
        saved = torch.load(cache, map_location="cpu", weights_only=False)
        if saved["key"] == key:
            return saved["latents"]
    images = images_tensor(scenes)
    with torch.no_grad():
        latents = torch.cat([vae.encode(images[i : i + 256]).latent_dist.mean for i in range(0, len(images), 256)])
    latents = latents * vae.config.scaling_factor
    _atomic_save({"key": key, "latents": latents}, cache)
    return latents


def train(cfg: DiTConfig, out: Path, *, checkpoint_minutes: float, stop_at: int | None, log_every: int) -> Models:
    models = build_models(cfg)
    params = [p for m in models.trained() for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    ema = EMA(models.trained(), cfg.ema_decay)
    state: dict = {}
    if (out / CHECKPOINT).exists():
        state = torch.load(out / CHECKPOINT, map_location="cpu", weights_only=False)
        for module, key in zip(models.trained(), ("transformer", "text_encoder", "text_encoder_2"), strict=True):
            module.load_state_dict(state[key])
        opt.load_state_dict(state["opt"])
        ema.shadow = state["ema"]
        log_line(out, {"resume": True, "step": state["step"]})
    elif cfg.init:
        _, start, init_step = models_from_checkpoint(Path(cfg.init))
        for module, trained in zip(models.trained(), start.trained(), strict=True):
            module.load_state_dict(trained.state_dict())
        ema = EMA(models.trained(), cfg.ema_decay)
        log_line(out, {"init": cfg.init, "init_step": init_step})
    step = state.get("step", 0)
    scenes = make_dataset(_unet_like(cfg))
    latents = encode_latents(toy_vae(), scenes, out / LATENTS)
    table = class_token_table(models.tokenizer)
    backbone = models.backbone()
    store_preset = Preset(size=64, attention_mode="softmax", class_maps="concept", attention_factor=VAE_FACTOR)
    blocks = list(range(cfg.layers))
    for module in models.trained():
        module.train()
    last = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    meter: dict[str, list[float]] = {"loss": [], "prior": [], "absent": [], "absent_attention": []}
    last_save, t0 = time.time(), time.time()
    while step < last:
        rng = step_rng(_unet_like(cfg), 3, step)
        index = rng.integers(0, len(scenes), cfg.batch)
        batch_scenes = [scenes[i] for i in index]
        captions, _ = captions_for(batch_scenes, rng, cfg.p_uncond, cfg.p_attributes)
        x0 = latents[torch.from_numpy(index)]
        for k in np.flatnonzero(rng.random(cfg.batch) < cfg.mosaic_fraction):
            if captions[k]:
                j = int(rng.integers(len(scenes)))
                x0[k], captions[k] = mosaic(batch_scenes[k], scenes[j], (x0[k], latents[j]), rng, cfg.p_attributes)
        t = sample_t(cfg, cfg.batch, rng)
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(int(rng.integers(2**62))))
        xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
        ids = models.tokenizer(
            captions, padding="max_length", max_length=CLIP_CONTEXT, truncation=True, return_tensors="pt"
        ).input_ids
        named = class_tokens(ids, table)  # (B, T, K): the caption's class-name tokens
        present = named.sum(1) > 0  # (B, K): the classes each caption names
        text = caption_conditioning(backbone, ids)
        vocabulary, vocabulary_ids = vocabulary_prompt(backbone)
        concepts = backbone._concepts(vocabulary, cfg.batch)
        # At segmentation the image tokens read the whole vocabulary's prompt, not a caption: on those
        # samples the absent-class term asks what the test asks (the caption still says what is present).
        swap = torch.from_numpy(rng.random(cfg.batch) < cfg.p_vocabulary)
        text = mix_conditioning(text, vocabulary, swap)
        vocabulary_named = class_tokens(vocabulary_ids, table).expand_as(named)  # (B, T, K): every class
        # The prior's classes are the caption's, wherever their tokens are (caption or vocabulary prompt).
        named_in_text = torch.where(swap[:, None, None], vocabulary_named * present[:, None, :], named)
        state_pass = TrainingPass(
            store=CaptureStore.for_view((64, 64), store_preset),
            factor=VAE_FACTOR,
            text_length=text.hidden.shape[1],
            image_first=True,
            maps=frozenset(blocks),
            class_maps="concept",
            concepts=concepts,
            last_concept=blocks[-1],
        )
        transformer_blocks = list(models.transformer.transformer_blocks)
        processors = {f"transformer_blocks.{i}.attn.processor": SD3JointProcessor(state_pass, i) for i in blocks}
        hooks = block_hooks(transformer_blocks, (), blocks[-1], {}, after=state_pass.concept_step, stop=False)
        pre_hooks = [(transformer_blocks[i], _keep_inputs(state_pass, i)) for i in blocks]
        with installed(models.transformer, processors, hooks, pre_hooks):
            velocity = models.transformer(
                hidden_states=xt, encoder_hidden_states=text.hidden, pooled_projections=text.pooled, timestep=1000 * t
            ).sample
        losses = per_sample_mse(velocity, noise - x0)
        loss = losses.mean()
        if cfg.class_attention_weight > 0:
            prior = torch.stack([pixel_class_information(m, named_in_text) for m in state_pass.caption_maps]).mean()
            loss = loss + cfg.class_attention_weight * prior
            meter["prior"].append(prior.item())
        if cfg.absent_class_weight > 0:
            absent = torch.stack([absent_mass(m, present) for m in state_pass.store.attention]).mean()
            loss = loss + cfg.absent_class_weight * absent
            meter["absent"].append(absent.item())
        if cfg.absent_attention_weight > 0 and swap.any():
            rows = swap & present.any(1)
            attention = torch.stack(
                [absent_share(m[rows], vocabulary_named[rows], present[rows]) for m in state_pass.caption_maps]
            ).mean()
            loss = loss + cfg.absent_attention_weight * attention
            meter["absent_attention"].append(attention.item())
        lr = optimiser_step(opt, params, loss, cfg, step)
        ema.update(models.trained(), step)
        meter["loss"].append(losses.mean().item())
        step += 1
        if step % log_every == 0 or step == last:
            record = {"phase": "dit", "step": step, "lr": round(lr, 6)}
            record["s_per_step"] = round((time.time() - t0) / max(1, len(meter["loss"])), 3)
            record.update({k: round(float(np.mean(v)), 5) for k, v in meter.items() if v})
            log_line(out, record)
            meter = {k: [] for k in meter}
            t0 = time.time()
        if time.time() - last_save > 60 * checkpoint_minutes or step == last:
            save_checkpoint(out, cfg, models, opt, ema, step)
            last_save = time.time()
    return models


def mix_conditioning(captions: TextConditioning, prompt: TextConditioning, swap: torch.Tensor) -> TextConditioning:
    """``captions`` ``(B, T, E)`` with the rows where ``swap`` ``(B,)`` is set replaced by ``prompt`` ``(1, T, E)``."""
    hidden = torch.where(swap[:, None, None], prompt.hidden.expand_as(captions.hidden), captions.hidden)
    pooled = torch.where(swap[:, None], prompt.pooled.expand_as(captions.pooled), captions.pooled)
    return TextConditioning(hidden=hidden, pooled=pooled)


def absent_mass(log_maps: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """``-log P(a class the caption names)`` per pixel from concept log-probabilities ``(B, K, h, w)``,
    averaged over the images whose caption names a class."""
    usable = present.any(1)
    if not usable.any():
        return log_maps.new_zeros(())
    picked = log_maps.masked_fill(~present[:, :, None, None], -torch.inf).logsumexp(dim=1)  # (B, h, w)
    return -picked[usable].mean()


def absent_share(maps: torch.Tensor, tokens: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """``-log`` (share of a pixel's attention to class-name tokens that goes to the classes its caption names).

    ``maps``: ``(B, N, T)`` image-to-text attention; ``tokens``: ``(B, T, K)`` 0/1 token -> class of a
    text that names every class; ``present``: ``(B, K)`` the classes the caption names (>= 1 per row).
    """
    if not len(maps):
        return maps.new_zeros(())
    per_class = maps @ tokens  # (B, N, K)
    share = (per_class * present[:, None, :]).sum(-1) / per_class.sum(-1).clamp_min(1e-12)
    return -share.clamp_min(1e-12).log().mean()


def _unet_like(cfg: DiTConfig):
    """The toy UNet's data settings (scenes, seeds) under this run's seed and scene count."""
    from research.train import TrainConfig

    return TrainConfig(seed=cfg.seed, num_scenes=cfg.num_scenes)


def save_checkpoint(out: Path, cfg: DiTConfig, models: Models, opt, ema: EMA, step: int) -> None:
    _atomic_save(
        {
            "config": dataclasses.asdict(cfg),
            "step": step,
            "transformer": models.transformer.state_dict(),
            "text_encoder": models.text_encoder.state_dict(),
            "text_encoder_2": models.text_encoder_2.state_dict(),
            "opt": opt.state_dict(),
            "ema": ema.shadow,
        },
        out / CHECKPOINT,
    )


def models_from_checkpoint(path: Path, *, use_ema: bool = True) -> tuple[DiTConfig, Models, int]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    cfg = DiTConfig.from_dict(state["config"])
    models = build_models(cfg)
    for module, key in zip(models.trained(), ("transformer", "text_encoder", "text_encoder_2"), strict=True):
        module.load_state_dict(state[key])
    if use_ema:
        with torch.no_grad():
            for shadow, p in zip(state["ema"], (p for m in models.trained() for p in m.parameters()), strict=True):
                p.copy_(shadow)
    for module in models.trained():
        module.eval()
    return cfg, models, state["step"]


# ----------------------------------------------------------------------------- export

DEFAULT_PRESET = {"size": 64, "feature_factor": 4, "attention_factor": 4}
"""Until a grid on held-out stream 3 chooses them: the toy's view size and grids."""


def export_model(folder: Path, models: Models, *, presets: dict | None = None, notes: dict | None = None) -> Path:
    """A ``StableDiffusion3Pipeline`` folder (no T5) + ``maskdiffusion.json``, replacing ``folder`` atomically.

    The transformer and text encoders are stored in float16 (loaders cast them to the dtype they are asked
    for); ``presets``: the named presets (default: :data:`DEFAULT_PRESET` for all three).
    """
    from diffusers import StableDiffusion3Pipeline

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".toy-dit-", dir=folder.parent))
    half = [copy.deepcopy(m).half() for m in models.trained()]  # stored in float16: half the wheel's bytes
    pipe = StableDiffusion3Pipeline(
        transformer=half[0],
        scheduler=flow_scheduler(),
        vae=toy_vae(),  # the toy UNet's autoencoder, as trained: float32
        text_encoder=half[1],
        tokenizer=models.tokenizer,
        text_encoder_2=half[2],
        tokenizer_2=models.tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.save_pretrained(staging, safe_serialization=True)
    base = presets or {"default": dict(DEFAULT_PRESET), "attention-only": dict(DEFAULT_PRESET),
                       "reference": dict(DEFAULT_PRESET)}  # fmt: skip
    info = {"presets": base, "vocabulary": list(CLASS_NAMES), "text_length": 0, "notes": notes or {}}
    (staging / "maskdiffusion.json").write_text(json.dumps(info, indent=2))
    if folder.exists():
        shutil.rmtree(folder)
    staging.rename(folder)
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="run folder (checkpoint, log, model/)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--checkpoint-minutes", type=float, default=3.0)
    parser.add_argument("--stop-at", type=int, default=None, help="stop (checkpointed) at this step")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--export-only", action="store_true", help="write OUT/model from the checkpoint and exit")
    parser.add_argument(
        "--presets", type=Path, help="JSON of the named presets to write into the model card (default: placeholders)"
    )
    for field in dataclasses.fields(DiTConfig):
        parser.add_argument("--" + field.name.replace("_", "-"), type=type(field.default), default=field.default)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = DiTConfig.from_dict({f.name: getattr(args, f.name) for f in dataclasses.fields(DiTConfig)})
    if (args.out / CHECKPOINT).exists():
        saved = DiTConfig.from_dict(torch.load(args.out / CHECKPOINT, map_location="cpu", weights_only=False)["config"])
        if saved != cfg and not args.export_only:
            print(f"resuming with the checkpoint's configuration: {saved}")
        cfg = saved
    else:
        (args.out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    if not args.export_only:
        train(cfg, args.out, checkpoint_minutes=args.checkpoint_minutes, stop_at=args.stop_at, log_every=args.log_every)
    cfg, models, step = models_from_checkpoint(args.out / CHECKPOINT)
    notes = {"train_config": dataclasses.asdict(cfg), "steps": step}
    presets = json.loads(args.presets.read_text()) if args.presets else None
    print(export_model(args.out / MODEL_DIR, models, presets=presets, notes=notes))


if __name__ == "__main__":
    main()
