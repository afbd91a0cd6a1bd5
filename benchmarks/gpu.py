"""Images per second and peak memory on one GPU, in under 5 minutes: the benchmark to run the day a GPU is lent.

Models have the real shapes of SD 1.5 (512 px), SDXL (1024) and SD3-medium (1024) with random weights
(``families.py``'s shapes, built on the GPU in the dtype measured: nothing to download, nothing saved). SD3
runs without its T5-XXL text encoder unless ``--t5``: its pipeline and maskdiffusion's backbone put zeros of
T5's shape in its place, so a view's work is the same; only the once-per-vocabulary text encoding differs.

Cases, in this order (the time guard skips what would not fit in ``--budget`` seconds and says so):

1. per dtype (float16, then bfloat16) and family, eager: batch 1, 4 and 8 (``MaskDiffusion(batch_size=)``, that
   many native-size images to ``segment_batch``) with the full VAE and with a TAESD-shaped tiny encoder;
   and the cost of capturing: our capture pass (the captured layers' explicit attention processors, the
   hooks, the early stop) against the same denoiser run with its stock SDPA processors everywhere, stopped
   at the same block, on the same latents and prompts;
2. ``compile=True`` (the VAE encoder and the denoiser's hook-free parts under ``torch.compile``), float16,
   batch 4, full VAE: the first call (compiling) is reported apart.

Each case: one warm-up call (it also encodes the class list, which maskdiffusion keeps: the timed calls
encode views only, as in use), then timed calls (median) until 5 or about 2 seconds of them; peak memory is
``torch.cuda.max_memory_allocated`` during the timed calls; a timed call's steps (``flops.StepProbe``: view
encoder, denoiser pass, stitching + mask head) are medians too.

    python benchmarks/gpu.py                     # ~4-5 min on one modern GPU, writes benchmarks/results/gpu.md
    python benchmarks/gpu.py --families sd1 --dtypes float16 --out /tmp/gpu.md
    python benchmarks/gpu.py --smoke             # the same code on the CPU with tiny models, seconds (tests)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import math
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # beside this file
import families
import flops

FAMILIES = ("sd1", "sdxl", "sd3")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
BATCHES = (1, 4, 8)
SMOKE_BATCHES = (1, 2)  # the same code paths as 1, 4, 8, in seconds
COMPILE_BATCH = 4
COMPILE_DTYPE = "float16"
BUDGET_S = 270.0  # of the 5 minutes: room for the CUDA context, the last case past its estimate and the write
SMOKE_SIZE = 64
REPEATS, REPEAT_SECONDS = 5, 2.0
COMPILE_GUESS_S = 90.0  # a first compiled call of a real-shaped model, before anything was measured
GIB = 2**30


@dataclass(frozen=True)
class Case:
    """One measurement: ``kind`` ``call`` (a ``segment_batch`` of ``batch`` images) or ``capture`` (our
    capture pass vs the stock SDPA pass, ``batch`` views)."""

    family: str
    dtype: str
    batch: int
    encoder: str = "full"
    compile: bool = False
    kind: str = "call"

    @property
    def label(self) -> str:
        what = "capture vs SDPA" if self.kind == "capture" else f"{self.encoder} encoder"
        return f"{self.family} {self.dtype} batch {self.batch} {what}" + (" compiled" if self.compile else "")


def plan(names, dtypes, batches, *, compile: bool = True) -> list[tuple[tuple[str, str, bool], list[Case]]]:
    """The cases grouped by the models they need (family, dtype, compiled), in the order they run."""
    groups = []
    for dtype in dtypes:  # every family in the first dtype before the second: a short budget still sees them all
        for name in names:
            cases = [Case(name, dtype, b, encoder) for encoder in ("full", "tiny") for b in batches]
            cases.append(Case(name, dtype, max(batches), kind="capture"))
            groups.append(((name, dtype, False), cases))
    if compile:
        dtype = COMPILE_DTYPE if COMPILE_DTYPE in dtypes else dtypes[0]
        batch = COMPILE_BATCH if COMPILE_BATCH in batches else max(batches)
        groups += [((name, dtype, True), [Case(name, dtype, batch, compile=True)]) for name in names]
    return groups


# -- the models ------------------------------------------------------------------------------


def real_pipeline(name: str, dtype: torch.dtype, device: torch.device, *, t5: bool = False):
    """A diffusers pipeline of ``name``'s real shapes with random weights (seed 0), made on ``device`` in
    ``dtype`` (no float32 copy on the way); an optional T5 is left out unless ``t5``. Returns it and what it
    left out."""
    builds = families.candidates(name)
    build = builds[0] if t5 else next((b for b in builds if b.without and not b.t5_layers and not b.depth), builds[0])
    torch.manual_seed(0)
    with torch.device(device), families.default_dtype(dtype):
        modules = families.build_modules(build.shapes)
    for module in modules.values():  # buffers made in float32 on purpose (SD3's position table) too, as a load casts
        module.to(dtype).eval().requires_grad_(False)
    return families.pipeline(build.shapes, modules), build.description()


def tiny_pipeline(name: str, dtype: torch.dtype, device: torch.device, folder: Path, *, t5: bool = False):
    """The tiny random model of ``name`` (``build_tiny_model``), loaded by diffusers in ``dtype`` on ``device``;
    without its T5 unless ``t5``, as :func:`real_pipeline` builds SD3."""
    from diffusers import DiffusionPipeline

    from maskdiffusion.tiny import build_tiny_model

    path = folder / name
    if not path.exists():
        build_tiny_model(path, family=name)
    pipe = DiffusionPipeline.from_pretrained(str(path), torch_dtype=dtype).to(device)
    if t5 or getattr(pipe, "text_encoder_3", None) is None:
        return pipe, "tiny random model"
    pipe.register_modules(text_encoder_3=None, tokenizer_3=None)
    return pipe, "tiny random model without text_encoder_3"


def tiny_encoder(vae, *, smoke: bool, folder: Path) -> torch.nn.Module:
    """A TAESD-shaped ``AutoencoderTiny`` matching ``vae`` (its latent channels, device, dtype); in smoke mode
    the tiny test encoder (``build_tiny_encoder``) through the loader ``encoder=`` uses."""
    channels = vae.config.latent_channels
    if not smoke:
        return bench.taesd_shaped(channels).to(vae.device, vae.dtype)
    from maskdiffusion.loading import load_tiny_encoder
    from maskdiffusion.tiny import build_tiny_encoder

    path = folder / f"tiny-encoder-{channels}"
    if not path.exists():
        build_tiny_encoder(path, latent_channels=channels)
    return load_tiny_encoder(path, device=vae.device, dtype=vae.dtype, vae=vae)


@contextlib.contextmanager
def cheap_compile(enabled: bool) -> Iterator[None]:
    """In smoke mode ``torch.compile`` traces with dynamo but runs eagerly (no Inductor build: seconds, not minutes)."""
    if not enabled:
        yield
        return
    original = torch.compile
    torch.compile = functools.partial(original, backend="eager")
    try:
        yield
    finally:
        torch.compile = original


def segmenter(pipe, dtype: torch.dtype, device: torch.device, *, batch: int, encoder=None, compile: bool = False):
    """``MaskDiffusion`` over the pipeline's modules as ``from_pretrained`` would set it up: precision plan
    (half weights, channels-last), an optional tiny encoder for the views, ``torch.compile`` if asked."""
    from maskdiffusion import MaskDiffusion
    from maskdiffusion.loading import components_from_pipe
    from maskdiffusion.precision import Precision

    components = components_from_pipe(pipe)
    if encoder is not None:
        components = dataclasses.replace(components, encoder=encoder, encoder_id=bench.TAESD_ID)
    precision = Precision.choose(device, dtype, compile=compile)
    precision.apply(components.encoder or components.vae, components.backbone)
    return MaskDiffusion(components, model_id=f"{components.family.name}-shaped-random", device=device, dtype=dtype,
                         batch_size=batch, cache_size=0, precision=precision)  # fmt: skip


# -- the measurements ------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None  # the CPU: not measured


def timed_calls(run: Callable[[], object], *, repeats: int, seconds: float, deadline: float) -> tuple[list[float], int]:
    """Timed calls of ``run`` until ``repeats`` of them, or ``seconds`` of them, or the deadline (at least one)."""
    times = []
    while len(times) < repeats and (not times or (sum(times) < seconds and time.perf_counter() < deadline)):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times, len(times)


def measure_call(seg, case: Case, images: list[np.ndarray], *, repeats: int, warm_up: bool, deadline: float) -> dict:
    """Images per second of ``segment_batch`` over ``images`` (one batch), its steps, peak memory."""
    probe = flops.StepProbe(seg, fresh_text=False)  # the class list is encoded once (warm-up), as in use
    rows = []

    def run():
        rows.append(probe.call(lambda: seg.segment_batch(images, families.CLASSES)))

    first = None
    if warm_up:
        start = time.perf_counter()
        seg.segment_batch(images, families.CLASSES)
        _sync(seg.device)
        first = time.perf_counter() - start
    _reset_peak(seg.device)
    _, count = timed_calls(run, repeats=repeats, seconds=REPEAT_SECONDS, deadline=deadline)
    seconds = [row["whole call"]["seconds"] for row in rows]
    steps = {step: statistics.median(row[step]["seconds"] for row in rows) for step in rows[0]}
    median = statistics.median(seconds)
    return {
        "case": case.label, **dataclasses.asdict(case), "size": seg.preset.size, "images_per_s": case.batch / median,
        "seconds": median, "repeats": count, "first_call": first, "peak_bytes": _peak(seg.device), "steps": steps,
    }  # fmt: skip


def plain_pass(seg, latents: torch.Tensor, text, preset) -> None:
    """The denoiser with its own (SDPA) processors everywhere and no capture, on the (view, prompt) batch our
    pass runs, stopped after the same block: what the pass costs without capturing."""
    from maskdiffusion.backbones.base import per_prompt
    from maskdiffusion.backbones.unet import UNetCapture, added_conditions
    from maskdiffusion.capture import PassComplete

    backbone = seg.backbone
    views, prompts = latents.shape[0], len(text)
    dtype = backbone.denoiser.dtype
    noised = backbone.noise(latents, preset.timestep, preset.seed)
    batch = per_prompt(noised, prompts, dtype, seg.precision)
    batch_text = text.batch(prompts, views, dtype)
    view = backbone.view(latents)
    if backbone.kind == "unet":
        last = backbone.unet.up_blocks[UNetCapture(backbone.unet, backbone.vae_factor, preset).stop_block]
        kwargs = {"sample": batch, "timestep": preset.timestep, "encoder_hidden_states": batch_text.hidden,
                  "added_cond_kwargs": added_conditions(batch_text, view)}  # fmt: skip
    else:
        last = backbone.blocks[max([*preset.attention_blocks, *preset.feature_blocks])]
        kwargs, _ = backbone.forward_inputs(batch, backbone.schedule.sigma(preset.timestep, backbone.tokens(view)),
                                            batch_text)  # fmt: skip

    def stop(module, args, output):
        raise PassComplete

    handle = last.register_forward_hook(stop)
    try:
        with torch.no_grad(), seg.precision.autocast(seg.device), suppress(PassComplete):
            backbone.denoiser(**kwargs, return_dict=False)
    finally:
        handle.remove()
    _sync(seg.device)


def measure_capture(seg, case: Case, images: list[np.ndarray], *, repeats: int, deadline: float) -> dict:
    """Our capture pass vs :func:`plain_pass` on the same latents and prompts, interleaved (medians)."""
    from maskdiffusion.prompts import background_classes
    from maskdiffusion.views import load_image

    vocabulary, preset = seg.check_inputs(families.CLASSES, None)
    prompted = [*vocabulary, *background_classes(vocabulary, preset.background_words)]
    text = seg.encode_prompts(seg.build_prompts(prompted, preset.separator))
    views = torch.stack([torch.from_numpy(np.asarray(load_image(i), np.float32)).permute(2, 0, 1) for i in images])
    latents = seg.encode_views(views / 127.5 - 1)
    ours, plain = [], []

    def both():
        start = time.perf_counter()
        seg.capture(latents, text, preset)
        _sync(seg.device)
        ours.append(time.perf_counter() - start)
        start = time.perf_counter()
        plain_pass(seg, latents, text, preset)
        plain.append(time.perf_counter() - start)

    both()  # warm-up
    ours.clear()
    plain.clear()
    _reset_peak(seg.device)
    _, count = timed_calls(both, repeats=repeats, seconds=REPEAT_SECONDS, deadline=deadline)
    capture, stock = statistics.median(ours), statistics.median(plain)
    return {
        "case": case.label, **dataclasses.asdict(case), "size": seg.preset.size, "prompts": len(text),
        "capture_s": capture, "plain_s": stock, "ratio": capture / stock, "repeats": count,
        "peak_bytes": _peak(seg.device),
    }  # fmt: skip


@dataclass
class Budget:
    """The time guard: what is left of ``seconds``, and guesses of what a case costs from what ran before."""

    seconds: float
    start: float = field(default_factory=time.perf_counter)
    per_image: dict[str, float] = field(default_factory=dict)  # "family dtype" -> seconds per image of a call
    builds: dict[str, float] = field(default_factory=dict)  # family -> seconds to build its models
    compiling: float = 0.0  # the longest first compiled call so far

    @property
    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)

    @property
    def deadline(self) -> float:
        return self.start + self.seconds

    def guess(self, case: Case) -> float:
        """Seconds the case will take (warm-up + up to :data:`REPEAT_SECONDS` of timed calls): from the same
        model's calls, else the family's in another dtype, else 0 (the first case measures)."""
        known = self.per_image.get(f"{case.family} {case.dtype}")
        if known is None:
            known = next((v for k, v in self.per_image.items() if k.split()[0] == case.family), None)
        if case.compile:
            return 1.5 * self.compiling if self.compiling else COMPILE_GUESS_S
        if known is None:
            return 0.0  # the first case of a model measures what the others will cost
        call = known * case.batch
        return call + min(REPEATS * call, REPEAT_SECONDS + call)

    def group(self, case: Case) -> float:
        """Seconds to build a group's models and run its first case."""
        return self.builds.get(case.family, 0.0) + self.guess(case)

    def learn(self, case: Case, row: dict) -> None:
        if case.compile:
            self.compiling = max(self.compiling, row["first_call"] or 0.0)
        elif case.kind == "call":
            self.per_image[f"{case.family} {case.dtype}"] = row["seconds"] / case.batch


