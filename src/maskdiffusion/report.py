"""What an evaluation writes for people: metrics.json, report.md, a bar chart, figures.

Everything here is rendering: the numbers come in as a finished confusion matrix and
leave as files (written atomically). matplotlib is used through its object API with the
Agg canvas, so no global backend is switched and no display is needed.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from . import files, visualize
from .metrics import ConfusionMatrix, scores

CHART_FILE = "per_class_iou.png"
FIGURE_HEIGHT = (160, 320)  # display height range of a figure panel, in pixels

PROTOCOLS = {
    ("open-vocab", None): "open-vocabulary: class words as prompts, dataset-level confusion matrix",
    ("unsupervised", "dataset"): (
        "unsupervised, dataset-level: one k-means fitted on features pooled over the data set, "
        "one Hungarian matching of clusters to classes over the data set's confusion matrix"
    ),
    ("unsupervised", "per-image"): (
        "unsupervised, per-image (optimistic): k-means and Hungarian matching per image, "
        "so every image gets its own best cluster-to-class assignment"
    ),
}


def protocol_id(mode: str, clustering: str | None) -> str:
    """Short protocol name for metrics.json: ``open-vocab``, ``unsupervised/dataset``, ``unsupervised/per-image``."""
    return mode if mode == "open-vocab" else f"{mode}/{clustering}"


def build_metrics(
    matrix: ConfusionMatrix,
    names: Sequence[str],
    *,
    mode: str,
    clustering: str | None,
    num_images: int,
    failed: dict[str, str],
    settings: dict[str, Any],
    resized: dict[str, list[int]] | None = None,
    cluster_matrix: ConfusionMatrix | None = None,
    cluster_to_class: np.ndarray | None = None,
    runtime: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The content of metrics.json (percentages; counts as int lists, rows = ground truth)."""
    result = scores(matrix, names)
    metrics: dict[str, Any] = {
        "mIoU": result["mIoU"],
        "pixel_accuracy": result["pixel_accuracy"],
        "per_class_iou": result["per_class_iou"],
        "num_classes_present": result["num_classes_present"],
        "num_pixels": result["num_pixels"],
        "num_samples": num_images + len(failed),
        "num_images": num_images,
        "num_failed": len(failed),
        "failed": [{"id": key, "reason": failed[key]} for key in sorted(failed)],
        "num_resized_labels": len(resized or {}),
        "resized_labels": [
            {"id": key, "image_size": sizes[:2], "label_size": sizes[2:]}
            for key, sizes in sorted((resized or {}).items())
        ],
        "class_names": list(names),
        "confusion_matrix": matrix.counts.tolist(),
        "unassigned_pixels": matrix.unassigned.tolist(),
        "protocol": protocol_id(mode, clustering),
        "protocol_description": PROTOCOLS[(mode, clustering if mode == "unsupervised" else None)],
    }
    if cluster_matrix is not None:
        metrics["cluster_confusion_matrix"] = cluster_matrix.counts.tolist()
        metrics["cluster_to_class"] = np.asarray(cluster_to_class).tolist()
    metrics.update(
        {
            "dataset": settings["dataset"],
            "split": settings["split"],
            "root": settings["root"],
            "image_list": settings.get("image_list"),
            "mode": settings["mode"],
            "clustering": settings["clustering"],
            "clusters": settings["clusters"],
            "eval_size": settings["eval_size"],
            "limit": settings["limit"],
            "preset": settings["preset"],
            "model": settings["model"],
            "version": settings["version"],
            "settings": settings,
            "runtime": runtime or {},
        }
    )
    return metrics


