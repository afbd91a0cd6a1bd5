"""Images per second of ``maskdiffusion segment`` on a folder, 1 and 2 processes in the same run, and the
listing and writing overhead per image as a ratio to the model's own time.

A folder of ``--images`` held-out toy-world scenes (``held_out_scenes``, stream 0) in a 3-level tree
is segmented by the bundled ``toy`` model (real weights, its ``default`` preset, the world's 8
classes) through the command line, once with one process and once with ``--num-processes 2``
(each worker gets half the torch threads), fresh output folders, png format. Then, in this process,
one pass through the same images measures where a worker's time goes: listing the tree
(``inputs.list_inputs``), the model (``segment_batch`` per group of the batch size), and writing
the outputs (``Export.write``: labels PNG, overlay PNG, JSON). The overhead ratio is (listing +
writing) / model.

    python benchmarks/segment_folder.py [--images 2000] [--out benchmarks/results]

Writes ``benchmarks/results/segment-folder-cpu.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from maskdiffusion import MaskDiffusion
from maskdiffusion.exports import EXPORTS
from maskdiffusion.inputs import Input, list_inputs
from maskdiffusion.precision import cpu_isa, cpu_model
from maskdiffusion.prompts import parse_classes
from maskdiffusion.toyworld.gate import held_out_scenes
from maskdiffusion.toyworld.world import CLASS_NAMES


def build_folder(root: Path, count: int) -> Path:
    """``count`` toy-world scenes as ``root/sceneK/partJ/NNNN.png`` (3 levels)."""
    for index, scene in enumerate(held_out_scenes(count, stream=0)):
        folder = root / f"scene{index % 4}" / f"part{index % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(scene.image).save(folder / f"{index:05d}.png")
    return root


def command_seconds(folder: Path, out: Path, processes: int) -> float:
    """Wall seconds of one ``maskdiffusion segment`` run (a fresh process, model loading included)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "maskdiffusion", "segment", str(folder), "--model", "toy", "--device", "cpu",
               "--classes", ", ".join(CLASS_NAMES), "--out", str(out), "--quiet",
               "--num-processes", str(processes)]  # fmt: skip
    began = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - began
    if done.returncode != 0:
        raise RuntimeError(f"segment failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return seconds


def load_seconds() -> float:
    """Wall seconds of a fresh process that only imports maskdiffusion and loads the toy model."""
    code = "from maskdiffusion import MaskDiffusion; MaskDiffusion.from_pretrained('toy', device='cpu')"
    began = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=True)
    return time.perf_counter() - began


def split_seconds(folder: Path, out: Path) -> dict[str, float]:
    """One worker's time per step over the whole folder, in this process."""
    seg = MaskDiffusion.from_pretrained("toy", device="cpu", cache_size=0)
    vocabulary = parse_classes(list(CLASS_NAMES))
    began = time.perf_counter()
    items = [item for item in list_inputs([str(folder)]) if isinstance(item, Input)]
    listing = time.perf_counter() - began
    export = EXPORTS["png"](out, vocabulary)
    model = writing = 0.0
    for start in range(0, len(items), seg.batch_size):
        group = items[start : start + seg.batch_size]
        began = time.perf_counter()
        results = seg.segment_batch([item.path for item in group], vocabulary)
        model += time.perf_counter() - began
        began = time.perf_counter()
        for item, result in zip(group, results, strict=True):
            export.write(item.name, result, item.path)
        writing += time.perf_counter() - began
    return {"images": len(items), "listing": listing, "model": model, "writing": writing}


def report(count: int, single: float, double: float, load: float, split: dict[str, float]) -> str:
    isa = ", ".join(name for name, present in cpu_isa().items() if present) or "none of avx2/avx512/amx"
    images = split["images"]
    overhead = (split["listing"] + split["writing"]) / split["model"]
    per = {key: 1000 * split[key] / images for key in ("listing", "model", "writing")}
    lines = [
        "# `maskdiffusion segment` on a folder: images per second, 1 and 2 processes",
        "",
        f"CPU: {cpu_model()} ({os.cpu_count()} cores; ISA: {isa}). Python {platform.python_version()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} torch threads in this process.",
        "",
        f"{count} held-out toy-world scenes (64x64, stream 0) in a 3-level tree, the bundled `toy` model with its "
        "`default` preset and the world's 8 classes, png outputs, fresh `--out` each time; wall time of the whole "
        "command (a fresh process: Python, imports and model loading included). A fresh process that only loads "
        f"the model takes {load:.1f} s, shown apart.",
        "",
        "| processes | wall s | images/s (whole command) | images/s (less one model load) |",
        "|---|---|---|---|",
        f"| 1 | {single:.1f} | {count / single:.2f} | {count / max(single - load, 1e-9):.2f} |",
        f"| 2 | {double:.1f} | {count / double:.2f} | {count / max(double - load, 1e-9):.2f} |",
        "",
        f"2 processes / 1 process: {single / double:.2f}x the throughput (each worker gets half the threads: on a "
        "machine with spare cores or one GPU per worker the workers do not share).",
        "",
        "Where one worker's time goes (this process, the same images):",
        "",
        "| step | total s | ms per image |",
        "|---|---|---|",
        f"| listing the tree (`list_inputs`) | {split['listing']:.3f} | {per['listing']:.2f} |",
        f"| model (`segment_batch`, groups of the batch size) | {split['model']:.2f} | {per['model']:.1f} |",
        f"| writing (labels PNG, overlay PNG, JSON) | {split['writing']:.2f} | {per['writing']:.2f} |",
        "",
        f"Listing + writing = **{overhead:.3f}x** the model time per image. The toy model is small (a 64x64 world); "
        "with a real Stable Diffusion view (seconds per image on a CPU, see families-cpu.md) the same overhead is a "
        "far smaller share.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="scenes in the folder (default 2000)")
    parser.add_argument("--out", default=str(Path(__file__).with_name("results")), help="where the table goes")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="segment-folder-") as work:
        folder = build_folder(Path(work) / "scenes", args.images)
        single = command_seconds(folder, Path(work) / "one", 1)
        double = command_seconds(folder, Path(work) / "two", 2)
        load = load_seconds()
        split = split_seconds(folder, Path(work) / "split")
    text = report(args.images, single, double, load, split)
    print(text)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "segment-folder-cpu.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
