"""FLOP counting, the CPU's peak and the per-step table of benchmarks/bench.py (flops.py), on tiny models."""

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench  # benchmarks/bench.py
import flops  # benchmarks/flops.py

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: a shared CPU stalls two threads' barriers


def cpuinfo(*, vendor="AuthenticAMD", family=26, flags="fpu avx2 fma avx512f avx512_bf16", mhz=2596.124, cores=2,
            threads_per_core=1) -> str:  # fmt: skip
    """A /proc/cpuinfo with ``cores`` x ``threads_per_core`` processors."""
    blocks = []
    for index in range(cores * threads_per_core):
        blocks.append(
            f"processor\t: {index}\nvendor_id\t: {vendor}\ncpu family\t: {family}\nmodel name\t: Test CPU\n"
            f"cpu MHz\t\t: {mhz}\nphysical id\t: 0\ncore id\t\t: {index % cores}\nflags\t\t: {flags}\n"
        )
    return "\n".join(blocks)


def test_the_peak_is_cores_times_clock_times_the_fma_width_of_the_isa():
    zen5 = flops.cpu_peak(cpuinfo(), lscpu="Model name: AMD EPYC\n", threads=2)
    assert (zen5.cores, zen5.mhz, zen5.fp32_per_cycle, zen5.bf16_per_cycle) == (2, 2596.124, 64, 128)
    assert zen5.gflops() == pytest.approx(2 * 2.596124 * 2 * 16 * 2)  # 2 FMA units x 16 lanes x 2 FLOP
    assert zen5.gflops(torch.bfloat16) == pytest.approx(2 * zen5.gflops())  # vdpbf16ps: twice the fp32 rate
    assert "cpu MHz" in zen5.clock_source and "AVX512-BF16" in zen5.isa
    assert "332 GFLOP/s" in zen5.describe() and "665 GFLOP/s" in zen5.describe()

    zen4 = flops.cpu_peak(cpuinfo(family=25), lscpu="", threads=2)
    assert zen4.fp32_per_cycle == 32 and "double-pumped" in zen4.fma_note  # 512-bit work on 256-bit pipes
    avx2 = flops.cpu_peak(cpuinfo(flags="avx2 fma"), lscpu="", threads=2)
    assert (avx2.fp32_per_cycle, avx2.bf16_per_cycle, avx2.gflops(torch.bfloat16)) == (32, None, None)
    amx = flops.cpu_peak(cpuinfo(vendor="GenuineIntel", family=6, flags="avx2 fma avx512f avx512_bf16 amx_bf16"),
                         lscpu="", threads=1)  # fmt: skip
    assert (amx.cores, amx.fp32_per_cycle, amx.bf16_per_cycle) == (1, 64, 1024)
    assert amx.gflops(torch.float16) is None  # no float16 peak on a CPU


def test_the_clock_comes_from_the_measurement_then_lscpu_then_cpuinfo_and_cores_are_physical():
    info = cpuinfo(cores=2, threads_per_core=2)  # 4 logical processors on 2 cores
    assert flops.cpu_peak(info, lscpu="", threads=4).cores == 2  # hyper-threads share their core's FMA units
    boosted = flops.cpu_peak(info, lscpu="CPU max MHz:  3700.0000\n", threads=2)
    assert boosted.mhz == 3700.0 and "lscpu" in boosted.clock_source
    measured = flops.cpu_peak(info, lscpu="CPU max MHz: 3700\n", threads=2, measured_mhz=4100.0)
    assert measured.mhz == 4100.0 and "measured" in measured.clock_source and "3700" in measured.clock_source


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")
def test_the_measured_clock_is_a_plausible_cpu_clock():
    mhz = flops.measure_mhz(iterations=20_000_000, runs=1)
    assert mhz is None or 300 < mhz < 8000


def test_the_flop_counter_gives_the_analytic_counts_of_a_linear_a_convolution_and_attention():
    torch.manual_seed(0)
    linear, conv = torch.nn.Linear(64, 32), torch.nn.Conv2d(3, 16, 3, padding=1)
    with torch.no_grad():
        assert flops.count_flops(lambda: linear(torch.randn(8, 64)))[1] == 2 * 8 * 64 * 32  # bias not counted
        assert flops.count_flops(lambda: conv(torch.randn(1, 3, 32, 32)))[1] == 2 * (16 * 32 * 32) * (3 * 3 * 3)
        assert flops.count_flops(lambda: torch.relu(torch.randn(100, 100)))[1] == 0  # elementwise: not counted
        q, k, v = torch.randn(1, 2, 16, 8), torch.randn(1, 2, 24, 8), torch.randn(1, 2, 24, 8)
        # the CPU's fused SDPA kernel (not in torch's table) = the explicit QK^T and PV products
        fused = flops.count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))[1]
        explicit = flops.count_flops(lambda: (q @ k.transpose(-1, -2)).softmax(-1) @ v)[1]
    assert fused == explicit == 2 * 2 * (2 * 16 * 24 * 8)


