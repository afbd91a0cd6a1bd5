"""Benchmark suites: the field's table of data sets, run as one resumable job, written as one table.

``ovss`` is the training-free open-vocabulary segmentation table of SCLIP, NACLIP, ClearCLIP,
ProxyCLIP and Trident: eight data sets in the field's column order, mIoU each and their
average. Every (preset, data set) cell is an ordinary evaluation RUN_DIR
(``OUT/<preset>/<data set>/``), so an interrupted suite resumes where it stopped and a finished
cell is read back, not recomputed. The protocol (view size, windows, background handling, image
lists) is written beside the numbers.

Background on VOC21, Context60 and COCO-Object is "none of the other classes", not a thing a
model can look for by name. The field prompts a handful of background words instead (SCLIP's
list below) and merges what they win into the background class; so do we, through
``Preset.background_words``. No confidence threshold by default: published thresholds are set
on CLIP logits, whose scale our scores do not share, and we have no held-out split of these
data sets here to choose one honestly (``--background-threshold`` sets one).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import files
from .datasets import Dataset, DatasetError, build_dataset
from .evaluation import evaluate
from .presets import Preset
from .prompts import background_classes, parse_classes

SCLIP_BACKGROUND_WORDS = (
    "sky", "wall", "tree", "wood", "grass", "road", "sea", "river", "mountain", "sands", "desk", "bed",
    "building", "cloud", "lamp", "door", "window", "wardrobe", "ceiling", "shelf", "curtain", "stair",
    "floor", "hill", "rail", "fence",
)  # fmt: skip
"""The background words of SCLIP's VOC21 / Context60 / COCO-Object class files (Wang et al., ECCV 2024)."""

BACKGROUND_SOURCE = (
    "background words of SCLIP (Wang et al., ECCV 2024), used the same way by NACLIP, ClearCLIP and ProxyCLIP; "
    "words that name one of the data set's classes are left out (they are classes)"
)


@dataclass(frozen=True)
class Column:
    """One column of a suite's table: a registered data set and how it is scored.

    ``background_words``: the preset's background words on this data set (only where the data
    set has a background class); ``download``: where the data comes from (official sources).
    """

    title: str
    dataset: str
    download: str
    background_words: tuple[str, ...] = ()


OVSS = (
    Column(
        "VOC21",
        "voc21",
        "PASCAL VOC 2012 trainval, http://host.robots.ox.ac.uk/pascal/VOC/voc2012/ (VOCtrainval_11-May-2012.tar)",
        SCLIP_BACKGROUND_WORDS,
    ),
    Column(
        "Context60",
        "context60",
        "VOC 2010 images, http://host.robots.ox.ac.uk/pascal/VOC/voc2010/ (VOCtrainval_03-May-2010.tar), and the "
        "PASCAL-Context labels, https://cs.stanford.edu/~roozbeh/pascal-context/ (trainval_merged.json), converted "
        "to SegmentationClassContext PNGs by mmsegmentation's tools/dataset_converters/pascal_context.py",
        SCLIP_BACKGROUND_WORDS,
    ),
    Column(
        "COCO-Object",
        "coco-object",
        "COCO 2017 val images, http://images.cocodataset.org/zips/val2017.zip, and the COCO-Stuff stuff-thing "
        "maps, https://github.com/nightrome/cocostuff (stuffthingmaps_trainval2017.zip)",
        SCLIP_BACKGROUND_WORDS,
    ),
    Column("VOC20", "voc20", "as VOC21"),
    Column("Context59", "context59", "as Context60"),
    Column("COCO-Stuff", "cocostuff171", "as COCO-Object"),
    Column(
        "Cityscapes",
        "cityscapes19",
        "https://www.cityscapes-dataset.com/ (leftImg8bit_trainvaltest.zip, gtFine_trainvaltest.zip)",
    ),
    Column("ADE", "ade20k", "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip"),
)
"""The training-free open-vocabulary table, in the field's column order (NACLIP's Table 1)."""

SUITES = {"ovss": OVSS}
ROWS = ("default", "reference", "attention-only")
"""Presets run as rows: ours, the MaskDiffusion paper's head, and attention alone (an ablation)."""


def find_columns(columns: tuple[Column, ...], root: str | Path) -> tuple[list[tuple[Column, Dataset]], dict[str, str]]:
    """The columns whose data set is under ``root`` with that data set, and why each other one is not
    (its error's first line)."""
    present, missing = [], {}
    for column in columns:
        try:
            present.append((column, build_dataset(column.dataset, root)))
        except DatasetError as error:
            missing[column.dataset] = str(error).splitlines()[0]
    return present, missing


def column_preset(preset: Preset, column: Column, has_background: bool) -> Preset:
    """``preset`` on ``column``: background words only where the data set has a background class
    (the preset's own words if it has some, else the column's)."""
    if not has_background:
        return preset.replace(background_words=())
    return preset if preset.background_words else preset.replace(background_words=column.background_words)


