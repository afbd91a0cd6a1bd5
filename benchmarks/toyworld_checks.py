"""Toy-world checks: what half precision and ``shared-queries`` do to quality on the bundled model's own data.

On N held-out toy-world scenes (``held_out_scenes(N, stream=0)``, never training scenes) with the
bundled ``toy`` model and its ``default`` preset:

1. Half precision (bf16 autocast on the CPU, where maps and mask head stay fp32; fp16 weights on a
   GPU) against fp32, with the whole 8-class vocabulary as the prompt: the share of pixels with the
   same label, and both mIoUs.
2. ``long_vocabulary="shared-queries"`` (one UNet pass; later prompts attend to its stored queries)
   against ``"batch"`` (one pass per prompt, exact) on a long vocabulary that needs several prompts:
   the 8 toy classes plus every COCO-Stuff-171 name that shares no word with them. Scored over the
   8 toy classes; a pixel labelled with a distractor is ``unassigned`` in the confusion matrix (a
   miss for its true class, no class's false positive). The plain 8-class vocabulary is the
   reference. The toy classes are placed two ways: ``spread`` evenly through the list, so that
   most of them sit in later prompts (the ones shared-queries approximates), and ``first``, all in
   the first prompt.

Every score comes from one confusion matrix over the scenes (``maskdiffusion.metrics``). A wall
time is one ``segment_batch`` over all the scenes after a warm-up (latent cache off).

    python benchmarks/bench.py --toyworld      # ~1-2 min on the 2-core CPU machine
"""

from __future__ import annotations

import hashlib
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from maskdiffusion import MaskDiffusion
from maskdiffusion.datasets import COCOSTUFF171_CLASSES
from maskdiffusion.loading import TOY_MODEL, resolve_model_folder
from maskdiffusion.metrics import ConfusionMatrix, scores
from maskdiffusion.prompts import build_prompts, parse_classes
from maskdiffusion.toyworld.gate import held_out_scenes
from maskdiffusion.toyworld.world import CLASS_NAMES, Scene

DEFAULT_SCENES = 100
PLACEMENTS = ("spread", "first")


def _words(name: str) -> set[str]:
    return {word.casefold() for word in name.replace("-", " ").split()}


def distractor_names(classes: Sequence[str] = CLASS_NAMES, names: Sequence[str] = COCOSTUFF171_CLASSES) -> list[str]:
    """``names`` that share no word with any of ``classes`` ("water drops" and "wall" go for "water", "brick wall")."""
    taken = set().union(*map(_words, classes))
    return [name for name in names if not _words(name) & taken]


def long_vocabulary(classes: Sequence[str], distractors: Sequence[str], placement: str) -> list[str]:
    """``classes`` and ``distractors`` in one list: classes ``first``, or ``spread`` evenly (class 0 first)."""
    if placement == "first":
        return [*classes, *distractors]
    if placement != "spread":
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    total = len(classes) + len(distractors)
    at = {round(i * total / len(classes)): name for i, name in enumerate(classes)}
    rest = iter(distractors)
    return [at[position] if position in at else next(rest) for position in range(total)]


@dataclass
class Segmentation:
    """Label maps of the scenes (indices into ``vocabulary``) and the wall time of the one call."""

    vocabulary: list[str]
    labels: list[np.ndarray]
    seconds: float


def segment(segmenter, scenes: Sequence[Scene], vocabulary: Sequence[str], preset=None) -> Segmentation:
    """All ``scenes`` through one ``segment_batch`` call, timed."""
    start = time.perf_counter()
    results = segmenter.segment_batch([scene.image for scene in scenes], list(vocabulary), preset=preset)
    seconds = time.perf_counter() - start
    return Segmentation(list(vocabulary), [result.labels for result in results], seconds)


def toy_scores(run: Segmentation, scenes: Sequence[Scene], classes: Sequence[str] = CLASS_NAMES) -> dict[str, Any]:
    """mIoU, pixel accuracy and per-class IoU (%) over ``classes``; other vocabulary labels are unassigned.

    Also ``distractor_pixels``: the share (0..1) of pixels labelled with a name outside ``classes``.
    """
    index = {name: i for i, name in enumerate(classes)}
    to_class = np.array([index.get(name, -1) for name in run.vocabulary], dtype=np.int64)
    matrix = ConfusionMatrix(len(classes))
    outside = 0
    for labels, scene in zip(run.labels, scenes, strict=True):
        mapped = np.where(labels >= 0, to_class[np.clip(labels, 0, None)], -1)
        matrix.update(mapped, scene.labels)
        outside += int((mapped < 0).sum())
    result = scores(matrix, classes)
    return {
        "mIoU": result["mIoU"],
        "pixel_accuracy": result["pixel_accuracy"],
        "per_class_iou": result["per_class_iou"],
        "distractor_pixels": outside / matrix.num_pixels,
        "seconds": run.seconds,
    }


