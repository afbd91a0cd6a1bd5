"""The per-family benchmark (benchmarks/families.py): real shapes, and its measuring path on tiny models."""

import json
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from maskdiffusion import MaskDiffusion
from maskdiffusion.families import FAMILIES
from maskdiffusion.tiny import FLUX_DEV_SCHEDULE, FLUX_VAE, build_tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import families  # benchmarks/families.py

GIB = 2**30
TRANSFORMERS = ("sd3", "sd3.5", "flux-dev", "flux-schnell", "pixart-sigma")

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
# Parameter counts of the transformer families' hub snapshots, exact (none was fetched here: no hub access).
# - Per-component totals of the diffusers snapshots as public code quotes them (the hub's safetensors
#   metadata / a module listing of the loaded pipeline): stabilityai/stable-diffusion-3-medium-diffusers
#   transformer 2,028,328,000, text_encoder 123,650,304, text_encoder_2 694,659,840, text_encoder_3
#   4,762,310,656; PixArt-alpha/PixArt-Sigma-XL-2-1024-MS (revision e102b359...) transformer 610,856,096 and
#   its T5 4,762,310,656; black-forest-labs/FLUX.1-dev transformer 11,901,408,320 (the hub's "11.9B params").
EXACT_PARAMETERS = {
    ("sd3", "transformer"): 2_028_328_000,
    ("sd3", "text_encoder"): 123_650_304,
    ("sd3", "text_encoder_2"): 694_659_840,
    ("sd3", "text_encoder_3"): 4_762_310_656,
    ("pixart-sigma", "transformer"): 610_856_096,
    ("pixart-sigma", "text_encoder"): 4_762_310_656,
    ("flux-dev", "transformer"): 11_901_408_320,
    ("flux-dev", "text_encoder_2"): 4_762_310_656,
}
# - KerasHub's presets (keras-team/keras-hub, keras_hub/src/models/stable_diffusion_3/stable_diffusion_3_presets.py,
#   "params"): CLIP-L + CLIP-G + MMDiT + VAE of SD3-medium 2,987,080,931 and of SD3.5-medium 3,371,793,763.
#   Exact once the MMDiT's position table is counted: a learned parameter there (and in the original
#   checkpoint), a buffer in diffusers (pos_embed_max_size^2 x 1536 values: 192^2 and 384^2).
KERAS_HUB_TOTALS = {"sd3": (2_987_080_931, 192), "sd3.5": (3_371_793_763, 384)}
# - Model cards, rounded: SD3.5-medium "2.5 billion parameters" (its MMDiT-X with the position table: 2.47B),
#   PixArt-Σ "0.6B", FLUX.1 "12 billion" (11.9B), SD3-medium "2 billion" (2.03B).
ROUNDED_BILLIONS = {("sd3.5", "transformer+pos_embed"): (2.5, 0.05), ("pixart-sigma", "transformer"): (0.6, 0.02),
                    ("flux-schnell", "transformer"): (11.9, 0.05), ("sd3", "transformer"): (2.0, 0.05)}  # fmt: skip
FLUX_GUIDANCE_EMBEDDER = (
    256 * 3072 + 3072 + 3072 * 3072 + 3072
)  # dev's guidance MLP (256 -> 3072 -> 3072), not in schnell


@pytest.fixture(scope="module")
def counts():
    return {name: families.parameter_counts(shapes) for name, shapes in families.SHAPES.items()}


def test_every_family_has_real_shapes_and_the_families_share_them_as_on_the_hub(counts):
    assert set(families.SHAPES) == set(FAMILIES)
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
                     "sdxl-turbo": 512, **dict.fromkeys(TRANSFORMERS, 1024)}  # fmt: skip


