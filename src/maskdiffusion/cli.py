"""The ``maskdiffusion`` command: segment images, run the offline demo, evaluate, serve the web demo.

Flags map onto a Preset and nothing more; every check that needs no model runs before one
is looked up.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from . import __version__
from .loading import DEFAULT_MODEL, DTYPES, ModelNotFoundError
from .presets import PRESETS, Preset
from .prompts import ClassName, VocabularyError, parse_classes, read_class_file
from .views import InputLimits

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
DEVICES = ["auto", "cpu", "cuda", "mps"]
DESCRIPTION = """\
Open-vocabulary semantic segmentation with a frozen text-to-image diffusion model.

commands:
  segment   label images with any list of class names
  demo      offline: the bundled toy model on held-out toy-world scenes
  evaluate  score a model on a benchmark data set (resumable)
  serve     start the local web demo

examples:
  maskdiffusion segment street.jpg --classes "road, traffic light, car, sky"
  maskdiffusion segment photos/*.jpg --classes @classes.txt --out labels/
  maskdiffusion demo
  maskdiffusion evaluate --dataset toyworld --model toy

Run 'maskdiffusion COMMAND --help' for a command's flags.
"""


def parse_class_argument(text: str) -> list[ClassName]:
    """``--classes``: ``"a, b|c"`` inline, or ``@file.txt`` (one class per line)."""
    if text.startswith("@"):
        return read_class_file(text[1:])
    return parse_classes(text)


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        default="auto",
        choices=DEVICES,
        help="where the model runs (default auto: cuda if available, then mps, then cpu)",
    )


def positive_number(text: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def add_limits_argument(parser: argparse.ArgumentParser) -> None:
    """``--max-megapixels``: the input limit of every command that reads user images."""
    parser.add_argument(
        "--max-megapixels",
        type=positive_number,
        default=InputLimits.max_pixels / 1e6,
        help=f"refuse larger images, checked from their header before decoding "
        f"(default {InputLimits.max_pixels / 1e6:g}); images may also be at most {InputLimits.max_aspect:g}:1",
    )


def input_limits(args: argparse.Namespace) -> InputLimits:
    return InputLimits(max_pixels=round(args.max_megapixels * 1e6))


def add_model_arguments(parser: argparse.ArgumentParser, *, default_model: str = DEFAULT_MODEL) -> None:
    """Flags shared by every command that loads a model."""
    parser.add_argument(
        "--model",
        default=default_model,
        help=f"hub id or diffusers folder (default: {default_model}; 'toy' = the bundled toy-world model, "
        "'tiny-random' = random test model)",
    )
    add_device_argument(parser)
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=sorted(DTYPES),
        help="model precision (default float32): weights stored in it, attention maps and mask head in float32; "
        "bfloat16 pays on CPUs with AMX / AVX512-BF16 and on GPUs",
    )
    parser.add_argument("--batch-size", type=int, default=4, help="views per UNet batch (default 4)")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the VAE encoder and the UNet's ResNet blocks (slow first call per shape; default off)",
    )


def add_preset_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags that override fields of the chosen preset."""
    parser.add_argument(
        "--preset",
        default="default",
        choices=sorted(PRESETS),
        help="named settings of the model (default: default, the recommended ones; "
        "reference = the MaskDiffusion paper's mask head); the flags below override single fields",
    )
    parser.add_argument(
        "--size",
        type=int,
        help="view short side in pixels, a multiple of the model's block size (64 for SD; default 512)",
    )
    parser.add_argument("--timestep", type=int, help="UNet timestep of the single pass (default 0 = the clean image)")
    parser.add_argument(
        "--attention-mode",
        choices=["exp", "softmax"],
        help="cross-attention as exp(QK^T*scale), the paper's choice, or softmax probabilities over the prompt "
        "(default: the preset's)",
    )
    parser.add_argument(
        "--background-threshold",
        type=float,
        help="pixels whose best class score is under it get no class (255 in label PNGs); scores are cosines in "
        "[-1, 1] (the reference preset's dot products are unbounded); default: off",
    )
    parser.add_argument("--refine-steps", type=int, help="prototype refinement rounds (default 0)")


def preset_overrides(args: argparse.Namespace) -> dict:
    """The preset fields given on the command line."""
    names = {
        "size": "size",
        "timestep": "timestep",
        "attention_mode": "attention_mode",
        "background_threshold": "background_threshold",
        "refine_steps": "refine_steps",
    }
    return {field: getattr(args, arg) for arg, field in names.items() if getattr(args, arg, None) is not None}


def chosen_preset(segmenter, args: argparse.Namespace) -> Preset:
    """The model's named preset with the command line's overrides applied."""
    return segmenter.presets[args.preset].replace(**preset_overrides(args))


def load_segmenter(args: argparse.Namespace):
    from .pipeline import MaskDiffusion

    limits = input_limits(args) if hasattr(args, "max_megapixels") else InputLimits()
    return MaskDiffusion.from_pretrained(
        args.model,
        device=args.device,
        dtype=args.dtype,
        batch_size=args.batch_size,
        preset=args.preset,
        limits=limits,
        compile=getattr(args, "compile", False),
    )


def check_overrides(args: argparse.Namespace) -> None:
    """The command line's preset fields, checked before any model is looked up (``ValueError``)."""
    PRESETS[args.preset].replace(**preset_overrides(args)).check()


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

    from .views import ImageLoadError

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


def cmd_segment(args: argparse.Namespace) -> int:
    classes = parse_class_argument(args.classes)
    check_overrides(args)
    out = Path(args.out)
    try:
        check_out_dir(out)
    except OSError as error:
        print(f"error: cannot write into --out {args.out!r}: {error.strerror or error}", file=sys.stderr)
        return EXIT_USAGE
    images, problems = existing_images(args.images)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if not images:
        print("error: none of the images exist; nothing to segment", file=sys.stderr)
        return 1
    segmenter = load_segmenter(args)
    preset = chosen_preset(segmenter, args)
    segmenter.check_inputs(classes, preset)
    try:
        failed = segment_files(segmenter, images, classes, preset, out, quiet=args.quiet) + len(problems)
    except KeyboardInterrupt:
        print(f"\ninterrupted: the files in {args.out} are complete sets (NAME.json is written last)", file=sys.stderr)
        return EXIT_INTERRUPTED
    done = len(args.images) - failed
    print(f"wrote {done} segmentation(s) to {args.out}" + (f"; {failed} image(s) failed" if failed else ""))
    return 1 if failed else 0


def example_images() -> list[tuple[Path, str]]:
    """The example images shipped with the package and the classes to ask for in each."""
    folder = Path(str(resources.files("maskdiffusion").joinpath("examples")))
    table = json.loads((folder / "examples.json").read_text())
    return [(folder / name, classes) for name, classes in table.items()]


def cmd_demo(args: argparse.Namespace) -> int:
    """Segment held-out toy-world scenes with the bundled model, offline; write a figure, print the
    mIoU next to the baselines of the same pass and the quality gate's targets."""
    from .loading import TOY_MODEL
    from .pipeline import MaskDiffusion
    from .toyworld.gate import demo_summary, run_demo
    from .toyworld.world import CLASS_NAMES

    segmenter = MaskDiffusion.from_pretrained(TOY_MODEL, device=args.device)
    numbers, figure = run_demo(segmenter, out_dir=Path(args.out), count=args.scenes)
    print(
        f"maskdiffusion demo: the bundled '{TOY_MODEL}' model segmented {args.scenes} held-out toy-world scene(s), "
        f"prompted with every class ({', '.join(CLASS_NAMES)})"
    )
    for line in demo_summary(numbers):
        print(f"  {line}")
    print(f"  figure (image | ground truth | prediction): {figure}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskdiffusion", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"maskdiffusion {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    segment = commands.add_parser("segment", help="segment images with a list of class names")
    segment.add_argument("images", nargs="+", help="image files")
    segment.add_argument(
        "--classes",
        required=True,
        help="comma-separated class names ('a|b' = synonyms), or @file.txt with one per line",
    )
    segment.add_argument("--out", default="maskdiffusion-out", help="output folder (default: maskdiffusion-out)")
    segment.add_argument("--quiet", action="store_true", help="no progress bar")
    add_limits_argument(segment)
    add_model_arguments(segment)
    add_preset_arguments(segment)
    segment.set_defaults(run=cmd_segment)

    from .evaluation import add_evaluate_command, int_at_least

    demo = commands.add_parser(
        "demo",
        help="segment held-out toy-world scenes offline with the bundled model",
        description="Segment held-out toy-world scenes with the bundled 'toy' model, offline, in seconds. Prints "
        "the mIoU next to the baselines measured on the same scenes (attention only, unsupervised k-means, the "
        "RGB k-means floor) and the quality gate's targets; writes toyworld.png (image | ground truth | prediction).",
    )
    demo.add_argument("--out", default="maskdiffusion-demo", help="output folder (default: maskdiffusion-demo)")
    demo.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda", "mps"],
        help="where the model runs (default auto: cuda if available, then mps, then cpu)",
    )
    demo.add_argument("--scenes", type=int_at_least(1), default=8, help="number of scenes (default 8)")
    demo.set_defaults(run=cmd_demo)

    from .web import add_serve_command

    add_evaluate_command(commands)
    add_serve_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "batch_size", 1) < 1:
        parser.error("--batch-size must be >= 1")
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except VocabularyError as error:
        parser.error(str(error))
    except ModelNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except ValueError as error:  # settings that cannot work (size, preset fields, device)
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
