"""The per-family benchmark (benchmarks/families.py): real shapes, and its measuring path on tiny models."""

import sys
from pathlib import Path

import pytest
import torch

from maskdiffusion import MaskDiffusion
from maskdiffusion.families import FAMILIES
from maskdiffusion.tiny import build_tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import families  # benchmarks/families.py

GIB = 2**30

# Sizes of the float32 safetensors files on the hub: exact bytes where a listing gave them
# (stabilityai/sdxl-turbo snapshot 71153311d3dbb46851df1931d3ca6e939de83304), else the hub's
# "x.xx GB" (stable-diffusion-v1-5 and stable-diffusion-2-1 unet, stable-diffusion-2-1(-base)
# text_encoder, nota-ai/bk-sdm-small unet).
EXACT_BYTES = {
    ("sdxl-turbo", "unet"): 10_270_077_736,
    ("sdxl-turbo", "text_encoder"): 492_265_168,
    ("sdxl-turbo", "text_encoder_2"): 2_778_702_264,
}
ROUNDED_GB = {
    ("sd1", "unet"): 3.44,
    ("sd2-v", "unet"): 3.46,
    ("sd2-v", "text_encoder"): 1.36,
    ("sd2", "text_encoder"): 1.36,
    ("distilled", "unet"): 1.93,
}


def test_every_family_has_real_shapes_and_the_families_share_them_as_on_the_hub():
    assert set(families.SHAPES) == set(FAMILIES)
    counts = {name: families.parameter_counts(shapes) for name, shapes in families.SHAPES.items()}
    for (name, part), size in EXACT_BYTES.items():
        assert 0 < size - 4 * counts[name][part] < 2**20, (name, part)  # the rest is the file's header
    for (name, part), gigabytes in ROUNDED_GB.items():
        assert 4 * counts[name][part] / 1e9 == pytest.approx(gigabytes, abs=0.005), (name, part)
    # the base model's shapes: SD 2.x base and Turbo = SD 2.1; SDXL-Turbo = SDXL; BK-SDM = SD 1.x minus blocks
    assert counts["sd2"] == counts["sd2-v"] == counts["sd-turbo"]
    assert counts["sdxl"] == counts["sdxl-turbo"]
    assert counts["distilled"]["text_encoder"] == counts["sd1"]["text_encoder"]
    assert counts["distilled"]["unet"] < 0.6 * counts["sd1"]["unet"]
    sizes = {name: shapes.native_size for name, shapes in families.SHAPES.items()}
    assert sizes == {"sd1": 512, "sd2": 512, "sd2-v": 768, "sdxl": 1024, "distilled": 512, "sd-turbo": 512,
                     "sdxl-turbo": 512}  # fmt: skip


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_a_view_is_timed_at_the_native_size_with_the_layers_the_model_chose(tmp_path, family):
    folder = build_tiny_model(tmp_path / family, family=family)
    seg = MaskDiffusion.from_pretrained(str(folder), device="cpu", cache_size=0)
    row = families.time_views(seg, repeats=2)
    chosen = seg.presets["default"]
    assert row["family"] == family
    assert row["size"] == chosen.size == {"sd1": 128, "sdxl": 256}[family]  # tiny sample sizes 16 and 32 x 8
    assert row["attention_factors"] == list(chosen.attention_factors)
    assert row["feature_blocks"] == list(chosen.feature_blocks)
    assert len(row["seconds"]) == 2 and min(row["seconds"]) <= row["median_seconds"] <= max(row["seconds"])
    assert 0 < row["cores_busy"] <= torch.get_num_threads() + 0.5  # CPU seconds per second of the calls
    weights = sum(p.numel() * 4 for m in (seg.unet, seg.vae, *seg.text_encoders) for p in m.parameters())
    assert row["weights_bytes"] == weights
    assert row["view_peak_rss"] > weights and row["process_peak_rss"] >= row["view_peak_rss"] * 0.99


def test_a_family_is_built_and_measured_in_processes_of_its_own_and_its_folder_removed(tmp_path):
    row = families.run_family("sd-turbo", tmp_path, repeats=1, threads=1, tiny=True)
    assert row["family"] == "sd-turbo" and row["timestep"] == FAMILIES["sd-turbo"].changes["timestep"]
    assert row["threads"] == 1 and len(row["seconds"]) == 1
    assert list(tmp_path.iterdir()) == []  # model folder and measurement file gone


def test_families_that_would_not_fit_are_skipped_with_the_reason():
    assert families.memory_verdict(4 * GIB, max_bytes=24 * GIB, available=20 * GIB) is None
    too_big = families.memory_verdict(20 * GIB, max_bytes=24 * GIB, available=64 * GIB)
    assert too_big is not None and "24 GiB" in too_big
    short = families.memory_verdict(13 * GIB, max_bytes=24 * GIB, available=12 * GIB)
    assert short is not None and "12.0 GiB free" in short


def test_report_has_a_row_per_family_and_says_which_were_skipped():
    row = {"name": "sd1", "hub_id": "stable-diffusion-v1-5/stable-diffusion-v1-5", "size": 512,
           "attention_factors": [32, 64], "feature_blocks": [1, 2], "timestep": 250, "seconds": [2.0, 1.0, 3.0],
           "median_seconds": 2.0, "cores_busy": 1.9, "load_seconds": 4.0, "weights_bytes": 4 * GIB,
           "view_peak_rss": 5 * GIB, "process_peak_rss": 6 * GIB, "load_1min": [0.5, 1.5]}  # fmt: skip
    text = families.report([row], {"sdxl": "needs ~16.2 GiB; this machine had 12.0 GiB free"}, repeats=3, threads=2)
    lines = text.splitlines()
    assert "| sd1 | stable-diffusion-v1-5/stable-diffusion-v1-5 | 512 | cross-attention 1/32, 1/64; " in text
    assert any(
        line.startswith("| sd1 |") and "| 2.0 | 1.0-3.0 | 1.90 | 4.00 | 5.00 | 6.00 | 4.0 |" in line for line in lines
    )
    assert any(line.startswith("| sdxl |") and "skipped: needs ~16.2 GiB" in line for line in lines)
    assert "load average 0.50-1.50" in text and "2 torch threads" in text
    model, flags = families.cpu_description()
    assert model in text and all(flag in text for flag in flags)
