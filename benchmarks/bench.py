"""Speed and memory of maskdiffusion against the reference's compute pattern, in one run.

Models have the published Stable Diffusion 1.5 shapes (UNet, VAE, CLIP text encoder) and,
for the reference's feature branch, a CLIP ViT-L/14-336 image encoder, all with random
weights: the same FLOPs and memory as the real checkpoints, no download. Repetitions are
interleaved and the median reported; memory is the peak resident set (CPU) or
``max_memory_allocated`` (GPU) during a call, plus the weights that approach has to hold.

    python benchmarks/bench.py                 # fp32 (+ bf16 where the CPU has it), ~20 min
    python benchmarks/bench.py --quick         # fewer repetitions, no Cityscapes-sized case
    python benchmarks/bench.py --steps         # only where a view's time goes and the tiny-encoder rows, ~4 min
    python benchmarks/bench.py --toyworld      # only the toy-world checks (bundled model), ~1-2 min

Writes the table to ``benchmarks/results/<device>.md``, and where one view's time goes to
``benchmarks/results/steps-<device>.md``: per step (text encoder, VAE encoder, UNet pass as run, stitching,
mask head) its FLOPs (``flops.py``: counted on the real modules), seconds, GFLOP/s and share of the CPU's
peak, fp32 and bf16 in the same run, and seconds per 512x512 view with the full VAE and with a tiny encoder
of TAESD's real shapes (random weights), interleaved. Every full run also does the toy-world checks
(``toyworld_checks.py``: half precision vs fp32 and shared-queries vs batch on held-out scenes of
the bundled model's world) and writes them to ``benchmarks/results/toyworld-<device>.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from maskdiffusion import MaskDiffusion
from maskdiffusion.backbones.unet import UNetBackbone
from maskdiffusion.families import FAMILIES
from maskdiffusion.loading import Components, model_presets
from maskdiffusion.precision import Precision, cpu_isa, cpu_model, native_half
from maskdiffusion.prompts import clip_tokenizer
from maskdiffusion.tiny import SD_NOISE_SCHEDULE

sys.path.insert(0, str(Path(__file__).resolve().parent))
import families  # beside this file: the real shapes
import flops
import toyworld_checks

ATTENTION = "reference attention branch, 512x512"
FEATURES = "reference feature branch, one 512x512 crop"
TEN_CLASSES = "road, sidewalk, building, wall, fence, pole, traffic light, vegetation, sky, car"
OTHER_TEN = "person, rider, truck, bus, train, motorcycle, bicycle, terrain, traffic sign, bridge"
TAESD_ID = "taesd-shaped-random"
TINY_CASE = "tiny encoder (TAESD-shaped), 512x512"
TINY_TARGET = 0.45  # issue 24: a 512 view with the tiny encoder's real shapes in <= 0.45x the full-VAE time


def sd15_components(device: torch.device) -> tuple[Components, torch.nn.Module]:
    """SD 1.5-shaped UNet, VAE and text encoder (``families.SHAPES["sd1"]``) plus a CLIP ViT-L/14-336 image
    encoder, random (seed 0)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    modules = families.build_modules(families.SHAPES["sd1"])
    vision = CLIPVisionModel(
        CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                         image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    )  # fmt: skip
    for module in (*modules.values(), vision):
        module.to(device).eval().requires_grad_(False)
    family = FAMILIES["sd1"]
    parts = {"unet": modules["unet"], "text_encoder": modules["text_encoder"], "tokenizer": clip_tokenizer()}
    backbone = UNetBackbone(parts, SD_NOISE_SCHEDULE, 8, family)
    presets = model_presets(Path("."))
    components = Components(vae=modules["vae"], backbone=backbone, presets=presets, folder=Path("."), family=family)
    return components, vision


