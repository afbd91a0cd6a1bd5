"""Choose a toy model's presets on one held-out stream: a grid of presets, each scored by its mIoU.

Settings are chosen here on stream 3 (never the gate's stream 0); the ablation reports them on
stream 4 as well. Two stages, as for the UNet's presets: attention only (map kind, timestep,
which blocks give the maps), then the mask head on the best attention settings (feature blocks,
EM weights). Each preset runs through ``MaskDiffusion.segment_batch`` on the scenes, the world's
whole vocabulary as the prompt; the table is printed best first and written as JSON.

    python -m research.grid --model toyworld_runs/dit1/model --stream 3 --scenes 100 --out grid.json
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import torch

from maskdiffusion import MaskDiffusion, Preset
from maskdiffusion.files import write_text
from maskdiffusion.metrics import ConfusionMatrix, scores
from maskdiffusion.toyworld.gate import held_out_scenes
from maskdiffusion.toyworld.world import CLASS_NAMES, Scene

SHAPES = CLASS_NAMES[4:]
TIMESTEPS = (100, 250, 400, 600)


def block_sets(blocks: int) -> dict[str, tuple[int, ...]]:
    """Named choices of blocks: each third, the last two thirds, all."""
    third = max(1, blocks // 3)
    sets = {
        "early": tuple(range(0, third)),
        "middle": tuple(range(third, 2 * third)),
        "late": tuple(range(2 * third, blocks)),
        "mid+late": tuple(range(third, blocks)),
        "all": tuple(range(blocks)),
    }
    return {name: chosen for name, chosen in sets.items() if chosen}


def miou(segmenter: MaskDiffusion, preset: Preset, scenes: list[Scene]) -> tuple[float, float]:
    """``(mIoU, shapes' mean IoU)`` of ``preset`` over ``scenes``."""
    matrix = ConfusionMatrix(len(CLASS_NAMES))
    results = segmenter.segment_batch([s.image for s in scenes], list(CLASS_NAMES), preset=preset)
    for result, scene in zip(results, scenes, strict=True):
        matrix.update(result.labels, scene.labels)
    measured = scores(matrix, CLASS_NAMES)
    return measured["mIoU"], float(np.mean([measured["per_class_iou"][c] or 0.0 for c in SHAPES]))


def attention_grid(base: Preset, blocks: int) -> dict[str, Preset]:
    """Attention-only presets: map kind x timestep x map blocks (raw probabilities)."""
    grid = {}
    for kind, t, (name, chosen) in itertools.product(("attention", "concept"), TIMESTEPS, block_sets(blocks).items()):
        grid[f"{kind} t={t} maps={name}"] = base.replace(
            class_maps=kind,
            timestep=t,
            attention_blocks=chosen,
            attention_mode="softmax",
            attention_normalization="probabilities",
            scoring="attention",
            refine_steps=0,
        )
    return grid


def head_grid(attention: Preset, blocks: int) -> dict[str, Preset]:
    """Mask-head presets on one attention setting: feature blocks x EM weights (and cosine prototypes)."""
    grid = {}
    for name, chosen in block_sets(blocks).items():
        head = attention.replace(feature_blocks=chosen, scoring="cosine", refinement="em", refine_steps=10)
        for concentration, prior in ((20.0, 2.0), (30.0, 3.0), (10.0, 1.0)):
            grid[f"features={name} em={concentration:g}/{prior:g}"] = head.replace(
                em_concentration=concentration, em_prior_weight=prior
            )
        grid[f"features={name} cosine"] = head.replace(refinement="hard", refine_steps=0)
    return grid


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model folder or name")
    parser.add_argument("--stream", type=int, default=3, help="held-out stream (default 3; never 0)")
    parser.add_argument("--scenes", type=int, default=100, help="scenes (default 100)")
    parser.add_argument("--top", type=int, default=3, help="attention settings the head grid starts from")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--out", type=Path, required=True, help="JSON to write")
    parser.add_argument(
        "--presets",
        type=Path,
        help="also write the winners as a model card's presets (default: the best head; attention-only: the best "
        "attention setting; reference: the model's own), for research.train_dit --presets",
    )
    args = parser.parse_args(argv)
    if args.stream == 0:
        parser.error("stream 0 is the quality gate's: settings are never chosen on it")
    torch.set_num_threads(args.threads)
    segmenter = MaskDiffusion.from_pretrained(args.model, device="cpu", batch_size=32, cache_size=0)
    blocks = len(segmenter.backbone.blocks)
    scenes = held_out_scenes(args.scenes, args.stream)
    base = segmenter.presets["default"]
    table: list[dict] = []

    def score(stage: str, name: str, preset: Preset) -> None:
        value, shapes = miou(segmenter, preset, scenes)
        table.append({"stage": stage, "name": name, "mIoU": value, "shapes": shapes, "preset": preset.to_dict()})
        print(f"{stage:>9} | {name:<40} {value:6.2f}  shapes {shapes:5.1f}", flush=True)

    attention = attention_grid(base, blocks)
    for name, preset in attention.items():
        score("attention", name, preset)
    best = sorted((r for r in table if r["stage"] == "attention"), key=lambda r: -r["mIoU"])[: args.top]
    for row in best:
        for name, preset in head_grid(attention[row["name"]], blocks).items():
            score("head", f"{row['name']} {name}", preset)
    table.sort(key=lambda r: (r["stage"], -r["mIoU"]))
    report = {"model": args.model, "stream": args.stream, "scenes": args.scenes, "rows": table}
    write_text(args.out, json.dumps(report, indent=2) + "\n")
    for stage in ("attention", "head"):
        top = next(r for r in table if r["stage"] == stage)
        print(f"best {stage}: {top['name']} {top['mIoU']:.2f} (shapes {top['shapes']:.1f})")
    if args.presets:
        write_text(args.presets, json.dumps(card_presets(table, segmenter.presets["reference"]), indent=2) + "\n")


def card_presets(table: list[dict], reference: Preset) -> dict[str, dict]:
    """The grid's winners as ``maskdiffusion.json`` presets: every field, so the card says all of it."""
    best = {stage: next(r for r in table if r["stage"] == stage)["preset"] for stage in ("attention", "head")}
    return {"default": best["head"], "attention-only": best["attention"], "reference": reference.to_dict()}


if __name__ == "__main__":
    main()
