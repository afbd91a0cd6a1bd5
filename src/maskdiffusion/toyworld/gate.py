"""The bundled model's quality gate and demo, on held-out toy-world scenes.

``maskdiffusion evaluate --dataset toyworld`` scores, on the same N held-out scenes
(``eval_seed(i, stream=seed)``, never training scenes) and with the whole class vocabulary
as the prompt of every image, five ways of segmenting them:

* ``mIoU``: MaskDiffusion with the chosen preset (the model's ``default`` unless told);
* ``attention_only_miou``: argmax of that pass's per-class attention maps, bilinear to the image;
* ``reference_miou``: MaskDiffusion with the model's ``reference`` preset;
* ``unsupervised_miou``: one k-means (K = number of classes) on the first pass's UNet
  features pooled over the scenes, one Hungarian matching over the data set (the
  evaluation's dataset-level unsupervised protocol);
* ``rgb_kmeans_miou``: the same on raw RGB pixels: the floor a model has to beat.

Every number comes from one confusion matrix over the scenes, as in every evaluation. The
scenes are generated in memory and a run takes seconds, so it is not resumable: running it
again recomputes it, bit for bit for the same settings.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import files
from ..clustering import cluster_scores, kmeans, labels_from_scores, sample_pixels, stable_seed
from ..evaluation import DEFAULT_POOL_SIZE, GATE_DATASET, GATE_LIMIT
from ..metrics import ConfusionMatrix, clusters_to_classes, hungarian_match, relabel, scores
from ..presets import Preset
from ..report import build_metrics, write_report
from ..runstate import RUN_FILE, RunDirError
from ..visualize import label_grid
from .world import CLASS_NAMES, Scene, class_palette, eval_seed, is_train_seed, make_scene

FIGURE_FILE = "figures.png"
DEMO_FILE = "toyworld.png"

VARIANTS = {
    "default": "MaskDiffusion with the chosen preset",
    "attention_only": "argmax of the chosen preset's per-class attention maps (bilinear to the image)",
    "reference": "MaskDiffusion with the model's reference preset",
    "unsupervised": "one k-means (K = classes) on UNet features pooled over the scenes, one Hungarian matching",
    "rgb_kmeans": "one k-means (K = classes) on RGB pixels pooled over the scenes, one Hungarian matching (floor)",
}
HEADLINES = {
    "default": "mIoU",
    "attention_only": "attention_only_miou",
    "reference": "reference_miou",
    "unsupervised": "unsupervised_miou",
    "rgb_kmeans": "rgb_kmeans_miou",
}
COLUMNS = {
    "default": "MaskDiffusion",
    "attention_only": "attention only",
    "reference": "reference",
    "unsupervised": "unsupervised",
    "rgb_kmeans": "RGB k-means",
}


def held_out_scenes(count: int, stream: int = 0) -> list[Scene]:
    """The first ``count`` held-out scenes of evaluation stream ``stream``."""
    if count < 1:
        raise ValueError(f"the number of scenes must be >= 1, got {count}")
    seeds = [eval_seed(index, stream) for index in range(count)]
    leaked = [seed for seed in seeds if is_train_seed(seed)]
    if leaked:  # cannot happen by construction of eval_seed; checked because the gate relies on it
        raise RuntimeError(f"held-out scene seeds {leaked[:5]} are training seeds")
    return [make_scene(seed) for seed in seeds]


def attention_labels(result) -> np.ndarray:
    """``(H, W)`` int64 argmax of a result's per-class attention maps, upsampled bilinearly to the image."""
    return labels_from_scores(torch.from_numpy(result.attention), result.labels.shape)


def dataset_clusters(
    maps: Sequence[torch.Tensor], truths: Sequence[np.ndarray], k: int, *, seed: int, pool_size: int
) -> tuple[ConfusionMatrix, np.ndarray, list[np.ndarray]]:
    """Dataset-level clustering of per-image ``(D, h, w)`` maps scored against ``truths``.

    One k-means on a fixed-seed sample of at most ``ceil(pool_size / N)`` cells per map,
    every pixel labelled with its nearest centroid at its label's size (scores upsampled
    bilinearly), one Hungarian matching over the summed counts.

    Returns:
        The class-space confusion matrix, ``cluster_to_class`` ``(k,)`` and each image's
        ``(H, W)`` class prediction (-1 for an unmatched cluster).
    """
    per_image = max(1, math.ceil(pool_size / len(maps)))
    pool = torch.cat([sample_pixels(m, per_image, stable_seed(seed, i)) for i, m in enumerate(maps)])
    centroids = kmeans(pool, k, seed=seed)
    counts = ConfusionMatrix(len(CLASS_NAMES), k)
    clusters = []
    for features, truth in zip(maps, truths, strict=True):
        clusters.append(labels_from_scores(cluster_scores(features, centroids), truth.shape))
        counts.update(clusters[-1], truth)
    matching = hungarian_match(counts)
    return clusters_to_classes(counts, matching), matching, [relabel(c, matching) for c in clusters]