def taesd_shaped(latent_channels: int = 4, *, seed: int = 0) -> torch.nn.Module:
    """An ``AutoencoderTiny`` in TAESD's real shapes (diffusers' default configuration: encoder levels of 64
    channels, 1, 3, 3, 3 blocks; taesd, taesdxl, and with 16 latent channels taesd3), random weights."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    return AutoencoderTiny(latent_channels=latent_channels).eval().requires_grad_(False)


def with_tiny_encoder(components: Components, precision: Precision | None = None) -> Components:
    """The same models with a TAESD-shaped encoder for the views, in the denoiser's dtype and memory format."""
    tiny = taesd_shaped(components.vae.config.latent_channels).to(components.vae.device, components.vae.dtype)
    if precision is not None and precision.channels_last:
        tiny.to(memory_format=torch.channels_last)
    return dataclasses.replace(components, encoder=tiny, encoder_id=TAESD_ID)


def half_components(device: torch.device, precision: Precision) -> Components:
    """The same random SD 1.5-shaped models (seed 0) in ``precision``: weights cast once, channels-last."""
    components, vision = sd15_components(device)
    del vision
    for module in (components.backbone.unet, components.vae, components.backbone.text_encoder):
        module.to(precision.weights)
    precision.apply(components.vae, components.backbone)
    return components


def weights_bytes(*modules: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


class PeakMemory:
    """Peak memory while a block runs: RSS sampled every 5 ms (CPU) or the CUDA allocator's peak."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.base = self._rss()
        self.peak = self.base
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._running = False
            self._thread.join()
        self.extra = self.peak - self.base  # activations and temporaries above what was already held

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as stats:
            return int(stats.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self):
        while self._running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.005)


class ReferencePattern:
    """The reference's sequence of model calls (METHOD.md), with random SD 1.5-shaped models.

    Attention branch on one squashed 512x512 view: VAE encode, a UNet pass at batch 1 (the
    wasted inversion step), a UNet pass at batch 2 (classifier-free guidance) with explicit
    attention in every layer (its hooks store exp maps), VAE decode. Feature branch per
    512x512 crop: CLIP ViT-L/14-336 image encoder (implicit captioner), VAE encode, UNet pass,
    VAE decode.
    """

    def __init__(self, components: Components, vision: torch.nn.Module, device: torch.device, autocast):
        from diffusers.models.attention_processor import AttnProcessor

        self.c, self.vision, self.device, self.autocast = components, vision, device, autocast
        self.explicit = AttnProcessor()

    def _text(self, batch: int) -> torch.Tensor:
        ids = torch.full((batch, 77), 49407, device=self.device)
        return self.c.backbone.text_encoder(ids)[0]

    @torch.no_grad()
    def attention_branch(self, view: torch.Tensor) -> None:
        c, unet = self.c, self.c.backbone.unet
        with self.autocast():
            latent = c.vae.encode(view).latent_dist.mean * 0.18215
            text = self._text(2)
            unet(latent, 0, encoder_hidden_states=text[:1])  # inversion step
            original = unet.attn_processors
            unet.set_attn_processor(self.explicit)
            try:
                unet(latent.repeat(2, 1, 1, 1), 0, encoder_hidden_states=text)
            finally:
                unet.set_attn_processor(original)
            c.vae.decode(latent / 0.18215)

    @torch.no_grad()
    def feature_branch(self, crop: torch.Tensor) -> None:
        c = self.c
        with self.autocast():
            pixels = torch.nn.functional.interpolate(crop, size=(336, 336), mode="bilinear")
            embedding = self.vision(pixel_values=pixels).last_hidden_state[:, :77, :768]
            latent = c.vae.encode(crop).latent_dist.mean * 0.18215
            c.backbone.unet(latent, 0, encoder_hidden_states=embedding)
            c.vae.decode(latent / 0.18215)

    def _view(self) -> torch.Tensor:
        return torch.rand(1, 3, 512, 512, device=self.device) * 2 - 1

    def attention_view(self) -> None:
        self.attention_branch(self._view())

    def feature_crop(self) -> None:
        self.feature_branch(self._view())

    def one_view(self) -> None:
        self.attention_view()
        self.feature_crop()


def compose(results: dict[str, dict], parts: dict[str, int]) -> dict:
    """Timing of a sequence of measured calls: ``parts`` maps a measured case to its count."""
    total = {key: sum(results[name][key] * count for name, count in parts.items()) for key in ("median", "min", "max")}
    total["extra_memory"] = max(results[name]["extra_memory"] for name in parts)
    busy = sum(results[name]["cores_busy"] * results[name]["median"] * count for name, count in parts.items())
    total["cores_busy"] = busy / total["median"]
    return total


def measure(cases: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, dict]:
    """Run every case ``repeats`` times, interleaved; median/min/max seconds, peak memory and cores busy
    (CPU seconds per second: below the thread count when other work shared the cores)."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    cpu: dict[str, float] = dict.fromkeys(cases, 0.0)
    memory: dict[str, int] = dict.fromkeys(cases, 0)
    for _ in range(repeats):
        for name, run in cases.items():
            with PeakMemory(device) as peak:
                start, start_cpu = time.perf_counter(), time.process_time()
                run()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - start)
                cpu[name] += time.process_time() - start_cpu
            memory[name] = max(memory[name], peak.extra)
            print(f"  {name}: {times[name][-1]:.2f} s", flush=True)
    return {
        name: {"median": statistics.median(t), "min": min(t), "max": max(t), "extra_memory": memory[name],
               "cores_busy": cpu[name] / sum(t)}
        for name, t in times.items()
    }  # fmt: skip


