"""Writing files so that a crash never leaves one half-written: temp file, then rename."""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from PIL import Image

_UMASK = os.umask(0)
os.umask(_UMASK)


def _write_temp(path: Path, data: bytes) -> Path:
    """``data`` in a synced temp file beside ``path`` (removed again if writing fails)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual mode
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return Path(temp)


def write_files(contents: Mapping[str | os.PathLike, bytes]) -> list[Path]:
    """Write several files as a set: all of them or none.

    Every file is first written to a temp file; only when all are on disk are they renamed
    into place, in order (so the last one's presence means the set is complete). A failure
    (full disk, read-only folder, an interrupt) removes the temp files and any file of the
    set already renamed.
    """
    temps: list[tuple[Path, Path]] = []
    placed: list[Path] = []
    try:
        for path, data in contents.items():
            temps.append((_write_temp(Path(path), data), Path(path)))
        for temp, path in temps:
            os.replace(temp, path)
            placed.append(path)
    except BaseException:
        for temp, _ in temps:
            temp.unlink(missing_ok=True)
        for path in placed:
            path.unlink(missing_ok=True)
        raise
    return [path for _, path in temps]


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (same-folder temp file + ``os.replace``)."""
    return write_files({path: data})[0]


def json_bytes(value: object) -> bytes:
    return (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def image_bytes(image: Image.Image, suffix: str = ".png") -> bytes:
    """``image`` encoded in the format its file suffix names (PNG by default)."""
    buffer = io.BytesIO()
    image.save(buffer, format=Image.registered_extensions().get(suffix.lower(), "PNG"))
    return buffer.getvalue()


def write_json(path: str | os.PathLike, value: object) -> Path:
    return write_bytes(path, json_bytes(value))


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_image(path: str | os.PathLike, image: Image.Image) -> Path:
    """Save ``image`` as PNG (or the format its suffix names) atomically."""
    return write_bytes(path, image_bytes(image, Path(path).suffix))
