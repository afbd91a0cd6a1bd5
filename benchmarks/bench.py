"""Speed and memory of maskdiffusion against the reference's compute pattern, in one run.

Models have the published Stable Diffusion 1.5 shapes (UNet, VAE, CLIP text encoder) and,
for the reference's feature branch, a CLIP ViT-L/14-336 image encoder, all with random
weights: the same FLOPs and memory as the real checkpoints, no download. Repetitions are
interleaved and the median reported; memory is the peak resident set (CPU) or
``max_memory_allocated`` (GPU) during a call, plus the weights that approach has to hold.

    python benchmarks/bench.py                 # fp32 (+ bf16 where the CPU has it), ~13 min
    python benchmarks/bench.py --quick         # fewer repetitions, no Cityscapes-sized case
    python benchmarks/bench.py --toyworld      # only the toy-world checks (bundled model), ~1-2 min

Writes the table to ``benchmarks/results/<device>.md``. Every run also does the toy-world checks
(``toyworld_checks.py``: half precision vs fp32 and shared-queries vs batch on held-out scenes of
the bundled model's world) and writes them to ``benchmarks/results/toyworld-<device>.md``.
"""

from __future__ import annotations

import argparse
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
import toyworld_checks  # beside this file

ATTENTION = "reference attention branch, 512x512"
FEATURES = "reference feature branch, one 512x512 crop"
TEN_CLASSES = "road, sidewalk, building, wall, fence, pole, traffic light, vegetation, sky, car"
OTHER_TEN = "person, rider, truck, bus, train, motorcycle, bicycle, terrain, traffic sign, bridge"


def sd15_components(device: torch.device) -> tuple[Components, torch.nn.Module]:
    """SD 1.5-shaped UNet, VAE and text encoder plus a CLIP ViT-L/14-336 image encoder, random (seed 0)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # defaults are SD 1.x's
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
        scaling_factor=0.18215,
    )
    text = CLIPTextModel(
        CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
    )  # fmt: skip
    vision = CLIPVisionModel(
        CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                         image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    )  # fmt: skip
    for module in (unet, vae, text, vision):
        module.to(device).eval().requires_grad_(False)
    family = FAMILIES["sd1"]
    parts = {"unet": unet, "text_encoder": text, "tokenizer": clip_tokenizer()}
    backbone = UNetBackbone(parts, SD_NOISE_SCHEDULE, 8, family)
    presets = model_presets(Path("."))
    components = Components(vae=vae, backbone=backbone, presets=presets, folder=Path("."), family=family)
    return components, vision


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
    return total


def measure(cases: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, dict]:
    """Run every case ``repeats`` times, interleaved; median/min/max seconds and peak memory."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    memory: dict[str, int] = dict.fromkeys(cases, 0)
    for _ in range(repeats):
        for name, run in cases.items():
            with PeakMemory(device) as peak:
                start = time.perf_counter()
                run()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - start)
            memory[name] = max(memory[name], peak.extra)
            print(f"  {name}: {times[name][-1]:.2f} s", flush=True)
    return {
        name: {"median": statistics.median(t), "min": min(t), "max": max(t), "extra_memory": memory[name]}
        for name, t in times.items()
    }


def coco_names() -> list[str]:
    from maskdiffusion.datasets import COCOSTUFF171_CLASSES

    return list(COCOSTUFF171_CLASSES)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 repetition, skip the Cityscapes-sized case")
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
    print(f"building SD 1.5-shaped random models on {device} ...", flush=True)
    components, vision = sd15_components(device)
    ours = MaskDiffusion(components, model_id="sd15-shaped-random", device=device, cache_size=0)
    cached = MaskDiffusion(components, model_id="sd15-shaped-random", device=device, cache_size=8)
    shared = ours.preset.replace(long_vocabulary="shared-queries")
    half_name = str(half).removeprefix("torch.")
    native = native_half(device)
    segmenters = {"": (ours, cached)}
    if native:
        precision = Precision.choose(device, half)
        low = half_components(device, precision)
        segmenters[f" {half_name}"] = tuple(
            MaskDiffusion(low, model_id="sd15-shaped-random", device=device, dtype=half, cache_size=size,
                          precision=precision)
            for size in (0, 8)
        )  # fmt: skip

    def autocast_for(dtype):
        if dtype == torch.float32:
            return nullcontext
        return lambda: torch.autocast(device.type, dtype=dtype)

    reference = ReferencePattern(components, vision, device, autocast_for(torch.float32))
    reference_half = ReferencePattern(components, vision, device, autocast_for(half))
    rng = np.random.default_rng(0)
    view = (rng.random((512, 512, 3)) * 255).astype(np.uint8)
    street = (rng.random((1024, 2048, 3)) * 255).astype(np.uint8)
    names = coco_names()

    print("warm-up ...", flush=True)
    cases = {ATTENTION: reference.attention_view, FEATURES: reference.feature_crop}
    for suffix, (plain, requery) in segmenters.items():
        plain(np.zeros((64, 64, 3), np.uint8), "a, b")
        requery(view, TEN_CLASSES)  # warm the latent cache: the re-query case asks a new vocabulary
        cases |= {
            f"ours{suffix}, 512x512": lambda p=plain: p(view, TEN_CLASSES),
            f"ours{suffix}, re-query (new classes)": lambda r=requery: r(view, OTHER_TEN),
            f"ours{suffix}, 171 COCO-Stuff names (batch)": lambda p=plain: p(view, names),
        }
    cases["ours, 171 COCO-Stuff names (shared-queries)"] = lambda: ours(view, names, preset=shared)
    if native:
        cases[f"reference-pattern {half_name}, 512x512"] = reference_half.one_view
    results = measure(cases, repeats, device)
    results["reference-pattern, 512x512"] = compose(results, {ATTENTION: 1, FEATURES: 1})
    if not native:
        # Without AMX / AVX512-BF16, bf16 is emulated and far slower than fp32 (one 512x512
        # view of ours ran for over 10 minutes on an AVX2 EPYC): not worth the budget.
        print(f"note: this CPU has no native {half_name}; the {half_name} cases are not run")
    if not args.quick:
        results |= measure({f"ours{suffix}, 1024x2048": (lambda p=plain: p(street, TEN_CLASSES))
                            for suffix, (plain, _) in segmenters.items()}, 1, device)  # fmt: skip
        # The reference's 8 feature crops are 8 identical calls: their measured median, 8 times.
        results["reference-pattern, 1024x2048"] = compose(results, {ATTENTION: 1, FEATURES: 8})
    stages = {name or " fp32": stage_times(plain, view, TEN_CLASSES) for name, (plain, _) in segmenters.items()}
    checks = toyworld(device, half, args.scenes, Path(args.out))
    write_report(results, stages, checks, components, vision, device, half, repeats, Path(args.out))
    return 0