def coco_names() -> list[str]:
    from maskdiffusion.datasets import COCOSTUFF171_CLASSES

    return list(COCOSTUFF171_CLASSES)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 repetition, skip the Cityscapes-sized case")
    parser.add_argument("--steps", action="store_true", help="only the per-step table and the tiny-encoder rows")
    parser.add_argument("--toyworld", action="store_true", help="only the toy-world checks (bundled model)")
    parser.add_argument("--scenes", type=int, default=toyworld_checks.DEFAULT_SCENES,
                        help="held-out toy-world scenes of the toy-world checks")  # fmt: skip
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    repeats = 1 if args.quick else args.repeats
    half = torch.bfloat16 if device.type == "cpu" else torch.float16
    if args.toyworld:
        toyworld(device, half, args.scenes, Path(args.out))
        return 0
    loads = [os.getloadavg()[0]]
    print(f"building SD 1.5-shaped random models on {device} ...", flush=True)
    components, vision = sd15_components(device)
    ours = MaskDiffusion(components, model_id="sd15-shaped-random", device=device, cache_size=0)
    cached = MaskDiffusion(components, model_id="sd15-shaped-random", device=device, cache_size=8)
    half_name = str(half).removeprefix("torch.")
    native = native_half(device)
    segmenters = {"": (ours, cached)}
    tiny = {"": MaskDiffusion(with_tiny_encoder(components), model_id="sd15-shaped-random", device=device,
                              cache_size=0)}  # fmt: skip
    if native:
        precision = Precision.choose(device, half)
        low = half_components(device, precision)
        segmenters[f" {half_name}"] = tuple(
            MaskDiffusion(low, model_id="sd15-shaped-random", device=device, dtype=half, cache_size=size,
                          precision=precision)
            for size in (0, 8)
        )  # fmt: skip
        tiny[f" {half_name}"] = MaskDiffusion(with_tiny_encoder(low, precision), model_id="sd15-shaped-random",
                                              device=device, dtype=half, cache_size=0, precision=precision)  # fmt: skip
    if not native:
        # Without AMX / AVX512-BF16, bf16 is emulated and far slower than fp32 (one 512x512
        # view of ours ran for over 10 minutes on an AVX2 EPYC): not worth the budget.
        print(f"note: this CPU has no native {half_name}; the {half_name} cases are not run")
    rng = np.random.default_rng(0)
    view = (rng.random((512, 512, 3)) * 255).astype(np.uint8)

    print("warm-up ...", flush=True)
    cases = {}
    for suffix, (plain, _) in segmenters.items():
        plain(np.zeros((64, 64, 3), np.uint8), "a, b")
        tiny[suffix](np.zeros((64, 64, 3), np.uint8), "a, b")
        cases |= {
            f"ours{suffix}, 512x512": lambda p=plain: p(view, TEN_CLASSES),
            f"ours{suffix}, {TINY_CASE}": lambda t=tiny[suffix]: t(view, TEN_CLASSES),
        }
    if args.steps:
        del vision
        results = measure(cases, repeats, device)
    else:
        results = main_cases(args, cases, segmenters, components, vision, view, device, half, repeats)
    print("where the time goes ...", flush=True)
    peak = flops.cpu_peak(measured_mhz=flops.measure_mhz()) if device.type == "cpu" else None
    gemm = {dtype: flops.gemm_gflops(dtype) for dtype in (torch.float32, *([half] if native else []))}
    labels = {"": "fp32", f" {half_name}": half_name}
    profiles = {}
    for suffix, (plain, _) in segmenters.items():
        dtype = torch.float32 if not suffix else half
        profiles[labels[suffix]] = (dtype, flops.profile_steps(plain, lambda p=plain: p(view, TEN_CLASSES)))
        profiles[f"{labels[suffix]}, tiny encoder"] = (
            dtype, flops.profile_steps(tiny[suffix], lambda t=tiny[suffix]: t(view, TEN_CLASSES))
        )  # fmt: skip
    whole_unet = whole_unet_flops(ours)
    loads.append(os.getloadavg()[0])
    out = Path(args.out)
    text = steps_report(profiles, results, peak, gemm, whole_unet, device, half, repeats, loads)
    print(text)
    from maskdiffusion.files import write_text

    out.mkdir(parents=True, exist_ok=True)
    write_text(out / f"steps-{device.type}.md", text)
    if not args.steps:
        checks = toyworld(device, half, args.scenes, out)
        write_report(results, checks, components, vision, device, half, repeats, out, loads)
    return 0


