"""FLOPs, the CPU's peak and where one call's time goes: shared by ``bench.py`` and ``gpu.py``.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on the modules as they run, 2 per
multiply-add: convolutions, matrix products (``mm``, ``addmm``, ``bmm``, ``baddbmm``; ``matmul`` and
``linear`` decompose into them, so the explicit capture processors' ``QK^T`` and ``PV`` count) and
fused attention (``scaled_dot_product_attention``; the CPU kernel is not in torch's table, so
:data:`CUSTOM_FORMULAS` adds it with torch's own SDPA formula). Not counted: elementwise work
(normalisations, activations, softmax, ``exp``/``log``, additions, interpolation), reductions and
copies; they are memory-bound, and what they cost shows as a lower GFLOP/s.

The peak is ``cores x clock x FLOP per cycle per core`` (:func:`cpu_peak`), each input stated with
where it comes from, since a VM's clock and a vendor's FMA layout are assumptions, not measurements.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """The CPU's fused attention kernel, with torch's formula for the others: 2 (QK^T) + 2 (PV) per multiply-add."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


CUSTOM_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}
NOT_COUNTED = (
    "elementwise ops (group/layer norms, activations, softmax, exp/log, additions), interpolation, reductions "
    "and copies are not counted"
)
COUNTED = (
    "counted by torch.utils.flop_counter.FlopCounterMode on the real modules, 2 FLOP per multiply-add: "
    "convolutions, matrix products (mm, addmm, bmm, baddbmm: matmul and linear go through them, so the explicit "
    "capture processors' QK^T and PV count) and fused attention (SDPA, the CPU kernel added with torch's SDPA "
    "formula)"
)


def flop_counter() -> FlopCounterMode:
    """A silent counter that also knows the CPU's fused attention kernel."""
    return FlopCounterMode(display=False, custom_mapping=CUSTOM_FORMULAS)


def count_flops(run: Callable[[], object]) -> tuple[object, int]:
    """``run()``'s result and the FLOPs it did."""
    with flop_counter() as counter:
        value = run()
    return value, counter.get_total_flops()


# -- the CPU's peak ------------------------------------------------------------------------


@dataclass(frozen=True)
class CpuPeak:
    """The peak FLOP rate of the cores torch runs on, with every input and where it came from."""

    model: str
    cores: int
    mhz: float
    clock_source: str
    isa: str
    fp32_per_cycle: int  # FLOP per cycle per core
    fma_note: str
    bf16_per_cycle: int | None  # None: no native bf16 (emulated)
    bf16_note: str

    def gflops(self, dtype: torch.dtype = torch.float32) -> float | None:
        """Peak GFLOP/s in ``dtype`` (``None`` for bf16 without hardware support, and for float16)."""
        per_cycle = {torch.float32: self.fp32_per_cycle, torch.bfloat16: self.bf16_per_cycle}.get(dtype)
        return None if per_cycle is None else self.cores * self.mhz / 1000 * per_cycle

    def describe(self) -> str:
        fp32 = f"{self.cores} cores x {self.mhz / 1000:.3f} GHz x {self.fp32_per_cycle} = {self.gflops():.0f} GFLOP/s"
        bf16 = self.gflops(torch.bfloat16)
        bf16_text = (
            f"{self.cores} x {self.mhz / 1000:.3f} x {self.bf16_per_cycle} = {bf16:.0f} GFLOP/s"
            if bf16 is not None
            else "none (no native bf16: emulated)"
        )
        return (
            f"Peak = cores x clock x FLOP per cycle per core. CPU: {self.model}. Cores: {self.cores} (torch threads, "
            f"at most the physical cores). Clock: {self.mhz:.0f} MHz ({self.clock_source}). ISA: {self.isa}; fp32: "
            f"{self.fma_note}. bf16: {self.bf16_note}. Peak fp32: {fp32}; peak bf16: {bf16_text}."
        )


