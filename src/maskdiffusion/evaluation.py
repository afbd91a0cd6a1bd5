"""The evaluation engine: score a segmenter on a data set, resumably, as one shard of one or many processes.

No command line here (``maskdiffusion evaluate`` is :mod:`maskdiffusion.commands.evaluate`) and no
process starting (:mod:`maskdiffusion.distributed`): a process calls :func:`evaluate` on its shard.

The line: samples -> groups of images -> one ``segment_batch`` call per group -> a
prediction per image (class labels, or k-means cluster labels) -> nearest-resized to the
scoring size -> one confusion matrix per shard -> summed over shards -> metrics and report.

Why groups. The images a UNet batch holds can change its floating-point results in the
last bits, which may flip an argmax. Groups are fixed slices of the full sample list
(``batch_size`` consecutive images), shards take whole groups (``rank::world``), and a
checkpoint only ever records whole groups. So every image is segmented in the same batch
in an uninterrupted run, a resumed run and an N-process run: they agree exactly.

Unsupervised, dataset-level clustering takes two passes over the data: pass 1 pools a
fixed-seed sample of feature vectors from every image (saved in ``pool/``), one k-means is
fitted on the whole pool (``kmeans.npz``), and pass 2 labels every pixel with its nearest
centroid and counts clusters x classes; one Hungarian matching over the data set's counts
maps clusters to classes at the end. Keeping every image's feature map instead of
recomputing it would cost tens of GB on Cityscapes at SD scale; a second UNet pass is
cheaper than that disk. Per-image clustering needs one pass (k-means and matching per
image, an optimistic protocol: each image gets its own best assignment).
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from . import files
from .clustering import (
    DEFAULT_POOL_SIZE,
    cluster_scores,
    kmeans,
    labels_from_scores,
    per_image_clusters,
    sample_pixels,
    stable_seed,
)
from .datasets import Dataset, DatasetError
from .distributed import Comm
from .metrics import ConfusionMatrix, clusters_to_classes, hungarian_match, relabel, scores
from .presets import Preset
from .prompts import parse_classes
from .report import build_metrics, comparison_figure, write_report
from .runstate import (
    CENTROIDS_FILE,
    RunDirError,
    ShardState,
    prepare_run_dir,
    read_arrays,
    safe_name,
    state_path,
    write_arrays,
)
from .views import ImageInput, ImageLoadError, load_image

MODES = ("open-vocab", "unsupervised")
CLUSTERINGS = ("dataset", "per-image")
MAX_ASPECT_DIFFERENCE = 0.10
"""A label whose aspect ratio differs more than this from its image's is not scored: the sample fails."""
SIZE_WARNINGS = 3
"""Labels of another size than their image that are named on the console (per process); all are counted."""


# -- inputs --------------------------------------------------------------------------


