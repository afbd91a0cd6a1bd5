"""What ``segment`` reads: files, folders, glob patterns and ``@list.txt`` files, streamed in a fixed order.

A data set to label is a tree of 10^4-10^7 images, so nothing here holds more than paths and
names: folders are walked one directory at a time (entries sorted by name, depth first, so the
order never depends on the file system), glob patterns are expanded lazily per pattern, and a
list file is read line by line. What cannot be read (a missing path, an unreadable folder, a
symbolic-link loop, a broken link) is yielded as a :class:`Problem` and the listing goes on.

Every input gets an output name, a relative path without suffix under ``--out``. A loose file
keeps its stem (``street.png`` -> ``street``); what comes from a folder, a glob or a list keeps
its path below the folder, the glob's fixed prefix or the list's folder
(``photos/city/000123.png`` -> ``city/000123``), so an output tree mirrors the input tree. Two
inputs that would share a name (``a.png`` and ``a.jpg``, the same stem in two loose files, or
names that differ only in case) get ``_2``, ``_3``, ... in listing order, so a name depends only
on the input list, never on which worker segments it.
"""

from __future__ import annotations

import glob
import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm"})
LIST_PREFIX = "@"
GLOB_CHARS = frozenset("*?[")
STATE_FOLDER = ".maskdiffusion"  # a run's own files under --out (manifest, parts): no output is named into it


@dataclass(frozen=True)
class Input:
    """One image to segment: ``path`` to read, ``name`` its outputs' path under ``--out`` without suffix."""

    path: str
    name: PurePosixPath


@dataclass(frozen=True)
class Problem:
    """Something in the input list that could not be read: skipped, reported, counted as failed."""

    source: str
    message: str


def is_image(path: str | os.PathLike) -> bool:
    return Path(path).suffix.casefold() in IMAGE_SUFFIXES


def list_inputs(specs: Sequence[str]) -> Iterator[Input | Problem]:
    """Every image the command line names, in order, with collision-free output names.

    ``specs``: image files (any suffix: a file named on purpose is read), folders (their image
    files, recursively), glob patterns (``'photos/**/*.jpg'``, quoted so the shell leaves them
    alone; ``**`` matches any depth) and ``@list.txt`` (one path, folder or pattern per line,
    relative to the list's folder; blank lines and ``#`` comments skipped).
    """
    names = _Names()
    for spec in specs:
        for item in _expand(spec):
            yield item if isinstance(item, Problem) else Input(item[0], names.claim(item[1]))


class _Names:
    """Output names handed out so far (case-folded), and the next free one for a wanted name."""

    def __init__(self):
        self.taken: set[str] = set()

    def claim(self, wanted: PurePosixPath) -> PurePosixPath:
        if wanted.parts[0].casefold() == STATE_FOLDER:
            wanted = PurePosixPath("_" + wanted.parts[0], *wanted.parts[1:])
        name, number = wanted, 1
        while str(name).casefold() in self.taken:
            number += 1
            name = wanted.with_name(f"{wanted.name}_{number}")
        self.taken.add(str(name).casefold())
        return name


def _expand(spec: str, *, base: Path | None = None) -> Iterator[tuple[str, PurePosixPath] | Problem]:
    """``(path, wanted name)`` pairs of one spec. ``base``: the folder of the list the spec is a line of;
    a relative line below it is named by its path from there, whatever it is (file, folder, pattern)."""
    if spec.startswith(LIST_PREFIX) and base is None:
        yield from _from_list(spec[len(LIST_PREFIX) :])
        return
    inside = base is not None and not Path(spec).is_absolute() and ".." not in Path(spec).parts
    path = base / spec if inside else Path(spec)
    if GLOB_CHARS & set(spec) and not path.exists():
        yield from _from_glob(str(path), spec, base if inside else _fixed_prefix(str(path)))
        return
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        yield Problem(spec, f"image {spec!r} does not exist: check the path")
        return
    except OSError as error:
        yield Problem(spec, f"cannot read {spec!r}: {error.strerror or error}")
        return
    if stat.S_ISDIR(mode):
        yield from _walk(path, spec, PurePosixPath(Path(spec).as_posix()) if inside else PurePosixPath())
    elif inside:
        yield str(path), _stemmed(PurePosixPath(Path(spec).as_posix()))
    else:
        yield str(path), PurePosixPath(path.stem or "image")