def _cpuinfo_fields(text: str) -> tuple[dict[str, str], set[str], int, float]:
    """The first processor's fields, its flags, the physical cores and the highest ``cpu MHz`` of ``/proc/cpuinfo``."""
    first: dict[str, str] = {}
    cores: set[tuple[str, str]] = set()
    mhz = 0.0
    current: dict[str, str] = {}
    for block in text.strip().split("\n\n"):
        current = {}
        for line in block.splitlines():
            key, _, value = line.partition(":")
            current[key.strip()] = value.strip()
        if not first:
            first = current
        cores.add((current.get("physical id", "0"), current.get("core id", current.get("processor", ""))))
        with suppress(ValueError):
            mhz = max(mhz, float(current.get("cpu MHz", 0)))
    return first, set(first.get("flags", "").split()), len(cores), mhz


def _lscpu_max_mhz(text: str | None) -> float | None:
    match = re.search(r"^CPU max MHz:\s*([\d.]+)", text or "", re.M)
    return float(match.group(1)) if match else None


def _read(path: str) -> str:
    try:
        with open(path) as file:
            return file.read()
    except OSError:
        return ""


def _lscpu() -> str | None:
    try:
        return subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_peak(
    cpuinfo: str | None = None,
    lscpu: str | None = None,
    threads: int | None = None,
    measured_mhz: float | None = None,
) -> CpuPeak:
    """This CPU's peak from ``/proc/cpuinfo``, at the clock ``measured_mhz`` (:func:`measure_mhz`), else
    ``lscpu``'s max MHz, else ``cpu MHz`` (a VM often reports its host's nominal clock and no max).

    FMA width by ISA (per core, per cycle): AVX-512 = FMA units x 16 fp32 lanes x 2 FLOP; the units are
    2 on Intel Xeon Scalable and on AMD Zen 5 (family 0x1A: a full 512-bit datapath, two FMA pipes), 1 on
    AMD Zen 4 (family 0x19: 512-bit work double-pumped through 256-bit pipes). AVX2 + FMA = 2 x 8 x 2.
    bf16: AVX512-BF16 ``vdpbf16ps`` does 32 bf16 products into 16 fp32 lanes at an FMA's throughput, 2x
    the fp32 rate; AMX-BF16 tiles 1024 FLOP per cycle per core (Intel's figure for Sapphire Rapids).
    """
    cpuinfo = _read("/proc/cpuinfo") if cpuinfo is None else cpuinfo
    first, flags, physical, cpuinfo_mhz = _cpuinfo_fields(cpuinfo)
    model = first.get("model name", "unknown CPU")
    vendor = first.get("vendor_id", "")
    try:
        family = int(first.get("cpu family", "0"))
    except ValueError:
        family = 0
    threads = torch.get_num_threads() if threads is None else threads
    cores = max(1, min(threads, physical or os.cpu_count() or 1))
    max_mhz = _lscpu_max_mhz(_lscpu() if lscpu is None else lscpu)
    stated = f"lscpu 'CPU max MHz' {max_mhz:.0f}" if max_mhz else f"/proc/cpuinfo 'cpu MHz' {cpuinfo_mhz:.0f}"
    if measured_mhz:
        mhz, source = measured_mhz, f"measured: a chain of dependent adds, 1 cycle each, timed; {stated}"
    elif max_mhz:
        mhz, source = max_mhz, "lscpu 'CPU max MHz': the highest boost clock"
    elif cpuinfo_mhz:
        mhz, source = cpuinfo_mhz, "/proc/cpuinfo 'cpu MHz'; no lscpu max MHz (a VM?): boost clocks may be higher"
    else:
        mhz, source = 1000.0, "no clock in /proc/cpuinfo or lscpu: 1000 MHz assumed"
    amd = vendor == "AuthenticAMD"
    if "avx512f" in flags:
        if amd and family == 0x19:
            units, why = 1, "AMD Zen 4 (family 0x19) runs 512-bit FMAs double-pumped on 256-bit pipes: 1 unit"
        elif amd:
            units, why = 2, f"AMD family {family:#x} (Zen 5 or later): full 512-bit datapath, 2 FMA pipes"
        else:
            units, why = 2, "Intel Xeon Scalable: 2 AVX-512 FMA units (some Silver/Bronze and client parts have 1)"
        fp32, isa = units * 16 * 2, "AVX-512"
        note = f"{units} FMA unit(s) x 16 fp32 lanes x 2 FLOP = {fp32} FLOP/cycle ({why})"
    elif "avx2" in flags and "fma" in flags:
        fp32, isa = 2 * 8 * 2, "AVX2 + FMA"
        note = f"2 FMA units x 8 fp32 lanes x 2 FLOP = {fp32} FLOP/cycle"
    else:
        fp32, isa = 2 * 4, "SSE"
        note = f"1 add + 1 multiply unit x 4 fp32 lanes = {fp32} FLOP/cycle"
    if "amx_bf16" in flags:
        bf16, bf16_note = 1024, "AMX-BF16: 1024 FLOP/cycle per core (Intel's Sapphire Rapids figure)"
        isa += ", AMX-BF16"
    elif "avx512_bf16" in flags:
        bf16 = 2 * fp32
        bf16_note = f"AVX512-BF16 vdpbf16ps: 2x the fp32 FMA rate = {bf16} FLOP/cycle (no AMX)"
        isa += ", AVX512-BF16"
    else:
        bf16, bf16_note = None, "no AVX512-BF16 or AMX: emulated, no native peak"
    return CpuPeak(model, cores, mhz, source, isa, fp32, note, bf16, bf16_note)