def test_the_transformer_families_have_the_published_parameter_counts(counts):
    for (name, part), exact in EXACT_PARAMETERS.items():
        assert counts[name][part] == exact, (name, part)
    for name, (total, table) in KERAS_HUB_TOTALS.items():
        ours = sum(counts[name][part] for part in ("transformer", "text_encoder", "text_encoder_2", "vae"))
        assert ours + table * table * 1536 == total, name
    billions = {**{(n, p): c for n, parts in counts.items() for p, c in parts.items()},
                ("sd3.5", "transformer+pos_embed"): counts["sd3.5"]["transformer"] + 384 * 384 * 1536}  # fmt: skip
    for key, (rounded, tolerance) in ROUNDED_BILLIONS.items():
        assert billions[key] / 1e9 == pytest.approx(rounded, abs=tolerance), key
    # what the families share: SD3 and 3.5 differ in the MMDiT only; FLUX dev and schnell in the guidance embedder
    assert {p: c for p, c in counts["sd3"].items() if p != "transformer"} == {
        p: c for p, c in counts["sd3.5"].items() if p != "transformer"
    }
    assert counts["flux-dev"]["transformer"] - counts["flux-schnell"]["transformer"] == FLUX_GUIDANCE_EMBEDDER
    assert counts["flux-dev"]["text_encoder"] == counts["sd1"]["text_encoder"]  # CLIP ViT-L, no projection
    assert counts["sd3"]["text_encoder"] - counts["sd1"]["text_encoder"] == 768 * 768  # with its projection
    assert counts["sd3"]["text_encoder_2"] == counts["sdxl"]["text_encoder_2"]  # OpenCLIP bigG with projection
    assert counts["pixart-sigma"]["vae"] == counts["sdxl"]["vae"]
    assert counts["sd3"]["vae"] == counts["flux-dev"]["vae"]  # one 16-channel layout, other latent statistics
    assert families.SHAPES["sd3"].vae["scaling_factor"] == 1.5305
    assert families.SHAPES["flux-dev"].vae["shift_factor"] == 0.1159
    # the weights in memory include SD3's position table (a buffer)
    assert families.weight_bytes(families.SHAPES["sd3"], "bfloat16") == 2 * (
        sum(counts["sd3"].values()) + 192**2 * 1536
    )


def test_what_does_not_fit_is_built_smaller_and_says_why():
    def chosen(name, dtype, available=22 * GIB):
        build, reasons = families.choose_build(name, dtype, max_bytes=24 * GIB, available=available)
        return build, reasons

    sd3, reasons = chosen("sd3", "float32")
    assert sd3.without == ("text_encoder_3",) and "text_encoder_3" not in sd3.shapes.text_encoders
    assert sd3.description() == "without text_encoder_3 (T5-XXL)"
    assert len(reasons) == 1 and reasons[0].startswith("real shapes: needs ~36.1 GiB") and "> 24 GiB" in reasons[0]
    assert chosen("sd3", "bfloat16") == (families.Build("sd3", "bfloat16"), [])
    pixart, _ = chosen("pixart-sigma", "float32")  # T5 is required: cut to 2 layers of the real width
    assert pixart.t5_layers == 2 and pixart.shapes.text_encoders["text_encoder"].config["d_model"] == 4096
    assert pixart.shapes.text_encoders["text_encoder"].layers == 2
    flux, reasons = chosen("flux-dev", "bfloat16")  # depth cut, the whole T5 fits in bfloat16
    assert flux.depth == {"num_layers": 4, "num_single_layers": 2} and flux.t5_layers is None
    assert flux.shapes.config["num_attention_heads"] * flux.shapes.config["attention_head_dim"] == 3072
    assert [r.split(":")[0] for r in reasons] == ["real shapes", "T5-XXL cut to 2 of 24 layers (real width)"]
    flux32, _ = chosen("flux-dev", "float32")
    assert flux32.depth and flux32.t5_layers == 2
    assert flux32.description() == (
        "depth-reduced copy at true width: 4 of 19 double-stream blocks, 2 of 38 single-stream blocks; "
        "T5-XXL cut to 2 of 24 layers (real width)"
    )
    nothing, reasons = chosen("flux-dev", "float32", available=4 * GIB)
    assert nothing is None and len(reasons) == 4 and reasons[-1].endswith("this machine had 4.0 GiB free")
    assert families.candidates("sdxl") == [families.Build("sdxl")]
    again = families.Build.from_json(json.loads(json.dumps(flux32.to_json())))  # as a child process reads it
    assert json.dumps(again.to_json(), sort_keys=True) == json.dumps(flux32.to_json(), sort_keys=True)
    assert again.description() == flux32.description() and again.shapes.config["num_layers"] == 4


def test_families_that_would_not_fit_are_skipped_with_the_reason():
    assert families.memory_verdict(4 * GIB, max_bytes=24 * GIB, available=20 * GIB) is None
    too_big = families.memory_verdict(20 * GIB, max_bytes=24 * GIB, available=64 * GIB)
    assert too_big is not None and "24 GiB" in too_big
    short = families.memory_verdict(13 * GIB, max_bytes=24 * GIB, available=12 * GIB)
    assert short is not None and "12.0 GiB free" in short
    # a small model's 1024-pixel view: its activations, not a quarter of its weights, decide
    assert families.memory_verdict(2 * GIB, max_bytes=24 * GIB, available=4 * GIB, activations=3 * GIB) == (
        "needs ~5.0 GiB; this machine had 4.0 GiB free"
    )
    assert families.activation_bytes(1024) == 3 * GIB and families.activation_bytes(512) == 3 * GIB // 4