def run_cases(args, device: torch.device) -> tuple[list[dict], list[dict], list[str]]:
    """Every planned case that fits the budget: call rows, capture rows, and what was skipped and why."""
    groups = plan(args.families, args.dtypes, args.batches, compile=not args.no_compile)
    budget = Budget(args.budget)
    calls, captures, skipped = [], [], []
    repeats = 1 if args.smoke else REPEATS
    workdir = Path(tempfile.mkdtemp(prefix="maskdiffusion-gpu-"))
    rng = np.random.default_rng(0)
    try:
        for (name, dtype_name, _), cases in groups:
            dtype = DTYPES[dtype_name]
            if budget.left < max(budget.group(cases[0]), 1.0):
                skipped += [f"{case.label}: skipped, time budget ({budget.left:.0f} s left)" for case in cases]
                continue
            began = time.perf_counter()
            try:
                if args.smoke:
                    from maskdiffusion.precision import Precision

                    weights = Precision.choose(device, dtype).weights
                    pipe, built = tiny_pipeline(name, weights, device, workdir, t5=args.t5)
                else:
                    pipe, built = real_pipeline(name, dtype, device, t5=args.t5)
                weights = sum(p.numel() * p.element_size() for m in pipe.components.values()
                              if isinstance(m, torch.nn.Module) for p in m.parameters())  # fmt: skip
            except torch.cuda.OutOfMemoryError:
                skipped += [f"{case.label}: skipped, out of GPU memory building the models" for case in cases]
                continue
            took = time.perf_counter() - began
            budget.builds[name] = max(budget.builds.get(name, 0.0), took)
            print(f"{name} {dtype_name}: built ({built}) in {took:.1f} s", flush=True)
            tiny = None
            for case in cases:
                guess = budget.guess(case)
                if budget.left < guess:
                    skipped.append(f"{case.label}: skipped, time budget ({budget.left:.0f} s left, ~{guess:.0f} s)")
                    continue
                try:
                    if case.encoder == "tiny" and tiny is None:
                        tiny = tiny_encoder(pipe.vae, smoke=args.smoke, folder=workdir)
                    with cheap_compile(args.smoke and case.compile):
                        seg = segmenter(pipe, dtype, device, batch=case.batch, compile=case.compile,
                                        encoder=tiny if case.encoder == "tiny" else None)  # fmt: skip
                        if args.smoke:
                            seg.preset = seg.preset.replace(size=SMOKE_SIZE)
                        size = seg.preset.size
                        images = [(rng.random((size, size, 3)) * 255).astype(np.uint8) for _ in range(case.batch)]
                        if case.kind == "capture":
                            row = measure_capture(seg, case, images, repeats=repeats, deadline=budget.deadline)
                        else:
                            row = measure_call(seg, case, images, repeats=repeats, warm_up=not args.smoke or
                                               case.compile, deadline=budget.deadline)  # fmt: skip
                except torch.cuda.OutOfMemoryError:
                    skipped.append(f"{case.label}: out of GPU memory")
                    _free(device)
                    continue
                row |= {"built": built, "weights_bytes": weights}
                (captures if case.kind == "capture" else calls).append(row)
                budget.learn(case, row)
                print(f"  {case.label}: {_summary(row)} ({budget.left:.0f} s of the budget left)", flush=True)
                del seg
            del pipe, tiny
            _free(device)
    finally:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    return calls, captures, skipped