CLOCK_PROGRAM = r"""
#include <stdio.h>
#include <time.h>
int main(void) {
    struct timespec a, b;
    unsigned long x = 0, n = %d;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (unsigned long i = 0; i < n; i++)  /* 4 dependent adds: 4 cycles, whatever the loop's own work */
        __asm__ volatile("add $1, %%0\n\tadd $1, %%0\n\tadd $1, %%0\n\tadd $1, %%0" : "+r"(x));
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("%%f\n", 4.0 * n / ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) * 1e3);
    return x == 0;
}
"""


def measure_mhz(iterations: int = 400_000_000, runs: int = 3) -> float | None:
    """The clock a busy core runs at, in MHz: a chain of dependent integer adds (one cycle each on every x86
    core) timed in C, best of ``runs``. ``None`` without a C compiler or off x86. A VM's ``cpu MHz`` is often
    the host's nominal (TSC) clock, below the boost clock the cores really run at."""
    import platform
    import shutil
    import tempfile

    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None or platform.machine() not in ("x86_64", "AMD64"):
        return None
    with tempfile.TemporaryDirectory() as folder:
        source, binary = os.path.join(folder, "clock.c"), os.path.join(folder, "clock")
        with open(source, "w") as file:
            file.write(CLOCK_PROGRAM % iterations)
        try:
            subprocess.run([compiler, "-O2", source, "-o", binary], check=True, capture_output=True, timeout=60)
            results = [subprocess.run([binary], capture_output=True, text=True, timeout=60) for _ in range(runs)]
            return max(float(r.stdout) for r in results)
        except (OSError, ValueError, subprocess.SubprocessError):
            return None


