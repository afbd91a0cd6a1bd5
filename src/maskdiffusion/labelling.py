"""Labelling a data set: ``segment`` over 10^4-10^7 images, resumable, sharded over processes and machines.

Layout of ``--out`` (the outputs themselves are the export format's: :mod:`maskdiffusion.exports`)::

    city/000123.labels.png ...             png: one set of files per image, mirroring the input tree
    .maskdiffusion/run.json                the run's settings: model, family, preset (every field), classes,
                                           format, package version
    .maskdiffusion/done/rank<r>of<w>.txt   the names each worker finished, one per line, appended only after
                                           an image's outputs are complete
    .maskdiffusion/progress/rank<r>.json   each worker's counts, read by the one progress bar
    .maskdiffusion/summary.json            the finished run: done, skipped, failed by name, images per second

Images are taken in listing order (:func:`maskdiffusion.inputs.list_inputs`) in groups of the
segmenter's batch size; group ``g`` belongs to worker ``g % world_size``, and a group is always
segmented as one ``segment_batch`` call, so every image shares its batch with the same images in
a single-process, multi-process, fresh or resumed run: the outputs are the same bytes. A resumed
run skips the groups whose images are all in the done lists (any earlier number of workers) and
segments the others whole, writing only what is missing. A run with other settings in the same
``--out`` is refused; ``overwrite`` starts it fresh (the done lists are cleared and every image
is written again).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from . import files
from .distributed import Comm
from .exports import EXPORTS, Export
from .inputs import STATE_FOLDER, Input, Problem, list_inputs
from .presets import Preset
from .prompts import ClassName
from .runstate import RunDirError, canonical, changed_settings, fingerprint, saved_run

PROGRESS_SECONDS = 1.0  # a worker writes its counts at most this often


@dataclass
class Summary:
    """What a run did: images segmented now, skipped as done before, failed (input -> why), and how fast."""

    done: int = 0
    skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    def merge(self, other: Summary) -> Summary:
        return Summary(
            self.done + other.done,
            self.skipped + other.skipped,
            {**self.failed, **other.failed},
            max(self.seconds, other.seconds),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "done": self.done,
            "skipped": self.skipped,
            "failed": dict(sorted(self.failed.items())),
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 3),
        }

    def line(self, out: str) -> str:
        """The one line the command prints at the end."""
        text = f"wrote {self.done} segmentation(s) to {out}"
        if self.skipped:
            text += f", {self.skipped} already done"
        if self.failed:
            text += f"; {len(self.failed)} input(s) failed"
        if self.done:
            text += f" ({self.images_per_second:.2f} images/s)"
        return text


def state(out: Path) -> Path:
    return Path(out) / STATE_FOLDER


def manifest(segmenter, preset: Preset, vocabulary: Sequence[ClassName], export: str) -> dict[str, Any]:
    """What binds an ``--out`` folder: everything that decides the outputs' bytes."""
    from . import __version__

    return canonical(
        {
            "model": segmenter.model_id,
            "family": segmenter.family.name,
            "encoder": segmenter.encoder_id,
            "dtype": str(segmenter.dtype).removeprefix("torch."),
            "preset": preset.to_dict(),
            "classes": [{"name": c.name, "words": list(c.synonyms)} for c in vocabulary],
            "format": export,
            "batch_size": segmenter.batch_size,
            "version": __version__,
        }
    )


def prepare(out: Path, settings: dict[str, Any], *, overwrite: bool) -> None:
    """Bind ``out`` to ``settings`` (``run.json``), or check it already is; raise :class:`RunDirError` if it holds
    another run. ``overwrite``: drop the earlier run's state (done lists, parts) and bind it anew."""
    run_file = state(out) / "run.json"
    record = {"fingerprint": fingerprint(settings), "settings": settings}
    if run_file.is_file() and not overwrite:
        changes = changed_settings(saved_run(run_file, "pass --overwrite to start fresh"), record)
        if changes:
            raise RunDirError(
                f"--out {str(out)!r} holds a segmentation run with other settings:\n{changes}\n"
                "Rerun with its settings to finish it, pass --overwrite to start fresh (every image is written "
                "again), or choose another --out."
            )
        return
    if overwrite and state(out).is_dir():
        shutil.rmtree(state(out))
    files.write_json(run_file, record)