@pytest.mark.parametrize("family", ["sd1", "sdxl", "sd3", "pixart-sigma"])
def test_a_view_is_timed_at_the_native_size_with_the_layers_the_model_chose(tmp_path, family):
    folder = build_tiny_model(tmp_path / family, family=family)
    seg = MaskDiffusion.from_pretrained(str(folder), device="cpu", cache_size=0)
    row = families.time_views(seg, repeats=2)
    chosen = seg.presets["default"]
    assert row["family"] == family and row["dtype"] == "float32"
    assert row["size"] == chosen.size == {"sdxl": 256}.get(family, 128)  # tiny sample sizes x 8 (sdxl 32, others 16)
    assert row["attention_factors"] == list(chosen.attention_factors)
    assert row["feature_blocks"] == list(chosen.feature_blocks)
    assert row["attention_blocks"] == list(chosen.attention_blocks) and row["class_maps"] == chosen.class_maps
    assert len(row["seconds"]) == 2 and min(row["seconds"]) <= row["median_seconds"] <= max(row["seconds"])
    assert 0 < row["cores_busy"] <= torch.get_num_threads() + 0.5  # CPU seconds per second of the calls
    weights = sum(p.numel() * 4 for m in (seg.backbone.denoiser, seg.vae, *seg.text_encoders) for p in m.parameters())
    assert row["weights_bytes"] == weights
    assert row["view_peak_rss"] > weights and row["process_peak_rss"] >= row["view_peak_rss"] * 0.99
    # where the time went: each text encoder in the warm-up (the class list is encoded once), the VAE, the blocks
    assert set(row["prompt_encoding"]) == {p for p in seg.backbone.text_parts if getattr(seg.backbone, p) is not None}
    assert all(seconds > 0 for seconds in row["prompt_encoding"].values())
    assert 0 < row["timing"]["vae"] < row["median_seconds"]
    if family in ("sd1", "sdxl"):
        assert row["blocks_run"] == [] and row["per_block"] == {} and row["timing"]["blocks"] == 0
        return
    kinds = {"sd3": "joint", "pixart-sigma": "DiT"}[family]
    stop = max(chosen.attention_blocks + chosen.feature_blocks)
    assert row["blocks_run"] == [kinds] * (stop + 1)  # the pass stops after the last block the preset needs
    assert set(row["per_block"]) == {kinds} and row["per_block"][kinds] > 0
    assert row["timing"]["blocks"] == pytest.approx(row["per_block"][kinds] * (stop + 1), rel=0.5)
    assert row["timing"]["blocks"] + row["timing"]["vae"] < row["median_seconds"] * 1.01
    t5 = "text_encoder_3" if family == "sd3" else "text_encoder"
    assert row["t5_layers"] == {t5: 2} and row["t5_layer"][t5] > 0  # the tiny T5 has 2 layers


def test_the_stopwatch_times_modules_one_after_the_other_from_start_to_start():
    class Wait(torch.nn.Module):
        def __init__(self, seconds):
            super().__init__()
            self.seconds = seconds

        def forward(self, x):
            time.sleep(self.seconds)
            return x

    first, second = Wait(0.02), Wait(0.01)
    with families.Stopwatch({"a": first, "b": second}) as stopwatch:
        first(0)
        time.sleep(0.03)  # between the blocks: counts to the first one in a chain
        second(0)
    assert 0.02 <= stopwatch.seconds("a") < 0.03 and 0.01 <= stopwatch.seconds("b") < 0.02
    chained = stopwatch.chain(["a", "b"])
    assert 0.05 <= chained["a"] < 0.07 and chained["b"] == pytest.approx(stopwatch.seconds("b"))
    first(0)
    assert len(stopwatch.starts["a"]) == 1  # the hooks are gone after the block


TINY_VAE = {"block_out_channels": (16, 16, 32, 32), "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4, "layers_per_block": 1, "latent_channels": 16,
            "norm_num_groups": 8, "sample_size": 128, "use_quant_conv": False, "use_post_quant_conv": False,
            **FLUX_VAE}  # fmt: skip
TINY_CLIP = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
             "hidden_act": "quick_gelu"}  # fmt: skip