def _summary(row: dict) -> str:
    if "capture_s" in row:
        return f"capture {row['capture_s']:.3f} s vs SDPA {row['plain_s']:.3f} s"
    return f"{row['images_per_s']:.2f} images/s, peak {_gib(row['peak_bytes'])} GiB"


def _free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- the table -------------------------------------------------------------------------------


def _number(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / GIB:.2f}"


def report(calls: list[dict], captures: list[dict], skipped: list[str], *, device: torch.device, args) -> str:
    """The markdown page: what ran where, a row per call case, a row per capture case, what was skipped."""
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
    else:
        where = f"CPU ({flops.cpu_peak().model}), smoke run: tiny random models at {SMOKE_SIZE} px, not a benchmark"
    steps = flops.STEPS
    lines = [
        f"# GPU benchmark: {where}",
        "",
        f"Python {platform.python_version()}, torch {torch.__version__}; `python benchmarks/gpu.py"
        f"{' --smoke' if args.smoke else ''}`, budget {args.budget:.0f} s. Random weights in the real shapes "
        "(benchmarks/families.py) of SD 1.5 (512 px), SDXL (1024) and SD3-medium (1024)"
        + (
            ""
            if args.t5
            else ", SD3 without its T5 (zeros of T5's shape in its place, as its pipeline does: the same per-view work)"
        )
        + ". A call = `segment_batch` of `batch` native-size random images with 10 classes, `default` preset, "
        "`MaskDiffusion(batch_size=batch)`, latent cache off: one denoiser batch. Median of the timed calls "
        "after one warm-up call (first call: it also encodes the class list, kept for the timed calls; "
        "compiled: it compiles; n = timed calls); peak = `torch.cuda.max_memory_allocated` during them (weights "
        "included). The steps are timed inside the calls (`flops.StepProbe`); the stitching and the mask head "
        "run on the CPU (the captured maps come back to it). Tiny encoder: an `AutoencoderTiny` in TAESD's real "
        "shapes (16 latent channels for SD3, as taesd3), random. Compiled: `compile=True` (the VAE encoder and "
        "the denoiser's hook-free parts under `torch.compile`).",
        "",
        "| family | size | dtype | encoder | compile | batch | images/s | s / call (n) | first call s | peak GiB "
        f"| weights GiB | {steps[1]} s | denoiser pass s | {steps[3]} + {steps[4]} s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in calls:
        s = row["steps"]
        denoiser = next(v for k, v in s.items() if k.endswith("(as run)"))
        lines.append(
            f"| {row['family']} | {row['size']} | {row['dtype']} | {row['encoder']} "
            f"| {'on' if row['compile'] else 'off'} | {row['batch']} | {_number(row['images_per_s'])} "
            f"| {_number(row['seconds'], 3)} ({row['repeats']}) | {_number(row['first_call'], 1)} "
            f"| {_gib(row['peak_bytes'])} | {_gib(row['weights_bytes'])} | {_number(s[steps[1]], 3)} "
            f"| {_number(denoiser, 3)} | {_number(s[steps[3]] + s[steps[4]], 3)} |"
        )
    lines += [
        "",
        "Capturing vs the stock SDPA pass: our capture pass (noising, explicit attention in the captured layers, "
        "hooks, early stop, maps back to the CPU) against the same denoiser with its own SDPA processors "
        "everywhere, stopped after the same block, on the same latents and (view, prompt) batch; interleaved, "
        "medians.",
        "",
        "| family | size | dtype | views | prompts | capture pass s | SDPA pass s | capture / SDPA | peak GiB | n |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in captures:
        lines.append(
            f"| {row['family']} | {row['size']} | {row['dtype']} | {row['batch']} | {row['prompts']} "
            f"| {_number(row['capture_s'], 3)} | {_number(row['plain_s'], 3)} | {_number(row['ratio'])} "
            f"| {_gib(row['peak_bytes'])} | {row['repeats']} |"
        )
    lines += ["", "Skipped: " + ("none." if not skipped else ""), *(f"- {line}" for line in skipped)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--batches", nargs="+", type=int, help=f"default {BATCHES} ({SMOKE_BATCHES} with --smoke)")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds; cases that would not fit are skipped")
    parser.add_argument("--no-compile", action="store_true", help="leave out the compile=True cases")
    parser.add_argument("--t5", action="store_true", help="build SD3 with its T5-XXL (9.5 GB in half precision)")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU, seconds: checks the code")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/gpu.md (smoke: $TMPDIR/gpu-smoke.md)")
    args = parser.parse_args(argv)
    args.batches = args.batches or list(SMOKE_BATCHES if args.smoke else BATCHES)
    device = torch.device(args.device or ("cpu" if args.smoke else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA GPU here: run with --smoke (tiny models on the CPU) to check the script")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # each batch size's convolutions tuned in its warm-up call
    began = time.perf_counter()
    threads = torch.get_num_threads()
    if args.smoke:
        torch.set_num_threads(1)  # tiny models gain nothing from more, and a shared CPU stalls their barriers
    try:
        calls, captures, skipped = run_cases(args, device)
    finally:
        torch.set_num_threads(threads)
    text = report(calls, captures, skipped, device=device, args=args)
    print(text)
    print(f"gpu.py took {time.perf_counter() - began:.0f} s", flush=True)
    from maskdiffusion.files import write_text

    default = (
        Path(tempfile.gettempdir()) / "gpu-smoke.md" if args.smoke else Path(__file__).parent / "results" / "gpu.md"
    )
    out = Path(args.out) if args.out else default
    write_text(out, text)
    print(f"wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
