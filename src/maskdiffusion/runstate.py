"""An evaluation's RUN_DIR: its settings, and each shard's resumable progress.

Layout of a RUN_DIR::

    run.json                     settings, their fingerprint, number of processes
    state.rank<r>of<w>.json      one shard's progress (confusion counts, done ids, failures)
    pool/rank<r>-<n>.npz         pooled feature samples of a shard (dataset-level clustering)
    kmeans.npz                   the fitted centroids (dataset-level clustering)
    predictions/<id>.png         raw predictions (the first few, or all with --save-predictions)
    metrics.json, report.md, per_class_iou.png, figures/   the results

Every file is written atomically (temp file + rename), and a state file only names pool
chunks that were written before it. So a run killed at any instant leaves either the
previous or the next checkpoint, never a torn one; work done after the last checkpoint
is simply done again. A RUN_DIR is bound to its settings by a fingerprint in ``run.json``:
a restart with other settings is refused instead of mixing two runs' counts.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import files
from .metrics import ConfusionMatrix

RUN_FILE = "run.json"
CENTROIDS_FILE = "kmeans.npz"


class RunDirError(ValueError):
    """A RUN_DIR that cannot be used for this run (other settings, other process count, not a run)."""


def canonical(value: Any) -> Any:
    """``value`` as JSON would give it back (tuples -> lists, keys -> str), for comparisons."""
    return json.loads(json.dumps(value, sort_keys=True))


def fingerprint(settings: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of ``settings``."""
    text = json.dumps(canonical(settings), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
    """Human-readable ``key: saved -> now`` lines for every differing leaf."""
    if isinstance(saved, dict) and isinstance(current, dict):
        lines = []
        for key in sorted(set(saved) | set(current)):
            lines += differences(saved.get(key, "<absent>"), current.get(key, "<absent>"), f"{prefix}{key}.")
        return lines
    if saved == current:
        return []
    shown = [str(v) if len(str(v)) <= 80 else str(v)[:77] + "..." for v in (saved, current)]
    return [f"{prefix.rstrip('.')}: {shown[0]} (in RUN_DIR) vs {shown[1]} (now)"]


def saved_run(run_file: Path, fresh: str) -> dict[str, Any]:
    """The record a run folder's ``run.json`` holds; :class:`RunDirError` saying ``fresh`` (how to start
    anew) when it cannot be read."""
    try:
        saved = json.loads(run_file.read_text(encoding="utf-8"))
        if not isinstance(saved, dict) or not {"settings", "fingerprint"} <= saved.keys():
            raise ValueError("no settings and fingerprint in it")
    except (OSError, ValueError) as error:
        raise RunDirError(f"{run_file} is damaged ({error!r}); {fresh}") from None
    return saved


def changed_settings(saved: dict[str, Any], record: dict[str, Any]) -> str:
    """``key: saved vs now`` lines, indented, where ``record``'s settings differ from ``saved``'s ("" if none)."""
    if saved["fingerprint"] == record["fingerprint"]:
        return ""
    return "\n".join(f"  {line}" for line in differences(saved["settings"], record["settings"])) or "  (fingerprint)"


def prepare_run_dir(out_dir: Path, settings: dict[str, Any], world_size: int) -> dict[str, Any]:
    """Create ``out_dir/run.json`` for a new run, or check that it holds the same run.

    Raises :class:`RunDirError` when the folder holds a run with other settings or another
    number of processes, or is a non-empty folder that is not an evaluation run.
    Returns the content of ``run.json``.
    """
    out_dir = Path(out_dir)
    settings = canonical(settings)
    record = {"fingerprint": fingerprint(settings), "world_size": world_size, "settings": settings}
    run_file = out_dir / RUN_FILE
    if not run_file.is_file():
        if out_dir.is_dir() and any(out_dir.iterdir()):
            raise RunDirError(
                f"{out_dir} is not empty and holds no {RUN_FILE}, so it is not an evaluation run folder: "
                "give --out a new or empty folder"
            )
        files.write_json(run_file, record)
        return record
    saved = saved_run(run_file, "give --out a new folder")
    changes = changed_settings(saved, record)
    if changes:
        raise RunDirError(
            f"{out_dir} holds an evaluation run with other settings, which cannot be mixed with this one:\n"
            f"{changes}\nResume it with its own settings, or give --out a new folder."
        )
    if saved.get("world_size") != world_size:
        raise RunDirError(
            f"{out_dir} was started with {saved.get('world_size')} process(es) and each keeps its own shard "
            f"of progress; resume it with --num-processes {saved.get('world_size')} (or the same torchrun "
            f"world size), not {world_size}, or give --out a new folder"
        )
    return saved


def state_path(out_dir: Path, rank: int, world_size: int) -> Path:
    return Path(out_dir) / f"state.rank{rank}of{world_size}.json"


def checkpointed(out_dir: Path) -> tuple[int, int]:
    """``(scored, pooled)``: samples the shard states in ``out_dir`` hold as scored (or failed),
    and as pooled in pass 1 of dataset-level clustering. Unreadable states count as none."""
    scored = pooled = 0
    for path in Path(out_dir).glob("state.rank*of*.json"):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            scored, pooled = scored + len(data["done"]), pooled + len(data["pooled"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return scored, pooled


@dataclass
class ShardState:
    """One shard's progress; everything a restart needs to go on exactly.

    Attributes:
        matrix: counts so far: ``(C, C)`` classes, or ``(C, K)`` clusters for dataset-level
            clustering (matched to classes only at the end).
        done: ids scored (or failed) in the scoring pass.
        failed: id -> reason, for images or labels that could not be read (or do not fit).
        resized: id -> ``[image h, w, label h, w]`` for samples scored on a label of another
            size than the image (the prediction resized to the label).
        pooled: ids whose feature samples are stored (dataset-level clustering, pass 1).
        pool_chunks: names of the pool files (under ``pool/``) holding those samples.
    """

    matrix: ConfusionMatrix
    done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    resized: dict[str, list[int]] = field(default_factory=dict)
    pooled: list[str] = field(default_factory=list)
    pool_chunks: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "matrix": self.matrix.to_dict(),
            "done": self.done,
            "failed": self.failed,
            "resized": self.resized,
            "pooled": self.pooled,
            "pool_chunks": self.pool_chunks,
        }

    def save(self, path: Path) -> None:
        files.write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: Path, empty: ConfusionMatrix) -> ShardState:
        """The saved state, or a fresh one (holding ``empty``) when there is none yet."""
        if not path.is_file():
            return cls(matrix=empty)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            matrix = ConfusionMatrix.from_dict(data["matrix"])
            state = cls(
                matrix=matrix,
                done=list(data["done"]),
                failed=dict(data["failed"]),
                resized=dict(data["resized"]),
                pooled=list(data["pooled"]),
                pool_chunks=list(data["pool_chunks"]),
            )
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise RunDirError(f"progress file {path} is damaged ({error!r}); delete it to redo that shard") from None
        if matrix.counts.shape != empty.counts.shape:
            raise RunDirError(
                f"progress file {path} holds a {matrix.counts.shape} matrix, expected {empty.counts.shape}"
            )
        return state


def write_arrays(path: Path, **arrays: np.ndarray) -> Path:
    """Atomically write ``arrays`` as one ``.npz``."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return files.write_bytes(path, buffer.getvalue())


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def safe_name(sample_id: str) -> str:
    """A sample id as one file name (ids of nested layouts may hold separators)."""
    name = sample_id.replace(os.sep, "__").replace("/", "__")
    return name if name not in ("", ".", "..") else f"_{name}"