def main_cases(args, cases, segmenters, components, vision, view, device, half, repeats) -> dict[str, dict]:
    """The comparison with the reference's compute pattern, re-queries and long vocabularies (with ``cases``,
    the 512x512 views of ours, interleaved), then the Cityscapes-sized image unless ``--quick``."""
    half_name = str(half).removeprefix("torch.")

    def autocast_for(dtype):
        if dtype == torch.float32:
            return nullcontext
        return lambda: torch.autocast(device.type, dtype=dtype)

    reference = ReferencePattern(components, vision, device, autocast_for(torch.float32))
    reference_half = ReferencePattern(components, vision, device, autocast_for(half))
    street = (np.random.default_rng(1).random((1024, 2048, 3)) * 255).astype(np.uint8)
    names = coco_names()
    ours = segmenters[""][0]
    shared = ours.preset.replace(long_vocabulary="shared-queries")
    cases = {ATTENTION: reference.attention_view, FEATURES: reference.feature_crop, **cases}
    for suffix, (plain, requery) in segmenters.items():
        requery(view, TEN_CLASSES)  # warm the latent cache: the re-query case asks a new vocabulary
        cases |= {
            f"ours{suffix}, re-query (new classes)": lambda r=requery: r(view, OTHER_TEN),
            f"ours{suffix}, 171 COCO-Stuff names (batch)": lambda p=plain: p(view, names),
        }
    cases["ours, 171 COCO-Stuff names (shared-queries)"] = lambda: ours(view, names, preset=shared)
    if len(segmenters) > 1:
        cases[f"reference-pattern {half_name}, 512x512"] = reference_half.one_view
    results = measure(cases, repeats, device)
    results["reference-pattern, 512x512"] = compose(results, {ATTENTION: 1, FEATURES: 1})
    if not args.quick:
        results |= measure({f"ours{suffix}, 1024x2048": (lambda p=plain: p(street, TEN_CLASSES))
                            for suffix, (plain, _) in segmenters.items()}, 1, device)  # fmt: skip
        # The reference's 8 feature crops are 8 identical calls: their measured median, 8 times.
        results["reference-pattern, 1024x2048"] = compose(results, {ATTENTION: 1, FEATURES: 8})
    return results


def whole_unet_flops(segmenter: MaskDiffusion) -> int:
    """FLOPs of the whole UNet (every block) for one 512x512 (view, prompt) pass: what a pass that did not stop
    early would cost."""
    unet = segmenter.backbone.unet
    latents = torch.zeros(1, unet.config.in_channels, 64, 64, device=segmenter.device, dtype=unet.dtype)
    text = torch.zeros(1, 77, unet.config.cross_attention_dim, device=segmenter.device, dtype=unet.dtype)
    with torch.no_grad():
        return flops.count_flops(lambda: unet(latents, 0, encoder_hidden_states=text))[1]


