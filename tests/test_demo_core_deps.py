"""`maskdiffusion demo` runs with the core dependencies only (scipy, matplotlib and scikit-learn are extras).

The demo runs in a fresh interpreter whose site-packages is a copy (of links) without those
packages and their metadata, so that every library sees them as not installed, as on a
machine that installed only ``pip install maskdiffusion``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import maskdiffusion

EXTRAS = ("scipy", "matplotlib", "sklearn", "scikit_learn", "pylab")


def site_without_extras(folder: Path) -> Path:
    """A site-packages of links to the real one's entries, less the extras' packages and metadata."""
    site = Path(sysconfig.get_paths()["purelib"])
    folder.mkdir()
    for entry in site.iterdir():
        if entry.name.split("-")[0].split(".")[0].lower() not in EXTRAS:
            (folder / entry.name).symlink_to(entry)
    return folder


def test_demo_runs_without_scipy_matplotlib_or_scikit_learn(tmp_path):
    shadow = site_without_extras(tmp_path / "site-packages")
    source = Path(maskdiffusion.__file__).resolve().parents[1]
    script = (
        "import importlib.util, sys\n"
        f"assert all(importlib.util.find_spec(name) is None for name in {EXTRAS[:3]!r})\n"
        "from maskdiffusion import cli\n"
        f"code = cli.main(['demo', '--scenes', '2', '--device', 'cpu', '--out', {str(tmp_path / 'demo')!r}])\n"
        "sys.exit(code)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(source), str(shadow)]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-S", "-c", script], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "RGB k-means" in done.stdout and "attention only" in done.stdout
    assert (tmp_path / "demo" / "toyworld.png").is_file()
