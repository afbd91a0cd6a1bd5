"""A `folder` data set skeleton for tests: ``images/``, ``labels/`` and ``classes.txt``."""

from __future__ import annotations

from pathlib import Path


def folder_dataset(root: Path, classes: str = "sky\nsand\n") -> Path:
    """Create ``root`` with empty ``images/`` and ``labels/`` and a ``classes.txt`` holding ``classes``."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "classes.txt").write_text(classes)
    return root