def toyworld(device: torch.device, half: torch.dtype, scenes: int, out: Path) -> dict:
    """The toy-world checks; writes ``toyworld-<device>.md`` and returns their numbers."""
    checks = toyworld_checks.run_checks(device, half, scenes)
    text = toyworld_checks.report(checks, device_name(device))
    print(text)
    from maskdiffusion.files import write_text

    write_text(out / f"toyworld-{device.type}.md", text)
    return checks


def write_report(results, checks, components, vision, device, half, repeats, out: Path, loads=()) -> None:
    unet = components.backbone.unet
    ours_weights = weights_bytes(unet, components.vae, components.backbone.text_encoder)
    # The reference holds two SD checkpoints (v1.4 for attention, ODISE's v1.3 for features)
    # and the CLIP image encoder.
    reference_weights = ours_weights + weights_bytes(unet, vision)
    half_name = str(half).removeprefix("torch.")
    rows = []
    for name, r in results.items():
        weights = reference_weights if name.startswith("reference") else ours_weights
        rows.append((name, r["median"], r["min"], r["max"], (weights + r["extra_memory"]) / 2**30, r["cores_busy"]))

    def ratio(a: str, b: str, key: str = "median") -> float:
        return results[a][key] / results[b][key]

    def mem(name: str) -> float:
        return next(row[4] for row in rows if row[0] == name)

    lines = [
        f"# Benchmark on {device_name(device)}",
        "",
        f"ISA: {isa_line(device)}.",
        "",
        f"Python {platform.python_version()}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"median of {repeats} interleaved repetitions (1 for ours at 1024x2048). The reference-pattern rows are "
        "sums of its measured branches: 512x512 = attention branch + one feature crop; 1024x2048 = attention "
        "branch + 8 feature crops. Random weights with SD 1.5 shapes "
        "(UNet, VAE, CLIP-L text) + CLIP ViT-L/14-336 for the reference's feature branch. Memory = weights the "
        "approach holds (reference: two SD UNets + VAE + text encoder + CLIP image encoder) + peak RSS above idle "
        f"during the call. {busy_note(loads)} The tiny-encoder rows encode the views with a TAESD-shaped "
        "AutoencoderTiny (random weights); where a view's time goes, against the machine: "
        f"[steps-{device.type}.md](steps-{device.type}.md).",
        "",
        "| case | median s | min s | max s | peak memory GiB | cores busy |",
        "|---|---|---|---|---|---|",
        *(f"| {n} | {m:.2f} | {lo:.2f} | {hi:.2f} | {g:.2f} | {c:.2f} |" for n, m, lo, hi, g, c in rows),
        "",
        "| ratio | value | target |",
        "|---|---|---|",
        f"| reference / ours, 512x512, fp32 | {ratio('reference-pattern, 512x512', 'ours, 512x512'):.2f}x | >= 5x |",
    ]
    if "ours, 1024x2048" in results:
        lines.append(
            f"| reference / ours, 1024x2048, fp32 | {ratio('reference-pattern, 1024x2048', 'ours, 1024x2048'):.2f}x "
            "| >= 5x |"
        )
    lines += [
        f"| memory ours / reference, 512x512 | {mem('ours, 512x512') / mem('reference-pattern, 512x512'):.2f} "
        "| <= 0.7 |",
    ]
    for case, target in (("512x512", "<= 0.4 on AMX (stretch 0.33)"), ("1024x2048", ""), ("re-query (new classes)", ""),
                         ("171 COCO-Stuff names (batch)", "")):  # fmt: skip
        if f"ours {half_name}, {case}" in results and f"ours, {case}" in results:
            lines.append(
                f"| ours {half_name} / ours fp32 time, {case} | "
                f"{ratio(f'ours {half_name}, {case}', f'ours, {case}'):.2f} | {target} |"
            )
    lines += tiny_ratio_rows(results, half_name)
    if f"reference-pattern {half_name}, 512x512" in results:
        lines.append(
            f"| reference {half_name} / ours {half_name} | "
            f"{ratio(f'reference-pattern {half_name}, 512x512', f'ours {half_name}, 512x512'):.2f}x "
            "| (same precision) |"
        )
    else:
        lines.append(f"| {half_name} cases | not run: no native {half_name} (AMX / AVX512-BF16) on this CPU | |")
    spread = checks["long_vocabulary"]["spread"]
    lines += [
        f"| labels ours {half_name} = ours fp32 (bundled toy model, {checks['scenes']} held-out toy-world scenes) "
        f"| {100 * checks['precision']['agreement']:.1f}% | >= 99% |",
        f"| toy-world mIoU, {spread['names']} names in {spread['prompts']} prompts (toy classes spread): "
        "shared-queries vs batch "
        f"| {spread['shared-queries']['mIoU']:.1f} vs {spread['batch']['mIoU']:.1f} "
        f"| shared-queries as default only if quality holds ([toyworld-{device.type}.md](toyworld-{device.type}.md)) |",
        f"| re-query / first query | {ratio('ours, re-query (new classes)', 'ours, 512x512'):.2f} | <= 0.4 |",
        f"| 171 names / 10 names (batch) | {ratio('ours, 171 COCO-Stuff names (batch)', 'ours, 512x512'):.2f} | <= 3 |",
        f"| 171 names / 10 names (shared-queries) | "
        f"{ratio('ours, 171 COCO-Stuff names (shared-queries)', 'ours, 512x512'):.2f} | <= 3 |",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    from maskdiffusion.files import write_text

    write_text(out / f"{device.type}.md", text)


def busy_note(loads) -> str:
    """What the cores-busy column means, and the machine's load around the run."""
    load = f" 1-minute load average {min(loads):.2f}-{max(loads):.2f} at the start and end." if loads else ""
    return (
        f"Cores busy = CPU seconds per second of the call (at most {torch.get_num_threads()}: below that, other work "
        f"shared the cores).{load}"
    )


def tiny_ratio_rows(results: dict[str, dict], half_name: str) -> list[str]:
    """Tiny encoder / full VAE, per precision measured: the issue's acceptance line."""
    rows = []
    for suffix in ("", f" {half_name}"):
        tiny, full = f"ours{suffix}, {TINY_CASE}", f"ours{suffix}, 512x512"
        if tiny in results and full in results:
            ratio = results[tiny]["median"] / results[full]["median"]
            verdict = "met" if ratio <= TINY_TARGET else "NOT met"
            rows.append(
                f"| tiny encoder / full VAE, one 512x512 view, {(suffix.strip() or 'fp32')} | {ratio:.2f} "
                f"| <= {TINY_TARGET} ({verdict}) |"
            )
    return rows


def _gflop(value: int | None) -> str:
    return "-" if value is None else f"{value / 1e9:,.1f}"


def step_rows(profiles: dict[str, tuple[torch.dtype, dict]], peak: flops.CpuPeak | None) -> list[str]:
    """The per-step table: a row per step, per profile its GFLOP, seconds, GFLOP/s, share of peak, cores busy."""
    header = "| step |" + "".join(
        f" {name} GFLOP | {name} s | {name} GFLOP/s | {name} % of peak | {name} cores busy |" for name in profiles
    )
    lines = [header, "|---" * (1 + 5 * len(profiles)) + "|"]
    steps = list(next(iter(profiles.values()))[1])
    for step in steps:
        cells = []
        for dtype, profile in profiles.values():
            row = profile.get(step)
            if row is None:
                cells += ["-"] * 5
                continue
            seconds, work = row["seconds"], row["flops"]
            rate = work / seconds / 1e9 if work and seconds > 0 else None
            top = peak.gflops(dtype) if peak is not None else None
            share = f"{100 * rate / top:.0f}%" if rate is not None and top else "-"
            busy = f"{row['cpu'] / seconds:.2f}" if seconds > 0 else "-"
            cells += [_gflop(work), f"{seconds:.3f}", "-" if rate is None else f"{rate:.0f}", share, busy]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return lines


def steps_report(profiles, results, peak, gemm, whole_unet, device, half, repeats, loads) -> str:
    """``steps-<device>.md``: where one 512x512 view's time goes against the machine, and the tiny encoder's rows."""
    half_name = str(half).removeprefix("torch.")
    full = {name: value for name, value in profiles.items() if "tiny" not in name}
    lines = [
        f"# Where one 512x512 view's time goes, against the machine: {device_name(device)}",
        "",
        f"Python {platform.python_version()}, torch {torch.__version__}, {torch.get_num_threads()} threads. "
        "SD 1.5-shaped random weights (UNet, VAE, CLIP-L text encoder), one random 512x512 image, 10 classes, "
        "`default` preset, latent cache off. Each step is timed inside the real `segment_batch` call (median of 2 "
        "calls; the text cache emptied before each so the text encoder runs), then its FLOPs are counted in one "
        f"more call: {flops.COUNTED}; {flops.NOT_COUNTED}. rest = the call minus the steps (image decoding, "
        f"views, prompts, noising bookkeeping). {busy_note(loads)}",
        "",
    ]
    if peak is not None:
        lines += [
            peak.describe(),
            "",
            "What a large matrix product (2048x2048, best of 5) reaches here: "
            + ", ".join(
                f"{str(dtype).removeprefix('torch.')} {rate:.0f} GFLOP/s"
                + (f" ({100 * rate / peak.gflops(dtype):.0f}% of peak)" if peak.gflops(dtype) else "")
                for dtype, rate in gemm.items()
            )
            + ".",
            "",
        ]
    lines += [
        *step_rows(full, peak),
        "",
        f"The UNet pass stops after the last block the preset needs; the whole UNet (every block) would be "
        f"{_gflop(whole_unet)} GFLOP for one (view, prompt) pass. % of peak uses the peak of the step's precision "
        f"(bf16 for the {half_name} column, though autocast keeps some of its ops, and the capture's attention "
        "scores, in fp32).",
        "",
        "## Tiny encoder vs the full VAE",
        "",
        "The views encoded by an `AutoencoderTiny` in TAESD's real shapes (diffusers' default configuration: 64 "
        "channels, 1/3/3/3 blocks, 4 latent channels; random weights, so no fidelity can be measured here), against "
        f"the SD 1.5 VAE encoder, same run. Seconds per view: median of {repeats} whole calls, interleaved with the "
        "full-VAE calls (the main table of bench.py); encoder FLOPs and seconds from the per-step profiles.",
        "",
        "| precision | encoder | encoder GFLOP | encoder s | s / view (median) | min-max s | tiny / full |",
        "|---|---|---|---|---|---|---|",
    ]
    for suffix in ("", f" {half_name}"):
        label = suffix.strip() or "fp32"
        full_case, tiny_case = f"ours{suffix}, 512x512", f"ours{suffix}, {TINY_CASE}"
        if full_case not in results or tiny_case not in results:
            continue
        ratio = results[tiny_case]["median"] / results[full_case]["median"]
        for encoder, case, profile in (("full VAE", full_case, label), ("tiny (TAESD-shaped)", tiny_case,
                                                                        f"{label}, tiny encoder")):  # fmt: skip
            step = profiles[profile][1][flops.STEPS[1]]
            r = results[case]
            lines.append(
                f"| {label} | {encoder} | {_gflop(step['flops'])} | {step['seconds']:.3f} | {r['median']:.2f} "
                f"| {r['min']:.2f}-{r['max']:.2f} | {'' if encoder == 'full VAE' else f'{ratio:.2f}'} |"
            )
    lines += ["", "| ratio | value | target |", "|---|---|---|", *tiny_ratio_rows(results, half_name)]
    return "\n".join(lines) + "\n"


def isa_line(device: torch.device) -> str:
    """The CPU features that decide the half-precision rows, and whether they run."""
    if device.type != "cpu":
        return "GPU: half precision is native"
    isa = cpu_isa()
    native = "native bf16: the bf16 rows run" if native_half(device) else "no native bf16: the bf16 rows are not run"
    return ", ".join(f"{name} {'yes' if isa[name] else 'no'}" for name in isa) + f" ({native})"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({cpu_model()}, {os.cpu_count()} cores)"


if __name__ == "__main__":
    sys.exit(main())