TINY_T5 = {"vocab_size": 1024, "d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 4, "num_heads": 4,
           "feed_forward_proj": "gated-gelu"}  # fmt: skip
# A FLUX-shaped model whose "real" depth (6 double-stream, 3 single-stream blocks, a 4-layer T5) the benchmark cuts
TINY_FLUX = families.Shapes(
    "tiny/flux",
    "FluxPipeline",
    "FluxTransformer2DModel",
    {
        "patch_size": 1,
        "in_channels": 64,
        "num_layers": 6,
        "num_single_layers": 3,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": 64,
        "pooled_projection_dim": 32,
        "guidance_embeds": True,
        "axes_dims_rope": (4, 6, 6),
    },
    {
        "text_encoder": families.TextEncoder("CLIP-L", TINY_CLIP),
        "text_encoder_2": families.TextEncoder("T5-XXL", TINY_T5, "t5"),
    },
    ("FlowMatchEulerDiscreteScheduler", FLUX_DEV_SCHEDULE),
    TINY_VAE,
)


def test_a_depth_reduced_flux_is_timed_per_block_and_extrapolated_to_the_real_depth(tmp_path):
    build = families.candidates("flux-dev", "bfloat16", TINY_FLUX)[-1]  # the smallest: depth and T5 cut
    assert build.depth == families.DEPTH_CUTS["FluxTransformer2DModel"] and build.t5_layers == 2
    row = families.run_family("flux-dev", tmp_path, repeats=1, threads=1, build=build)
    assert list(tmp_path.iterdir()) == []  # model folder, build spec and measurement file gone
    assert row["family"] == "flux-dev" and row["dtype"] == "bfloat16" and row["threads"] == 1
    assert row["build"] == (
        "depth-reduced copy at true width: 4 of 6 double-stream blocks, 2 of 3 single-stream blocks; "
        "T5-XXL cut to 2 of 4 layers (real width)"
    )
    assert row["attention_blocks"] == row["feature_blocks"] == [0, 1, 2, 3]  # auto: the last 4 double-stream blocks
    assert row["blocks_run"] == ["double-stream"] * 4  # the default pass never reaches the single-stream blocks
    double, single = row["per_block"]["double-stream"], row["per_block"]["single-stream"]  # single: the through calls
    assert double > 0 and single > 0 and row["t5_layers"] == {"text_encoder_2": 2}
    guess = row["extrapolated"]
    assert guess["real_layers"] == {"attention_blocks": [2, 3, 4, 5], "feature_blocks": [2, 3, 4, 5]}
    assert guess["default"] == pytest.approx(row["median_seconds"] + 2 * double)  # blocks 4, 5 of the real 0-5
    assert guess["full"] == pytest.approx(guess["default"] + 3 * single)  # and the 3 single-stream blocks
    prompt = sum(row["prompt_encoding"].values()) + 2 * row["t5_layer"]["text_encoder_2"]
    assert guess["prompt"] == pytest.approx(prompt)  # the 2 cut T5 layers at the measured seconds per layer
    assert [a.split(" x ")[0] for a in guess["added"]] == ["2 double-stream blocks"]
    assert [a.split(" x ")[0] for a in guess["full_added"]] == ["3 single-stream blocks"]
    assert [a.split(" x ")[0] for a in guess["prompt_added"]] == ["2 T5-XXL layers"]


def test_a_family_is_built_and_measured_in_processes_of_its_own_and_its_folder_removed(tmp_path):
    row = families.run_family("sd-turbo", tmp_path, repeats=1, threads=1, tiny=True)
    assert row["family"] == "sd-turbo" and row["timestep"] == FAMILIES["sd-turbo"].changes["timestep"]
    assert row["threads"] == 1 and len(row["seconds"]) == 1
    assert list(tmp_path.iterdir()) == []  # model folder and measurement file gone


UNET_ROW = {"name": "sd1", "hub_id": "stable-diffusion-v1-5/stable-diffusion-v1-5", "size": 512,
            "attention_factors": [32, 64], "feature_blocks": [1, 2], "timestep": 250, "seconds": [2.0, 1.0, 3.0],
            "median_seconds": 2.0, "cores_busy": 1.9, "load_seconds": 4.0, "weights_bytes": 4 * GIB,
            "view_peak_rss": 5 * GIB, "process_peak_rss": 6 * GIB, "load_1min": [0.5, 1.5]}  # fmt: skip


