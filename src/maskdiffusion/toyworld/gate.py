"""The bundled model's quality gate and demo, on held-out toy-world scenes.

``maskdiffusion evaluate --dataset toyworld`` scores, on the same N held-out scenes
(``eval_seed(i, stream=seed)``, never training scenes) and with the whole class vocabulary
as the prompt of every image, five ways of segmenting them:

* ``mIoU``: MaskDiffusion with the chosen preset (the model's ``default`` unless told);
* ``attention_only_miou``: the strongest attention-only baseline we know, the model's
  ``attention-only`` preset (argmax of raw softmax attention probabilities at the layers and
  timestep that scored best on held-out stream 3; no features): what the head must beat;
* ``reference_miou``: MaskDiffusion with the model's ``reference`` preset;
* ``unsupervised_miou``: one k-means (K = number of classes) on the first pass's backbone
  features pooled over the scenes, one Hungarian matching over the data set (the
  evaluation's dataset-level unsupervised protocol);
* ``rgb_kmeans_miou``: the same on raw RGB pixels: the floor a model has to beat.

Every number comes from one confusion matrix over the scenes, as in every evaluation, and
is reported next to the gate's targets (:data:`TARGETS`). RUN_DIR is bound to the settings
as for data set runs (``runstate.prepare_run_dir``); a run takes seconds and keeps no
checkpoints, so the same command again recomputes it (same numbers). ``maskdiffusion demo`` scores
the gate's scenes the same way with every bundled model (no reference preset), so each number comes
with its baselines and, on the gate's scenes, its targets.
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
from ..clustering import DEFAULT_POOL_SIZE, cluster_scores, kmeans, labels_from_scores, sample_pixels, stable_seed
from ..metrics import ConfusionMatrix, clusters_to_classes, hungarian_match, relabel, scores
from ..presets import Preset
from ..report import build_metrics, write_report
from ..runstate import RUN_FILE, prepare_run_dir
from ..visualize import label_grid
from .world import CLASS_NAMES, Scene, class_palette, eval_seed, is_train_seed, make_scene

GATE_DATASET = "toyworld"  # the gate's name as a data set: ``maskdiffusion evaluate --dataset toyworld``
GATE_LIMIT = 200  # held-out scenes scored by default
FIGURE_FILE = "figures.png"
DEMO_FILE = "toyworld.png"

VARIANTS = {
    "default": "MaskDiffusion with the chosen preset: class prototypes from attention-weighted backbone features",
    "attention_only": "the model's attention-only preset: argmax of raw softmax attention probabilities at the "
    "best layers and timestep of a grid on held-out stream 3 (bilinear; no features): the baseline to beat",
    "reference": "MaskDiffusion with the model's reference preset (the paper's mask head)",
    "unsupervised": "one k-means (K = classes) on the same pass's backbone features, one Hungarian matching; no words",
    "rgb_kmeans": "the floor: one k-means (K = classes) on raw RGB pixels, one Hungarian matching; no model",
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

# The gate's targets (issue 12), each (metrics key, metrics key it is compared with or None for a
# fixed bar, points): mIoU >= 43, >= the strongest attention only + 2, >= unsupervised k-means on
# the same features + 5, and above the RGB k-means floor.
TARGETS = (
    ("mIoU", None, 43.0),
    ("mIoU", "attention_only_miou", 2.0),
    ("mIoU", "unsupervised_miou", 5.0),
    ("mIoU", "rgb_kmeans_miou", 0.0),
)
ATTENTION_ONLY = "attention-only"  # the model's preset of the attention-only baseline


def held_out_scenes(count: int, stream: int = 0) -> list[Scene]:
    """The first ``count`` held-out scenes of evaluation stream ``stream``."""
    if count < 1:
        raise ValueError(f"the number of scenes must be >= 1, got {count}")
    seeds = [eval_seed(index, stream) for index in range(count)]
    leaked = [seed for seed in seeds if is_train_seed(seed)]
    if leaked:  # cannot happen by construction of eval_seed; checked because the gate relies on it
        raise RuntimeError(f"held-out scene seeds {leaked[:5]} are training seeds")
    return [make_scene(seed) for seed in seeds]


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


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="scene", disable=not enabled, dynamic_ncols=True)


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


def gate_presets(segmenter, preset: str | Preset | None = None) -> dict[str, Preset]:
    """The presets the gate runs: the headline (``preset``), the model's attention-only and reference ones.

    A model without an ``attention-only`` preset gets its headline preset scored by attention alone.
    """
    names = list(CLASS_NAMES)
    default = segmenter.check_inputs(names, preset)[1]
    attention = (
        ATTENTION_ONLY if ATTENTION_ONLY in segmenter.presets else default.replace(scoring="attention", refine_steps=0)
    )
    return {
        "default": default,
        "attention_only": segmenter.check_inputs(names, attention)[1],
        "reference": segmenter.check_inputs(names, "reference")[1],
    }


def segment_scenes(segmenter, scenes: Sequence[Scene], presets: dict[str, Preset]) -> dict[str, list]:
    """Each preset's results on ``scenes`` (the headline's with features, for clustering)."""
    images = [scene.image for scene in scenes]
    return {
        name: segmenter.segment_batch(images, list(CLASS_NAMES), preset=preset, keep_features=name == "default")
        for name, preset in presets.items()
    }


class Scoreboard:
    """The variants' confusion matrices over scenes added one by one, then the two clusterings.

    Only the first ``keep`` predictions of each variant are kept (for figures); the backbone
    feature maps added are kept for the dataset-level clustering.
    """

    def __init__(self, keep: int = 0):
        self.keep = keep
        self.matrices: dict[str, ConfusionMatrix] = {}
        self.predictions: dict[str, list[np.ndarray]] = {name: [] for name in VARIANTS}
        self.features: list[torch.Tensor] = []
        self.extra: dict[str, dict[str, Any]] = {}

    def add(self, scene: Scene, labelled: dict[str, np.ndarray], features: torch.Tensor | None = None) -> None:
        for name, labels in labelled.items():
            self.matrices.setdefault(name, ConfusionMatrix(len(CLASS_NAMES))).update(labels, scene.labels)
            if len(self.predictions[name]) < self.keep:
                self.predictions[name].append(labels)
        if features is not None:
            self.features.append(features)

    def cluster(self, scenes: Sequence[Scene], *, seed: int, pool_size: int) -> None:
        """Score the dataset-level clusterings: on the features added (if any), and on RGB (the floor)."""
        truths = [scene.labels for scene in scenes]
        k = len(CLASS_NAMES)
        for name, maps in (("unsupervised", self.features), ("rgb_kmeans", [rgb_map(s) for s in scenes])):
            if not maps:
                continue
            matrix, matching, predicted = dataset_clusters(maps, truths, k, seed=seed, pool_size=pool_size)
            self.matrices[name] = matrix
            self.predictions[name] = predicted[: self.keep]
            self.extra[name] = {"clusters": k, "pool_size": pool_size, "cluster_to_class": matching.tolist()}

    def miou(self, name: str) -> float | None:
        return scores(self.matrices[name], CLASS_NAMES)["mIoU"]

    def variants(self) -> dict[str, dict[str, Any]]:
        """Each scored variant's numbers, in :data:`VARIANTS` order."""
        return {
            name: _variant(self.matrices[name], VARIANTS[name], **self.extra.get(name, {}))
            for name in VARIANTS
            if name in self.matrices
        }

    def headlines(self) -> dict[str, float | None]:
        """``{metrics key: mIoU}`` of each scored variant (``mIoU``, ``attention_only_miou``, ...)."""
        return {HEADLINES[name]: self.miou(name) for name in VARIANTS if name in self.matrices}


