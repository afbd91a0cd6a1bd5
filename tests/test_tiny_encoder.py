"""``encoder="tiny"``: views encoded by a tiny autoencoder (diffusers' ``AutoencoderTiny``) in the model's latents."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from scenes import scene, sky_and_sand_dataset

from maskdiffusion import MaskDiffusion, ModelNotFoundError, cli
from maskdiffusion.tiny import build_tiny_encoder

CLASSES = ["sky", "sand"]


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    return build_tiny_encoder(tmp_path_factory.mktemp("encoders") / "taesd")


def test_views_are_encoded_by_the_tiny_encoder_in_its_own_scale(tiny_model, tiny_encoder):
    from diffusers import AutoencoderTiny

    seg = MaskDiffusion.from_pretrained(str(tiny_model), device="cpu", encoder=str(tiny_encoder))
    assert isinstance(seg.encoder, AutoencoderTiny) and seg.encoder is not seg.vae
    views = torch.rand(2, 3, 128, 128) * 2 - 1
    with torch.no_grad():
        expected = AutoencoderTiny.from_pretrained(tiny_encoder).encode(views).latents  # TAESD: scaling 1, shift 0
    torch.testing.assert_close(seg.encode_views(views), expected, rtol=1e-5, atol=1e-6)
    result = seg(scene(), classes=CLASSES)
    assert result.labels.shape == (64, 96)
    assert json.loads(json.dumps(result.summary()))["settings"]["encoder"] == str(tiny_encoder)
    assert (
        MaskDiffusion.from_pretrained(str(tiny_model), device="cpu")(scene(), CLASSES).summary()["settings"]["encoder"]
        == "full"
    )


def test_a_tiny_encoder_with_shift_and_scale_is_brought_into_the_denoisers_space(tiny_family_model, tmp_path):
    """taesd3 / taef1 carry their VAE's factors: the latents get the same (x - shift) * scale as the VAE's."""
    from diffusers import AutoencoderTiny

    folder = build_tiny_encoder(tmp_path / "taesd3", latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609)
    seg = MaskDiffusion.from_pretrained(str(tiny_family_model("sd3")), device="cpu", encoder=str(folder))
    views = torch.rand(1, 3, 128, 128) * 2 - 1
    with torch.no_grad():
        raw = AutoencoderTiny.from_pretrained(folder).encode(views).latents
    torch.testing.assert_close(seg.encode_views(views), (raw - 0.0609) * 1.5305, rtol=1e-5, atol=1e-6)
    assert seg(scene(), classes=CLASSES).labels.shape == (64, 96)


def place_in_hub_cache(folder, cache, repo_id):
    repo, revision = cache / f"models--{repo_id.replace('/', '--')}", "0" * 40
    shutil.copytree(folder, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)


def test_tiny_is_the_familys_own_encoder_found_in_the_local_cache(tiny_model, tiny_encoder, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(
        ModelNotFoundError, match=r"(?s)'madebyollin/taesd' is not in the local.*hf download madebyollin/taesd"
    ):
        MaskDiffusion.from_pretrained(str(tiny_model), device="cpu", encoder="tiny")
    place_in_hub_cache(tiny_encoder, tmp_path / "hub", "madebyollin/taesd")  # sd1's tiny encoder
    seg = MaskDiffusion.from_pretrained(str(tiny_model), device="cpu", encoder="tiny")
    assert seg.encoder_id == "madebyollin/taesd"
    assert seg(scene(), classes=CLASSES).summary()["settings"]["encoder"] == "madebyollin/taesd"


def test_a_tiny_encoder_of_another_latent_space_or_pickled_weights_is_refused(
    tiny_family_model, tiny_encoder, tmp_path
):
    with pytest.raises(ModelNotFoundError, match=r"4-channel latents at 1/8 .* VAE 16-channel at 1/8: use the tiny"):
        MaskDiffusion.from_pretrained(str(tiny_family_model("sd3")), device="cpu", encoder=str(tiny_encoder))
    pickled = shutil.copytree(tiny_encoder, tmp_path / "pickled")
    from safetensors.torch import load_file

    weights = pickled / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), pickled / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(ModelNotFoundError, match=r"only diffusion_pytorch_model\.bin, a pickle checkpoint"):
        MaskDiffusion.from_pretrained(str(tiny_family_model("sd1")), device="cpu", encoder=str(pickled))
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        MaskDiffusion.from_pretrained(str(tiny_family_model("sd1")), device="cpu", encoder=str(tmp_path / "none"))


def test_cli_segment_evaluate_and_a_resumed_run_record_the_encoder(tiny_model, tiny_encoder, tmp_path, capsys):
    from PIL import Image

    image = tmp_path / "scene.png"
    Image.fromarray(scene()).save(image)
    common = ["--model", str(tiny_model), "--device", "cpu", "--quiet", "--encoder", str(tiny_encoder)]
    out = tmp_path / "out"
    assert cli.main(["segment", str(image), "--classes", "sky, sand", "--out", str(out), *common]) == 0
    assert json.loads((out / "scene.json").read_text())["settings"]["encoder"] == str(tiny_encoder)
    assert json.loads((out / ".maskdiffusion" / "run.json").read_text())["settings"]["encoder"] == str(tiny_encoder)
    plain = [arg for arg in common if arg not in ("--encoder", str(tiny_encoder))]
    assert cli.main(["segment", str(image), "--classes", "sky, sand", "--out", str(out), *plain]) == 2
    assert "encoder:" in capsys.readouterr().err  # the run's own encoder, not another one, finishes it
    data = sky_and_sand_dataset(tmp_path / "beach")
    run = tmp_path / "run"
    assert cli.main(["evaluate", "--dataset", "folder", "--root", str(data), "--out", str(run), *common]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["settings"]["encoder"] == str(tiny_encoder) and np.isfinite(metrics["mIoU"])
