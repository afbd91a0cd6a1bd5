"""Signals to a running `python -m maskdiffusion evaluate --num-processes 2` (real processes, Linux /proc).

- SIGKILL of the parent: the workers must not run on to the end, they die with it. The parent
  is started with SIGINT ignored, as a shell script starts a background job (``cmd &``) or
  ``nohup`` does: torch's own guard (SIGINT to workers whose parent dies) does nothing then.
- Ctrl-C (SIGINT to the whole process group, as a terminal sends it): one line, exit 130,
  no traceback, no worker left.

The data set is long (300 images at view size 512 take minutes on the tiny model), so a
worker that survives its parent is still running when it is looked for; with the fix the
test ends as soon as the workers have checkpointed once.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from folder_data import folder_dataset
from PIL import Image

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs Linux /proc to find the workers")

IMAGES = 300


@pytest.fixture(scope="module")
def long_data(tmp_path_factory) -> Path:
    root = folder_dataset(tmp_path_factory.mktemp("long") / "data")
    label = np.zeros((32, 32), np.uint8)
    label[16:] = 1
    for index in range(IMAGES):
        Image.fromarray(np.full((32, 32, 3), index % 256, np.uint8)).save(root / "images" / f"{index:04d}.png")
        Image.fromarray(label).save(root / "labels" / f"{index:04d}.png")
    return root


def start(data: Path, model: Path, out: Path, *, ignore_sigint: bool) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "maskdiffusion", "evaluate", "--dataset", "folder", "--root", str(data),
        "--model", str(model), "--size", "512", "--device", "cpu", "--batch-size", "1", "--save-every", "1",
        "--num-processes", "2", "--out", str(out), "--quiet",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    log = (out.parent / "log.txt").open("w")
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint else None
    return subprocess.Popen(
        command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=ignore
    )


def wait_for(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


def stat_fields(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    fields = stat_fields(pid)
    return fields is not None and fields[0] != "Z"  # a zombie has ended, only its parent has not reaped it


def workers_of(parent: int) -> list[int]:
    """The multiprocessing-spawned children of ``parent``."""
    found = []
    for entry in Path("/proc").iterdir():
        fields = stat_fields(int(entry.name)) if entry.name.isdigit() else None
        if fields is not None and int(fields[1]) == parent:
            try:
                if b"spawn_main" in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.fixture
def running(long_data, tiny_model, tmp_path, request):
    """A 2-process evaluation whose workers have both checkpointed; killed with its group at the end.
    ``request.param``: whether it is started with SIGINT ignored."""
    out = tmp_path / "run"
    process = start(long_data, tiny_model, out, ignore_sigint=request.param)
    try:
        started = wait_for(lambda: all((out / f"state.rank{r}of2.json").is_file() for r in (0, 1)), 300)
        assert started, (out.parent / "log.txt").read_text()[-3000:]
        workers = workers_of(process.pid)
        assert len(workers) == 2
        yield process, workers, out
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.mark.parametrize("running", [True], indirect=True, ids=["started-with-SIGINT-ignored"])
def test_workers_die_with_a_parent_that_is_killed(running):
    process, workers, _ = running
    process.kill()
    process.wait()
    assert wait_for(lambda: not any(alive(pid) for pid in workers), 10), "workers outlived their killed parent"


@pytest.mark.parametrize("running", [False], indirect=True, ids=["started-from-a-terminal"])
def test_ctrl_c_prints_one_line_exits_130_and_leaves_no_worker(running):
    process, workers, out = running
    os.killpg(process.pid, signal.SIGINT)
    assert process.wait(timeout=60) == 130
    log = (out.parent / "log.txt").read_text()
    assert "Traceback" not in log
    lines = [line for line in log.splitlines() if "interrupted" in line]
    assert len(lines) == 1, log[-3000:]
    assert re.fullmatch(rf"interrupted; \d+ image\(s\) checkpointed in {re.escape(str(out))}; run the same "
                        "command again to resume", lines[0])  # fmt: skip
    assert wait_for(lambda: not any(alive(pid) for pid in workers), 10)