def read_done(out: Path) -> set[str]:
    """Every name in the done lists of ``out`` (written by any number of workers). Each line is a JSON string,
    so a line torn by a kill does not parse and is ignored (a cut ``city/000123`` is never ``city/0001``)."""
    names: set[str] = set()
    for path in sorted((state(out) / "done").glob("rank*.txt")):
        for line in path.read_text(encoding="utf-8", errors="replace").split("\n"):
            try:
                name = json.loads(line)
            except ValueError:
                continue
            if isinstance(name, str):
                names.add(name)
    return names


class DoneList:
    """One worker's done list: a name is appended (and flushed) once its image's outputs are complete."""

    def __init__(self, out: Path, rank: int, world_size: int):
        path = state(out) / "done" / f"rank{rank}of{world_size}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = path.open("a+", encoding="utf-8")
        self.handle.seek(0, os.SEEK_END)
        if self.handle.tell():  # a worker killed mid-line: start on a fresh line
            self.handle.seek(self.handle.tell() - 1)
            last = self.handle.read(1)
            self.handle.seek(0, os.SEEK_END)
            if last != "\n":
                self.handle.write("\n")

    def add(self, name: PurePosixPath) -> None:
        self.handle.write(json.dumps(str(name)) + "\n")
        self.handle.flush()

    def close(self) -> None:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()


def sweep(folder: Path | None, before: float, swept: set[Path]) -> None:
    """Remove the temp files (``.NAME.*.tmp``) a killed run left in ``folder``, once per folder: only those
    last written before ``before`` (this run's start), never a live worker's."""
    if folder is None or folder in swept:
        return
    swept.add(folder)
    for temp in folder.glob(".*.tmp") if folder.is_dir() else ():
        with contextlib.suppress(OSError):
            if temp.stat().st_mtime < before:
                temp.unlink()


class Progress:
    """One worker's counts, written to ``progress/rank<r>.json`` at most once a second (and at the end)."""

    def __init__(self, out: Path, rank: int):
        self.path = state(out) / "progress" / f"rank{rank}.json"
        self.counts = {"done": 0, "skipped": 0, "failed": 0}
        self.written = 0.0

    def add(self, **counts: int) -> None:
        for key, value in counts.items():
            self.counts[key] += value
        if time.monotonic() - self.written >= PROGRESS_SECONDS:
            self.write()

    def write(self) -> None:
        files.write_json(self.path, self.counts)
        self.written = time.monotonic()


class ProgressBar:
    """The one bar over the whole job: every worker's counts summed, the total once a background count of the
    inputs is known; shown by one process (rank 0, or the parent of spawned workers)."""

    def __init__(self, out: Path, specs: Sequence[str], *, quiet: bool):
        from tqdm.auto import tqdm

        self.folder = state(out) / "progress"
        self.bar = tqdm(desc="segmenting", unit="image", disable=quiet, dynamic_ncols=True)
        self.stop = threading.Event()
        self.counter = threading.Thread(target=self._count, args=(specs,), name="count-inputs", daemon=True)
        self.watcher = threading.Thread(target=self._watch, name="progress", daemon=True)

    def __enter__(self) -> ProgressBar:
        self.counter.start()
        self.watcher.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.watcher.join()
        self._refresh()
        self.bar.close()

    def _count(self, specs: Sequence[str]) -> None:
        total = sum(1 for item in list_inputs(specs) if isinstance(item, Input) and not self.stop.is_set())
        if not self.stop.is_set():
            self.bar.total = total
            self.bar.refresh()

    def _watch(self) -> None:
        while not self.stop.wait(PROGRESS_SECONDS / 2):
            self._refresh()

    def _refresh(self) -> None:
        counts = {"done": 0, "skipped": 0, "failed": 0}
        for path in self.folder.glob("rank*.json"):
            try:
                for key, value in json.loads(path.read_text(encoding="utf-8")).items():
                    counts[key] += int(value)
            except (OSError, ValueError, KeyError, TypeError):
                continue  # a file being replaced: read it next time
        self.bar.n = sum(counts.values())
        self.bar.set_postfix(skipped=counts["skipped"], failed=counts["failed"], refresh=False)
        self.bar.refresh()


