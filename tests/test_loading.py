import shutil

import pytest
import torch

from maskdiffusion import MaskDiffusion, ModelNotFoundError
from maskdiffusion.loading import model_presets, pick_device, pick_dtype, resolve_model_folder


def fake_hub_cache(tiny_model, cache, repo="someorg/tiny-sd"):
    """Lay the tiny model out as huggingface_hub caches a downloaded repo."""
    root = cache / f"models--{repo.replace('/', '--')}"
    revision = "0" * 40
    shutil.copytree(tiny_model, root / "snapshots" / revision)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(revision)
    return repo


def test_hub_id_in_the_local_cache_loads_offline(tiny_model, tmp_path, monkeypatch):
    import huggingface_hub.constants

    repo = fake_hub_cache(tiny_model, tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    folder = resolve_model_folder(repo)
    assert folder.parent.name == "snapshots"
    seg = MaskDiffusion.from_pretrained(repo, device="cpu")
    assert seg.model_id == repo
    assert not seg.unet.training and not any(p.requires_grad for p in seg.unet.parameters())


def test_missing_hub_model_offline_names_the_model_and_the_fix(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFoundError, match=r"(?s)someorg/absent.*not in the local.*hf download"):
        resolve_model_folder("someorg/absent")


def test_model_folder_overrides_presets_with_its_settings_file(tiny_model, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    (folder / "maskdiffusion.json").write_text('{"presets": {"default": {"size": 128, "attention_factors": [16]}}}')
    presets = model_presets(folder)
    assert presets["default"].size == 128 and presets["default"].attention_factors == (16,)
    assert presets["reference"].size == 512  # untouched
    seg = MaskDiffusion.from_pretrained(str(folder), device="cpu")
    assert seg.preset.size == 128


def test_device_and_dtype_names_are_checked():
    assert pick_device("auto").type in ("cpu", "cuda", "mps")
    assert pick_dtype("bfloat16") is torch.bfloat16 and pick_dtype(None) is torch.float32
    with pytest.raises(ValueError, match="unknown dtype"):
        pick_dtype("float8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            pick_device("cuda")
