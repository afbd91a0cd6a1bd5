"""Ablation of the mask head's options on the bundled toy model, like a paper's table.

Every row is a preset run through ``MaskDiffusion.segment_batch`` on held-out toy-world scenes
(``held_out_scenes(N, stream)``, never training scenes, never the gate's stream 0), with the
world's whole vocabulary as the prompt. Rows:

* baselines: attention only (max-normalised, raw probabilities, calibrated), the reference
  head, and the plain head (max-normalised attention, cosine prototypes: the project's
  previous default);
* each option **added** to the plain head, one at a time;
* each option **removed** from (or swapped in) the shipped ``default``, one at a time;
* the opt-in options that need more passes (self-attention propagation, ensembles).

Per row and stream: mIoU with a 95% bootstrap interval (scenes resampled with replacement,
one confusion matrix per resample), per-class IoU, seconds per image (one thread, after a
warm-up) and, on the long-vocabulary case (the 8 toy classes spread through 160 COCO-Stuff
names, ``toyworld_checks.long_vocabulary``), mIoU over the toy classes. ``calibrated`` rows use
per-word attention measured without labels on stream 2 (:func:`measure_calibration`).

    python benchmarks/ablation.py                     # streams 3 and 4, 200 scenes: ~15 min on 2 CPU cores
    python benchmarks/ablation.py --scenes 20 --bootstrap 50 --long-scenes 10   # smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maskdiffusion import MaskDiffusion, Preset
from maskdiffusion.files import write_text
from maskdiffusion.metrics import ConfusionMatrix, scores
from maskdiffusion.precision import cpu_model
from maskdiffusion.toyworld.gate import held_out_scenes
from maskdiffusion.toyworld.world import CLASS_NAMES, Scene

sys.path.insert(0, str(Path(__file__).parent))
from toyworld_checks import distractor_names, long_vocabulary

CALIBRATION_STREAM = 2
SHAPES = CLASS_NAMES[4:]


Row = tuple[str, str, Preset]


def rows(default: Preset, attention_only: Preset, reference: Preset, backbone) -> list[Row]:
    """``(group, name, preset)`` of every row, built from the model's own presets; a transformer
    (``backbone.kind != "unet"``) gets its own rows (:func:`transformer_rows`) instead of the UNet-only ones."""
    plain = default.replace(attention_normalization="max", refinement="hard", refine_steps=0)
    prob = {"attention_normalization": "probabilities"}
    em = {"refinement": "em", "refine_steps": 10}
    pamr = {"refinement_on_image": "pamr", "image_refine_steps": 10, "image_refine_dilations": (1, 2, 4, 8)}
    no_pamr = {"refinement_on_image": "none"}
    baseline, added, shipped = "baseline", "added to the plain head", "the shipped default"
    removed, added_default, extra = "removed from the default", "added to the default", "opt-in, more work"
    on_image = "refinement on the image"
    table = [
        (baseline, "attention only, max-normalised", attention_only.replace(attention_normalization="max")),
        (baseline, "attention only, probabilities (the gate's baseline)", attention_only),
        (baseline, "attention only, calibrated", attention_only.replace(attention_normalization="calibrated")),
        (baseline, "reference head (exp, max, dot)", reference),
        (baseline, "plain head (max, cosine)", plain),
        (added, "+ probabilities", plain.replace(**prob)),
        (added, "+ calibrated", plain.replace(attention_normalization="calibrated")),
        (added, "+ class presence (support)", plain.replace(class_presence="support")),
        (added, "+ confident cells", plain.replace(prototype_cells="confident")),
        (added, "+ product of experts", plain.replace(scoring="poe")),
        (added, "+ hard refinement (2 rounds)", plain.replace(refine_steps=2)),
        (added, "+ EM", plain.replace(**em)),
        (added, "+ probabilities + product of experts", plain.replace(**prob, scoring="poe")),
        (shipped, "default", default),
        (removed, "- probabilities (max-normalised)", default.replace(attention_normalization="max")),
        (removed, "- EM (cosine prototypes)", default.replace(refine_steps=0)),
        (removed, "EM -> product of experts", default.replace(refine_steps=0, scoring="poe")),
        (added_default, "+ calibrated", default.replace(attention_normalization="calibrated")),
        (added_default, "+ class presence (support)", default.replace(class_presence="support")),
        (added_default, "+ confident cells", default.replace(prototype_cells="confident")),
        (on_image, "attention only, PAMR off", attention_only.replace(**no_pamr)),
        (on_image, "attention only, PAMR on", attention_only.replace(**pamr)),
        (on_image, "default, PAMR off", default.replace(**no_pamr)),
        (on_image, "default, PAMR on (10 steps, dilations 1, 2, 4, 8)", default.replace(**pamr)),
        (on_image, "default, PAMR 5 steps", default.replace(**{**pamr, "image_refine_steps": 5})),
        (on_image, "default, PAMR dilations 1, 2", default.replace(**{**pamr, "image_refine_dilations": (1, 2)})),
        (extra, "+ 4 noise samples", default.replace(noise_samples=4)),
        (extra, "+ timesteps 200 and 300", default.replace(ensemble_timesteps=(200, 300))),
    ]
    if backbone.kind == "unet":
        return [
            *table,
            (extra, "+ self-attention propagation (factor 8, k=1)", default.replace(self_attention_factors=(8,))),
        ]
    return table + transformer_rows(default, attention_only, len(backbone.denoiser.transformer_blocks))


def transformer_rows(default: Preset, attention_only: Preset, blocks: int) -> list[Row]:
    """A joint-attention model's questions: attention weights vs concept outputs (each attention only and
    under the mask head), which blocks give the maps and the features, and the noise level."""
    thirds = {
        f"blocks {part[0]}-{part[-1]}": tuple(part)
        for part in (range(0, blocks // 3), range(blocks // 3, 2 * blocks // 3), range(2 * blocks // 3, blocks))
        if len(part)
    }
    thirds[f"all {blocks} blocks"] = tuple(range(blocks))
    maps, layers, features, noise = "map kind", "map blocks", "feature blocks (mask head)", "noise level (mask head)"
    table: list[Row] = []
    for kind in ("attention", "concept"):
        table.append((maps, f"attention only, {kind} maps", attention_only.replace(class_maps=kind)))
        table.append((maps, f"mask head, {kind} maps", default.replace(class_maps=kind)))
    for name, chosen in thirds.items():
        table.append((layers, f"attention only, {name}", attention_only.replace(attention_blocks=chosen)))
        table.append((layers, f"mask head, {name}", default.replace(attention_blocks=chosen)))
    table += [(features, name, default.replace(feature_blocks=chosen)) for name, chosen in thirds.items()]
    table += [(noise, f"timestep {t}", default.replace(timestep=t)) for t in (100, 250, 500, 750)]
    return table


def measure_calibration(segmenter: MaskDiffusion, scenes: list[Scene], preset: Preset) -> dict[str, float]:
    """Per word, its mean attention probability over ``scenes`` (no labels used)."""
    probe = preset.replace(attention_normalization="probabilities", scoring="attention", refine_steps=0)
    results = segmenter.segment_batch([s.image for s in scenes], list(CLASS_NAMES), preset=probe)
    mass = np.mean([r.attention.mean(axis=(1, 2)) for r in results], axis=0)
    return {name: float(value) for name, value in zip(CLASS_NAMES, mass, strict=True)}


def per_scene_matrices(labels: list[np.ndarray], scenes: list[Scene], to_class: np.ndarray) -> np.ndarray:
    """``(N, C, C + 1)`` counts per scene; the last column counts unassigned pixels."""
    out = np.zeros((len(scenes), len(CLASS_NAMES), len(CLASS_NAMES) + 1), dtype=np.int64)
    for i, (prediction, scene) in enumerate(zip(labels, scenes, strict=True)):
        matrix = ConfusionMatrix(len(CLASS_NAMES))
        mapped = np.where(prediction >= 0, to_class[np.clip(prediction, 0, None)], -1)
        matrix.update(mapped, scene.labels)
        out[i, :, :-1], out[i, :, -1] = matrix.counts, matrix.unassigned
    return out


def summed_scores(counts: np.ndarray) -> dict[str, Any]:
    matrix = ConfusionMatrix(len(CLASS_NAMES))
    matrix.counts[:], matrix.unassigned[:] = counts[:, :-1], counts[:, -1]
    return scores(matrix, CLASS_NAMES)


def bootstrap_interval(per_scene: np.ndarray, samples: int, seed: int) -> tuple[float, float]:
    """95% interval of the mIoU over scene resamples (with replacement)."""
    if samples < 1:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    values = [
        summed_scores(per_scene[rng.integers(0, len(per_scene), len(per_scene))].sum(axis=0))["mIoU"]
        for _ in range(samples)
    ]
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


PAIRS = (
    ("attention only, concept maps", "attention only, attention maps"),
    ("mask head, concept maps", "mask head, attention maps"),
    ("default, PAMR on (10 steps, dilations 1, 2, 4, 8)", "default, PAMR off"),
    ("attention only, PAMR on", "attention only, PAMR off"),
)
"""Rows compared scene by scene (where both are in the table): is the first better than the second?"""


def paired_interval(first: np.ndarray, second: np.ndarray, samples: int, seed: int) -> tuple[float, float, float]:
    """``mIoU(first) - mIoU(second)`` over the same scenes and its 95% interval over the same resamples
    of them (``(N, C, C + 1)`` per-scene matrices each): closer than two separate intervals say."""
    difference = summed_scores(first.sum(axis=0))["mIoU"] - summed_scores(second.sum(axis=0))["mIoU"]
    if samples < 1:
        return difference, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(samples):
        pick = rng.integers(0, len(first), len(first))
        values.append(summed_scores(first[pick].sum(axis=0))["mIoU"] - summed_scores(second[pick].sum(axis=0))["mIoU"])
    low, high = np.percentile(values, [2.5, 97.5])
    return difference, float(low), float(high)


def paired_rows(matrices: dict[tuple[str, int], np.ndarray], streams: list[int], samples: int) -> list[dict]:
    """:data:`PAIRS` present in ``matrices`` (row name, stream) -> per-scene matrices, each stream's difference."""
    out = []
    for first, second in PAIRS:
        if all((name, stream) in matrices for name in (first, second) for stream in streams):
            per_stream = {}
            for stream in streams:
                difference, low, high = paired_interval(
                    matrices[first, stream], matrices[second, stream], samples, seed=stream
                )
                per_stream[str(stream)] = {"difference": difference, "interval": (low, high)}
            out.append({"first": first, "second": second, "streams": per_stream})
    return out


