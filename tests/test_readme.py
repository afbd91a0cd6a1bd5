"""README's runnable Python example really runs (on the tiny random model)."""

import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def runnable_blocks():
    text = README.read_text(encoding="utf-8")
    return re.findall(r"<!-- runnable[^>]*-->\s*```python\n(.*?)```", text, flags=re.S)


def test_readme_api_example_runs(tiny_model, tmp_path):
    (block,) = runnable_blocks()
    image = tmp_path / "street.png"
    from PIL import Image

    Image.fromarray((np.random.default_rng(0).random((70, 110, 3)) * 255).astype(np.uint8)).save(image)
    namespace = {"MODEL": str(tiny_model), "IMAGE": str(image), "OUT": str(tmp_path / "out")}
    block = block.replace('device="auto"', 'device="cpu", preset=Preset(size=128)')  # small views: fast
    exec(compile(block, "README.md", "exec"), namespace)
    result = namespace["result"]
    assert result.labels.shape == (70, 110)
    assert (tmp_path / "out" / "street.labels.png").exists()
    assert len(namespace["results"]) == 2