def test_report_has_a_row_per_family_and_says_which_were_skipped():
    text = families.report(
        [UNET_ROW], {"sdxl": "needs ~16.2 GiB; this machine had 12.0 GiB free"}, repeats=3, threads=2
    )
    lines = text.splitlines()
    assert "| sd1 | stable-diffusion-v1-5/stable-diffusion-v1-5 | 512 | cross-attention 1/32, 1/64; " in text
    assert any(
        line.startswith("| sd1 |") and "| 2.0 | 1.0-3.0 | 1.90 | 4.00 | 5.00 | 6.00 | 4.0 |" in line for line in lines
    )
    assert any(line.startswith("| sdxl |") and "skipped: needs ~16.2 GiB" in line for line in lines)
    assert "load average 0.50-1.50" in text and "2 torch threads" in text
    model, flags = families.cpu_description()
    assert model in text and all(flag in text for flag in flags)
    assert families.TRANSFORMER_HEADING not in text


def _transformer_row(name, dtype, seconds, **changes):
    return {**UNET_ROW, "name": name, "dtype": dtype, "size": 1024, "attention_factors": [16],
            "attention_blocks": [15, 16, 17, 18], "feature_blocks": [15, 16, 17, 18], "class_maps": "concept",
            "timestep": 181, "seconds": [seconds], "median_seconds": seconds,
            "timing": {"text": {}, "vae": 10.0, "blocks": 40.0, "rest": 3.0}, "blocks_run": ["double-stream"] * 19,
            "per_block": {"double-stream": 2.0}, "t5_layers": {"text_encoder_2": 24},
            "t5_layer": {"text_encoder_2": 0.8},
            "prompt_encoding": {"text_encoder": 0.2, "text_encoder_2": 19.5}, "build": "real shapes", "left_out": "",
            **changes}  # fmt: skip


def test_report_keeps_the_rows_and_sections_a_run_did_not_measure_and_shows_the_extrapolations():
    first = families.report(
        [UNET_ROW, _transformer_row("sd3", "float32", 100.0), _transformer_row("flux-dev", "bfloat16", 50.0)],
        {("pixart-sigma", "float32"): "needs ~25 GiB"},
        repeats=2,
        threads=2,
    )
    guess = {"default": 230.0, "full": 420.0, "prompt": 21.0, "added": ["15 double-stream blocks x 12.0 s"],
             "full_added": ["38 single-stream blocks x 5.0 s"], "prompt_added": ["22 T5-XXL layers x 0.80 s"],
             "real_layers": {"attention_blocks": [15, 16, 17, 18], "feature_blocks": [15, 16, 17, 18]}}  # fmt: skip
    flux = _transformer_row(
        "flux-dev", "bfloat16", 50.0, attention_blocks=[0, 1, 2, 3], feature_blocks=[0, 1, 2, 3],
        blocks_run=["double-stream"] * 4, t5_layers={"text_encoder_2": 2}, extrapolated=guess,
        build="depth-reduced copy at true width", left_out="real shapes: needs ~39.3 GiB",
    )  # fmt: skip
    second = families.report([flux], {}, repeats=2, threads=2, previous=first)
    unet, transformer = (families._sections(second)[h] for h in (families.UNET_HEADING, families.TRANSFORMER_HEADING))
    assert unet.rstrip("\n") == families._sections(first)[families.UNET_HEADING].rstrip("\n")  # kept as it was
    rows = [line for line in transformer.splitlines() if line.startswith("| ") and not line.startswith("| family")]
    assert Counter(line.split("|")[1].strip() for line in rows) == {"sd3": 2, "flux-dev": 2, "pixart-sigma": 1}
    assert all(("| bfloat16 |" if "flux" in line else "| float32 |") in line for line in rows)
    flux_lines = [line for line in rows if line.startswith("| flux-dev |")]
    assert "| 50.0 |" in flux_lines[0] and "true width; real shapes: needs ~39.3 GiB |" in flux_lines[0]
    assert (
        "attention blocks 15-18; features blocks 15-18; concept maps (in the measured copy: blocks 0-3)"
        in flux_lines[0]
    )
    assert "≈ 230 (extrapolated: + 15 double-stream blocks x 12.0 s)" in flux_lines[1]
    assert "≈ 420 (extrapolated: + 38 single-stream blocks x 5.0 s)" in flux_lines[1]
    assert "T5-XXL 19.5 (2 of 24 layers, 0.80 s / layer); ≈ 21 with every layer (extrapolated)" in flux_lines[1]
    assert "| skipped: needs ~25 GiB |" in transformer and "AVX512-BF16" in transformer
    assert "They are extrapolations, not measurements." in transformer