def read_image(path: Path) -> ImageInput:
    """What ``segment_batch`` accepts for a data set's image file.

    Ordinary image files (PNG, JPEG, the ISPRS RGB ``.tif``) are passed as paths. STEGO's
    Potsdam ``.mat`` tiles hold ``img`` ``(H, W, 4)`` uint8 RGB + infrared: the RGB
    channels are returned as a ``(H, W, 3)`` uint8 array. Raises :class:`ImageLoadError`.
    """
    path = Path(path)
    if path.suffix.lower() != ".mat":
        return path
    from scipy.io import loadmat

    try:
        values = np.asarray(loadmat(path, variable_names=["img"]).get("img"))
    except Exception as error:  # scipy raises several types for damaged files
        raise ImageLoadError(f"cannot read image {str(path)!r}: {type(error).__name__}: {error}") from None
    if values.ndim != 3 or values.shape[2] < 3 or 0 in values.shape:
        raise ImageLoadError(
            f"image {str(path)!r} has no (H, W, 3 or 4) variable 'img' (got shape {values.shape}); "
            "STEGO's Potsdam tiles hold RGB + infrared in 'img'"
        )
    rgb = values[..., :3]
    if rgb.dtype != np.uint8:
        rgb = np.clip(rgb, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(rgb)


def eval_shape(shape: tuple[int, int], eval_size: int | None) -> tuple[int, int]:
    """Scoring size of a label of ``shape``: itself, or its short side resized to ``eval_size``."""
    if eval_size is None:
        return tuple(shape)
    scale = eval_size / min(shape)
    return max(1, round(shape[0] * scale)), max(1, round(shape[1] * scale))


def resize_nearest(array: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an ``(h, w)`` integer map (pixel centres), any dtype."""
    if array.shape == tuple(shape):
        return array
    rows = np.minimum(((np.arange(shape[0]) + 0.5) * array.shape[0] / shape[0]).astype(np.int64), array.shape[0] - 1)
    cols = np.minimum(((np.arange(shape[1]) + 0.5) * array.shape[1] / shape[1]).astype(np.int64), array.shape[1] - 1)
    return array[rows[:, None], cols[None, :]]


def label_size_problem(image_shape: tuple[int, int], label_shape: tuple[int, int], label: Path) -> str | None:
    """Why a label cannot be scored against a prediction made at its image's size, or None.

    The protocol: a prediction is made at the image's size and resized (nearest) to the
    label's. That is only meaningful when both have the same aspect ratio (up to
    :data:`MAX_ASPECT_DIFFERENCE`): otherwise the label belongs to another picture, or one
    of the two is rotated (an EXIF orientation tag, say).
    """
    (image_h, image_w), (label_h, label_w) = image_shape, label_shape
    difference = abs(math.log((image_w / image_h) / (label_w / label_h)))
    if difference <= math.log1p(MAX_ASPECT_DIFFERENCE):
        return None
    return (
        f"label {label} is {label_w}x{label_h} pixels but its image is {image_w}x{image_h}: their aspect ratios "
        f"differ by {math.expm1(difference):.0%} (more than {MAX_ASPECT_DIFFERENCE:.0%}), so the label does not fit "
        "the image (another picture's label, or one of them rotated, e.g. by an EXIF orientation tag); fix the "
        "pair or leave it out"
    )


# -- the run -------------------------------------------------------------------------


@dataclass
class _Item:
    """One image of a group after segmentation: its label and prediction, or why it failed."""

    index: int
    id: str
    label: np.ndarray | None = None
    result: Any = None
    error: str | None = None


class Evaluation:
    """One evaluation run (or one shard of it): see the module docstring for the flow.

    Build it with :func:`evaluate`; ``run()`` returns the metrics dict on every process.
    """

    def __init__(
        self,
        dataset: Dataset,
        segmenter,
        *,
        out_dir: Path,
        preset: Preset,
        mode: str,
        clusters: int | None,
        clustering: str,
        limit: int | None,
        save_every: int,
        eval_size: int | None,
        figures: int,
        progress: bool,
        comm: Comm,
        save_predictions: bool,
        pool_size: int,
        seed: int,
        on_images: Callable[[int], None] | None = None,
    ):
        self.dataset = dataset
        self.segmenter = segmenter
        self.out_dir = Path(out_dir)
        self.preset = preset
        self.mode = mode
        self.clustering = clustering if mode == "unsupervised" else None
        self.num_classes = dataset.num_classes
        self.clusters = (clusters or self.num_classes) if mode == "unsupervised" else None
        self.limit = limit
        self.save_every = save_every
        self.eval_size = eval_size
        self.figures = figures
        self.progress = progress
        self.comm = comm
        self.save_predictions = save_predictions
        self.pool_size = pool_size
        self.seed = seed
        self.samples = list(dataset.files[: limit if limit is not None else None])
        self.names = [c.name for c in parse_classes(list(dataset.classes))]
        self.group_size = segmenter.batch_size
        groups = [
            list(range(start, min(start + self.group_size, len(self.samples))))
            for start in range(0, len(self.samples), self.group_size)
        ]
        self.my_groups = groups[comm.rank :: comm.world_size]
        self.prompt_indices = self._prompt_indices()
        self.on_images = on_images
        self.handled = 0

    # -- settings ------------------------------------------------------------------

    def _prompt_indices(self) -> list[int]:
        """Classes whose words go into the prompt. On a data set with a background class (VOC,
        Context60, COCO-Object), a preset that finds background itself (background words or a
        score threshold) leaves that class out of the prompt: it gets every pixel the preset
        calls background."""
        background = self.dataset.background_index
        finds_background = self.preset.background_threshold is not None or bool(self.preset.background_words)
        if self.mode == "open-vocab" and finds_background and background is not None:
            return [i for i in range(self.num_classes) if i != background]
        return list(range(self.num_classes))

    def _background_rule(self) -> str | None:
        """How the data set's background class is predicted, for the run's settings."""
        if len(self.prompt_indices) == self.num_classes:
            return "class word" if self.dataset.background_index is not None else None
        rules = ["background words"] * bool(self.preset.background_words)
        rules += ["threshold"] * (self.preset.background_threshold is not None)
        return " + ".join(rules)

    def settings(self) -> dict[str, Any]:
        """Everything that decides the metrics; its fingerprint binds a RUN_DIR."""
        from . import __version__

        ids = "\n".join(s.id for s in self.samples)
        unsupervised = self.mode == "unsupervised"
        return {
            "dataset": self.dataset.name,
            "split": self.dataset.split,
            "root": str(Path(self.dataset.root).resolve()),
            "image_list": self.dataset.image_list,
            "classes": list(self.dataset.classes),
            "num_samples": len(self.samples),
            "samples_sha256": hashlib.sha256(ids.encode("utf-8")).hexdigest(),
            "limit": self.limit,
            "eval_size": self.eval_size if self.eval_size is not None else "original",
            "mode": self.mode,
            "clustering": self.clustering,
            "clusters": self.clusters,
            "pool_size": self.pool_size if self.clustering == "dataset" else None,
            "seed": self.seed if unsupervised else None,
            "background": self._background_rule(),
            "preset": self.preset.to_dict(),
            "model": self.segmenter.model_id,
            "family": self.segmenter.family.name,
            "encoder": self.segmenter.encoder_id,
            "noise": self.segmenter.noise_levels(self.preset),
            "dtype": str(self.segmenter.dtype).removeprefix("torch."),
            "images_per_batch": self.group_size,
            "version": __version__,
        }

    # -- per group -----------------------------------------------------------------

    def _segment(self, indices: Sequence[int], keep_features: bool) -> list[_Item]:
        """Labels and segmentations of the images ``indices`` (one ``segment_batch`` call)."""
        items = [_Item(index=i, id=self.samples[i].id) for i in indices]
        inputs, runnable = [], []
        for item in items:
            try:
                item.label = self.dataset.load(item.index).label
                inputs.append(read_image(self.samples[item.index].image_path))
                runnable.append(item)
            except (DatasetError, ImageLoadError) as error:
                item.error = str(error)
        if runnable:
            classes = [self.dataset.classes[i] for i in self.prompt_indices]
            results = self.segmenter.segment_batch(
                inputs, classes, preset=self.preset, errors="return", keep_features=keep_features
            )
            for item, result in zip(runnable, results, strict=True):
                if isinstance(result, ImageLoadError):
                    item.error = str(result)
                    continue
                label_path = self.samples[item.index].label_path
                item.error = label_size_problem(result.labels.shape, item.label.shape, label_path)
                item.result = None if item.error else result
        return items

    def _scoring_pair(self, item: _Item, prediction: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(prediction, ground truth) at the scoring size; a prediction made at the image's
        size is first brought to the label's size (nearest)."""
        label = item.label
        prediction = resize_nearest(prediction, label.shape)
        shape = eval_shape(label.shape, self.eval_size)
        return resize_nearest(prediction, shape), resize_nearest(label, shape)

    def _class_prediction(self, item: _Item) -> np.ndarray:
        labels = item.result.labels
        if len(self.prompt_indices) == self.num_classes:
            return labels
        table = np.asarray(self.prompt_indices, dtype=np.int64)
        return np.where(labels >= 0, table[np.clip(labels, 0, None)], self.dataset.background_index)

    def _image_size(self, item: _Item) -> tuple[int, int]:
        return item.result.labels.shape

    def _failed(self, state: ShardState, item: _Item) -> None:
        """Record (and report once) a sample that could not be read; the run goes on."""
        if item.id not in state.failed:
            from tqdm.auto import tqdm

            tqdm.write(f"warning: sample {item.id!r} skipped: {item.error}", file=sys.stderr)
        state.failed[item.id] = item.error

    def _note_resized(self, state: ShardState, item: _Item) -> None:
        """Record a label of another size (same aspect) than its image; name the first few."""
        image, label = self._image_size(item), item.label.shape
        if item.id not in state.resized and len(state.resized) < SIZE_WARNINGS:
            from tqdm.auto import tqdm

            more = " (further ones are only counted: resized_labels in metrics.json)" * (
                len(state.resized) == SIZE_WARNINGS - 1
            )
            tqdm.write(
                f"warning: sample {item.id!r}: its label is {label[1]}x{label[0]} pixels, its image "
                f"{image[1]}x{image[0]}; the prediction is resized (nearest) to the label's size to be scored{more}",
                file=sys.stderr,
            )
        state.resized[item.id] = [*image, *label]

    def _count(self, items: Sequence[_Item]) -> None:
        """Count the images handled by this process and tell ``on_images``."""
        self.handled += len(items)
        if self.on_images is not None:
            self.on_images(self.handled)

    def _save_prediction(self, index: int, sample_id: str, prediction: np.ndarray) -> None:
        """``predictions/<id>.png``: class (or raw cluster) index per pixel, 255 (65535) = none."""
        if not (self.save_predictions or index < self.figures):
            return
        values = max(self.num_classes, self.clusters or 0)
        if values < 255:
            array = np.where(prediction < 0, 255, prediction).astype(np.uint8)
        else:
            array = np.where(prediction < 0, 65535, prediction).astype(np.uint16)
        files.write_image(self.out_dir / "predictions" / f"{safe_name(sample_id)}.png", Image.fromarray(array))

    # -- passes ----------------------------------------------------------------------

    def _bar(self, total: int, initial: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(
            total=total,
            initial=initial,
            desc=desc,
            unit="image",
            disable=not (self.progress and self.comm.is_main),
            dynamic_ncols=True,
        )

    def _shard_ids(self) -> list[str]:
        return [self.samples[i].id for group in self.my_groups for i in group]

    def _pool_pass(self, state: ShardState, path: Path) -> None:
        """Pass 1 of dataset-level clustering: a fixed-seed sample of feature vectors per image."""
        per_image = max(1, math.ceil(self.pool_size / max(len(self.samples), 1)))
        pooled = set(state.pooled)
        total = len(self._shard_ids())
        positions: list[int] = []
        chunks: list[np.ndarray] = []
        pending: list[str] = []

        def checkpoint() -> None:
            if not pending:
                return
            if chunks:
                name = f"rank{self.comm.rank}-{len(state.pool_chunks):05d}.npz"
                counts = np.asarray([c.shape[0] for c in chunks], dtype=np.int64)
                write_arrays(
                    self.out_dir / "pool" / name,
                    positions=np.asarray(positions, dtype=np.int64),
                    counts=counts,
                    samples=np.concatenate(chunks),
                )
                state.pool_chunks.append(name)
            state.pooled.extend(pending)
            state.save(path)
            positions.clear()
            chunks.clear()
            pending.clear()

        with self._bar(total, len(pooled), "pass 1/2: pooling features") as bar:
            for group in self.my_groups:
                if all(self.samples[i].id in pooled for i in group):
                    continue
                items = self._segment(group, keep_features=True)
                for item in items:
                    if item.error is not None:
                        self._failed(state, item)
                    else:
                        picked = sample_pixels(item.result.features, per_image, stable_seed(self.seed, item.id))
                        positions.append(item.index)
                        chunks.append(picked.to(torch.float16).numpy())
                    pending.append(item.id)
                    bar.update(1)
                self._count(items)
                if len(pending) >= self.save_every:
                    checkpoint()
            checkpoint()

    def _load_pool(self, state: ShardState) -> list[tuple[int, np.ndarray]]:
        """This shard's pooled samples as (sample position, (n, D) float16) pairs."""
        out = []
        for name in state.pool_chunks:
            arrays = read_arrays(self.out_dir / "pool" / name)
            pieces = np.split(arrays["samples"], np.cumsum(arrays["counts"])[:-1])
            out += list(zip(arrays["positions"].tolist(), pieces, strict=True))
        return out

    def _centroids(self, state: ShardState, path: Path) -> torch.Tensor:
        """The data set's k-means centroids ``(K, D)``: loaded if fitted, else pooled and fitted."""
        centroid_file = self.out_dir / CENTROIDS_FILE
        fitted = self.comm.broadcast(centroid_file.is_file() if self.comm.is_main else None)
        if not fitted:
            self._pool_pass(state, path)
            parts = self.comm.gather(self._load_pool(state))
            centroids = None
            if self.comm.is_main:
                pool = sorted((pair for part in parts for pair in part), key=lambda pair: pair[0])
                if not pool:
                    raise RuntimeError("no image of the data set could be read, so there is nothing to cluster")
                points = torch.from_numpy(np.concatenate([samples for _, samples in pool])).float()
                centroids = kmeans(points.to(self.segmenter.device), self.clusters, seed=self.seed).cpu().numpy()
                write_arrays(centroid_file, centroids=centroids, num_points=np.asarray(points.shape[0]))
            return torch.from_numpy(self.comm.broadcast(centroids))
        centroids = read_arrays(centroid_file)["centroids"] if self.comm.is_main else None
        return torch.from_numpy(self.comm.broadcast(centroids))

    def _score_pass(self, state: ShardState, path: Path, centroids: torch.Tensor | None) -> None:
        """Predict every image of the shard and add it to the shard's confusion counts."""
        done = set(state.done)
        total = len(self._shard_ids())
        since_save = 0
        desc = "pass 2/2: scoring" if self.clustering == "dataset" else "scoring"
        with self._bar(total, len(done), desc) as bar:
            for group in self.my_groups:
                todo = [i for i in group if self.samples[i].id not in done]
                if not todo:
                    continue
                runnable = [i for i in todo if self.samples[i].id not in state.failed]
                items = self._segment(runnable, keep_features=self.mode == "unsupervised")
                for item in items:
                    if item.error is not None:
                        self._failed(state, item)
                    else:
                        self._score(item, state, centroids)
                    bar.update(1)
                bar.update(len(todo) - len(items))  # failed in pass 1
                state.done.extend(self.samples[i].id for i in todo)
                done.update(self.samples[i].id for i in todo)
                since_save += len(todo)
                self._count(items)
                if since_save >= self.save_every:
                    state.save(path)
                    since_save = 0
                bar.set_postfix_str(self._running(state.matrix))
            state.save(path)

    def _score(self, item: _Item, state: ShardState, centroids: torch.Tensor | None) -> None:
        """One image's prediction into the shard's counts (and onto disk if kept)."""
        size = self._image_size(item)
        if size != item.label.shape:
            self._note_resized(state, item)
        if self.mode == "open-vocab":
            prediction, truth = self._scoring_pair(item, self._class_prediction(item))
            state.matrix.update(prediction, truth)
        elif self.clustering == "dataset":
            labels = labels_from_scores(cluster_scores(item.result.features, centroids), size)
            prediction, truth = self._scoring_pair(item, labels)
            state.matrix.update(prediction, truth)
        else:
            labels = per_image_clusters(
                item.result.features,
                self.clusters,
                size,
                seed=stable_seed(self.seed, item.id),
                device=self.segmenter.device,
            )
            clustered, truth = self._scoring_pair(item, labels)
            counts = ConfusionMatrix(self.num_classes, self.clusters)
            counts.update(clustered, truth)
            matching = hungarian_match(counts)
            state.matrix = state.matrix + clusters_to_classes(counts, matching)
            prediction = relabel(clustered, matching)
        self._save_prediction(item.index, item.id, prediction)

    def _class_matrix(self, matrix: ConfusionMatrix) -> tuple[ConfusionMatrix, np.ndarray | None]:
        """Class-space counts (dataset clustering: after one Hungarian matching) and the matching."""
        if self.clustering != "dataset":
            return matrix, None
        matching = hungarian_match(matrix)
        return clusters_to_classes(matrix, matching), matching

    def _running(self, matrix: ConfusionMatrix) -> str:
        if matrix.num_pixels == 0:
            return "mIoU n/a"
        value = scores(self._class_matrix(matrix)[0], self.names)["mIoU"]
        return "mIoU n/a" if value is None else f"mIoU {value:.2f}"

    # -- the whole run ----------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        started = time.perf_counter()
        settings = self.settings()
        refusal = None
        if self.comm.is_main:  # one process checks the folder; all of them stop if it is refused
            try:
                prepare_run_dir(self.out_dir, settings, self.comm.world_size)
            except RunDirError as error:
                refusal = str(error)
        refusal = self.comm.broadcast(refusal)
        if refusal is not None:
            raise RunDirError(refusal)
        path = state_path(self.out_dir, self.comm.rank, self.comm.world_size)
        columns = self.clusters if self.clustering == "dataset" else self.num_classes
        state = ShardState.load(path, ConfusionMatrix(self.num_classes, columns))
        resumed = bool(state.done or state.pooled)

        centroids = self._centroids(state, path) if self.clustering == "dataset" else None
        self._score_pass(state, path, centroids)

        total = ConfusionMatrix.from_array(self.comm.sum(state.matrix.to_array()))
        failed: dict[str, str] = {}
        for part in self.comm.all_gather(state.failed):
            failed.update(part)
        resized: dict[str, list[int]] = {}
        for part in self.comm.all_gather(state.resized):
            resized.update(part)
        done = sum(self.comm.all_gather(len(state.done)))
        if done != len(self.samples):
            raise RuntimeError(
                f"shards scored {done} samples, expected {len(self.samples)}: the run folder is inconsistent"
            )
        matrix, matching = self._class_matrix(total)
        runtime = {
            "device": str(self.segmenter.device),
            "world_size": self.comm.world_size,
            "resumed": resumed,
            "seconds_this_session": round(time.perf_counter() - started, 3),
        }
        metrics = build_metrics(
            matrix,
            self.names,
            mode=self.mode,
            clustering=self.clustering,
            num_images=len(self.samples) - len(failed),
            failed=failed,
            resized=resized,
            settings=settings,
            cluster_matrix=total if matching is not None else None,
            cluster_to_class=matching,
            runtime=runtime,
        )
        if self.comm.is_main:
            figures = self._figures(failed, matching)
            files.write_json(self.out_dir / "metrics.json", metrics)
            write_report(self.out_dir, metrics, figures)
        self.comm.barrier()
        return metrics

    def _figures(self, failed: dict[str, str], matching: np.ndarray | None) -> list[str]:
        """image | ground truth | prediction for the first ``figures`` samples; relative paths."""
        written = []
        for index, sample in enumerate(self.samples[: self.figures]):
            stored = self.out_dir / "predictions" / f"{safe_name(sample.id)}.png"
            if sample.id in failed or not stored.is_file():
                continue
            with Image.open(stored) as picture:
                raw = np.asarray(picture)
            none = 255 if raw.dtype == np.uint8 else 65535
            prediction = np.where(raw == none, -1, raw.astype(np.int64))
            if matching is not None:
                prediction = relabel(prediction, matching)
            label = self.dataset.load(index).label
            truth = resize_nearest(label, eval_shape(label.shape, self.eval_size))
            image = load_image(read_image(sample.image_path))
            name = f"figures/{safe_name(sample.id)}.png"
            files.write_image(self.out_dir / name, comparison_figure(image, truth, prediction, self.names))
            written.append(name)
        return written


def evaluate(
    dataset: Dataset,
    segmenter,
    *,
    out_dir: str | os.PathLike,
    preset: str | Preset | None = None,
    mode: str = "open-vocab",
    clusters: int | None = None,
    clustering: str = "dataset",
    limit: int | None = None,
    save_every: int = 20,
    eval_size: int | None = None,
    figures: int = 4,
    progress: bool = True,
    rank: int | None = None,
    world_size: int | None = None,
    save_predictions: bool = False,
    pool_size: int = DEFAULT_POOL_SIZE,
    seed: int = 0,
    on_images: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Evaluate ``segmenter`` on ``dataset`` and write the results into ``out_dir``.

    Arguments:
        dataset: from :func:`maskdiffusion.datasets.build_dataset`.
        segmenter: a :class:`maskdiffusion.MaskDiffusion`; its ``batch_size`` is also the
            number of images per ``segment_batch`` call.
        out_dir: RUN_DIR; a folder holding the same run is resumed, one holding another
            run is refused (:class:`RunDirError`).
        preset: name or :class:`Preset` (default: the segmenter's).
        mode: ``"open-vocab"`` (class words as prompts) or ``"unsupervised"`` (k-means).
        clusters: K for unsupervised mode (default: the number of classes).
        clustering: ``"dataset"`` (one k-means and one matching for the data set) or
            ``"per-image"`` (k-means and matching per image; optimistic).
        limit: score only the first ``limit`` samples (sorted by id).
        save_every: checkpoint after at least this many images (rounded up to groups).
        eval_size: score at this short side (labels and predictions resized nearest);
            None = the label files' own size.
        figures: side-by-side figures for the first this many samples.
        progress: tqdm bar (rank 0 only) with the running mIoU.
        rank, world_size: this shard; default from torch.distributed if initialised, else 0 of 1.
        save_predictions: keep every prediction in ``predictions/`` (else only the figures').
        pool_size: feature samples pooled over the data set for dataset-level k-means.
        seed: seed of the pixel sampling and of k-means.
        on_images: called with the number of images this process has handled so far, after each
            group is scored (before its checkpoint): progress for a caller, or a place to stop the run.

    Returns:
        The metrics dict also written to ``out_dir/metrics.json`` (same on every rank).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if clustering not in CLUSTERINGS:
        raise ValueError(f"clustering must be one of {CLUSTERINGS}, got {clustering!r}")
    if clusters is not None and (clusters < 1 or mode != "unsupervised"):
        raise ValueError(
            f"clusters (K of k-means) must be >= 1 and needs mode='unsupervised', got {clusters} in {mode!r}"
        )
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if save_every < 1:
        raise ValueError(f"save_every must be >= 1, got {save_every}")
    if eval_size is not None and eval_size < 1:
        raise ValueError(f"eval_size must be a positive short side or None, got {eval_size}")
    if figures < 0 or pool_size < 1:
        raise ValueError(f"figures must be >= 0 and pool_size >= 1, got {figures} and {pool_size}")
    _, chosen = segmenter.check_inputs(list(dataset.classes), preset)
    job = Evaluation(
        dataset,
        segmenter,
        out_dir=Path(out_dir),
        preset=chosen,
        mode=mode,
        clusters=clusters,
        clustering=clustering,
        limit=limit,
        save_every=save_every,
        eval_size=eval_size,
        figures=figures,
        progress=progress,
        comm=Comm.current(rank, world_size),
        save_predictions=save_predictions,
        pool_size=pool_size,
        seed=seed,
        on_images=on_images,
    )
    return job.run()