def gemm_gflops(dtype: torch.dtype = torch.float32, size: int = 2048, repeats: int = 5) -> float:
    """What a large matrix product reaches here (best of ``repeats``): the ceiling the library gets in practice."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


# -- where one call's time goes ------------------------------------------------------------

STEPS = ("text encoder", "VAE encoder", "UNet pass (as run)", "stitching", "mask head")


@dataclass
class StepProbe:
    """Seconds, CPU seconds and (with ``count``) FLOPs of each step of ``segment_batch`` calls, timed inside them.

    Wraps for the duration: the segmenter's ``encode_prompts``, ``encode_views`` and ``capture`` (the text
    encoders, the view encoder, the denoiser pass with its noising), the pipeline's stitching
    (``ViewLayout.stitch_log`` / ``stitch``) and its mask head (``class_attention``, ``segment_scores``,
    the labels' upsampling and argmax). ``rest`` is the call minus them (decoding, views, prompts).
    With ``fresh_text`` the text cache is emptied before each call, so that every call runs the text encoder.
    """

    segmenter: object
    count: bool = False
    fresh_text: bool = True
    names: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)
    flops: dict[str, int] = field(default_factory=dict)
    _inside: bool = False

    def _sync(self) -> None:
        if self.segmenter.device.type == "cuda":
            torch.cuda.synchronize(self.segmenter.device)

    def _timed(self, step: str, function: Callable) -> Callable:
        def run(*args, **kwargs):
            if self._inside:  # a step called from another (stitch_log calls stitch): it belongs to the outer one
                return function(*args, **kwargs)
            self._inside = True
            try:
                return self._measure(step, function, args, kwargs)
            finally:
                self._inside = False

        return run

    def _measure(self, step: str, function: Callable, args: tuple, kwargs: dict) -> object:
        self._sync()
        start, cpu = time.perf_counter(), time.process_time()
        if self.count:
            with flop_counter() as counter:
                value = function(*args, **kwargs)
            self.flops[step] = self.flops.get(step, 0) + counter.get_total_flops()
        else:
            value = function(*args, **kwargs)
        self._sync()
        self.seconds[step] = self.seconds.get(step, 0.0) + time.perf_counter() - start
        self.cpu[step] = self.cpu.get(step, 0.0) + time.process_time() - cpu
        return value

    @contextmanager
    def installed(self) -> Iterator[StepProbe]:
        import maskdiffusion.pipeline as pipeline
        from maskdiffusion.views import ViewLayout

        seg = self.segmenter
        denoiser = STEPS[2].replace("UNet", "transformer") if seg.backbone.kind != "unet" else STEPS[2]
        self.names = {"encode_prompts": STEPS[0], "encode_views": STEPS[1], "capture": denoiser}
        patched = [(seg, name, self._timed(step, getattr(seg, name))) for name, step in self.names.items()]
        for name in ("stitch_log", "stitch"):
            patched.append((ViewLayout, name, self._timed(STEPS[3], getattr(ViewLayout, name))))
        for name in ("class_attention", "segment_scores", "_labels"):
            patched.append((pipeline, name, self._timed(STEPS[4], getattr(pipeline, name))))
        saved = [(owner, name, owner.__dict__.get(name)) for owner, name, _ in patched]
        for owner, name, wrapper in patched:
            setattr(owner, name, wrapper)
        try:
            yield self
        finally:
            for owner, name, before in saved:
                if before is None:
                    delattr(owner, name)
                else:
                    setattr(owner, name, before)

    def call(self, run: Callable[[], object]) -> dict:
        """One call of ``run`` (a ``segment_batch`` call of the segmenter): each step's seconds, CPU seconds,
        FLOPs (with ``count``), the call's own and ``rest``; the text cache emptied first with ``fresh_text``."""
        from maskdiffusion.pipeline import LRU, TEXT_CACHE_SIZE

        if self.fresh_text:
            self.segmenter.text_cache = LRU(TEXT_CACHE_SIZE)
        self.seconds, self.cpu, self.flops = {}, {}, {}
        with self.installed():
            self._sync()
            start, cpu = time.perf_counter(), time.process_time()
            if self.count:
                with flop_counter() as counter:
                    run()
                total_flops = counter.get_total_flops()
            else:
                run()
            self._sync()
            total, total_cpu = time.perf_counter() - start, time.process_time() - cpu
        steps = [*self.names.values(), STEPS[3], STEPS[4]]
        row = {
            step: {
                "seconds": self.seconds.get(step, 0.0),
                "cpu": self.cpu.get(step, 0.0),
                "flops": self.flops.get(step),
            }
            for step in steps
        }
        row["rest"] = {
            "seconds": total - sum(self.seconds.values()),
            "cpu": total_cpu - sum(self.cpu.values()),
            "flops": total_flops - sum(self.flops.values()) if self.count else None,
        }
        row["whole call"] = {"seconds": total, "cpu": total_cpu, "flops": total_flops if self.count else None}
        return row


def profile_steps(segmenter, run: Callable[[], object], repeats: int = 2) -> dict[str, dict]:
    """Per step: median seconds and CPU seconds of ``repeats`` timed calls, FLOPs of one counted call after them
    (counting slows a call: it is not timed)."""
    timed = [StepProbe(segmenter).call(run) for _ in range(repeats)]
    counted = StepProbe(segmenter, count=True).call(run)
    return {
        step: {
            "seconds": statistics.median(call[step]["seconds"] for call in timed),
            "cpu": statistics.median(call[step]["cpu"] for call in timed),
            "flops": counted[step]["flops"],
        }
        for step in counted
    }
