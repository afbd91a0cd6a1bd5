"""Quick measurements of a toy-world model during experiments (not the project's evaluation).

Three numbers decide whether a training run is going anywhere (issue 5's lessons):

* **text reliance**: how much worse the model denoises with another scene's caption;
* **binding gap**: how much worse it denoises when two objects' pattern words are swapped
  in the caption (zero = the caption is used as a bag of words, no word is routed to its own
  object);
* **attention-only mIoU**: held-out scenes, the prompt lists the *whole* class vocabulary,
  each pixel takes the class whose cross-attention (finest layers) is highest after per-class
  max normalisation. Also a MaskDiffusion-style score (attention-weighted prototypes of
  L2-normalised decoder features, cosine, argmax) to choose the settings we recommend.

The core pipeline gives the real evaluation; this module only needs the frozen model, an
attention processor that keeps the cross-attention probabilities, and forward hooks on the
up blocks.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from maskdiffusion.prompts import build_prompts, clip_tokenizer, parse_classes
from maskdiffusion.toyworld.world import _BACKGROUND_PHRASES, CLASS_NAMES, Scene, eval_seed, make_scene, swap_patterns


class KeepCrossAttention:
    """Attention processor that computes attention explicitly and keeps the cross-attention
    probabilities, averaged over heads, as ``(B, N, T) float32`` in ``store[name]``."""

    def __init__(self, name: str, store: dict[str, torch.Tensor]) -> None:
        self.name, self.store = name, store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        cross = encoder_hidden_states is not None
        context = encoder_hidden_states if cross else hidden_states
        b, n, _ = hidden_states.shape
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(context))
        v = attn.head_to_batch_dim(attn.to_v(context))
        probs = torch.softmax(q @ k.transpose(1, 2) * attn.scale, dim=-1)
        if cross:
            self.store[self.name] = probs.view(b, attn.heads, n, -1).mean(1).float()
        out = attn.batch_to_head_dim(probs @ v)
        return attn.to_out[1](attn.to_out[0](out))


def install_probes(unet) -> dict[str, torch.Tensor]:
    """Replace every cross-attention processor by :class:`KeepCrossAttention`; return the store."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    store: dict[str, torch.Tensor] = {}
    procs = {}
    for name in unet.attn_processors:
        procs[name] = KeepCrossAttention(name, store) if name.endswith("attn2.processor") else AttnProcessor2_0()
    unet.set_attn_processor(procs)
    return store


def load(path: str | Path):
    """``(vae, unet, text_encoder, tokenizer)`` from a model folder or a training checkpoint."""
    path = Path(path)
    if path.is_file():
        from research.train import models_from_checkpoint

        _, vae, unet, text = models_from_checkpoint(path)
        return vae, unet, text, clip_tokenizer()
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    return (
        AutoencoderKL.from_pretrained(path / "vae").eval(),
        UNet2DConditionModel.from_pretrained(path / "unet").eval(),
        CLIPTextModel.from_pretrained(path / "text_encoder").eval(),
        CLIPTokenizer.from_pretrained(path / "tokenizer"),
    )


def _images(scenes: Sequence[Scene]) -> torch.Tensor:
    arr = np.stack([s.image for s in scenes]).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2)