def rgb_map(scene: Scene) -> torch.Tensor:
    """A scene's pixels as a ``(3, H, W)`` float32 feature map (the RGB k-means floor's features)."""
    return torch.from_numpy(scene.image.astype(np.float32)).permute(2, 0, 1)


def scene_figure(scenes: Sequence[Scene], predictions: dict[str, Sequence[np.ndarray]], *, scale: int = 4):
    """image | ground truth | one column per prediction, a row per scene, the class legend on the right."""
    rows = [[s.image, s.labels, *(p[i] for p in predictions.values())] for i, s in enumerate(scenes)]
    titles = ["image", "ground truth", *predictions]
    return label_grid(rows, titles, CLASS_NAMES, class_palette(), scale=scale)


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="toyworld gate", unit="scene", disable=not enabled, dynamic_ncols=True)


def _variant(matrix: ConfusionMatrix, description: str, **extra: Any) -> dict[str, Any]:
    result = scores(matrix, CLASS_NAMES)
    return {
        "mIoU": result["mIoU"],
        "pixel_accuracy": result["pixel_accuracy"],
        "per_class_iou": result["per_class_iou"],
        "confusion_matrix": matrix.counts.tolist(),
        "unassigned_pixels": matrix.unassigned.tolist(),
        "description": description,
        **extra,
    }