def groups(specs: Sequence[str], size: int, problems: list[Problem] | None = None) -> Iterator[list[Input]]:
    """The inputs in listing order, in groups of ``size``; what cannot be listed goes to ``problems``."""
    group: list[Input] = []
    for item in list_inputs(specs):
        if isinstance(item, Problem):
            if problems is not None:
                problems.append(item)
            continue
        group.append(item)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def _say(message: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(f"error: {message}", file=sys.stderr)


def _write(export: Export, item: Input, result, before: float, swept: set[Path]) -> str | None:
    """Write one image's outputs; what went wrong (unreadable image, full disk, a name the format cannot
    hold), or ``None``."""
    from .views import ImageLoadError

    if isinstance(result, ImageLoadError):
        return str(result)
    try:
        sweep(export.folder(item.name), before, swept)
        export.write(item.name, result, item.path)
    except OSError as error:
        return f"could not write the outputs of {item.path!r} into {str(export.out)!r}: {error.strerror or error}"
    except ValueError as error:  # ExportError: a name the format cannot hold
        return f"could not write the outputs of {item.path!r}: {error}"
    return None


def label_shard(
    segmenter,
    specs: Sequence[str],
    vocabulary: Sequence[ClassName],
    preset: Preset,
    out: Path,
    export_format: str,
    comm: Comm,
    on_image: Callable[[int], object] | None = None,
) -> Summary:
    """This worker's share of the job: its groups of images, segmented and written, its done list kept.

    ``on_image``: a progress hook, called with the number of images this worker has written so far,
    after each one's outputs are complete and done-listed.
    """
    started, wall_start = time.perf_counter(), time.time() - 1.0
    export: Export = EXPORTS[export_format](out, vocabulary, rank=comm.rank, world_size=comm.world_size)
    listed = read_done(out)
    swept: set[Path] = set()

    def is_done(item: Input) -> bool:  # in a done list and its outputs there (a power loss may lose either)
        return str(item.name) in listed and export.done(item.name)

    done_list, progress, summary = DoneList(out, comm.rank, comm.world_size), Progress(out, comm.rank), Summary()
    problems: list[Problem] = []
    try:
        for index, group in enumerate(groups(specs, segmenter.batch_size, problems if comm.is_main else None)):
            if index % comm.world_size != comm.rank:
                continue
            done = {str(item.name) for item in group if is_done(item)}
            if len(done) == len(group):
                summary.skipped += len(group)
                progress.add(skipped=len(group))
                continue
            results = segmenter.segment_batch([item.path for item in group], vocabulary, preset=preset, errors="return")
            for item, result in zip(group, results, strict=True):
                if str(item.name) in done:
                    summary.skipped += 1
                    progress.add(skipped=1)
                    continue
                failure = _write(export, item, result, wall_start, swept)
                if failure is not None:
                    summary.failed[item.path] = failure
                    progress.add(failed=1)
                    _say(failure)
                    continue
                done_list.add(item.name)
                summary.done += 1
                progress.add(done=1)
                if on_image is not None:
                    on_image(summary.done)
        for problem in problems:
            summary.failed[problem.source] = problem.message
            _say(problem.message)
    finally:
        export.close()
        done_list.close()
        progress.write()
    summary.seconds = time.perf_counter() - started
    return summary


def finish(
    specs: Sequence[str], vocabulary: Sequence[ClassName], out: Path, export_format: str, summaries: Sequence[Summary]
) -> Summary:
    """After every worker: the export's run-level files and ``summary.json`` (rank 0 only); the merged summary."""
    total = Summary()
    for part in summaries:
        total = total.merge(part)
    names = (item.name for item in list_inputs(specs) if isinstance(item, Input))
    EXPORTS[export_format](out, vocabulary).finish(names)
    files.write_json(state(out) / "summary.json", total.to_dict())
    return total