def score_scenes(
    segmenter, scenes: Sequence[Scene], presets: dict[str, Preset], *, keep: int, progress: bool, desc: str
) -> Scoreboard:
    """Each preset's confusion matrix over ``scenes``, a batch at a time with a progress bar (the
    headline preset's features kept for the clusterings; call :meth:`Scoreboard.cluster` next)."""
    board = Scoreboard(keep=keep)
    step = segmenter.batch_size
    with _progress(len(scenes), progress, desc) as bar:
        for start in range(0, len(scenes), step):
            chunk = scenes[start : start + step]
            results = segment_scenes(segmenter, chunk, presets)
            for index, scene in enumerate(chunk):
                board.add(
                    scene, {name: rs[index].labels for name, rs in results.items()}, results["default"][index].features
                )
            bar.update(len(chunk))
            bar.set_postfix_str(f"mIoU {board.miou('default'):.2f}")
    return board


def check_targets(numbers: dict[str, float | None]) -> list[dict[str, Any]]:
    """Each of :data:`TARGETS` with the numbers it compares and whether it is met (None: not measured)."""
    checked = []
    for key, other, points in TARGETS:
        if other is None:
            bar, name = points, f"{key} >= {points:g}"
        else:
            bar = None if numbers.get(other) is None else numbers[other] + points
            name = f"{key} >= {other}" + (f" + {points:g}" if points else "")
        value = numbers.get(key)
        met = None if value is None or bar is None else value >= bar
        checked.append({"target": name, "value": value, "bar": bar, "met": met})
    return checked


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def target_lines(numbers: dict[str, float | None]) -> list[str]:
    """One plain line per target: met, MISSED or not measured, with the two numbers compared."""
    lines = []
    for target in check_targets(numbers):
        state = {True: "met", False: "MISSED", None: "not measured"}[target["met"]]
        lines.append(f"{target['target']}: {state} ({_number(target['value'])} vs {_number(target['bar'])})")
    return lines


