"""``maskdiffusion segment INPUT... --classes ...``: label image files, folders, patterns and lists of any size.

One process, ``--num-processes N`` local workers (one per GPU where there are GPUs), or a rank of
``torchrun`` / ``accelerate launch`` (``-m maskdiffusion segment ...``; several machines with
``--out`` on a shared file system): the work is :mod:`maskdiffusion.labelling`'s, resumable, with
one progress bar and one summary.
"""

from __future__ import annotations

import argparse
import errno
import json
import sys
import tempfile
from functools import partial
from pathlib import Path

from ..distributed import Comm, LaunchInfo, WorkersFailed, check_gpus, launched_by_env, run_launched, run_spawned
from ..exports import EXPORTS
from ..inputs import GLOB_CHARS, LIST_PREFIX
from ..labelling import ProgressBar, Summary, finish, label_shard, manifest, prepare, state
from . import options


def add_command(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = commands.add_parser("segment", help="segment images, folders or lists of them with a list of class names")
    parser.add_argument(
        "images",
        nargs="+",
        metavar="INPUT",
        help="image files, folders (their images, recursively; outputs mirror the tree), glob patterns in quotes "
        "('photos/**/*.jpg') or @list.txt (one path per line, relative to the list's folder)",
    )
    parser.add_argument(
        "--classes",
        required=True,
        help="comma-separated class names ('a|b' = synonyms), or @file.txt with one per line",
    )
    parser.add_argument("--out", default="maskdiffusion-out", help="output folder (default: maskdiffusion-out)")
    parser.add_argument(
        "--format",
        default="png",
        choices=sorted(EXPORTS),
        help="png: NAME.labels.png, NAME.overlay.png and NAME.json per image (default); coco: one COCO "
        "annotations.json with RLE masks; cvat: CVAT's Segmentation mask 1.1 folder",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in an --out that holds another run (or this one): every image is written again",
    )
    parser.add_argument(
        "--num-processes",
        type=options.int_at_least(1),
        default=1,
        help="local worker processes, one per GPU on GPUs (default 1); or launch with torchrun / accelerate",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    options.add_limits_argument(parser)
    options.add_model_arguments(parser)
    options.add_preset_arguments(parser)
    parser.set_defaults(run=run)
    return parser


def check_out_dir(out: Path) -> None:
    """Make sure ``out`` is (or can become) a writable folder, before a model is loaded (``OSError``)."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "exists and is not a folder", str(out))
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=out):
        pass


def missing_inputs(specs: list[str]) -> list[str]:
    """Inputs that name nothing (checked before any model is loaded; patterns are matched later)."""
    missing = []
    for spec in specs:
        path = Path(spec[len(LIST_PREFIX) :] if spec.startswith(LIST_PREFIX) else spec)
        if not path.exists() and not (GLOB_CHARS & set(spec) and not spec.startswith(LIST_PREFIX)):
            missing.append(f"{'list file' if spec.startswith(LIST_PREFIX) else 'image'} {str(path)!r} does not exist")
    return missing


def run(args: argparse.Namespace) -> int:
    """``maskdiffusion segment``: check all that needs no model, then label the inputs here, on workers or as a rank."""
    launch = launched_by_env()
    main = launch is None or launch.rank == 0
    try:
        classes = options.parse_class_argument(args.classes)
        options.check_overrides(args)
        if launch is not None and args.num_processes > 1:
            raise ValueError("--num-processes cannot be combined with torchrun / accelerate launch: they start them")
        try:
            check_out_dir(Path(args.out))
        except OSError as error:
            raise ValueError(f"cannot write into --out {args.out!r}: {error.strerror or error}") from None
        missing = missing_inputs(args.images)
        if len(missing) == len(args.images):
            if main:
                print("\n".join(f"error: {m}" for m in missing), file=sys.stderr)
                print("error: none of the inputs exist; nothing to segment", file=sys.stderr)
            return 1
        args.classes = classes
        if launch is not None:
            summary = run_launched(partial(_launched, args, launch), args.device, launch)
        elif args.num_processes == 1:
            summary = _label(args, args.device, Comm(), show_progress=True)
        else:
            summary = _spawn(args)
    except KeyboardInterrupt:
        if main:
            print(
                f"\ninterrupted: every image written to {args.out} is complete; run the same command again to "
                "finish (done images are skipped)",
                file=sys.stderr,
            )
        return options.EXIT_INTERRUPTED
    except WorkersFailed as error:
        if not error.usage and "\n" in str(error):  # a worker's traceback; usage errors were printed by rank 0
            print(f"error: a segmentation {error}", file=sys.stderr)
        return options.EXIT_USAGE if error.usage else 1
    if summary is None:  # a rank other than 0
        return 0
    print(summary.line(args.out))
    return 1 if summary.failed else 0


def _spawn(args: argparse.Namespace) -> Summary:
    """``--num-processes N``: the workers label, this process shows the one progress bar."""
    check_gpus(args.device, args.num_processes)
    out = Path(args.out)
    with ProgressBar(out, args.images, quiet=args.quiet):
        run_spawned(partial(_spawned, args), args.device, args.num_processes)
    saved = json.loads((state(out) / "summary.json").read_text(encoding="utf-8"))
    return Summary(saved["done"], saved["skipped"], saved["failed"], saved["seconds"])


def _spawned(args: argparse.Namespace, device: str) -> None:
    _label(args, device, Comm.current(), show_progress=False)


def _launched(args: argparse.Namespace, launch: LaunchInfo, device: str, comm: Comm) -> Summary | None:
    return _label(args, device, comm, show_progress=launch.rank == 0)


def _label(args: argparse.Namespace, device: str, comm: Comm, *, show_progress: bool) -> Summary | None:
    """One worker (or the only process): load the model, bind --out (rank 0), label this shard, merge (rank 0)."""
    from tqdm.auto import tqdm

    args.device = device
    segmenter = options.load_segmenter(args)
    vocabulary, preset = segmenter.check_inputs(args.classes, options.chosen_preset(segmenter, args))
    out = Path(args.out)
    if comm.is_main:
        prepare(out, manifest(segmenter, preset, vocabulary, args.format), overwrite=args.overwrite)
        for warning in segmenter.warnings(vocabulary):
            tqdm.write(f"warning: {warning}", file=sys.stderr)
    comm.barrier()
    if show_progress:
        with ProgressBar(out, args.images, quiet=args.quiet):
            summary = label_shard(segmenter, args.images, vocabulary, preset, out, args.format, comm)
    else:
        summary = label_shard(segmenter, args.images, vocabulary, preset, out, args.format, comm)
    summaries = comm.gather(summary)
    if not comm.is_main:
        return None
    return finish(args.images, vocabulary, out, args.format, summaries)
