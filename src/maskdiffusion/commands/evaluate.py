"""``maskdiffusion evaluate``: flags -> a data set, a model and a preset -> the evaluation engine.

The engine (:func:`maskdiffusion.evaluation.evaluate`) scores one shard in one process; this
command starts the processes (:func:`~maskdiffusion.distributed.run_spawned` for
``--num-processes``, :func:`~maskdiffusion.distributed.run_launched` under torchrun /
accelerate) or, for ``--dataset toyworld``, runs the bundled model's gate.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from functools import partial
from pathlib import Path
from typing import Any

from ..clustering import DEFAULT_POOL_SIZE
from ..datasets import Dataset, DatasetError, available_datasets, build_dataset
from ..distributed import Comm, LaunchInfo, WorkersFailed, check_gpus, launched_by_env, run_launched, run_spawned
from ..evaluation import CLUSTERINGS, MODES, evaluate
from ..prompts import read_class_file
from ..runstate import checkpointed
from ..toyworld.gate import GATE_DATASET, GATE_LIMIT
from . import options


def add_command(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "evaluate",
        help="score on a benchmark data set (resumable, multi-process)",
        description="Evaluate on a data set; writes metrics.json, report.md and figures into RUN_DIR. "
        "Run it again with the same --out to resume an interrupted run (toyworld keeps no checkpoints: it is "
        "recomputed, same numbers); a RUN_DIR holding a run with other settings is refused, naming them.",
    )
    parser.add_argument(
        "--dataset",
        required=True,
        help=f"data set name: {', '.join(available_datasets())}; or {GATE_DATASET}: generated held-out scenes, "
        "the bundled model's quality gate (no --root)",
    )
    parser.add_argument(
        "--root",
        help="data sets folder (holding cityscapes/, cocostuff/, ...) or one data set's folder; required "
        f"except for {GATE_DATASET}",
    )
    parser.add_argument("--split", default="val", help="split (default val)")
    parser.add_argument(
        "--image-list",
        metavar="curated|all|FILE",
        help="cocostuff*: which images of the split: 'curated' (STEGO's curated list, the COCO-Stuff-27 benchmark "
        "protocol; default for cocostuff27), 'all' (default for cocostuff171) or a file of image ids",
    )
    parser.add_argument(
        "--class-names",
        help="file with one class per line ('a|b' = synonyms) replacing the data set's prompt words "
        "(default: the data set's own words)",
    )
    parser.add_argument(
        "--limit",
        type=options.int_at_least(1),
        help=f"score only the first N samples, sorted by id (default: all); {GATE_DATASET}: N scenes "
        f"(default {GATE_LIMIT})",
    )
    parser.add_argument(
        "--out",
        help="RUN_DIR (default outputs/<timestamp>); the same run there is resumed (toyworld: recomputed), "
        "a run with other settings is refused",
    )
    parser.add_argument(
        "--mode",
        choices=MODES,
        default="open-vocab",
        help="open-vocab: class words as prompts (default); unsupervised: k-means on the UNet features",
    )
    parser.add_argument(
        "--clusters", type=options.int_at_least(1), help="unsupervised: k-means K (default: number of classes)"
    )
    parser.add_argument(
        "--clustering",
        choices=CLUSTERINGS,
        default="dataset",
        help="unsupervised protocol: dataset = one k-means + one matching for the data set (default), "
        "per-image = k-means + matching per image (optimistic)",
    )
    parser.add_argument(
        "--pool-size",
        type=options.int_at_least(1),
        default=DEFAULT_POOL_SIZE,
        help=f"dataset clustering (and toyworld's): feature samples pooled over the data set for k-means "
        f"(default {DEFAULT_POOL_SIZE})",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help=f"seed of the feature sampling and k-means (default 0); {GATE_DATASET}: also the held-out scene stream",
    )
    parser.add_argument(
        "--save-every", type=options.int_at_least(1), default=20, help="checkpoint every N images (default 20)"
    )
    parser.add_argument(
        "--eval-size",
        type=parse_eval_size,
        default=None,
        metavar="SHORT_SIDE|original",
        help="score with labels resized (nearest) to this short side; default original = label resolution",
    )
    parser.add_argument(
        "--figures",
        type=options.int_at_least(0),
        default=4,
        help="side-by-side figures of the first N images (default 4)",
    )
    parser.add_argument(
        "--save-predictions",
        action="store_true",
        help="keep every prediction PNG in RUN_DIR/predictions (default: only the figures' ones)",
    )
    parser.add_argument(
        "--num-processes",
        type=options.int_at_least(1),
        default=1,
        help="local worker processes, one GPU each when there are GPUs (default 1)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    options.add_model_arguments(parser)
    options.add_preset_arguments(parser)
    parser.set_defaults(run=run)
    return parser


def parse_eval_size(text: str) -> int | None:
    """``--eval-size``: ``original`` (the label's own size) or a positive short side."""
    if text == "original":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'original' or a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive short side, got {value}")
    return value


def open_dataset(args: argparse.Namespace) -> Dataset:
    """The data set named on the command line, with ``--class-names`` applied."""
    if args.dataset not in available_datasets():
        known = ", ".join(sorted([*available_datasets(), GATE_DATASET]))
        raise DatasetError(f"unknown data set {args.dataset!r}; available: {known}")
    if args.root is None:
        raise DatasetError(
            f"--dataset {args.dataset} is read from disk: give --root, the folder holding the data sets "
            "(layouts in docs/datasets.md)"
        )
    options = {"image_list": args.image_list} if args.image_list else {}
    dataset = build_dataset(args.dataset, args.root, args.split, **options)
    if args.class_names:
        names = ["|".join(c.synonyms) for c in read_class_file(args.class_names)]
        dataset = dataset.with_class_names(names)
    return dataset


def _summary(metrics: dict[str, Any], out: Path) -> str:
    def show(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}%"

    failed = f", {metrics['num_failed']} failed" if metrics["num_failed"] else ""
    resized = metrics["num_resized_labels"]
    if resized:
        failed += f", {resized} scored on a label of another size than the image (prediction resized to it)"
    return (
        f"{metrics['dataset']} ({metrics['protocol']}): mIoU {show(metrics['mIoU'])}, pixel accuracy "
        f"{show(metrics['pixel_accuracy'])} over {metrics['num_images']} image(s){failed} -> {out / 'metrics.json'}"
    )


def run(args: argparse.Namespace) -> int:
    """``maskdiffusion evaluate``: one process, ``--num-processes N`` local workers, or a torchrun rank.

    Ctrl-C ends it with one line saying what is kept, and exit code 130.
    """
    launch = launched_by_env()
    try:
        if args.dataset == GATE_DATASET:
            return _cmd_gate(args, launch)
        return _cmd_dataset(args, launch)
    except KeyboardInterrupt:
        if launch is None or launch.rank == 0:
            print(_interrupted(args), file=sys.stderr)
        return options.EXIT_INTERRUPTED


def _interrupted(args: argparse.Namespace) -> str:
    """What an interrupted run leaves, and how to go on."""
    if args.dataset == GATE_DATASET:
        return f"interrupted; the {GATE_DATASET} gate keeps no checkpoints: run the same command again to recompute it"
    if not args.out:
        return "interrupted before the run started; nothing was written"
    scored, pooled = checkpointed(Path(args.out))
    kept = f"{scored} image(s)" if scored or not pooled else f"{pooled} image(s) of pass 1 (feature pooling)"
    return f"interrupted; {kept} checkpointed in {args.out}; run the same command again to resume"


def _cmd_dataset(args: argparse.Namespace, launch: LaunchInfo | None) -> int:
    """``evaluate`` on a data set read from disk: here, on ``--num-processes`` workers, or as a launched rank."""
    try:
        if launch is not None and args.num_processes > 1:
            raise ValueError(
                "--num-processes cannot be combined with torchrun / accelerate launch: they start the processes"
            )
        open_dataset(args)  # a missing or malformed data set fails here, before any model is loaded
        if launch is not None:
            metrics = run_launched(partial(_launched_shard, args), args.device, launch)
            if launch.rank == 0:
                print(_summary(metrics, Path(args.out)))
            return 0
        args.out = args.out or options.default_out()
        if args.num_processes == 1:
            print(_summary(score_shard(args, args.device), Path(args.out)))
            return 0
        check_gpus(args.device, args.num_processes)
    except ValueError as error:  # DatasetError, RunDirError, settings
        if launch is None or launch.rank == 0:
            print(f"error: {error}", file=sys.stderr)
        return options.EXIT_USAGE
    try:
        run_spawned(partial(score_shard, args), args.device, args.num_processes)
    except WorkersFailed as error:
        if not error.usage and "\n" in str(error):  # a worker's traceback; usage errors were printed by rank 0
            print(f"error: an evaluation {error}", file=sys.stderr)
        return options.EXIT_USAGE if error.usage else 1
    metrics = json.loads((Path(args.out) / "metrics.json").read_text(encoding="utf-8"))
    print(_summary(metrics, Path(args.out)))
    return 0


def score_shard(args: argparse.Namespace, device: str) -> dict[str, Any]:
    """Load the model on ``device`` and evaluate this process's shard (rank/world from torch.distributed)."""
    dataset = open_dataset(args)
    model_args = copy.copy(args)
    model_args.device = device
    segmenter = options.load_segmenter(model_args)
    return evaluate(
        dataset,
        segmenter,
        out_dir=args.out,
        preset=options.chosen_preset(segmenter, args),
        mode=args.mode,
        clusters=args.clusters,
        clustering=args.clustering,
        limit=args.limit,
        save_every=args.save_every,
        eval_size=args.eval_size,
        figures=args.figures,
        progress=not args.quiet,
        save_predictions=args.save_predictions,
        pool_size=args.pool_size,
        seed=args.seed,
    )


def _launched_shard(args: argparse.Namespace, device: str, comm: Comm) -> dict[str, Any]:
    """This rank's shard of a torchrun / accelerate job; rank 0 names the RUN_DIR for all."""
    args.out = comm.broadcast(args.out or options.default_out())
    return score_shard(args, device)


# Evaluate flags that have no meaning for the generated toy-world scenes.
_NOT_FOR_GATE = (
    "root", "split", "image_list", "class_names", "mode", "clusters", "clustering", "eval_size",
    "save_every", "save_predictions", "num_processes",
)  # fmt: skip


def _cmd_gate(args: argparse.Namespace, launch: LaunchInfo | None) -> int:
    """``--dataset toyworld``: the bundled model's quality gate, in one process (see toyworld/gate.py)."""
    from ..toyworld import gate

    defaults = _defaults()
    given = ["--" + name.replace("_", "-") for name in _NOT_FOR_GATE if getattr(args, name) != getattr(defaults, name)]
    problem = None
    if given or launch is not None:
        flags = ", ".join(given) or "torchrun / accelerate launch"
        problem = f"generates its scenes and scores every protocol in one process; it does not take {flags}"
    elif args.seed < 0:
        problem = f"takes --seed >= 0 (it numbers the stream of held-out scenes), got {args.seed}"
    if problem:
        print(f"error: --dataset {GATE_DATASET} {problem}", file=sys.stderr)
        return options.EXIT_USAGE
    out = Path(args.out or options.default_out())
    segmenter = options.load_segmenter(args)
    metrics = gate.run_gate(
        segmenter,
        out_dir=out,
        limit=args.limit or GATE_LIMIT,
        seed=args.seed,
        preset=options.chosen_preset(segmenter, args),
        figures=args.figures,
        pool_size=args.pool_size,
        progress=not args.quiet,
    )
    print(gate.summary(metrics, out))
    return 0


def _defaults() -> argparse.Namespace:
    """``evaluate``'s flags at their defaults (to tell which ones the user gave)."""
    parser = argparse.ArgumentParser()
    add_command(parser.add_subparsers())
    return parser.parse_args(["evaluate", "--dataset", GATE_DATASET])