def _stemmed(relative: PurePosixPath) -> PurePosixPath:
    """``city/000123.png`` -> ``city/000123``."""
    return relative.with_name(relative.stem or "image")


def _walk(root: Path, spec: str, prefix: PurePosixPath) -> Iterator[tuple[str, PurePosixPath] | Problem]:
    """The image files below ``root`` (named ``prefix/<path below root>``), depth first, entries sorted by
    name, hidden ones (``.*``) left out; links followed, loops reported."""
    seen: set[tuple[int, int]] = set()

    def visit(folder: Path, relative: PurePosixPath) -> Iterator[tuple[str, PurePosixPath] | Problem]:
        try:
            info = folder.stat()
        except OSError as error:
            yield Problem(str(folder), f"cannot read folder {str(folder)!r}: {error.strerror or error}")
            return
        key = (info.st_dev, info.st_ino)
        if key in seen:
            message = f"folder {str(folder)!r} is a symbolic-link loop (it leads back into {spec!r}): skipped"
            yield Problem(str(folder), message)
            return
        seen.add(key)
        try:
            with os.scandir(folder) as entries:
                names = sorted(entry.name for entry in entries)
        except OSError as error:
            yield Problem(str(folder), f"cannot read folder {str(folder)!r}: {error.strerror or error}")
            return
        for name in names:
            if name.startswith("."):  # hidden entries (.git, .ipynb_checkpoints, a run's own state) are not data
                continue
            path = folder / name
            try:
                is_folder = path.is_dir()
            except OSError as error:
                yield Problem(str(path), f"cannot read {str(path)!r}: {error.strerror or error}")
                continue
            if is_folder:
                yield from visit(path, relative / name)
            elif is_image(name):
                if not path.exists():  # a broken link
                    yield Problem(str(path), f"{str(path)!r} is a broken symbolic link: skipped")
                else:
                    yield str(path), _stemmed(relative / name)
        seen.discard(key)  # a folder reached twice by different links is fine; only its own descendants loop

    yield from visit(root, prefix)


def _from_glob(pattern: str, spec: str, root: Path | None) -> Iterator[tuple[str, PurePosixPath] | Problem]:
    """A pattern's image files (and the images in its matching folders) in sorted order, named by their
    path below ``root``."""
    found = False
    for match in sorted(glob.iglob(pattern, recursive=True)):
        relative = PurePosixPath((Path(match).relative_to(root) if root else Path(match)).as_posix())
        if os.path.isfile(match) and (is_image(match) or not GLOB_CHARS & set(Path(pattern).name)):
            found = True
            yield match, _stemmed(relative)
        elif os.path.isdir(match):
            found = True
            yield from _walk(Path(match), match, relative)
    if not found:
        yield Problem(spec, f"pattern {spec!r} matches no image file")


def _fixed_prefix(pattern: str) -> Path | None:
    """The folder part of ``pattern`` before its first wildcard (``photos/**/*.jpg`` -> ``photos``)."""
    parts = Path(pattern).parts
    fixed = parts[: next(i for i, p in enumerate(parts) if GLOB_CHARS & set(p))]
    return Path(*fixed) if fixed else None


def _from_list(list_path: str) -> Iterator[tuple[str, PurePosixPath] | Problem]:
    """The lines of a list file, each expanded relative to the list's folder."""
    path = Path(list_path)
    try:
        handle = path.open(encoding="utf-8-sig")
    except OSError as error:
        yield Problem(LIST_PREFIX + list_path, f"cannot read list file {list_path!r}: {error.strerror or error}")
        return
    with handle:
        try:
            for line in _lines(handle):
                yield from _expand(line, base=path.parent)
        except UnicodeDecodeError:
            yield Problem(LIST_PREFIX + list_path, f"list file {list_path!r} is not UTF-8 text: one path per line")


def _lines(handle: Iterable[str]) -> Iterator[str]:
    for raw in handle:
        line = raw.strip()
        if line and not line.startswith("#"):
            yield line