def agreement(a: Segmentation, b: Segmentation) -> float:
    """Share (0..1) of pixels with the same label in two runs over the same scenes and vocabulary."""
    if a.vocabulary != b.vocabulary:
        raise ValueError("label agreement needs both runs to use the same vocabulary in the same order")
    same = sum(int((x == y).sum()) for x, y in zip(a.labels, b.labels, strict=True))
    return same / sum(x.size for x in a.labels)


def model_fingerprint(model: str) -> str:
    """First 12 hex digits of the sha256 of the model's weight files (which weights were measured)."""
    digest = hashlib.sha256()
    folder = resolve_model_folder(model, local_files_only=True)
    for path in sorted(folder.rglob("*.safetensors")):
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def run_checks(
    device: str | torch.device,
    half: torch.dtype,
    count: int = DEFAULT_SCENES,
    *,
    stream: int = 0,
    model: str = TOY_MODEL,
    distractors: Sequence[str] | None = None,
    placements: Sequence[str] = PLACEMENTS,
    log: Callable[[str], object] = print,
) -> dict[str, Any]:
    """Both checks on ``count`` held-out scenes of ``stream``; a JSON-ready dict (scores in %, shares 0..1)."""
    started = time.perf_counter()
    device = torch.device(device)
    classes = list(CLASS_NAMES)
    distractors = distractor_names(classes) if distractors is None else list(distractors)
    scenes = held_out_scenes(count, stream)
    full = MaskDiffusion.from_pretrained(model, device=device, cache_size=0)
    reduced = MaskDiffusion.from_pretrained(model, device=device, dtype=half, cache_size=0)
    half_name = str(half).removeprefix("torch.")
    for segmenter in (full, reduced):  # warm-up: first-call costs stay out of the wall times
        segmenter(scenes[0].image, classes)

    log(f"toy-world checks: {count} held-out scenes (stream {stream}), fp32 vs {half_name} ...")
    fp32 = segment(full, scenes, classes)
    low = segment(reduced, scenes, classes)
    precision = {
        "dtype": half_name,
        "agreement": agreement(fp32, low),
        "fp32": toy_scores(fp32, scenes, classes),
        "half": toy_scores(low, scenes, classes),
    }
    log(f"  labels equal: {100 * precision['agreement']:.2f}%")

    exact = full.preset.replace(long_vocabulary="batch")
    shared = full.preset.replace(long_vocabulary="shared-queries")
    long: dict[str, Any] = {}
    for placement in placements:
        vocabulary = long_vocabulary(classes, distractors, placement)
        prompts = build_prompts(full.tokenizer, parse_classes(vocabulary), exact.separator)
        log(f"  {len(vocabulary)} names in {prompts.num_prompts} prompts, toy classes {placement}: batch, shared ...")
        batch = segment(full, scenes, vocabulary, preset=exact)
        approx = segment(full, scenes, vocabulary, preset=shared)
        long[placement] = {
            "names": len(vocabulary),
            "prompts": prompts.num_prompts,
            "prompt_of_class": {name: prompts.spans[vocabulary.index(name)][0].prompt for name in classes},
            "batch": toy_scores(batch, scenes, classes),
            "shared-queries": toy_scores(approx, scenes, classes),
            "agreement": agreement(approx, batch),
        }
    return {
        "model": model,
        "weights": model_fingerprint(model),
        "device": str(device),
        "scenes": count,
        "stream": stream,
        "image_size": int(scenes[0].image.shape[0]),
        "preset": full.preset.to_dict(),
        "batch_size": full.batch_size,
        "classes": classes,
        "distractors": distractors,
        "dropped": [name for name in COCOSTUFF171_CLASSES if name not in distractors],
        "precision": precision,
        "plain": precision["fp32"],
        "long_vocabulary": long,
        "seconds": time.perf_counter() - started,
    }


