"""The ``maskdiffusion`` command: the top of the layers, one sub-command per module of :mod:`.commands`.

Flags map onto a Preset and nothing more; every check that needs no model runs before one
is looked up.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import __version__
from .commands import benchmark, demo, evaluate, segment, serve
from .commands.options import EXIT_INTERRUPTED, EXIT_USAGE
from .loading import ModelNotFoundError
from .prompts import VocabularyError

DESCRIPTION = """\
Open-vocabulary semantic segmentation with a frozen text-to-image diffusion model.

commands:
  segment   label images with any list of class names
  demo      offline: the bundled toy model on held-out toy-world scenes
  evaluate  score a model on a benchmark data set (resumable)
  benchmark run a suite of data sets (ovss: the training-free open-vocabulary table)
  serve     start the local web demo

examples:
  maskdiffusion segment street.jpg --classes "road, traffic light, car, sky"
  maskdiffusion segment photos/*.jpg --classes @classes.txt --out labels/
  maskdiffusion demo
  maskdiffusion evaluate --dataset toyworld --model toy
  maskdiffusion benchmark --suite ovss --root data/

Run 'maskdiffusion COMMAND --help' for a command's flags.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskdiffusion", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"maskdiffusion {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for command in (segment, demo, evaluate, benchmark, serve):
        command.add_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