def _noised(vae, scenes: Sequence[Scene], t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    from diffusers import DDIMScheduler

    from maskdiffusion.tiny import SD_NOISE_SCHEDULE

    x0 = vae.encode(_images(scenes)).latent_dist.mean * vae.config.scaling_factor
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    a = DDIMScheduler(**SD_NOISE_SCHEDULE).alphas_cumprod[t].float()
    return a.sqrt() * x0 + (1 - a).sqrt() * noise if t > 0 else x0, noise


def _ids(tokenizer, captions: Sequence[str]) -> torch.Tensor:
    return tokenizer(
        list(captions), padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids


def explicit_caption(background: str, objects) -> str:
    """Every object with its pattern, then the background: the caption the binding test swaps."""
    things = " and ".join(f"a {o.pattern} {o.shape}" for o in objects)
    return f"{things} on {_BACKGROUND_PHRASES[background]}"


@torch.no_grad()
def text_tests(
    vae, unet, text, tokenizer, *, count: int = 96, timesteps: Sequence[int] = (300, 500), stream: int = 1
) -> dict[str, float]:
    """Denoising error with the right, another scene's, and a pattern-swapped caption.

    Scenes come from held-out stream ``stream`` and have two or more objects. Returns
    ``reliance`` (other/right - 1), ``binding_gap`` (swapped/right - 1) and
    ``swap_worse`` (share of scenes where the swapped caption denoises worse).
    """
    scenes: list[Scene] = []
    i = 0
    while len(scenes) < count:
        scene = make_scene(eval_seed(i, stream))
        i += 1
        if len(scene.objects) >= 2:
            scenes.append(scene)
    rng = np.random.default_rng(0)
    right, swapped = [], []
    for scene in scenes:
        a, b = rng.permutation(len(scene.objects))[:2]
        right.append(explicit_caption(scene.background, scene.objects))
        swapped.append(explicit_caption(scene.background, swap_patterns(scene.objects, int(a), int(b))))
    other = right[1:] + right[:1]
    errs = {"right": [], "other": [], "swapped": []}
    for t in timesteps:
        for start in range(0, count, 32):
            chunk = scenes[start : start + 32]
            xt, noise = _noised(vae, chunk, t, seed=1000 + t + start)
            tt = torch.full((len(chunk),), t)
            for key, caps in (("right", right), ("other", other), ("swapped", swapped)):
                cond = text(_ids(tokenizer, caps[start : start + 32]))[0]
                pred = unet(xt, tt, encoder_hidden_states=cond).sample
                errs[key].append(((pred - noise) ** 2).flatten(1).mean(1))
    e = {k: torch.cat(v) for k, v in errs.items()}
    return {
        "reliance": float(e["other"].mean() / e["right"].mean() - 1),
        "binding_gap": float(e["swapped"].mean() / e["right"].mean() - 1),
        "swap_worse": float((e["swapped"] > e["right"]).float().mean()),
    }


def _miou(conf: np.ndarray) -> float:
    present = conf.sum(1) > 0
    iou = np.diag(conf) / np.maximum(conf.sum(0) + conf.sum(1) - np.diag(conf), 1)
    return float(iou[present].mean())


@torch.no_grad()
def segmentation(
    vae,
    unet,
    text,
    tokenizer,
    *,
    count: int = 100,
    timesteps: Sequence[int] = (0, 100, 300),
    factors: Sequence[Sequence[int]] = ((4,), (4, 8)),
    feature_blocks: Sequence[int] | None = None,
    stream: int = 0,
) -> dict[str, float]:
    """Whole-vocabulary mIoU on ``count`` held-out scenes, for each timestep and layer set.

    Keys: ``attn_t{t}_f{factors}`` (attention-only argmax) and ``md_t{t}_f{factors}``
    (prototypes of L2-normalised ``up_blocks[feature_blocks]`` outputs, cosine, argmax;
    default: the last two up blocks).
    """
    if feature_blocks is None:
        feature_blocks = (len(unet.up_blocks) - 2, len(unet.up_blocks) - 1)
    classes = parse_classes(list(CLASS_NAMES))
    prompt = build_prompts(tokenizer, classes)
    weights = prompt.token_weights()[:, 0]  # (C, 77)
    cond1 = text(prompt.input_ids)[0]
    store = install_probes(unet)
    feats: dict[int, torch.Tensor] = {}
    hooks = [
        unet.up_blocks[i].register_forward_hook(lambda m, a, o, i=i: feats.__setitem__(i, o)) for i in feature_blocks
    ]
    scenes = [make_scene(eval_seed(i, stream)) for i in range(count)]
    size = scenes[0].image.shape[0]
    n_cls = len(CLASS_NAMES)
    confs: dict[str, np.ndarray] = {}
    for t in timesteps:
        for start in range(0, count, 25):
            chunk = scenes[start : start + 25]
            xt, _ = _noised(vae, chunk, t, seed=7 + t)
            unet(xt, torch.full((len(chunk),), t), encoder_hidden_states=cond1.expand(len(chunk), -1, -1))
            gt = torch.from_numpy(np.stack([s.labels for s in chunk])).long()
            by_factor: dict[int, list[torch.Tensor]] = {}
            for probs in store.values():
                side = round(probs.shape[1] ** 0.5)
                maps = torch.einsum("bnt,ct->bcn", probs, weights).view(len(chunk), n_cls, side, side)
                by_factor.setdefault(size // side, []).append(maps)
            grid = min(by_factor)  # finest cross-attention grid
            side = size // grid
            f = torch.cat(
                [
                    F.normalize(F.interpolate(feats[i], size=(side, side), mode="bilinear", align_corners=False), dim=1)
                    for i in feature_blocks
                ],
                1,
            )
            f = F.normalize(f, dim=1)
            for fs in factors:
                layers = [
                    F.interpolate(m, size=(side, side), mode="bilinear", align_corners=False)
                    for fac in fs
                    for m in by_factor.get(fac, [])
                ]
                if not layers:
                    continue
                att = torch.stack(layers).mean(0)
                att = att / att.flatten(2).amax(2).clamp_min(1e-12)[..., None, None]
                proto = torch.einsum("bchw,bdhw->bcd", att, f) / att.sum((2, 3))[..., None].clamp_min(1e-12)
                cos = torch.einsum("bcd,bdhw->bchw", F.normalize(proto, dim=2), f)
                tag = "f" + "-".join(map(str, fs))
                for name, score in ((f"attn_t{t}_{tag}", att), (f"md_t{t}_{tag}", cos)):
                    pred = F.interpolate(score, size=(size, size), mode="bilinear", align_corners=False).argmax(1)
                    conf = confs.setdefault(name, np.zeros((n_cls, n_cls), dtype=np.int64))
                    np.add.at(conf, (gt.numpy().ravel(), pred.numpy().ravel()), 1)
    for h in hooks:
        h.remove()
    return {name: round(_miou(conf), 4) for name, conf in confs.items()}


def _caption_with_spans(tokenizer, background: str, objects) -> tuple[torch.Tensor, dict[int, list[int]]]:
    """Ids of the explicit caption and, per present class, the positions of its words.

    CLIP's BPE splits on spaces first, so the word-by-word ids concatenate to the ids of the
    whole caption.
    """
    pieces: list[tuple[str, int | None]] = []
    for k, obj in enumerate(objects):
        pieces.append((("and " if k else "") + f"a {obj.pattern}", None))
        pieces.append((obj.shape, CLASS_NAMES.index(obj.shape)))
    article = _BACKGROUND_PHRASES[background].split()[: -len(background.split())]
    pieces.append((" ".join(["on", *article]), None))
    pieces.append((background, CLASS_NAMES.index(background)))
    ids = [tokenizer.bos_token_id]
    spans: dict[int, list[int]] = {}
    for text, cls in pieces:
        piece = list(tokenizer(text, add_special_tokens=False).input_ids) if text else []
        if cls is not None:
            spans.setdefault(cls, []).extend(range(len(ids), len(ids) + len(piece)))
        ids += piece
    ids.append(tokenizer.eos_token_id)
    row = torch.full((77,), tokenizer.pad_token_id, dtype=torch.long)
    row[: len(ids)] = torch.tensor(ids)
    return row, spans


@torch.no_grad()
def caption_segmentation(
    vae, unet, text, tokenizer, *, count: int = 100, timesteps: Sequence[int] = (0, 100), stream: int = 0
) -> dict[str, float]:
    """Diagnostic: attention-only mIoU when the prompt is the scene's own explicit caption
    and each pixel chooses among the classes present (the easier setting of issue 5's runs)."""
    store = install_probes(unet)
    scenes = [make_scene(eval_seed(i, stream)) for i in range(count)]
    size = scenes[0].image.shape[0]
    n_cls = len(CLASS_NAMES)
    out = {}
    for t in timesteps:
        conf = np.zeros((n_cls, n_cls), dtype=np.int64)
        for start in range(0, count, 25):
            chunk = scenes[start : start + 25]
            rows, spans = zip(*(_caption_with_spans(tokenizer, s.background, s.objects) for s in chunk), strict=True)
            xt, _ = _noised(vae, chunk, t, seed=7 + t)
            unet(xt, torch.full((len(chunk),), t), encoder_hidden_states=text(torch.stack(rows))[0])
            fine = [p for p in store.values() if p.shape[1] == max(q.shape[1] for q in store.values())]
            probs = torch.stack(fine).mean(0)  # (B, N, 77)
            side = round(probs.shape[1] ** 0.5)
            for b, scene in enumerate(chunk):
                score = torch.full((n_cls, side * side), -1.0)
                for cls, pos in spans[b].items():
                    m = probs[b, :, pos].mean(1)
                    score[cls] = m / m.max().clamp_min(1e-12)
                up = F.interpolate(
                    score.view(1, n_cls, side, side), size=(size, size), mode="bilinear", align_corners=False
                )
                np.add.at(conf, (scene.labels.ravel(), up.argmax(1).numpy().ravel()), 1)
        out[f"caption_attn_t{t}"] = round(_miou(conf), 4)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Probe a toy-world model: text reliance, binding, mIoU.")
    parser.add_argument("model", help="model folder or training checkpoint.pt")
    parser.add_argument("--scenes", type=int, default=100)
    parser.add_argument("--t", type=int, nargs="+", default=[0, 100, 300])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    vae, unet, text, tok = load(args.model)
    report = text_tests(vae, unet, text, tok)
    report.update(segmentation(vae, unet, text, tok, count=args.scenes, timesteps=args.t))
    report.update(caption_segmentation(vae, unet, text, tok, count=args.scenes, timesteps=args.t))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