def trailing_line(numbers: dict[str, float | None]) -> str | None:
    """A plain sentence when the mask head scores under attention only (else None)."""
    head, attention = numbers.get("mIoU"), numbers.get("attention_only_miou")
    if head is None or attention is None or head >= attention:
        return None
    return (
        f"the mask head (mIoU {head:.2f}) trails attention only ({attention:.2f}) by {attention - head:.2f} points: "
        "its prototypes label the scenes worse than the attention maps they start from"
    )


def verdict_lines(numbers: dict[str, float | None]) -> list[str]:
    """The targets (met or not) and, when it does, that the mask head trails attention only."""
    trailing = trailing_line(numbers)
    return [f"target {line}" for line in target_lines(numbers)] + ([trailing] if trailing else [])


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
        out_dir: RUN_DIR, bound to the gate's settings by ``run.json`` like every evaluation run:
            a folder holding this gate run is recomputed (the gate keeps no checkpoints; the
            same settings give the same numbers), one holding another run is refused
            (:class:`~maskdiffusion.runstate.RunDirError`, naming the settings that differ).
        limit: number of held-out scenes; seed: their stream, and the seed of k-means.
        preset: the headline preset (default: the segmenter's); ``reference`` is the model's own.
        figures: scenes shown in ``figures.png`` (0: none).

    Returns:
        The metrics dict written to ``metrics.json`` (percentages).
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    if figures < 0 or pool_size < 1:
        raise ValueError(f"figures must be >= 0 and pool_size >= 1, got {figures} and {pool_size}")
    names = list(CLASS_NAMES)
    presets = gate_presets(segmenter, preset)
    scenes = held_out_scenes(limit, seed)
    settings = _settings(segmenter, presets, limit, seed, pool_size, scenes)
    again = (out_dir / RUN_FILE).is_file()
    prepare_run_dir(out_dir, settings, world_size=1)  # another run's folder is refused, naming what differs
    board = score_scenes(segmenter, scenes, presets, keep=figures, progress=progress, desc="toyworld gate")
    board.cluster(scenes, seed=seed, pool_size=pool_size)

    variants = board.variants()
    metrics: dict[str, Any] = board.headlines()
    metrics.update(
        build_metrics(
            board.matrices["default"],
            names,
            mode="open-vocab",
            clustering=None,
            num_images=len(scenes),
            failed={},
            settings=settings,
            runtime={
                "device": str(segmenter.device),
                "seconds": round(time.perf_counter() - started, 3),
                "recomputed": again,
            },
        )
    )
    metrics.update(
        seed=seed,
        presets={name: p.to_dict() for name, p in presets.items()},
        scene_seeds=[scenes[0].seed, scenes[-1].seed],
        variants=variants,
        targets=check_targets(metrics),
        notes=[line for line in (trailing_line(metrics),) if line],
    )
    shown = []
    if figures:
        picture = scene_figure(
            scenes[:figures], {COLUMNS[name]: board.predictions[name][:figures] for name in VARIANTS}, scale=3
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
    """The headline numbers, the targets and what they say, for the command line."""

    def show(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}%"

    lines = [
        f"toyworld gate: {metrics['num_images']} held-out scenes (stream {metrics['seed']}), "
        f"model {metrics['model']}, {metrics['runtime']['seconds']:.1f} s"
    ]
    if metrics["runtime"].get("recomputed"):
        lines.append(f"  {out_dir} held this gate run (same settings): recomputed, as the gate keeps no checkpoints")
    lines += [f"  {key:<20} {show(metrics[key])}" for key in HEADLINES.values()]
    lines += [f"  {line}" for line in verdict_lines(metrics)]
    lines.append(f"  -> {out_dir / 'metrics.json'}")
    return "\n".join(lines)


def run_demo(
    segmenters: dict[str, Any],
    *,
    out_dir: str | Path,
    count: int = GATE_LIMIT,
    show: int = 4,
    stream: int = 0,
    progress: bool = True,
) -> tuple[dict[str, dict[str, float | None]], Path]:
    """Score each model on the same ``count`` held-out scenes, the whole vocabulary as the prompt; draw ``show``.

    Arguments:
        segmenters: ``{name: MaskDiffusion}``, each scored as the gate scores it (its default, attention
            only, the unsupervised clustering of its features and the RGB floor; no reference preset).

    Returns:
        Per model, the mIoU (%) over the scenes of its mask head and baselines (``mIoU``,
        ``attention_only_miou``, ``unsupervised_miou``, ``rgb_kmeans_miou``; see :data:`HEADLINES`), and
        the path of ``toyworld.png`` (image | ground truth | each model's prediction, a row per scene
        drawn, the class legend).
    """
    if show < 1 or show > count:
        raise ValueError(f"the scenes drawn must be between 1 and the scenes scored ({count}), got {show}")
    scenes = held_out_scenes(count, stream)
    numbers, drawn = {}, {}
    for name, segmenter in segmenters.items():
        presets = gate_presets(segmenter)
        del presets["reference"]
        board = score_scenes(segmenter, scenes, presets, keep=show, progress=progress, desc=f"demo: {name}")
        board.cluster(scenes, seed=stream, pool_size=DEFAULT_POOL_SIZE)
        numbers[name], drawn[name] = board.headlines(), board.predictions["default"]
    path = files.write_image(Path(out_dir) / DEMO_FILE, scene_figure(scenes[:show], drawn))
    return numbers, path


def demo_summary(numbers: dict[str, dict[str, float | None]], count: int) -> list[str]:
    """The demo's table (a row per variant, a column per model, what each variant is) and, where they
    apply (the gate's :data:`GATE_LIMIT` scenes or more), the gate's targets checked on each model."""
    models = list(numbers)
    width = 2 + max(6, *(len(m) for m in models))  # at least two spaces between columns
    lines = [f"mIoU (%) over the {count} scenes, each from one confusion matrix over them:"]
    lines.append(" " * 18 + "".join(f"{m:>{width}}" for m in models))
    shown = [v for v in VARIANTS if all(HEADLINES[v] in n for n in numbers.values())]
    for variant in shown:
        cells = "".join(f"{_number(n[HEADLINES[variant]]):>{width}}" for n in numbers.values())
        lines.append(f"  {COLUMNS[variant]:<16}{cells}")
    lines += [f"  ({COLUMNS[variant]}: {VARIANTS[variant]})" for variant in shown]
    for model, measured in numbers.items():
        trailing = trailing_line(measured)
        if trailing:
            lines.append(f"{model}: {trailing}")
    if count < GATE_LIMIT:
        lines.append(
            f"the quality gate's targets are set for its {GATE_LIMIT} scenes and are not checked on {count}: "
            f"run maskdiffusion demo without --scenes, or maskdiffusion evaluate --dataset {GATE_DATASET}"
        )
        return lines
    for model, measured in numbers.items():
        command = f"maskdiffusion evaluate --dataset {GATE_DATASET} --model {model}"
        lines.append(f"{model}: the quality gate's targets ({command}):")
        lines += [f"  {line}" for line in target_lines(measured)]
    return lines