def bar_chart(
    per_class_iou: dict[str, float | None], miou: float | None, colours: np.ndarray | None = None
) -> bytes | None:
    """PNG bytes of a horizontal bar chart of per-class IoU; None if matplotlib is missing.

    ``colours``: ``(C, 3)`` uint8 bar colours (default: :func:`visualize.palette`).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    names = list(per_class_iou)
    values = [per_class_iou[n] if per_class_iou[n] is not None else 0.0 for n in names]
    figure = Figure(figsize=(7, max(2.5, 0.24 * len(names) + 1.2)), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    colours = (visualize.palette(len(names)) if colours is None else np.asarray(colours)) / 255.0
    positions = np.arange(len(names))
    axes.barh(positions, values, color=colours, edgecolor="black", linewidth=0.4)
    axes.set_yticks(positions, [n if per_class_iou[n] is not None else f"{n} (absent)" for n in names])
    axes.invert_yaxis()
    axes.set_xlim(0, 100)
    axes.set_xlabel("IoU (%)")
    if miou is not None:
        axes.axvline(miou, color="black", linestyle="--", linewidth=1)
        axes.set_title(f"per-class IoU (mIoU {miou:.2f}%)")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def report_markdown(metrics: dict[str, Any], *, chart: str | None, figures: Sequence[str]) -> str:
    """report.md: headline numbers, settings, notes and targets (if any), the per-class table, chart,
    failures, figures."""
    counts = np.asarray(metrics["confusion_matrix"], dtype=np.int64).reshape(len(metrics["class_names"]), -1)
    in_truth = counts.sum(axis=1) + np.asarray(metrics["unassigned_pixels"], dtype=np.int64)
    in_prediction = counts.sum(axis=0)
    settings = metrics["settings"]
    size = metrics["eval_size"]
    scored_at = "label resolution" if size == "original" else f"labels resized to short side {size}"
    lines = [
        f"# Evaluation: {metrics['dataset']} ({metrics['split']})",
        "",
        f"- **mIoU: {_percent(metrics['mIoU'])}%**, pixel accuracy {_percent(metrics['pixel_accuracy'])}%",
        f"- images scored: {metrics['num_images']}, failed: {metrics['num_failed']}, "
        f"classes present: {metrics['num_classes_present']} of {len(metrics['class_names'])}",
        f"- protocol: `{metrics['protocol']}`: {metrics['protocol_description']}",
        f"- model: `{metrics['model']}`, preset: size {settings['preset']['size']}, "
        f"timestep {settings['preset']['timestep']}, attention {settings['preset']['attention_mode']}",
        f"- scored at: {scored_at}, limit: {metrics['limit'] or 'none'}, maskdiffusion {metrics['version']}",
    ]
    if metrics.get("image_list"):
        lines.append(f"- image list: `{metrics['image_list']}`")
    if metrics.get("num_resized_labels"):
        lines.append(
            f"- **{metrics['num_resized_labels']} image(s) scored on a label of another size** (same aspect ratio): "
            "their predictions were resized (nearest) to the label's size; listed in metrics.json `resized_labels`"
        )
    lines += [f"- **{note}**" for note in metrics.get("notes", [])]
    if metrics.get("targets"):
        lines += ["", "## Targets", "", "| target | value (%) | to reach (%) | met |", "|---|---:|---:|---|"]
        for target in metrics["targets"]:
            met = {True: "yes", False: "**no**", None: "not measured"}[target["met"]]
            lines.append(f"| `{target['target']}` | {_percent(target['value'])} | {_percent(target['bar'])} | {met} |")
    lines += [
        "",
        "## Per-class IoU",
        "",
        "| # | class | IoU (%) | ground-truth pixels | predicted pixels |",
        "|---:|---|---:|---:|---:|",
    ]
    for index, name in enumerate(metrics["class_names"]):
        iou = _percent(metrics["per_class_iou"][name])
        lines.append(f"| {index} | {name} | {iou} | {int(in_truth[index])} | {int(in_prediction[index])} |")
    lines.append("")
    lines.append(
        "IoU is n/a for a class absent from both ground truth and prediction; such classes are left out of the mean."
    )
    if chart:
        lines += ["", f"![per-class IoU]({chart})"]
    if "variants" in metrics:
        lines += ["", "## Variants (same images, same class list)", ""]
        lines += ["| variant | mIoU (%) | pixel accuracy (%) | what |", "|---|---:|---:|---|"]
        for name, variant in metrics["variants"].items():
            lines.append(
                f"| {name} | {_percent(variant['mIoU'])} | {_percent(variant['pixel_accuracy'])} "
                f"| {variant['description']} |"
            )
        variants = list(metrics["variants"])
        lines += ["", "| class | " + " | ".join(variants) + " |", "|---|" + "---:|" * len(variants)]
        for name in metrics["class_names"]:
            row = [_percent(metrics["variants"][v]["per_class_iou"][name]) for v in variants]
            lines.append(f"| {name} | " + " | ".join(row) + " |")
    if "cluster_to_class" in metrics:
        lines += ["", "## Cluster -> class (one Hungarian matching over the data set)", ""]
        for cluster, target in enumerate(metrics["cluster_to_class"]):
            name = metrics["class_names"][target] if target >= 0 else "(unmatched: its pixels count as misses)"
            lines.append(f"- cluster {cluster} -> {name}")
    if metrics["failed"]:
        lines += ["", "## Failed samples", ""]
        lines += [f"- `{item['id']}`: {item['reason']}" for item in metrics["failed"]]
    if figures:
        lines += ["", "## Examples", ""]
        lines += [f"![{Path(f).stem}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


def write_report(
    out_dir: Path, metrics: dict[str, Any], figures: Sequence[str], colours: np.ndarray | None = None
) -> Path:
    """Write ``per_class_iou.png`` (when matplotlib is installed; bars in ``colours``) and ``report.md``."""
    chart = bar_chart(metrics["per_class_iou"], metrics["mIoU"], colours)
    if chart is not None:
        files.write_bytes(out_dir / CHART_FILE, chart)
    text = report_markdown(metrics, chart=CHART_FILE if chart is not None else None, figures=figures)
    if chart is None:
        text += "\n(bar chart skipped: install matplotlib, e.g. `pip install maskdiffusion[eval]`)\n"
    return files.write_text(out_dir / "report.md", text)


def _fit(picture: Image.Image, resample: Image.Resampling) -> Image.Image:
    """Scale a panel into the display height range, keeping its aspect ratio."""
    height = min(max(picture.height, FIGURE_HEIGHT[0]), FIGURE_HEIGHT[1])
    if height == picture.height:
        return picture
    width = max(1, round(picture.width * height / picture.height))
    return picture.resize((width, height), resample)


def comparison_figure(
    image: Image.Image, ground_truth: np.ndarray, prediction: np.ndarray, names: Sequence[str]
) -> Image.Image:
    """image | ground truth | prediction | legend, one row.

    Arguments:
        image: RGB, resized to the label's size here.
        ground_truth: ``(h, w)`` uint8 class indices, 255 = ignore (drawn black).
        prediction: ``(h, w)`` int class indices, negative = no class (drawn black).
        names: class names.
    """
    height, width = ground_truth.shape
    colours = visualize.palette(len(names))
    truth = np.where(ground_truth == 255, -1, ground_truth.astype(np.int64))
    panels = [
        _fit(image.convert("RGB").resize((width, height), Image.Resampling.BILINEAR), Image.Resampling.BILINEAR),
        _fit(Image.fromarray(visualize.colorize(truth, colours)), Image.Resampling.NEAREST),
        _fit(Image.fromarray(visualize.colorize(prediction, colours)), Image.Resampling.NEAREST),
    ]
    present = sorted({int(c) for c in np.unique(truth) if c >= 0} | {int(c) for c in np.unique(prediction) if c >= 0})
    key = visualize.legend([names[c] for c in present], colours[present], height=panels[0].height)
    return visualize.side_by_side([*panels, key], ["image", "ground truth", "prediction", ""])
