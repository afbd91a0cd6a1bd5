"""Seconds and peak memory per view for every model family at its native size, on the CPU.

For each family of :data:`maskdiffusion.families.FAMILIES` a diffusers folder is built with
random weights in the shapes of the family's reference checkpoint (fixed seed, float32, built
in place: one copy in memory), saved as safetensors in a temporary folder and loaded by
``MaskDiffusion.from_pretrained`` in a fresh process, which segments one random image of
exactly native x native pixels with 10 classes and the ``default`` preset (warm-up, then the
median of ``--repeats`` calls, latent cache off so every call encodes its view). Each family
builds and measures in processes of its own, so the peak resident set (``ru_maxrss``) is that
family's alone. A family whose float32 weights would not fit in ``--max-gib`` (24) GiB, or in
the memory this machine has free, is skipped and the results say so.

    python benchmarks/families.py                      # every family, ~25 min on 2 cores
    python benchmarks/families.py --families sd1 sdxl  # some of them

Writes ``benchmarks/results/families-cpu.md``.

The shapes come from the checkpoints' own configuration files (``unet/config.json``,
``text_encoder*/config.json``, ``vae/config.json``, ``scheduler/scheduler_config.json``):

- sd1, ``stable-diffusion-v1-5/stable-diffusion-v1-5``: UNet 320/640/1280/1280, 2 layers per
  block, 8 heads, cross-attention 768, sample 64; CLIP ViT-L/14 text encoder (12 layers, 768
  wide, MLP 3072, 12 heads, quick GELU); VAE 128/256/512/512, scaling 0.18215.
- sd2, ``stabilityai/stable-diffusion-2-1-base``: the UNet with heads of 64 channels
  (``attention_head_dim`` [5, 10, 20, 20]), linear projections, cross-attention 1024, sample 64;
  OpenCLIP ViT-H text encoder (23 layers, 1024 wide, MLP 4096, 16 heads, GELU, "!" padding).
- sd2-v, ``stabilityai/stable-diffusion-2-1``: sd2's shapes with sample 96 (768 px),
  ``upcast_attention``, a DDIM scheduler with ``prediction_type="v_prediction"``.
- sdxl, ``stabilityai/stable-diffusion-xl-base-1.0``: UNet 320/640/1280 (no cross-attention at
  the finest level), ``transformer_layers_per_block`` [1, 2, 10], heads [5, 10, 20],
  cross-attention 2048, ``addition_embed_type="text_time"``, ``addition_time_embed_dim`` 256,
  ``projection_class_embeddings_input_dim`` 2816, sample 128; CLIP ViT-L plus OpenCLIP ViT-bigG
  with projection (32 layers, 1280 wide, MLP 5120, 20 heads, projection 1280); VAE scaling 0.13025.
- distilled, ``nota-ai/bk-sdm-small``: sd1's UNet with ``layers_per_block`` 1 and
  ``mid_block_type`` null (Nota-NetsPresso/BK-SDM ``src/unet_config/bk_small/config.json``).
- sd-turbo, ``stabilityai/sd-turbo``: sd2's shapes (its hub ``unet/config.json``: heads [5, 10, 20,
  20], cross-attention 1024), an Euler scheduler with ``timestep_spacing="trailing"``.
- sdxl-turbo, ``stabilityai/sdxl-turbo``: sdxl's shapes at sample 64 (512 px, the model card's
  resolution), Euler ancestral, ``timestep_spacing="trailing"`` (its ``scheduler_config.json``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from maskdiffusion.tiny import SD2_PAD_TOKEN, SD2_V_SCHEDULE, SD_NOISE_SCHEDULE, SDXL_SCHEDULE, TURBO_SCHEDULE

CLASSES = "road, sidewalk, building, wall, fence, pole, traffic light, vegetation, sky, car"
GIB = 2**30
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")

SD15_UNET = {
    "sample_size": 64,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
SD21_UNET = {
    **SD15_UNET,
    "cross_attention_dim": 1024,
    "attention_head_dim": (5, 10, 20, 20),
    "use_linear_projection": True,
}
SDXL_UNET = {
    "sample_size": 128,
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "use_linear_projection": True,
    "cross_attention_dim": 2048,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
}
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
          "hidden_act": "quick_gelu", "projection_dim": 768}  # fmt: skip
OPENCLIP_H = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23, "num_attention_heads": 16,
              "hidden_act": "gelu", "projection_dim": 512}  # fmt: skip
OPENCLIP_BIGG = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
                 "hidden_act": "gelu", "projection_dim": 1280}  # fmt: skip
SD_VAE = {
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
SDXL_VAE = {**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}


@dataclass(frozen=True)
class Shapes:
    """One family's reference checkpoint: its hub id and the configurations its components are built from.

    ``text_2``: SDXL's second text encoder (with projection); ``pad_token``: the first
    tokenizer's pad token where it is not CLIP's (SD 2.x's OpenCLIP pads with "!").
    """

    hub_id: str
    unet: dict
    text: dict
    scheduler: tuple[str, dict]
    vae: dict = field(default_factory=lambda: SD_VAE)
    text_2: dict | None = None
    pad_token: str | None = None

    @property
    def native_size(self) -> int:
        return self.unet["sample_size"] * 2 ** (len(self.vae["block_out_channels"]) - 1)


SHAPES: dict[str, Shapes] = {
    "sd1": Shapes(
        "stable-diffusion-v1-5/stable-diffusion-v1-5", SD15_UNET, CLIP_L, ("DDIMScheduler", SD_NOISE_SCHEDULE)
    ),
    "sd2": Shapes(
        "stabilityai/stable-diffusion-2-1-base",
        SD21_UNET,
        OPENCLIP_H,
        ("DDIMScheduler", SD_NOISE_SCHEDULE),
        pad_token=SD2_PAD_TOKEN,
    ),
    "sd2-v": Shapes(
        "stabilityai/stable-diffusion-2-1",
        {**SD21_UNET, "sample_size": 96, "upcast_attention": True},
        OPENCLIP_H,
        ("DDIMScheduler", SD2_V_SCHEDULE),
        vae={**SD_VAE, "sample_size": 768},
        pad_token=SD2_PAD_TOKEN,
    ),
    "sdxl": Shapes(
        "stabilityai/stable-diffusion-xl-base-1.0",
        SDXL_UNET,
        CLIP_L,
        ("EulerDiscreteScheduler", SDXL_SCHEDULE),
        vae=SDXL_VAE,
        text_2=OPENCLIP_BIGG,
    ),
    "distilled": Shapes(
        "nota-ai/bk-sdm-small",
        {**SD15_UNET, "layers_per_block": 1, "mid_block_type": None},
        CLIP_L,
        ("DDIMScheduler", SD_NOISE_SCHEDULE),
    ),
    "sd-turbo": Shapes(
        "stabilityai/sd-turbo",
        SD21_UNET,
        OPENCLIP_H,
        ("EulerDiscreteScheduler", TURBO_SCHEDULE),
        pad_token=SD2_PAD_TOKEN,
    ),
    "sdxl-turbo": Shapes(
        "stabilityai/sdxl-turbo",
        {**SDXL_UNET, "sample_size": 64},
        CLIP_L,
        ("EulerAncestralDiscreteScheduler", TURBO_SCHEDULE),
        vae=SDXL_VAE,
        text_2=OPENCLIP_BIGG,
    ),
}


def _tokenizer(pad_token: str | None = None):
    from maskdiffusion.prompts import clip_tokenizer

    tokenizer = copy.deepcopy(clip_tokenizer())
    if pad_token is not None:
        tokenizer.pad_token = pad_token
    return tokenizer


def _text_encoder(config: dict, *, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from maskdiffusion.prompts import CLIP_CONTEXT, clip_tokenizer

    tokenizer = clip_tokenizer()
    full = CLIPTextConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=CLIP_CONTEXT,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **config,
    )
    return CLIPTextModelWithProjection(full) if projection else CLIPTextModel(full)


def build_modules(shapes: Shapes) -> dict[str, torch.nn.Module]:
    """The weighted components (UNet, VAE, text encoders) with random float32 weights from the torch seed.

    Under ``with torch.device("meta")`` nothing is allocated (for counting parameters).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    modules = {
        "unet": UNet2DConditionModel(**shapes.unet),
        "vae": AutoencoderKL(**shapes.vae),
        "text_encoder": _text_encoder(shapes.text),
    }
    if shapes.text_2 is not None:
        modules["text_encoder_2"] = _text_encoder(shapes.text_2, projection=True)
    return modules


def parameter_counts(shapes: Shapes) -> dict[str, int]:
    """Parameters per component, counted on the meta device (no memory, no initialisation cost)."""
    with torch.device("meta"):
        modules = build_modules(shapes)
    return {name: sum(p.numel() for p in module.parameters()) for name, module in modules.items()}


def build_folder(shapes: Shapes, folder: Path, seed: int = 0) -> Path:
    """Save a diffusers pipeline of ``shapes`` with random weights (safetensors) in ``folder``."""
    import diffusers
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from maskdiffusion.tiny import mark_random_weights

    torch.manual_seed(seed)
    modules = build_modules(shapes)
    scheduler_class, scheduler_config = shapes.scheduler
    scheduler = getattr(diffusers, scheduler_class)(**scheduler_config)
    if shapes.text_2 is None:
        pipe = StableDiffusionPipeline(
            **modules,
            tokenizer=_tokenizer(shapes.pad_token),
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    else:
        pipe = StableDiffusionXLPipeline(
            **modules,
            tokenizer=_tokenizer(shapes.pad_token),
            tokenizer_2=_tokenizer(SD2_PAD_TOKEN),
            scheduler=scheduler,
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )
    pipe.save_pretrained(folder, safe_serialization=True)
    mark_random_weights(folder)
    return folder


def rss_bytes() -> int:
    with open("/proc/self/statm") as stats:
        return int(stats.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """This process's peak resident set so far (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(folder: str | os.PathLike, *, repeats: int = 3, threads: int = 2) -> dict:
    """Load ``folder`` with ``threads`` torch threads and :func:`time_views` it; with the load's seconds."""
    from maskdiffusion import MaskDiffusion

    torch.set_num_threads(threads)
    start = time.perf_counter()
    seg = MaskDiffusion.from_pretrained(str(folder), device="cpu", cache_size=0)
    return {"load_seconds": time.perf_counter() - start, **time_views(seg, repeats=repeats)}


def time_views(seg, *, repeats: int) -> dict:
    """Segment one random native x native image with ``seg``: seconds per view and memory.

    Returns the family, native size, the layers "auto" chose, per-call seconds (after one
    warm-up call) and the CPU seconds per second they used, the weights' bytes, the resident
    set now (after loading), the peak during the calls (sampled) and the process's peak
    (``ru_maxrss``: loading included).
    """
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench import PeakMemory  # beside this file

    after_load = rss_bytes()
    preset = seg.presets["default"]
    image = (np.random.default_rng(0).random((preset.size, preset.size, 3)) * 255).astype(np.uint8)
    seg(image, CLASSES)  # warm-up
    seconds, cpu_seconds, view_peak = [], 0.0, 0
    for _ in range(repeats):
        with PeakMemory(torch.device("cpu")) as peak:
            began, began_cpu = time.perf_counter(), time.process_time()
            result = seg(image, CLASSES)
            seconds.append(time.perf_counter() - began)
            cpu_seconds += time.process_time() - began_cpu
        view_peak = max(view_peak, peak.peak)
    if result.labels.shape != (preset.size, preset.size):
        raise RuntimeError(f"labels of shape {result.labels.shape} for a {preset.size}-pixel view")
    modules = (seg.backbone.denoiser, seg.vae, *seg.text_encoders)
    return {
        "family": seg.family.name,
        "size": preset.size,
        "attention_factors": list(preset.attention_factors),
        "feature_blocks": list(preset.feature_blocks),
        "timestep": preset.timestep,
        "seconds": seconds,
        "median_seconds": statistics.median(seconds),
        "cores_busy": cpu_seconds / sum(seconds),  # below the thread count: the cores were shared (or idle)
        "weights_bytes": sum(p.numel() * p.element_size() for m in modules for p in m.parameters()),
        "rss_after_load": after_load,
        "view_peak_rss": view_peak,
        "process_peak_rss": peak_rss_bytes(),
        "threads": torch.get_num_threads(),
    }


def available_bytes() -> int:
    """``MemAvailable`` of /proc/meminfo: what this machine can hand out now without swapping."""
    with open("/proc/meminfo") as info:
        for line in info:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def memory_verdict(weights: int, *, max_bytes: int, available: int) -> str | None:
    """Why a family with ``weights`` bytes of float32 weights is not run here, or ``None`` if it is.

    The need is estimated as the weights plus a quarter (activations of one view and loading).
    """
    need = weights * 5 // 4
    if need > max_bytes:
        return (
            f"needs ~{need / GIB:.1f} GiB (weights {weights / GIB:.1f} GiB + activations) > {max_bytes / GIB:.0f} GiB"
        )
    if need > available:
        return f"needs ~{need / GIB:.1f} GiB; this machine had {available / GIB:.1f} GiB free"
    return None


def _child(args: list[str], threads: int) -> None:
    """Run this script in a fresh process (its own peak memory), offline, with ``threads`` threads."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], check=True, env=env)


def run_family(name: str, workdir: Path, *, repeats: int, threads: int, tiny: bool = False) -> dict:
    """Build family ``name``'s folder in one process, measure it in another, delete it; the measurements.

    ``tiny``: build :func:`maskdiffusion.tiny.build_tiny_model`'s model of the family instead (tests).
    """
    folder = workdir / (name if tiny else SHAPES[name].hub_id.replace("/", "--"))
    out = workdir / f"{name}.json"
    try:
        began = time.perf_counter()
        _child(["--build", name, str(folder), *(["--tiny"] if tiny else [])], threads)
        build_seconds = time.perf_counter() - began
        load_before = os.getloadavg()[0]
        _child(["--measure", str(folder), str(out), "--repeats", str(repeats), "--threads", str(threads)], threads)
        row = json.loads(out.read_text())
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        out.unlink(missing_ok=True)
    return {**row, "name": name, "build_seconds": build_seconds, "load_1min": [load_before, os.getloadavg()[0]]}


def cpu_description() -> tuple[str, list[str]]:
    """The CPU's model name and which of :data:`CPU_FLAGS` it has."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return model, [flag for flag in CPU_FLAGS if flag in flags]


def _layers(row: dict) -> str:
    attention = ", ".join(f"1/{f}" for f in row["attention_factors"])
    return f"cross-attention {attention}; features up_blocks {', '.join(map(str, row['feature_blocks']))}"


def report(rows: list[dict], skipped: dict[str, str], *, repeats: int, threads: int) -> str:
    """The results page: header (CPU, software, load) and one table row per family."""
    model, flags = cpu_description()
    loads = [load for row in rows for load in row["load_1min"]]
    load = (
        f" 1-minute load average {min(loads):.2f}-{max(loads):.2f} before and after the measurements (this "
        "benchmark's own threads included)."
        if loads
        else ""
    )
    lines = [
        "# Model families on the CPU: seconds and memory per view at the native size",
        "",
        f"CPU: {model}, {os.cpu_count()} cores; ISA: {', '.join(flags) or 'none of ' + ', '.join(CPU_FLAGS)}. "
        f"Python {platform.python_version()}, torch {torch.__version__}, {threads} torch threads, float32.{load}",
        "",
        "Random weights in each family's real shapes (`benchmarks/families.py` cites the configs), saved as "
        "safetensors and loaded by `MaskDiffusion.from_pretrained` in a fresh process per family. One view = one "
        "random image of exactly native x native pixels, 10 classes, `default` preset (t and layers as the family "
        f"sets them), latent cache off; median of {repeats} calls after a warm-up. Cores busy: CPU seconds per "
        "second during the calls (below the thread count when other work shared the cores). Memory: float32 "
        "weights; peak resident set sampled during the calls; peak of the whole process (`ru_maxrss`, loading "
        "included).",
        "",
        "| family | shapes of | native size | layers chosen by auto | t | s / view (median) | min-max s | cores busy "
        "| weights GiB | peak RSS in a view GiB | process peak RSS GiB | load s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['name']} | {row.get('hub_id', '-')} | {row['size']} | {_layers(row)} | {row['timestep']} "
            f"| {row['median_seconds']:.1f} | {min(row['seconds']):.1f}-{max(row['seconds']):.1f} "
            f"| {row['cores_busy']:.2f} "
            f"| {row['weights_bytes'] / GIB:.2f} | {row['view_peak_rss'] / GIB:.2f} "
            f"| {row['process_peak_rss'] / GIB:.2f} | {row['load_seconds']:.1f} |"
        )
    for name, reason in skipped.items():
        lines.append(
            f"| {name} | {SHAPES[name].hub_id if name in SHAPES else '-'} | - | skipped: {reason} | | | | | | | | |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-gib", type=float, default=24.0, help="skip families whose weights would not fit")
    parser.add_argument("--workdir", default=None, help="where the temporary model folders go (default: $TMPDIR)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "families-cpu.md"))
    parser.add_argument("--build", nargs=2, metavar=("FAMILY", "FOLDER"), help=argparse.SUPPRESS)
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--measure", nargs=2, metavar=("FOLDER", "JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.build:
        name, folder = args.build
        if args.tiny:
            from maskdiffusion.tiny import build_tiny_model

            build_tiny_model(folder, family=name)
        else:
            build_folder(SHAPES[name], Path(folder))
        return 0
    if args.measure:
        folder, out = args.measure
        Path(out).write_text(json.dumps(measure(folder, repeats=args.repeats, threads=args.threads)))
        return 0

    from maskdiffusion.files import write_text

    rows, skipped = [], {}
    workdir = Path(tempfile.mkdtemp(prefix="maskdiffusion-families-", dir=args.workdir))
    try:
        for name in args.families:
            shapes = SHAPES[name]
            weights = 4 * sum(parameter_counts(shapes).values())
            reason = memory_verdict(weights, max_bytes=int(args.max_gib * GIB), available=available_bytes())
            if reason:
                print(f"{name}: skipped, {reason}", flush=True)
                skipped[name] = reason
                continue
            print(f"{name}: {shapes.hub_id} shapes, {weights / GIB:.2f} GiB of weights ...", flush=True)
            try:
                row = run_family(name, workdir, repeats=args.repeats, threads=args.threads)
            except subprocess.CalledProcessError as error:  # e.g. killed for memory (-9): the others still run
                print(f"{name}: failed, {error}", flush=True)
                skipped[name] = (
                    f"failed: {'build' if '--build' in error.cmd else 'measurement'} exited {error.returncode}"
                )
                continue
            if row["family"] != name or row["size"] != shapes.native_size:
                raise RuntimeError(
                    f"{name}: loaded as family {row['family']!r} at {row['size']} px, "
                    f"expected {name!r} at {shapes.native_size}"
                )
            rows.append({**row, "hub_id": shapes.hub_id})
            print(
                f"{name}: {row['median_seconds']:.1f} s per view, peak {row['process_peak_rss'] / GIB:.2f} GiB",
                flush=True,
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text = report(rows, skipped, repeats=args.repeats, threads=args.threads)
    print(text)
    write_text(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
