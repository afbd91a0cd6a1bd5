"""README's runnable Python example really runs (on the tiny random model)."""

import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def runnable_blocks():
    text = README.read_text(encoding="utf-8")
    return re.findall(r"<!-- runnable[^>]*-->\s*```python\n(.*?)```", text, flags=re.S)


def street(tmp_path):
    from PIL import Image

    image = tmp_path / "street.png"
    Image.fromarray((np.random.default_rng(0).random((70, 110, 3)) * 255).astype(np.uint8)).save(image)
    return image


def test_readme_api_example_runs(tiny_model, tmp_path):
    block, _ = runnable_blocks()
    image = street(tmp_path)
    namespace = {"MODEL": str(tiny_model), "IMAGE": str(image), "OUT": str(tmp_path / "out")}
    block = block.replace('device="auto"', 'device="cpu", preset=Preset(size=128)')  # small views: fast
    exec(compile(block, "README.md", "exec"), namespace)
    result = namespace["result"]
    assert result.labels.shape == (70, 110)
    assert (tmp_path / "out" / "street.labels.png").exists()
    assert len(namespace["results"]) == 2


def test_readme_transformer_example_runs(tiny_family_model, tmp_path):
    _, block = runnable_blocks()
    namespace = {"TRANSFORMER": str(tiny_family_model("flux-schnell")), "IMAGE": str(street(tmp_path))}
    exec(compile(block.replace('device="auto"', 'device="cpu"'), "README.md", "exec"), namespace)
    concepts, weights = namespace["concepts"], namespace["weights"]
    assert concepts.labels.shape == weights.labels.shape == (70, 110)
    assert (concepts.preset.class_maps, weights.preset.class_maps) == ("concept", "attention")
    assert list(weights.summary()["settings"]["attention_blocks"]) == [0, 1]
