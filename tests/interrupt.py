"""Stopping an evaluation or a segmentation run where a killed run dies.

The product has no fault switch: these hooks go through the public progress callbacks
(``evaluate``'s ``on_images``: a group scored, its checkpoint not yet written; ``label_shard``'s
``on_image``: an image written and done-listed). In-process, :func:`stop_evaluations_after`
makes ``maskdiffusion evaluate`` raise; as a script, ``python tests/interrupt.py N ARGS...`` runs
``maskdiffusion ARGS...`` and SIGKILLs itself once N images are handled, as ``kill -9`` would.
"""

from __future__ import annotations

import os
import signal
import sys
from functools import partial

from maskdiffusion import cli, evaluation, labelling
from maskdiffusion.commands import evaluate as evaluate_command
from maskdiffusion.commands import segment as segment_command


def _stop(images: int, stop) -> None:
    def on_images(handled: int) -> None:
        if handled >= images:
            stop()

    evaluate_command.evaluate = partial(evaluation.evaluate, on_images=on_images)
    segment_command.label_shard = partial(labelling.label_shard, on_image=on_images)


def stop_evaluations_after(monkeypatch, images: int, error: type[BaseException]) -> None:
    """Until ``monkeypatch`` undoes it, ``maskdiffusion evaluate`` raises ``error`` after ``images`` images."""
    monkeypatch.setattr(evaluate_command, "evaluate", evaluate_command.evaluate)  # restored on undo
    monkeypatch.setattr(segment_command, "label_shard", segment_command.label_shard)

    def stop():
        raise error

    _stop(images, stop)


if __name__ == "__main__":
    _stop(int(sys.argv[1]), lambda: os.kill(os.getpid(), signal.SIGKILL))
    sys.exit(cli.main(sys.argv[2:]))
