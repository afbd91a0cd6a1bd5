"""Command line: ``maskdiffusion segment | demo | evaluate | serve`` (flags map onto a Preset, nothing more)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from .loading import DEFAULT_MODEL, DTYPES, ModelNotFoundError
from .presets import PRESETS, Preset
from .prompts import ClassName, VocabularyError, parse_classes, read_class_file

EXIT_USAGE = 2


def parse_class_argument(text: str) -> list[ClassName]:
    """``--classes``: ``"a, b|c"`` inline, or ``@file.txt`` (one class per line)."""
    if text.startswith("@"):
        return read_class_file(text[1:])
    return parse_classes(text)


def add_model_arguments(parser: argparse.ArgumentParser, *, default_model: str = DEFAULT_MODEL) -> None:
    """Flags shared by every command that loads a model."""
    parser.add_argument(
        "--model",
        default=default_model,
        help=f"hub id or diffusers folder (default: {default_model}; 'toy' = the bundled toy-world model, "
        "'tiny-random' = random test model)",
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=sorted(DTYPES),
        help="model precision; on the CPU half precision runs as autocast",
    )
    parser.add_argument("--batch-size", type=int, default=4, help="views per UNet batch (default 4)")


def add_preset_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags that override fields of the chosen preset."""
    parser.add_argument(
        "--preset",
        default="default",
        choices=sorted(PRESETS),
        help="named settings (default: ours; 'reference' = the reference mask head)",
    )
    parser.add_argument("--size", type=int, help="view short side in pixels, a multiple of 64 for SD (default 512)")
    parser.add_argument("--timestep", type=int, help="UNet timestep of the single pass (default 0)")
    parser.add_argument("--attention-mode", choices=["exp", "softmax"])
    parser.add_argument(
        "--background-threshold", type=float, help="score under which a pixel is background (label 255 in PNGs)"
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

    return MaskDiffusion.from_pretrained(
        args.model, device=args.device, dtype=args.dtype, batch_size=args.batch_size, preset=args.preset
    )


def unique_stems(paths: Sequence[str]) -> list[str]:
    """Output names from input file names; repeated stems get ``_2``, ``_3``, ..."""
    seen: dict[str, int] = {}
    stems = []
    for path in paths:
        stem = Path(path).stem or "image"
        seen[stem] = seen.get(stem, 0) + 1
        stems.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return stems


def segment_files(segmenter, images: Sequence[str], classes, preset: Preset, out: Path, *, quiet: bool = False) -> int:
    """Segment ``images`` and write their outputs; returns how many failed."""
    from tqdm.auto import tqdm

    from .views import ImageLoadError

    stems = unique_stems(images)
    failed = 0
    group = max(1, segmenter.batch_size)
    with tqdm(total=len(images), desc="segmenting", unit="image", disable=quiet) as bar:
        for start in range(0, len(images), group):
            batch = list(images[start : start + group])
            results = segmenter.segment_batch(batch, classes, preset=preset, errors="return")
            for stem, result in zip(stems[start : start + group], results, strict=True):
                if isinstance(result, ImageLoadError):
                    failed += 1
                    tqdm.write(f"error: {result}", file=sys.stderr)
                else:
                    result.save(out, stem)
                bar.update(1)
    return failed


def cmd_segment(args: argparse.Namespace) -> int:
    classes = parse_class_argument(args.classes)
    segmenter = load_segmenter(args)
    preset = chosen_preset(segmenter, args)
    segmenter.check_inputs(classes, preset)
    failed = segment_files(segmenter, args.images, classes, preset, Path(args.out), quiet=args.quiet)
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
    parser = argparse.ArgumentParser(prog="maskdiffusion", description=__doc__)
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
