"""How the models run fast: half-precision weights, channels-last, ``torch.compile``.

Half precision pays only where the hardware does it: a GPU (fp16/bf16), or a CPU with AMX or
AVX512-BF16 (bf16). Elsewhere bf16 is emulated and slower than fp32, though it computes the
same thing. Weights are stored in the half dtype (not cast on every call under autocast);
autocast stays on around the passes so the ops it keeps in float32 (normalisations, softmax)
keep their precision. Attention maps and the mask head are float32 whatever the weights
(``capture.py`` and ``mask_head.py`` cast up).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


def cpu_isa() -> dict[str, bool]:
    """The instruction-set features that decide CPU speed: ``avx2``, ``avx512``, ``avx512_bf16``, ``amx``."""
    features = {
        "avx2": _probe("_is_avx2_supported", "avx2"),
        "avx512": _probe("_is_avx512_supported", "avx512f"),
        "avx512_bf16": _probe("_is_avx512_bf16_supported", "avx512_bf16"),
        "amx": _probe("_is_amx_tile_supported", "amx_bf16"),
    }
    return features


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what ``platform`` knows."""
    import platform

    try:
        with open("/proc/cpuinfo") as info:
            names = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or platform.machine()


def _probe(torch_name: str, cpuinfo_flag: str) -> bool:
    check = getattr(torch.cpu, torch_name, None)
    if check is not None:
        try:
            return bool(check())
        except RuntimeError:
            pass
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return f" {cpuinfo_flag}" in cpuinfo.read()
    except OSError:
        return False


def native_half(device: torch.device) -> bool:
    """Whether half precision runs in hardware here (a GPU, or a CPU with AMX / AVX512-BF16)."""
    if device.type != "cpu":
        return True
    isa = cpu_isa()
    return isa["amx"] or isa["avx512_bf16"]


@dataclass(frozen=True)
class Precision:
    """How a segmenter's models run.

    Attributes:
        dtype: the precision asked for (float32, float16 or bfloat16).
        weights: the dtype the weights are stored in: ``dtype``, except float16 on a CPU
            (weights stay float32 and the passes run under float16 autocast).
        channels_last: convolution weights and inputs in NHWC (pays with oneDNN bf16 on a CPU
            and with half precision on a GPU).
        compile: the VAE encoder and the denoiser's hook-free parts (a UNet's ResNet blocks, a
            transformer's feed-forward layers) wrapped by ``torch.compile``.
    """

    dtype: torch.dtype
    weights: torch.dtype
    channels_last: bool
    compile: bool = False

    @classmethod
    def choose(
        cls, device: torch.device, dtype: torch.dtype, *, channels_last: bool | None = None, compile: bool = False
    ) -> Precision:
        """The plan for ``dtype`` on ``device``; ``channels_last=None`` turns it on for half precision."""
        weights = torch.float32 if device.type == "cpu" and dtype == torch.float16 else dtype
        if channels_last is None:
            channels_last = dtype != torch.float32
        return cls(dtype=dtype, weights=weights, channels_last=channels_last, compile=compile)

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """Autocast around the passes for half precision (float32: none)."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.dtype)

    def apply(self, vae: torch.nn.Module, backbone) -> None:
        """Convert modules this segmenter owns (never a pipeline's: see ``MaskDiffusion.from_pipe``):
        the VAE and the ``backbone``'s denoiser (a :class:`~maskdiffusion.backbones.Backbone`)."""
        if self.channels_last:
            vae.to(memory_format=torch.channels_last)
            backbone.denoiser.to(memory_format=torch.channels_last)
        if self.compile:
            vae.encoder = torch.compile(vae.encoder)
            backbone.compile(torch.compile)

    def layout(self, tensor: torch.Tensor) -> torch.Tensor:
        """An image-like input in the memory format the convolutions expect."""
        return tensor.contiguous(memory_format=torch.channels_last) if self.channels_last else tensor
