"""Find and load the four Stable Diffusion components MaskDiffusion needs.

A model is a diffusers Stable Diffusion 1.x/2.x folder or a hub id. Only the VAE,
UNet, text encoder, tokenizer and noise schedule are read (no safety checker, no
sampler). Hub ids are looked up in the local cache first, so an offline machine with
the weights cached never touches the network; when nothing is cached and the hub is
unreachable, the error says how to get the weights or what to pass instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .presets import PRESETS, Preset

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer")
HUB_FILES = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "tokenizer/*",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
]
SETTINGS_FILE = "maskdiffusion.json"  # optional per-model preset overrides


class ModelNotFoundError(FileNotFoundError):
    """The model is neither a usable folder nor available from the hub cache/network."""


TOY_MODEL = "toy"


def toy_model_path() -> Path:
    """The bundled toy-world model (trained by ``maskdiffusion.toyworld.train``, shipped in the package)."""
    from importlib import resources

    return Path(str(resources.files("maskdiffusion").joinpath("models", "toy")))


def _alias_folder(model: str) -> Path | None:
    """Folders behind the built-in model names.

    ``toy``: the bundled toy-world model (real trained weights, small, offline);
    ``tiny-random``: random weights, for tests of the plumbing.
    """
    if model == TOY_MODEL:
        return toy_model_path()
    if model == "tiny-random":
        from .tiny import tiny_model_path

        return tiny_model_path()
    return None


def _missing_parts(folder: Path) -> list[str]:
    missing = [f"{c}/" for c in COMPONENTS if not (folder / c).is_dir()]
    for part in ("unet", "vae", "text_encoder"):
        if (folder / part).is_dir() and not (folder / part / "config.json").exists():
            missing.append(f"{part}/config.json")
    return missing


def _how_to_get(model: str) -> str:
    return (
        f"To use it offline, download it once on a machine with internet access:\n"
        f"    hf download {model} --include {' '.join(repr(p) for p in HUB_FILES)}\n"
        f"or copy a diffusers model folder here and pass --model /path/to/folder "
        f"(--model tiny-random runs the pipeline offline on random weights)."
    )


def resolve_model_folder(model: str, *, local_files_only: bool | None = None) -> Path:
    """Local folder holding ``model`` (a folder, a built-in name, or a hub id).

    Raises :class:`ModelNotFoundError` with what is missing and how to get it.
    """
    alias = _alias_folder(model)
    if alias is not None:
        return alias
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(f"model {model!r} is a file; pass a diffusers model folder or a hub id")
        missing = _missing_parts(path)
        if missing:
            raise ModelNotFoundError(
                f"model folder {str(path)!r} is not a diffusers Stable Diffusion folder: missing {missing}. "
                "It needs unet/, vae/, text_encoder/ and tokenizer/ subfolders (as saved by diffusers)."
            )
        return path
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ModelNotFoundError(f"model folder {model!r} does not exist (and it is not a hub id like 'org/name')")

    from huggingface_hub import constants, snapshot_download

    offline = bool(local_files_only) or constants.HF_HUB_OFFLINE
    try:
        folder = Path(snapshot_download(model, allow_patterns=HUB_FILES, local_files_only=True))
        if not _missing_parts(folder):
            return folder
    except Exception:  # not cached (or a partial cache): fall through to the network
        pass
    if offline:
        raise ModelNotFoundError(
            f"model {model!r} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and the hub "
            f"is offline (HF_HUB_OFFLINE=1 or local_files_only).\n{_how_to_get(model)}"
        )
    try:
        folder = Path(snapshot_download(model, allow_patterns=HUB_FILES))
    except Exception as error:
        raise ModelNotFoundError(
            f"could not download model {model!r} from the Hugging Face hub ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'no details'}).\n{_how_to_get(model)}"
        ) from None
    missing = _missing_parts(folder)
    if missing:
        raise ModelNotFoundError(f"hub model {model!r} lacks {missing}: is it a Stable Diffusion 1.x/2.x model?")
    return folder


@dataclass
class Components:
    """The frozen models, on one device, in eval mode, with gradients off."""

    vae: torch.nn.Module
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    alphas_cumprod: torch.Tensor
    presets: dict[str, Preset]
    folder: Path


def model_presets(folder: Path) -> dict[str, Preset]:
    """Named presets for this model: the global ones with the folder's overrides applied.

    ``maskdiffusion.json`` may hold ``{"presets": {"default": {...}, "reference": {...}}}``
    with field overrides for models whose shapes differ from Stable Diffusion's.
    """
    settings_file = folder / SETTINGS_FILE
    overrides = json.loads(settings_file.read_text()).get("presets", {}) if settings_file.exists() else {}
    presets = dict(PRESETS)
    for name, changes in overrides.items():
        base = presets.get(name, PRESETS["default"]).to_dict()
        presets[name] = Preset.from_dict({**base, **changes})
    return presets


def load_components(folder: Path, *, device: torch.device, dtype: torch.dtype) -> Components:
    """Load VAE, UNet, text encoder, tokenizer and noise schedule from a local folder."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=dtype)
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=dtype)
        text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=dtype)
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    scheduler_dir = folder / "scheduler"
    if (scheduler_dir / "scheduler_config.json").exists():
        schedule = DDPMScheduler.from_pretrained(scheduler_dir)
    else:
        from .tiny import SD_NOISE_SCHEDULE

        schedule = DDPMScheduler(**{k: v for k, v in SD_NOISE_SCHEDULE.items() if k != "set_alpha_to_one"})
    for module in (vae, unet, text_encoder):
        module.to(device).eval().requires_grad_(False)
    return Components(
        vae=vae,
        unet=unet,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        alphas_cumprod=schedule.alphas_cumprod.to(torch.float32),
        presets=model_presets(folder),
        folder=folder,
    )


def pick_device(device: str | torch.device | None) -> torch.device:
    """``auto``/None -> cuda, then mps, then cpu; explicit names are checked."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' was asked for but MPS is not available; use --device cpu")
    return device


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported; use one of {sorted(DTYPES)}")
        return dtype
    try:
        return DTYPES[str(dtype).removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}") from None