@pytest.fixture(scope="module")
def tiny_segmenter(tiny_model):
    from maskdiffusion import MaskDiffusion

    seg = MaskDiffusion.from_pretrained(str(tiny_model), device="cpu", cache_size=0)
    seg.preset = seg.preset.replace(size=128)
    return seg


def test_each_step_is_timed_inside_the_call_counted_and_everything_is_put_back(tiny_segmenter):
    import maskdiffusion.pipeline as pipeline
    from maskdiffusion.views import ViewLayout

    seg = tiny_segmenter
    image = (np.random.default_rng(0).random((128, 128, 3)) * 255).astype(np.uint8)
    stitch, head = ViewLayout.stitch, pipeline.segment_scores
    profile = flops.profile_steps(seg, lambda: seg(image, "road, sky"), repeats=1)
    assert list(profile) == [*flops.STEPS, "rest", "whole call"]
    whole = profile["whole call"]
    assert all(row["seconds"] >= 0 for row in profile.values())
    assert sum(profile[step]["seconds"] for step in [*flops.STEPS, "rest"]) == pytest.approx(whole["seconds"])
    # the counted call's steps add up to its total, and the encoder's count is the encoder's own
    assert sum(profile[step]["flops"] for step in [*flops.STEPS, "rest"]) == whole["flops"]
    pixels = torch.zeros(1, 3, 128, 128)
    with torch.no_grad():
        assert profile["VAE encoder"]["flops"] == flops.count_flops(lambda: seg.vae.encode(pixels))[1]
    assert profile["text encoder"]["flops"] > 0 and profile["UNet pass (as run)"]["flops"] > 0
    assert ViewLayout.stitch is stitch and pipeline.segment_scores is head
    assert "encode_views" not in vars(seg) and "capture" not in vars(seg)


def test_the_denoiser_pass_counts_only_what_runs(tiny_segmenter):
    seg = tiny_segmenter
    image = (np.random.default_rng(1).random((128, 128, 3)) * 255).astype(np.uint8)
    profile = flops.profile_steps(seg, lambda: seg(image, "road"), repeats=1)
    unet = seg.backbone.unet
    latents, text = torch.zeros(1, 4, 16, 16), torch.zeros(1, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        whole = flops.count_flops(lambda: unet(latents, 0, encoder_hidden_states=text))[1]
    assert 0 < profile["UNet pass (as run)"]["flops"] < whole  # the finest decoder level is skipped


def test_the_step_table_has_a_row_per_step_with_rates_and_shares_of_the_peak(tiny_segmenter):
    seg = tiny_segmenter
    image = (np.random.default_rng(2).random((128, 128, 3)) * 255).astype(np.uint8)
    profile = flops.profile_steps(seg, lambda: seg(image, "road, sky"), repeats=1)
    peak = flops.cpu_peak(cpuinfo(), lscpu="", threads=2)
    lines = bench.step_rows({"fp32": (torch.float32, profile), "bfloat16": (torch.bfloat16, profile)}, peak)
    assert lines[0].count("% of peak") == 2 and len(lines) == 2 + len(profile)
    encoder = next(line for line in lines if line.startswith("| VAE encoder |")).split(" | ")
    gflops, seconds = profile["VAE encoder"]["flops"] / 1e9, profile["VAE encoder"]["seconds"]
    assert float(encoder[1]) == pytest.approx(gflops, abs=0.05)
    rate = gflops / seconds
    assert encoder[3] == f"{rate:.0f}" and encoder[4] == f"{100 * rate / peak.gflops():.0f}%"
    assert encoder[9] == f"{100 * rate / peak.gflops(torch.bfloat16):.0f}%"  # the bf16 column: the bf16 peak
    stitching = next(line for line in lines if line.startswith("| stitching |"))
    assert "| - | - |" in stitching  # no FLOPs counted: no rate, no share


def test_the_steps_page_reports_the_tiny_encoder_ratio_against_the_target():
    step = {"seconds": 1.0, "cpu": 2.0, "flops": 10**9}
    profile = {name: dict(step) for name in [*flops.STEPS, "rest", "whole call"]}
    profiles = {"fp32": (torch.float32, profile), "fp32, tiny encoder": (torch.float32, profile)}
    timing = {"median": 10.0, "min": 9.0, "max": 11.0, "extra_memory": 0, "cores_busy": 2.0}
    results = {"ours, 512x512": timing, f"ours, {bench.TINY_CASE}": {**timing, "median": 4.0}}
    peak = flops.cpu_peak(cpuinfo(), lscpu="", threads=2)
    text = bench.steps_report(profiles, results, peak, {torch.float32: 100.0}, 8 * 10**11, torch.device("cpu"),
                              torch.bfloat16, 3, [1.0, 2.0])  # fmt: skip
    assert "| tiny encoder / full VAE, one 512x512 view, fp32 | 0.40 | <= 0.45 (met) |" in text
    assert "800.0 GFLOP" in text and "Peak = cores x clock" in text and "float32 100 GFLOP/s" in text
    slow = {**results, f"ours, {bench.TINY_CASE}": {**timing, "median": 5.0}}
    assert "| 0.50 | <= 0.45 (NOT met) |" in "\n".join(bench.tiny_ratio_rows(slow, "bfloat16"))
