"""``maskdiffusion demo``: the bundled models on the quality gate's held-out toy-world scenes, offline."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import options


def add_command(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from ..loading import BUNDLED_MODELS
    from ..toyworld.gate import GATE_LIMIT

    parser = commands.add_parser(
        "demo",
        help="segment held-out toy-world scenes offline with the bundled models",
        description="Segment the quality gate's held-out toy-world scenes with each bundled model "
        f"({', '.join(BUNDLED_MODELS)}), offline. Prints each model's mIoU next to the baselines measured on the "
        "same scenes (attention only, unsupervised k-means, the RGB k-means floor) and, on the gate's "
        f"{GATE_LIMIT} scenes, the gate's targets; writes toyworld.png (image | ground truth | each model's "
        "prediction).",
    )
    parser.add_argument("--out", default="maskdiffusion-demo", help="output folder (default: maskdiffusion-demo)")
    options.add_device_argument(parser)
    parser.add_argument(
        "--scenes",
        type=options.int_at_least(1),
        default=GATE_LIMIT,
        help=f"scenes scored (default {GATE_LIMIT}, the gate's; the targets are checked only on that many or more)",
    )
    parser.add_argument(
        "--show", type=options.int_at_least(1), help="scenes drawn (default 4, or all when fewer are scored)"
    )
    parser.add_argument(
        "--model",
        action="append",
        type=toy_world_model,
        help=f"a bundled model ({', '.join(BUNDLED_MODELS)}) or the folder of a model trained on the toy world "
        "(e.g. research.train_dit's export); repeatable, one column each (default: every bundled model)",
    )
    parser.set_defaults(run=run)
    return parser


def toy_world_model(value: str) -> str:
    """A bundled model's name, or a model folder whose card says it speaks the toy world's vocabulary."""
    from ..loading import BUNDLED_MODELS
    from ..model_card import SETTINGS_FILE, read_settings
    from ..toyworld.world import CLASS_NAMES

    if value in BUNDLED_MODELS:
        return value
    if not (Path(value) / SETTINGS_FILE).is_file():
        raise argparse.ArgumentTypeError(
            f"{value!r} is neither a bundled model ({', '.join(BUNDLED_MODELS)}) "
            f"nor a model folder with {SETTINGS_FILE}"
        )
    try:
        vocabulary = read_settings(Path(value)).get("vocabulary")
    except ValueError as error:  # the message names the file and what to do
        raise argparse.ArgumentTypeError(str(error)) from None
    if vocabulary != list(CLASS_NAMES):
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a toy-world model: its {SETTINGS_FILE} 'vocabulary' is not the world's classes "
            f"({', '.join(CLASS_NAMES)})"
        )
    return value


def run(args: argparse.Namespace) -> int:
    """Score each bundled model on the scenes, write a figure, print the table and the targets that apply."""
    from ..loading import BUNDLED_MODELS
    from ..pipeline import MaskDiffusion
    from ..toyworld.gate import demo_summary, run_demo
    from ..toyworld.world import CLASS_NAMES

    show = min(4, args.scenes) if args.show is None else args.show
    if show > args.scenes:
        raise SystemExit(f"maskdiffusion demo: error: --show {args.show} is more than --scenes {args.scenes}")
    names = args.model or list(BUNDLED_MODELS)
    segmenters = {name: MaskDiffusion.from_pretrained(name, device=args.device) for name in dict.fromkeys(names)}
    numbers, figure = run_demo(segmenters, out_dir=Path(args.out), count=args.scenes, show=show)
    print(
        f"maskdiffusion demo: the model(s) {', '.join(segmenters)} segmented {args.scenes} held-out "
        f"toy-world scene(s) of the quality gate's stream, prompted with every class ({', '.join(CLASS_NAMES)})"
    )
    for line in demo_summary(numbers, args.scenes):
        print(f"  {line}")
    print(f"  figure (image | ground truth | {' | '.join(segmenters)}, {show} scenes): {figure}")
    return 0