def _pct(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def report(checks: dict[str, Any], device_label: str) -> str:
    """The results file: header, half-precision table, long-vocabulary table, per-class IoU."""
    precision, long = checks["precision"], checks["long_vocabulary"]
    half_name = precision["dtype"]
    preset = checks["preset"]
    lines = [
        f"# Toy-world checks on {device_label}",
        "",
        f"Model `{checks['model']}` (weights sha256 {checks['weights']}...), {checks['scenes']} held-out toy-world "
        f"scenes (stream {checks['stream']}, {checks['image_size']}x{checks['image_size']}), the model's `default` "
        f"preset (timestep {preset['timestep']}, {preset['attention_mode']} attention), {checks['batch_size']} views "
        f"per UNet batch, no latent cache. Python {platform.python_version()}, torch {torch.__version__}, threads "
        f"{torch.get_num_threads()}; all checks {checks['seconds']:.0f} s. mIoU and pixel accuracy in %, each from "
        "one confusion matrix over the scenes; wall time = one `segment_batch` over all scenes after a warm-up. "
        "Made by `python benchmarks/bench.py --toyworld` ([toyworld_checks.py](../toyworld_checks.py)).",
        "",
        f"## {half_name} vs fp32, whole 8-class vocabulary",
        "",
        f"| | fp32 | {half_name} | target |",
        "|---|---|---|---|",
        f"| labels equal to fp32's | | {100 * precision['agreement']:.2f}% | >= 99% |",
        f"| mIoU | {_pct(precision['fp32']['mIoU'])} | {_pct(precision['half']['mIoU'])} | |",
        f"| pixel accuracy | {_pct(precision['fp32']['pixel_accuracy'])} | "
        f"{_pct(precision['half']['pixel_accuracy'])} | |",
        f"| wall s | {precision['fp32']['seconds']:.1f} | {precision['half']['seconds']:.1f} | |",
        "",
        "## Long vocabulary: shared-queries vs batch",
        "",
        f"The 8 toy classes plus the {len(checks['distractors'])} COCO-Stuff-171 names that share no word with them "
        f"(left out: {', '.join(checks['dropped'])}). mIoU and pixel accuracy over the 8 toy classes; a pixel "
        "labelled with a distractor is unassigned (a miss for its true class). `spread`: toy classes evenly through "
        "the list, `first`: all in the first prompt. shared-queries runs one UNet pass with the first prompt; the "
        "other prompts attend to its stored queries.",
        "",
        "| vocabulary | long_vocabulary | mIoU | pixel accuracy | pixels labelled a distractor | labels equal to "
        "batch's | wall s |",
        "|---|---|---|---|---|---|---|",
        f"| 8 toy classes (1 prompt) | - | {_pct(checks['plain']['mIoU'])} | "
        f"{_pct(checks['plain']['pixel_accuracy'])} | 0% | | {checks['plain']['seconds']:.1f} |",
    ]
    for placement, row in long.items():
        for mode in ("batch", "shared-queries"):
            scored = row[mode]
            same = "100%" if mode == "batch" else f"{100 * row['agreement']:.2f}%"
            lines.append(
                f"| {row['names']} names, {placement} ({row['prompts']} prompts) | {mode} | {_pct(scored['mIoU'])} | "
                f"{_pct(scored['pixel_accuracy'])} | {100 * scored['distractor_pixels']:.1f}% | {same} | "
                f"{scored['seconds']:.1f} |"
            )
    columns = [("8 classes", checks["plain"])]
    for placement, row in long.items():
        columns += [(f"{placement}, {mode}", row[mode]) for mode in ("batch", "shared-queries")]
    lines += [
        "",
        "Per-class IoU (prompt of the class in each placement, 0 = the first):",
        "",
        "| class | " + " | ".join(f"prompt ({p})" for p in long) + " | " + " | ".join(n for n, _ in columns) + " |",
        "|---" * (1 + len(long) + len(columns)) + "|",
    ]
    for name in checks["classes"]:
        prompts = [str(row["prompt_of_class"][name]) for row in long.values()]
        ious = [_pct(scored["per_class_iou"][name]) for _, scored in columns]
        lines.append(f"| {name} | " + " | ".join(prompts + ious) + " |")
    return "\n".join(lines) + "\n"