def run_gate(
    segmenter,
    *,
    out_dir: str | Path,
    limit: int = GATE_LIMIT,
    seed: int = 0,
    preset: str | Preset | None = None,
    figures: int = 4,
    pool_size: int = DEFAULT_POOL_SIZE,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the quality gate and write ``metrics.json``, ``report.md``, the bar chart and ``figures.png``.

    Arguments:
        segmenter: a :class:`maskdiffusion.MaskDiffusion` (``batch_size`` images per call).
        out_dir: RUN_DIR; a folder holding a resumable evaluation run is refused.
        limit: number of held-out scenes; seed: their stream, and the seed of k-means.
        preset: the headline preset (default: the segmenter's); ``reference`` is the model's own.
        figures: scenes shown in ``figures.png`` (0: none).

    Returns:
        The metrics dict written to ``metrics.json`` (percentages).
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    if (out_dir / RUN_FILE).is_file():
        raise RunDirError(f"{out_dir} holds a resumable evaluation run ({RUN_FILE}): give the gate another --out")
    if figures < 0 or pool_size < 1:
        raise ValueError(f"figures must be >= 0 and pool_size >= 1, got {figures} and {pool_size}")
    names = list(CLASS_NAMES)
    presets = {
        "default": segmenter.check_inputs(names, preset)[1],
        "reference": segmenter.check_inputs(names, "reference")[1],
    }
    scenes = held_out_scenes(limit, seed)
    truths = [scene.labels for scene in scenes]
    matrices = {name: ConfusionMatrix(len(names)) for name in ("default", "attention_only", "reference")}
    predictions: dict[str, list[np.ndarray]] = {name: [] for name in VARIANTS}
    features = []
    step = segmenter.batch_size
    with _progress(len(scenes), progress) as bar:
        for start in range(0, len(scenes), step):
            chunk = scenes[start : start + step]
            images = [scene.image for scene in chunk]
            main = segmenter.segment_batch(images, names, preset=presets["default"], keep_features=True)
            reference = segmenter.segment_batch(images, names, preset=presets["reference"])
            for scene, first, second in zip(chunk, main, reference, strict=True):
                labelled = {"default": first.labels, "attention_only": attention_labels(first)}
                labelled["reference"] = second.labels
                for name, labels in labelled.items():
                    matrices[name].update(labels, scene.labels)
                    if len(predictions[name]) < figures:
                        predictions[name].append(labels)
                features.append(first.features)
            bar.update(len(chunk))
            bar.set_postfix_str(f"mIoU {scores(matrices['default'], names)['mIoU']:.2f}")
    k = len(names)
    extra = {}
    for name, maps in (("unsupervised", features), ("rgb_kmeans", [rgb_map(s) for s in scenes])):
        matrix, matching, predictions[name] = dataset_clusters(maps, truths, k, seed=seed, pool_size=pool_size)
        matrices[name] = matrix
        extra[name] = {"clusters": k, "pool_size": pool_size, "cluster_to_class": matching.tolist()}

    variants = {name: _variant(matrices[name], VARIANTS[name], **extra.get(name, {})) for name in VARIANTS}
    metrics = {HEADLINES[name]: variants[name]["mIoU"] for name in VARIANTS}
    metrics.update(
        build_metrics(
            matrices["default"],
            names,
            mode="open-vocab",
            clustering=None,
            num_images=len(scenes),
            failed={},
            settings=_settings(segmenter, presets, limit, seed, pool_size, scenes),
            runtime={"device": str(segmenter.device), "seconds": round(time.perf_counter() - started, 3)},
        )
    )
    metrics.update(
        seed=seed,
        presets={name: p.to_dict() for name, p in presets.items()},
        scene_seeds=[scenes[0].seed, scenes[-1].seed],
        variants=variants,
    )
    shown = []
    if figures:
        picture = scene_figure(
            scenes[:figures], {COLUMNS[name]: predictions[name][:figures] for name in VARIANTS}, scale=3
        )
        files.write_image(out_dir / FIGURE_FILE, picture)
        shown.append(FIGURE_FILE)
    files.write_json(out_dir / "metrics.json", metrics)
    write_report(out_dir, metrics, shown, colours=class_palette())
    return metrics


def _settings(segmenter, presets: dict[str, Preset], limit: int, seed: int, pool_size: int, scenes) -> dict:
    """What decides the gate's numbers, in the evaluation's ``settings`` shape."""
    from .. import __version__

    return {
        "dataset": GATE_DATASET,
        "split": f"held-out stream {seed}",
        "root": None,
        "classes": list(CLASS_NAMES),
        "num_samples": len(scenes),
        "scene_seeds": [scenes[0].seed, scenes[-1].seed],
        "limit": limit,
        "eval_size": "original",
        "mode": "open-vocab",
        "clustering": None,
        "clusters": None,
        "pool_size": pool_size,
        "seed": seed,
        "preset": presets["default"].to_dict(),
        "presets": {name: p.to_dict() for name, p in presets.items()},
        "model": segmenter.model_id,
        "dtype": str(segmenter.dtype).removeprefix("torch."),
        "images_per_batch": segmenter.batch_size,
        "version": __version__,
    }


def summary(metrics: dict[str, Any], out_dir: Path) -> str:
    """One line per headline number, for the command line."""

    def show(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}%"

    lines = [
        f"toyworld gate: {metrics['num_images']} held-out scenes (stream {metrics['seed']}), "
        f"model {metrics['model']}, {metrics['runtime']['seconds']:.1f} s"
    ]
    lines += [f"  {key:<20} {show(metrics[key])}" for key in HEADLINES.values()]
    lines.append(f"  -> {out_dir / 'metrics.json'}")
    return "\n".join(lines)


def run_demo(segmenter, *, out_dir: str | Path, count: int = 8, stream: int = 0) -> tuple[float | None, Path]:
    """Segment ``count`` held-out scenes with the whole vocabulary; write the figure.

    Returns:
        The mIoU (%) over those scenes and the path of ``toyworld.png``
        (image | ground truth | prediction per scene, class legend).
    """
    scenes = held_out_scenes(count, stream)
    results = segmenter.segment_batch([s.image for s in scenes], list(CLASS_NAMES))
    matrix = ConfusionMatrix(len(CLASS_NAMES))
    for scene, result in zip(scenes, results, strict=True):
        matrix.update(result.labels, scene.labels)
    figure = scene_figure(scenes, {"prediction": [r.labels for r in results]})
    path = files.write_image(Path(out_dir) / DEMO_FILE, figure)
    return scores(matrix, CLASS_NAMES)["mIoU"], path
