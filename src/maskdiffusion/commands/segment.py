"""``maskdiffusion segment IMAGE... --classes ...``: label image files with any list of class names."""

from __future__ import annotations

import argparse
import errno
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ..presets import Preset
from . import options


def add_command(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = commands.add_parser("segment", help="segment images with a list of class names")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument(
        "--classes",
        required=True,
        help="comma-separated class names ('a|b' = synonyms), or @file.txt with one per line",
    )
    parser.add_argument("--out", default="maskdiffusion-out", help="output folder (default: maskdiffusion-out)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    options.add_limits_argument(parser)
    options.add_model_arguments(parser)
    options.add_preset_arguments(parser)
    parser.set_defaults(run=run)
    return parser


def unique_stems(paths: Sequence[str]) -> list[str]:
    """Output names from input file names, never two alike (case-insensitively): ``x``, ``x_2``, ..."""
    taken: set[str] = set()
    stems = []
    for path in paths:
        base = Path(path).stem or "image"
        stem, number = base, 1
        while stem.casefold() in taken:
            number += 1
            stem = f"{base}_{number}"
        taken.add(stem.casefold())
        stems.append(stem)
    return stems


def check_out_dir(out: Path) -> None:
    """Make sure ``out`` is (or can become) a writable folder, before a model is loaded (``OSError``)."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "exists and is not a folder", str(out))
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=out):
        pass


def existing_images(paths: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(paths that are files, messages for those that are not)``: reported before the model loads."""
    found, problems = [], []
    for path in paths:
        if os.path.isfile(path):
            found.append(path)
        elif os.path.isdir(path):
            problems.append(f"image {path!r} is a folder: pass its files (e.g. {os.path.join(path, '*.jpg')})")
        else:
            problems.append(f"image {path!r} does not exist: check the path")
    return found, problems


def segment_files(segmenter, images: Sequence[str], classes, preset: Preset, out: Path, *, quiet: bool = False) -> int:
    """Segment ``images`` and write their outputs; returns how many failed.

    An unreadable image or one whose files cannot be written is reported by name and
    counted; the others are still written.
    """
    from tqdm.auto import tqdm

    from ..views import ImageLoadError

    stems = unique_stems(images)
    failed = 0
    group = max(1, segmenter.batch_size)
    warned = False
    with tqdm(total=len(images), desc="segmenting", unit="image", disable=quiet) as bar:
        for start in range(0, len(images), group):
            batch = list(images[start : start + group])
            results = segmenter.segment_batch(batch, classes, preset=preset, errors="return")
            for path, stem, result in zip(batch, stems[start : start + group], results, strict=True):
                bar.update(1)
                if isinstance(result, ImageLoadError):
                    failed += 1
                    tqdm.write(f"error: {result}", file=sys.stderr)
                    continue
                if not warned:
                    for warning in result.warnings:
                        tqdm.write(f"warning: {warning}", file=sys.stderr)
                    warned = True
                if stem != Path(path).stem:
                    tqdm.write(f"note: {path!r} is written as {stem}.* (another input has its name)", file=sys.stderr)
                try:
                    result.save(out, stem)
                except OSError as error:
                    failed += 1
                    reason = error.strerror or str(error)
                    tqdm.write(
                        f"error: could not write the files of {path!r} into {str(out)!r}: {reason}", file=sys.stderr
                    )
    return failed


def run(args: argparse.Namespace) -> int:
    """``maskdiffusion segment``: check all that needs no model, load it, write one set of files per image."""
    classes = options.parse_class_argument(args.classes)
    options.check_overrides(args)
    out = Path(args.out)
    try:
        check_out_dir(out)
    except OSError as error:
        print(f"error: cannot write into --out {args.out!r}: {error.strerror or error}", file=sys.stderr)
        return options.EXIT_USAGE
    images, problems = existing_images(args.images)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if not images:
        print("error: none of the images exist; nothing to segment", file=sys.stderr)
        return 1
    segmenter = options.load_segmenter(args)
    preset = options.chosen_preset(segmenter, args)
    segmenter.check_inputs(classes, preset)
    try:
        failed = segment_files(segmenter, images, classes, preset, out, quiet=args.quiet) + len(problems)
    except KeyboardInterrupt:
        print(f"\ninterrupted: the files in {args.out} are complete sets (NAME.json is written last)", file=sys.stderr)
        return options.EXIT_INTERRUPTED
    done = len(args.images) - failed
    print(f"wrote {done} segmentation(s) to {args.out}" + (f"; {failed} image(s) failed" if failed else ""))
    return 1 if failed else 0