def run_row(segmenter, preset: Preset, scenes: list[Scene], vocabulary: list[str]) -> tuple[np.ndarray, float]:
    """Per-scene matrices over the toy classes and seconds per image of one preset on one vocabulary."""
    images = [s.image for s in scenes]
    segmenter.segment_batch(images[:2], vocabulary, preset=preset)  # warm-up
    start = time.perf_counter()
    results = segmenter.segment_batch(images, vocabulary, preset=preset)
    seconds = (time.perf_counter() - start) / len(scenes)
    index = {name: i for i, name in enumerate(CLASS_NAMES)}
    to_class = np.array([index.get(name, -1) for name in vocabulary], dtype=np.int64)
    return per_scene_matrices([r.labels for r in results], scenes, to_class), seconds


def ablation(args: argparse.Namespace, argv: list[str] | None = None) -> dict[str, Any]:
    torch.set_num_threads(1)
    segmenter = MaskDiffusion.from_pretrained(args.model, device="cpu", batch_size=args.batch_size, cache_size=0)
    default, attention_only = segmenter.presets["default"], segmenter.presets["attention-only"]
    calibration = measure_calibration(segmenter, held_out_scenes(args.scenes, CALIBRATION_STREAM), default)
    segmenter.card = dataclasses.replace(segmenter.card, attention_calibration=calibration)
    table = rows(default, attention_only, segmenter.presets["reference"], segmenter.backbone)
    long_names = long_vocabulary(CLASS_NAMES, distractor_names(), "spread")
    report: dict[str, Any] = {
        "model": args.model,
        "command": " ".join(["python benchmarks/ablation.py", *(argv if argv is not None else sys.argv[1:])]),
        "scenes": args.scenes,
        "streams": args.streams,
        "bootstrap": args.bootstrap,
        "long_vocabulary": {"names": len(long_names), "scenes": args.long_scenes, "stream": args.streams[-1]},
        "calibration": {"stream": CALIBRATION_STREAM, "mean_attention": calibration},
        "machine": f"{cpu_model()}, torch {torch.__version__}",
        "rows": [],
    }
    streams = {stream: held_out_scenes(args.scenes, stream) for stream in args.streams}
    long_scenes = streams[args.streams[-1]][: args.long_scenes]
    matrices: dict[tuple[str, int], np.ndarray] = {}
    for group, name, preset in table:
        row: dict[str, Any] = {"group": group, "name": name, "preset": preset.to_dict(), "streams": {}}
        for stream, scenes in streams.items():
            per_scene, seconds = run_row(segmenter, preset, scenes, list(CLASS_NAMES))
            matrices[name, stream] = per_scene
            result = summed_scores(per_scene.sum(axis=0))
            row["streams"][str(stream)] = {
                "mIoU": result["mIoU"],
                "interval": bootstrap_interval(per_scene, args.bootstrap, seed=stream),
                "per_class_iou": result["per_class_iou"],
                "seconds_per_image": seconds,
            }
        if args.long_scenes:
            per_scene, _ = run_row(segmenter, preset, long_scenes, long_names)
            row["long_vocabulary_miou"] = summed_scores(per_scene.sum(axis=0))["mIoU"]
        report["rows"].append(row)
        shown = "  ".join(f"stream {s}: {v['mIoU']:.1f}" for s, v in row["streams"].items())
        print(f"{group:>26} | {name:<52} {shown}", flush=True)
    report["paired"] = paired_rows(matrices, args.streams, args.bootstrap)
    return report