def run_suite(
    segmenter,
    *,
    suite: str,
    root: str | Path,
    out_dir: str | Path,
    presets: dict[str, Preset],
    limit: int | None = None,
    figures: int = 4,
    progress: bool = True,
    log: Callable[[str], object] = print,
) -> dict[str, Any]:
    """Evaluate ``segmenter`` with each of ``presets`` on every data set of ``suite`` found under ``root``.

    Writes ``OUT/<preset>/<data set>/`` run dirs, then ``results.json`` and ``results.md``.
    Returns the results dict. Raises ``DatasetError`` when none of the data sets is there.
    """
    columns = SUITES[suite]
    present, missing = find_columns(columns, root)
    if not present:
        raise DatasetError(
            f"none of the {suite} data sets is under {str(root)!r}: "
            + "; ".join(f"{name}: {why}" for name, why in missing.items())
        )
    for name in missing:
        log(f"{suite}: {name} is not under {root}; its column stays empty")
    out = Path(out_dir)
    rows = []
    protocol: dict[str, Any] = {}
    for name, preset in presets.items():
        scores = {}
        for column, dataset in present:
            chosen = column_preset(preset, column, dataset.background_index is not None)
            log(f"{suite}: {name} on {column.dataset} ({len(dataset)} images) -> {out / name / column.dataset}")
            metrics = evaluate(
                dataset,
                segmenter,
                out_dir=out / name / column.dataset,
                preset=chosen,
                limit=limit,
                figures=figures,
                progress=progress,
            )
            scores[column.dataset] = metrics["mIoU"]
            protocol.setdefault(column.dataset, _protocol(metrics, chosen, dataset))
        rows.append({"preset": name, "mIoU": scores, "average": _average(scores.values())})
    results = {
        "suite": suite,
        "model": segmenter.model_id,
        "columns": [{"title": c.title, "dataset": c.dataset} for c in columns],
        "rows": rows,
        "missing": missing,
        "complete": not missing,
        "limit": limit,
        "protocol": protocol,
        "background_words_source": BACKGROUND_SOURCE,
    }
    files.write_json(out / "results.json", results)
    files.write_text(out / "results.md", results_markdown(results))
    return results


def _average(values) -> float | None:
    numbers = [v for v in values if v is not None and math.isfinite(v)]
    return sum(numbers) / len(numbers) if numbers else None


def _protocol(metrics: dict[str, Any], preset: Preset, dataset: Dataset) -> dict[str, Any]:
    """What decides a column's numbers besides the model: written beside them."""
    settings = metrics["settings"]
    return {
        "split": dataset.split,
        "image_list": dataset.image_list or f"the {dataset.split} split's list ({len(dataset)} images)",
        "num_images": metrics["num_images"],
        "view_size": preset.size,
        "window_overlap": preset.window_overlap,
        "eval_size": settings["eval_size"],
        "background": settings["background"],
        "background_words": [
            c.name for c in background_classes(parse_classes(list(dataset.classes)), preset.background_words)
        ],
        "background_threshold": preset.background_threshold,
    }


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def results_markdown(results: dict[str, Any]) -> str:
    """The table (one row per preset, the field's columns and their average) and the protocol."""
    columns = results["columns"]
    present = [c for c in columns if c["dataset"] not in results["missing"]]
    average = "Avg" if results["complete"] else f"Avg of {len(present)}"
    lines = [
        f"# {results['suite']} benchmark: {results['model']}",
        "",
        "mIoU (%) per data set, as in the training-free open-vocabulary table of SCLIP / NACLIP / ProxyCLIP. "
        + ("" if results["complete"] else f"'-' = data set not found; {average} averages the columns present. ")
        + (f"Only the first {results['limit']} images of each data set (--limit). " if results["limit"] else ""),
        "",
        "| preset | " + " | ".join(c["title"] for c in columns) + f" | {average} |",
        "|---" * (len(columns) + 2) + "|",
    ]
    for row in results["rows"]:
        cells = [_cell(row["mIoU"].get(c["dataset"])) for c in columns]
        lines.append(f"| {row['preset']} | " + " | ".join(cells) + f" | {_cell(row['average'])} |")
    lines += ["", "## Protocol", ""]
    lines += [
        "| data set | images | view size | window overlap | scored at | background |",
        "|---|---|---|---|---|---|",
    ]
    for name, used in results["protocol"].items():
        background = used["background"] or "no background class"
        if used["background_words"]:
            background += f" ({len(used['background_words'])} words: {', '.join(used['background_words'])})"
        if used["background_threshold"] is not None:
            background += f", threshold {used['background_threshold']:g}"
        scored = "label resolution" if used["eval_size"] == "original" else f"short side {used['eval_size']}"
        lines.append(
            f"| {name} | {used['num_images']} ({used['image_list']}) | {used['view_size']} | "
            f"{used['window_overlap']:g} | {scored} | {background} |"
        )
    lines += ["", f"Background words: {results['background_words_source']}."]
    if results["missing"]:
        lines += ["", "Not found:", ""] + [f"- {name}: {why}" for name, why in results["missing"].items()]
    return "\n".join(lines) + "\n"
