"""``maskdiffusion benchmark --suite ovss --root DATA_DIR``: the field's table in one resumable command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..datasets import DatasetError
from ..runstate import RunDirError
from ..suite import ROWS, SUITES, results_markdown, run_suite
from . import options


def add_command(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "benchmark",
        help="run a benchmark suite (ovss: the training-free open-vocabulary table) and write its table",
        description="Evaluate on every data set of the suite found under --root (the missing ones are listed and "
        "left empty) and write OUT/results.md and OUT/results.json: one row per preset (--preset, then the "
        "reference and attention-only baselines), the suite's columns in the field's order, and their average. "
        "Each (preset, data set) is an evaluate RUN_DIR in OUT/<preset>/<data set>/: run the same command again "
        "to resume.",
    )
    parser.add_argument("--suite", choices=sorted(SUITES), default="ovss", help="which table (default ovss)")
    parser.add_argument("--root", required=True, help="folder holding the data sets (layouts in README)")
    parser.add_argument("--out", help="output folder (default outputs/<timestamp>); the same folder resumes")
    parser.add_argument(
        "--no-baselines", action="store_true", help="only the --preset row (default: also reference, attention-only)"
    )
    parser.add_argument(
        "--limit", type=options.int_at_least(1), help="score only the first N images of each data set (default: all)"
    )
    parser.add_argument("--figures", type=options.int_at_least(0), default=4, help="figures per run dir (default 4)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    options.add_model_arguments(parser)
    options.add_preset_arguments(parser)
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    options.check_overrides(args)
    names = [args.preset] + ([] if args.no_baselines else [row for row in ROWS if row != args.preset])
    out = Path(args.out or options.default_out())
    segmenter = options.load_segmenter(args)
    overrides = options.preset_overrides(args)
    presets = {name: segmenter.presets[name].replace(**overrides) for name in names}
    try:
        results = run_suite(
            segmenter,
            suite=args.suite,
            root=args.root,
            out_dir=out,
            presets=presets,
            limit=args.limit,
            figures=args.figures,
            progress=not args.quiet,
            log=lambda line: print(line, file=sys.stderr),
        )
    except (DatasetError, RunDirError) as error:
        print(f"error: {error}", file=sys.stderr)
        return options.EXIT_USAGE
    print(results_markdown(results).split("\n## ")[0].rstrip())
    print(f"-> {out / 'results.md'}, {out / 'results.json'}")
    return 0