INTRO = """# Ablation of the mask head (model `{model}`)

Written by `{command}`. Every row is a preset run through
`MaskDiffusion.segment_batch` on {scenes} held-out scenes of each stream (never training scenes,
never the quality gate's stream 0), the world's 8 class words as the prompt. mIoU from one
confusion matrix per stream; 95% intervals from {bootstrap} bootstrap resamples of the scenes.
"168 names": mIoU over the 8 toy classes when they are spread through 160 COCO-Stuff names
({long} scenes of stream {long_stream}; a pixel given to a distractor name is a miss).
"ms / image": one CPU thread ({machine}), stream {last}, after a warm-up. `calibrated` rows divide
each word's attention by the square root of its mean attention over {scenes} scenes of stream
{cal_stream}, measured without labels.

The settings of the model's default were chosen on stream 3 alone (a grid over timestep,
attention layers, normalisation and the EM weights; for a transformer `research.grid`); stream 4
is the report. With cosine
prototypes, max-normalised and probability maps give the same prototypes (a per-class scale
cancels in a weighted mean), so `+ probabilities` alone changes nothing: it matters through the
heads that keep the attention in the decision (product of experts, EM).

"""


def markdown(report: dict[str, Any]) -> str:
    """The ablation page: how it was made, the table, per-class IoU on the last stream."""
    streams = [str(s) for s in report["streams"]]
    intro = INTRO.format(
        model=report["model"],
        command=report["command"],
        scenes=report["scenes"],
        bootstrap=report["bootstrap"],
        long=report["long_vocabulary"]["scenes"],
        long_stream=report["long_vocabulary"]["stream"],
        machine=report["machine"],
        last=streams[-1],
        cal_stream=report["calibration"]["stream"],
    )
    lines = [
        "| group | variant | "
        + " | ".join(f"stream {s} mIoU [95% CI]" for s in streams)
        + " | shapes IoU (stream "
        + streams[-1]
        + ") | 168 names | ms / image |",
        "|---" * (5 + len(streams)) + "|",
    ]
    for row in report["rows"]:
        cells = []
        for s in streams:
            v = row["streams"][s]
            cells.append(f"{v['mIoU']:.1f} [{v['interval'][0]:.1f}, {v['interval'][1]:.1f}]")
        last = row["streams"][streams[-1]]
        shapes = np.mean([last["per_class_iou"][c] or 0.0 for c in SHAPES])
        long = row.get("long_vocabulary_miou")
        lines.append(
            f"| {row['group']} | {row['name']} | "
            + " | ".join(cells)
            + f" | {shapes:.1f} | {'' if long is None else f'{long:.1f}'} | {1000 * last['seconds_per_image']:.0f} |"
        )
    if report.get("paired"):
        lines += ["", "Paired differences: the first row's mIoU minus the second's on the same scenes, with the 95%",
                  "interval of that difference over the same bootstrap resamples of the scenes (an interval",
                  "that excludes 0 says the first is better, or worse, on this model):", ""]  # fmt: skip
        lines.append("| first | second | " + " | ".join(f"stream {s}: difference [95% CI]" for s in streams) + " |")
        lines.append("|---" * (2 + len(streams)) + "|")
        for pair in report["paired"]:
            cells = [pair["streams"][s] for s in streams]
            shown = " | ".join(
                f"{c['difference']:+.1f} [{c['interval'][0]:+.1f}, {c['interval'][1]:+.1f}]" for c in cells
            )
            lines.append(f"| {pair['first']} | {pair['second']} | {shown} |")
    lines += ["", f"Per-class IoU, stream {streams[-1]}:", ""]
    lines.append("| variant | " + " | ".join(CLASS_NAMES) + " |")
    lines.append("|---" * (len(CLASS_NAMES) + 1) + "|")
    for row in report["rows"]:
        per_class = row["streams"][streams[-1]]["per_class_iou"]
        lines.append(f"| {row['name']} | " + " | ".join(f"{per_class[c] or 0.0:.1f}" for c in CLASS_NAMES) + " |")
    return intro + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="toy", help="model (default: the bundled toy model)")
    parser.add_argument("--streams", type=int, nargs="+", default=[3, 4], help="held-out streams (default 3 4)")
    parser.add_argument("--scenes", type=int, default=200, help="scenes per stream (default 200)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    parser.add_argument("--long-scenes", type=int, default=100, help="scenes of the 168-name case (default 100)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per UNet batch (default 16)")
    parser.add_argument(
        "--out", type=Path, default=Path("docs/ablation"), help="writes OUT.md, OUT.json (default docs/ablation)"
    )
    args = parser.parse_args(argv)
    if 0 in args.streams:
        parser.error("stream 0 is the quality gate's: it is never used for choosing or ablating settings")
    report = ablation(args, argv)
    write_text(args.out.with_suffix(".json"), json.dumps(report, indent=2) + "\n")
    write_text(args.out.with_suffix(".md"), markdown(report))
    print(f"wrote {args.out.with_suffix('.md')} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
