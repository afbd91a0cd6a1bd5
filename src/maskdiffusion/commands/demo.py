"""``maskdiffusion demo``: the bundled toy model on held-out toy-world scenes, offline, in seconds."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import options


def add_command(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "demo",
        help="segment held-out toy-world scenes offline with the bundled model",
        description="Segment held-out toy-world scenes with the bundled 'toy' model, offline, in seconds. Prints "
        "the mIoU next to the baselines measured on the same scenes (attention only, unsupervised k-means, the "
        "RGB k-means floor) and the quality gate's targets; writes toyworld.png (image | ground truth | prediction).",
    )
    parser.add_argument("--out", default="maskdiffusion-demo", help="output folder (default: maskdiffusion-demo)")
    options.add_device_argument(parser)
    parser.add_argument("--scenes", type=options.int_at_least(1), default=8, help="number of scenes (default 8)")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Segment the scenes, write a figure, print the mIoU next to the baselines of the same pass and
    the quality gate's targets."""
    from ..loading import TOY_MODEL
    from ..pipeline import MaskDiffusion
    from ..toyworld.gate import demo_summary, run_demo
    from ..toyworld.world import CLASS_NAMES

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