def stage_times(segmenter: MaskDiffusion, image: np.ndarray, classes: str, repeats: int = 2) -> dict[str, float]:
    """Where one view's time goes: median seconds of each step of ``segment_batch``, run one by one.

    Input (decode + views), text encoder, VAE encoder, UNet pass (attention + features), each
    alone; then the whole call, inside which the stitching of views + mask head (``_finish``) is
    timed; output = writing the three files. The steps of the call sum to it within noise.
    """
    import tempfile

    from maskdiffusion.views import ViewLayout, load_image

    preset = segmenter.preset
    vocabulary = segmenter.check_inputs(classes, preset)[0]
    steps: dict[str, list[float]] = {}

    def timed(name: str, run: Callable[[], object]) -> object:
        start = time.perf_counter()
        value = run()
        steps.setdefault(name, []).append(time.perf_counter() - start)
        return value

    finish = segmenter._finish

    def timed_finish(*args):
        return timed("stitching + mask head (in the call)", lambda: finish(*args))

    for _ in range(repeats):
        crops = timed("input: decode + views", lambda: ViewLayout.for_image(
            (image.shape[1], image.shape[0]), preset.size, segmenter.backbone.block, preset.window_overlap
        ).crops(load_image(image)))  # fmt: skip
        batches = segmenter.build_prompts(vocabulary, preset.separator)
        text = timed("text encoder", lambda b=batches: segmenter.encode_prompts(b))
        latents = timed("VAE encoder", lambda c=crops: segmenter.encode_views(c))
        timed("UNet pass", lambda lat=latents, t=text: segmenter.capture(lat, t, preset))
        segmenter._finish = timed_finish
        try:
            result = timed("whole call", lambda: segmenter(image, classes))
        finally:
            del segmenter._finish
        with tempfile.TemporaryDirectory() as folder:
            timed("output: labels, overlay, JSON", lambda r=result, f=folder: r.save(f, "view"))
    return {name: statistics.median(values) for name, values in steps.items()}


def toyworld(device: torch.device, half: torch.dtype, scenes: int, out: Path) -> dict:
    """The toy-world checks; writes ``toyworld-<device>.md`` and returns their numbers."""
    checks = toyworld_checks.run_checks(device, half, scenes)
    text = toyworld_checks.report(checks, device_name(device))
    print(text)
    from maskdiffusion.files import write_text

    write_text(out / f"toyworld-{device.type}.md", text)
    return checks


def write_report(results, stages, checks, components, vision, device, half, repeats, out: Path) -> None:
    unet = components.backbone.unet
    ours_weights = weights_bytes(unet, components.vae, components.backbone.text_encoder)
    # The reference holds two SD checkpoints (v1.4 for attention, ODISE's v1.3 for features)
    # and the CLIP image encoder.
    reference_weights = ours_weights + weights_bytes(unet, vision)
    half_name = str(half).removeprefix("torch.")
    rows = []
    for name, r in results.items():
        weights = reference_weights if name.startswith("reference") else ours_weights
        rows.append((name, r["median"], r["min"], r["max"], (weights + r["extra_memory"]) / 2**30))

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
        "during the call.",
        "",
        "| case | median s | min s | max s | peak memory GiB |",
        "|---|---|---|---|---|",
        *(f"| {n} | {m:.2f} | {lo:.2f} | {hi:.2f} | {g:.2f} |" for n, m, lo, hi, g in rows),
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
    lines += [
        "",
        "Where one 512x512 view's time goes (10 classes; median of 2; the first four steps timed alone, "
        "stitching + mask head timed inside the whole call):",
        "",
        "| step | " + " | ".join(f"{name.strip()} s" for name in stages) + " |",
        "|---" * (len(stages) + 1) + "|",
    ]
    for step in next(iter(stages.values())):
        lines.append(f"| {step} | " + " | ".join(f"{times[step]:.2f}" for times in stages.values()) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    from maskdiffusion.files import write_text

    write_text(out / f"{device.type}.md", text)


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
