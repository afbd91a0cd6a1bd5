"""Find and load the components MaskDiffusion needs from a diffusers folder or hub id.

A model is a diffusers folder (or hub id) of any architecture in
:data:`maskdiffusion.backbones.BACKBONES`: a UNet (Stable Diffusion 1.x/2.x, SDXL) or a
transformer (SD3/3.5, FLUX.1, PixArt-Σ). Only the VAE, the denoiser, the text encoders and
tokenizers the backbone lists and the noise schedule are read (no safety checker, no
sampler). Hub ids are looked up in the local cache first, so an offline machine with the
weights cached never touches the network; when nothing is cached and the hub is
unreachable, the error says how to get the weights or what to pass instead.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .backbones import BACKBONES, Backbone, Part
from .families import ARCHITECTURES, Family, ModelDescription, detect, family_changes, native_size
from .model_card import SETTINGS_FILE, ModelCard, json_kind, model_card, read_settings
from .presets import PRESETS, Preset
from .prompts import shorten

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SUPPORTED = "Stable Diffusion 1.x/2.x/XL (unet/), SD3/3.5, FLUX.1 or PixArt-Σ (transformer/)"
HUB_FILES = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    *(
        f"{denoiser}/{name}"
        for denoiser in ("unet", "transformer")
        for name in (
            "config.json",
            "diffusion_pytorch_model*.safetensors",
            "diffusion_pytorch_model.safetensors.index.json",
        )
    ),
    *(
        f"text_encoder{n}/{name}"
        for n in ("", "_2", "_3")
        for name in ("config.json", "model*.safetensors", "model.safetensors.index.json")
    ),
    *(f"tokenizer{n}/*" for n in ("", "_2", "_3")),
]
VARIANT = re.compile(r"\.(fp16|bf16|fp32)[.-]")  # diffusers' weight variants: the plain files are what is loaded


class ModelNotFoundError(FileNotFoundError):
    """The model is neither a usable folder nor available from the hub cache/network."""


class ModelTooLargeError(ValueError):
    """The model's weights would not fit in the memory the device has free: said before loading, not after
    an out-of-memory kill."""


TOY_MODEL = "toy"
# The models the package ships (real trained weights, small, offline), each a folder under models/ named as
# the model, with what trained it.
BUNDLED_MODELS = {TOY_MODEL: "the toy-world UNet (research.train)"}


def bundled_model_path(name: str) -> Path:
    """The folder of a bundled model (a key of :data:`BUNDLED_MODELS`)."""
    from importlib import resources

    if name not in BUNDLED_MODELS:
        raise KeyError(f"{name!r} is not a bundled model; they are {', '.join(BUNDLED_MODELS)}")
    return Path(str(resources.files("maskdiffusion").joinpath("models", name)))


def toy_model_path() -> Path:
    """The bundled toy-world UNet (trained by the repository's ``research.train``, shipped in the package)."""
    return bundled_model_path(TOY_MODEL)


def _alias_folder(model: str) -> Path | None:
    """Folders behind the built-in model names.

    The bundled models (:data:`BUNDLED_MODELS`: real trained weights, small, offline);
    ``tiny-random``: random weights, for tests of the plumbing.
    """
    if model in BUNDLED_MODELS:
        return bundled_model_path(model)
    if model == "tiny-random":
        from .tiny import tiny_model_path

        return tiny_model_path()
    return None


def folder_architecture(folder: Path) -> str | None:
    """The backbone (key of :data:`~maskdiffusion.backbones.BACKBONES`) a folder needs, from its denoiser's
    configuration (``transformer/`` or ``unet/``), or ``None`` when it has neither."""
    transformer = folder / "transformer"
    if transformer.is_dir():
        name = _json_file(transformer / "config.json").get("_class_name")
        return ARCHITECTURES.get(str(name), "unknown")
    return "unet" if (folder / "unet").is_dir() else None


def _missing_parts(folder: Path) -> list[str]:
    architecture = folder_architecture(folder)
    if architecture is None:
        return ["unet/ or transformer/", *([] if (folder / "vae").is_dir() else ["vae/"])]
    if architecture not in BACKBONES:
        return ["transformer/config.json of SD3Transformer2DModel, FluxTransformer2DModel or PixArtTransformer2DModel"]
    parts = {"vae": Part("diffusers", "AutoencoderKL"), **BACKBONES[architecture].parts}
    missing = [f"{name}/" for name, part in parts.items() if part.required and not (folder / name).is_dir()]
    for name, part in parts.items():
        if part.weights and (folder / name).is_dir() and not (folder / name / "config.json").exists():
            missing.append(f"{name}/config.json")
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
    try:
        exists = path.exists()
    except (OSError, ValueError) as error:  # a name too long for a path, a NUL byte
        raise ModelNotFoundError(f"model {shorten(model)} is neither a folder nor a hub id ({error})") from None
    if exists:
        if not path.is_dir():
            raise ModelNotFoundError(f"model {shorten(model)} is a file; pass a diffusers model folder or a hub id")
        missing = _missing_parts(path)
        if missing:
            raise ModelNotFoundError(
                f"model folder {str(path)!r} is not a diffusers folder of a model maskdiffusion reads: missing "
                f"{missing}. It needs the subfolders its pipeline saves ({SUPPORTED}: vae/, the denoiser, "
                "text_encoder/ and tokenizer/ and the others its model has)."
            )
        return path
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ModelNotFoundError(
            f"model folder {shorten(model)} does not exist (and it is not a hub id like 'org/name')"
        )

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
            f"model {shorten(model)} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and the hub "
            f"is offline (HF_HUB_OFFLINE=1 or local_files_only).\n{_how_to_get(model)}"
        )
    folder = download_model(model)
    missing = _missing_parts(folder)
    if missing:
        raise ModelNotFoundError(f"hub model {shorten(model)} lacks {missing}: is it a {SUPPORTED} model?")
    return folder


def _is_timeout(error: BaseException) -> bool:
    """A network wait that ran out (requests', httpx's and the socket module's timeout errors alike)."""
    return isinstance(error, TimeoutError) or any("Timeout" in kind.__name__ for kind in type(error).__mro__)


def download_model(model: str) -> Path:
    """Download the files MaskDiffusion reads (:data:`HUB_FILES`) of hub model ``model``; every wait is bounded.

    The file list comes from one ``model_info`` call with a timeout of ``HF_HUB_ETAG_TIMEOUT``
    seconds (``snapshot_download`` would wait on it forever); each file is then fetched at
    that exact revision, huggingface_hub bounding its waits by ``HF_HUB_ETAG_TIMEOUT`` and
    ``HF_HUB_DOWNLOAD_TIMEOUT``. A hub that does not answer ends in a
    :class:`ModelNotFoundError` that says so and how to work offline.
    """
    from fnmatch import fnmatch

    from huggingface_hub import HfApi, constants, hf_hub_download

    timeout = float(constants.HF_HUB_ETAG_TIMEOUT)
    step = "looking up"
    try:
        info = HfApi().model_info(model, timeout=timeout)
        wanted = [
            s.rfilename
            for s in info.siblings or []
            if any(fnmatch(s.rfilename, p) for p in HUB_FILES) and not VARIANT.search(s.rfilename)
        ]
        if not wanted:
            raise ModelNotFoundError(
                f"hub model {shorten(model)} has none of the files MaskDiffusion reads ({', '.join(HUB_FILES)}): "
                f"is it a diffusers {SUPPORTED} model with .safetensors weights?"
            )
        step = "downloading"
        for name in wanted:
            path = Path(hf_hub_download(model, name, revision=info.sha, etag_timeout=timeout))
    except ModelNotFoundError:
        raise
    except Exception as error:
        if _is_timeout(error):
            waited = timeout if step == "looking up" else max(timeout, constants.HF_HUB_DOWNLOAD_TIMEOUT)
            raise ModelNotFoundError(
                f"the Hugging Face hub ({constants.ENDPOINT}) did not answer within {waited:g} s while {step} "
                f"model {shorten(model)}. Check the network or wait longer (HF_HUB_ETAG_TIMEOUT, "
                f"HF_HUB_DOWNLOAD_TIMEOUT in seconds), or work offline.\n{_how_to_get(model)}"
            ) from None
        raise ModelNotFoundError(
            f"could not download model {shorten(model)} from the Hugging Face hub ({_first_line(error)}).\n"
            f"{_how_to_get(model)}"
        ) from None
    return path.parents[name.count("/")]


@dataclass
class Components:
    """The frozen models (on one device, in eval mode, gradients off when loaded from a folder).

    ``backbone``: the denoiser, text encoders and tokenizers behind the architecture's seam;
    ``folder``: where they were loaded from (``None`` for a pipeline already in memory);
    ``encoder``: what encodes the views when it is not ``vae`` (``encoder_id`` names it).
    """

    vae: torch.nn.Module
    backbone: Backbone
    presets: dict[str, Preset]
    folder: Path | None
    family: Family
    card: ModelCard = field(default_factory=ModelCard)
    encoder: torch.nn.Module | None = None  # a tiny autoencoder that encodes the views instead of ``vae``
    encoder_id: str = "full"


def model_presets(
    folder: Path, settings: dict | None = None, family: tuple[Family, int] | None = None
) -> dict[str, Preset]:
    """Named presets for this model: the global ones, the family's changes, then the folder's overrides.

    ``family``: the model's family and native view size (:func:`folder_family`).

    ``maskdiffusion.json`` may hold ``{"presets": {"default": {...}, "reference": {...}}}``
    with field overrides for models whose shapes differ from Stable Diffusion's; every
    value is checked (:meth:`Preset.check`) and errors name the file and the preset.
    """
    settings = read_settings(folder) if settings is None else settings
    where = f"model settings file {str(Path(folder) / SETTINGS_FILE)!r}"
    overrides = settings.get("presets", {})
    if not isinstance(overrides, dict):
        raise ValueError(
            f'{where}: "presets" must be an object mapping preset names to field values, not {json_kind(overrides)}'
        )
    presets = family_presets(*family) if family is not None else dict(PRESETS)
    for name, changes in overrides.items():
        if not isinstance(changes, dict):
            raise ValueError(
                f"{where}: preset {shorten(name)} must be an object of field values, not {json_kind(changes)}"
            )
        base = presets.get(name, presets["default"]).to_dict()
        try:
            presets[name] = Preset.from_dict({**base, **changes})
        except ValueError as error:
            raise ValueError(f"{where}: preset {shorten(name)}: {error}") from None
    return presets


def family_presets(family: Family, size: int) -> dict[str, Preset]:
    """:data:`PRESETS` with ``family``'s changes and the model's native view ``size`` in every one."""
    return {name: preset.replace(**family_changes(family, size, name)) for name, preset in PRESETS.items()}


def _json_file(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError) as error:
        raise ModelNotFoundError(f"cannot read {str(path)!r} ({_first_line(error)}): is the folder complete?") from None
    return value if isinstance(value, dict) else {}


def folder_family(folder: Path, settings: dict, names: Sequence[str] = ()) -> tuple[Family, int]:
    """The :class:`~maskdiffusion.families.Family` of a model folder and its native view size.

    ``names``: what the model was asked for by (a hub id); the folder's own name (not its
    parents'), the hub cache's ``models--org--name`` and the configurations'
    ``_name_or_path`` are added.
    """
    denoiser = "transformer" if (folder / "transformer").is_dir() else "unet"
    unet = _json_file(folder / denoiser / "config.json")
    scheduler = _json_file(folder / "scheduler" / "scheduler_config.json")
    size = native_size(unet, _json_file(folder / "vae" / "config.json"))
    try:
        family = detect(
            ModelDescription(
                unet=unet,
                scheduler=scheduler,
                two_text_encoders=denoiser == "unet" and (folder / "text_encoder_2").is_dir(),
                names=(
                    *names,
                    folder.name,
                    *(part for part in folder.parts if part.startswith("models--")),  # a hub cache: models--org--name
                    str(unet.get("_name_or_path", "")),
                    str(_json_file(folder / "model_index.json").get("_name_or_path", "")),
                ),
                declared=settings.get("family"),
            )
        )
    except ValueError as error:
        raise ValueError(f"model settings file {str(folder / SETTINGS_FILE)!r}: {error}") from None
    return family, size


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
VAE_PART = Part("diffusers", "AutoencoderKL")


def _first_line(error: BaseException, limit: int = 200) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else "no details"
    return f"{type(error).__name__}: {text if len(text) <= limit else text[:limit] + '…'}"


def folder_parts(folder: Path) -> dict[str, Part]:
    """The parts to load from ``folder``: the VAE and its backbone's, optional ones where the folder has them."""
    backbone = BACKBONES[folder_architecture(folder) or "unet"]
    parts = {"vae": VAE_PART, **backbone.parts}
    return {name: part for name, part in parts.items() if part.required or (folder / name).is_dir()}


def check_weights(folder: Path) -> None:
    """Safetensors only: refuse pickle checkpoints (loading one can run code) and name damaged files.

    Every weights file's header is read (not its data), so a truncated or corrupt file is
    reported by name before any model is built.
    """
    from safetensors import safe_open

    missing = _missing_parts(folder)
    if missing:
        raise ModelNotFoundError(
            f"model folder {str(folder)!r} is not a diffusers folder of a model maskdiffusion reads: missing {missing}"
        )
    for part in (name for name, spec in folder_parts(folder).items() if spec.weights):
        files = sorted((folder / part).glob("*.safetensors"))
        if not files:
            pickles = sorted(p.name for p in (folder / part).iterdir() if p.suffix in PICKLE_SUFFIXES)
            get = f"download the .safetensors files (hf download HUB_ID --include '{part}/*.safetensors')"
            if not pickles:
                raise ModelNotFoundError(f"model folder {str(folder)!r} has no weights file in {part}/: {get}")
            raise ModelNotFoundError(
                f"model folder {str(folder)!r} has only {part}/{pickles[0]}, a pickle checkpoint: safetensors only "
                f"(loading a pickle can run code). Either {get}, or convert the checkpoint once on a machine you "
                f"trust: safetensors.torch.save_file(torch.load(FILE, weights_only=True), "
                f"'{part}/{_safetensors_name(part)}')"
            )
        for file in files:
            try:
                with safe_open(str(file), framework="pt") as handle:
                    handle.keys()
            except Exception as error:  # SafetensorError, OSError: the header does not describe the file
                raise ModelNotFoundError(
                    f"weights file {str(file)!r} is damaged or incomplete ({_first_line(error)}): download it again"
                ) from None


def weights_bytes(folder: Path, dtype: torch.dtype) -> dict[str, int]:
    """Bytes each weighted part of ``folder`` takes in memory as ``dtype`` (float32 and float16 / bfloat16
    tensors are stored in ``dtype``, others as they are), read from the safetensors headers only."""
    from safetensors import safe_open

    itemsize = torch.tensor([], dtype=dtype).element_size()
    floats = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}
    sizes = {"I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
    needed = {}
    for part in (name for name, spec in folder_parts(folder).items() if spec.weights):
        total = 0
        for file in sorted((folder / part).glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as handle:
                names = handle.keys()
                for key in names:
                    info = handle.get_slice(key)
                    count = math.prod(info.get_shape())
                    kind = info.get_dtype()
                    total += count * (itemsize if kind in floats else sizes.get(kind, 4))
        needed[part] = total
    return needed


def free_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on ``device``: a GPU's free memory, or the CPU's ``MemAvailable``
    (``None`` where it cannot be read)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(folder: Path, device: torch.device, dtype: torch.dtype, free: int | None = None) -> None:
    """Raise :class:`ModelTooLargeError` when the folder's weights in ``dtype`` exceed what ``device`` has free."""
    free = free_memory(device) if free is None else free
    if free is None:
        return
    needed = weights_bytes(folder, dtype)
    if sum(needed.values()) <= free:
        return
    gib = 2**30
    parts = ", ".join(f"{name} {size / gib:.1f}" for name, size in sorted(needed.items(), key=lambda kv: -kv[1]))
    hint = "load it in bfloat16 (--dtype bfloat16)" if dtype == torch.float32 else "use a device with more memory"
    raise ModelTooLargeError(
        f"model folder {str(folder)!r} needs {sum(needed.values()) / gib:.1f} GiB for its weights in "
        f"{str(dtype).removeprefix('torch.')} ({parts} GiB), but {device.type} has {free / gib:.1f} GiB free: "
        f"{hint}, free memory, or leave an optional part out of the folder (e.g. SD3's text_encoder_3: "
        "its pipeline then reads zeros in T5's place)"
    )


def _safetensors_name(part: str) -> str:
    return "model.safetensors" if part.startswith("text_encoder") else "diffusion_pytorch_model.safetensors"


def _load_part(folder: Path, part: str, load):
    """``load()`` with any failure turned into a :class:`ModelNotFoundError` naming the part."""
    try:
        return load()
    except MemoryError:
        raise
    except Exception as error:
        raise ModelNotFoundError(
            f"could not load {part} from {str(folder / part)!r} ({_first_line(error)}): is the folder complete and "
            f"saved by diffusers ({SUPPORTED})?"
        ) from error


def _loader(spec: Part, path: Path, dtype: torch.dtype):
    """A function loading one part: a diffusers or transformers class, weights from safetensors only."""
    import diffusers
    import transformers

    cls = getattr(diffusers if spec.library == "diffusers" else transformers, spec.name)
    if not spec.weights:
        return lambda: cls.from_pretrained(path)
    if spec.library == "diffusers":
        return lambda: cls.from_pretrained(path, torch_dtype=dtype, use_safetensors=True)
    return lambda: cls.from_pretrained(path, dtype=dtype, use_safetensors=True)


def load_components(folder: Path, *, device: torch.device, dtype: torch.dtype, names: Sequence[str] = ()) -> Components:
    """Load the VAE, the backbone's denoiser, text encoder(s) and tokenizer(s), and the noise schedule.

    The settings file is checked first, then the weights files (:func:`check_weights`);
    every failure names the file or part. ``names``: what the model was asked for by (a hub
    id), for recognising its family (:func:`folder_family`).
    """
    from transformers.utils import logging as hf_logging

    settings = read_settings(folder)
    family, size = folder_family(folder, settings, names)
    presets, card = model_presets(folder, settings, (family, size)), model_card(folder, settings)
    if card.text_length is not None:  # the T5 length this model was trained with, where it is not its family's
        family = dataclasses.replace(family, text_length=card.text_length)
    check_weights(folder)
    check_memory(folder, device, dtype)
    vae_config = _json_file(folder / "vae" / "config.json")
    # SDXL's VAE overflows in float16 (its config says force_upcast): keep it in float32, as diffusers does
    upcast = dtype == torch.float16 and vae_config.get("force_upcast", False)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        parts = {
            name: _load_part(
                folder, name, _loader(spec, folder / name, torch.float32 if upcast and name == "vae" else dtype)
            )
            for name, spec in folder_parts(folder).items()
        }
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    for module in parts.values():
        if isinstance(module, torch.nn.Module):
            module.to(device).eval().requires_grad_(False)
    scheduler = _json_file(folder / "scheduler" / "scheduler_config.json")
    vae = parts.pop("vae")
    backbone = _load_part(
        folder, "scheduler", lambda: BACKBONES[family.architecture](parts, scheduler, _vae_factor(vae), family)
    )
    return Components(vae=vae, backbone=backbone, presets=presets, folder=folder, family=family, card=card)


def _vae_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def components_from_pipe(pipe) -> Components:
    """The components of a diffusers pipeline already in memory (any family), shared, not copied.

    Nothing of the pipeline is changed: its modules keep their device, dtype, mode and
    gradient flags (every maskdiffusion pass runs under ``torch.no_grad``), and the attention
    processors a pass installs are restored after it.
    """
    denoiser = next((getattr(pipe, n) for n in ("transformer", "unet") if getattr(pipe, n, None) is not None), None)
    architecture = ARCHITECTURES.get(type(denoiser).__name__) if denoiser is not None else None
    if architecture not in BACKBONES:
        raise ValueError(
            f"from_pipe takes a pipeline of {SUPPORTED} (StableDiffusionPipeline, StableDiffusionXLPipeline, "
            f"StableDiffusion3Pipeline, FluxPipeline, PixArtSigmaPipeline); {type(pipe).__name__} has "
            f"{'no unet or transformer' if denoiser is None else 'a ' + type(denoiser).__name__}"
        )
    backbone_class = BACKBONES[architecture]
    for name, part in {"vae": VAE_PART, **backbone_class.parts}.items():
        if part.required and getattr(pipe, name, None) is None:
            raise ValueError(
                f"the pipeline has no {name}: from_pipe takes a whole {type(pipe).__name__} "
                f"(a {architecture} model needs {', '.join(n for n, p in backbone_class.parts.items() if p.required)})"
            )
    name = str(getattr(pipe, "name_or_path", "") or denoiser.config.get("_name_or_path", ""))
    config = {"_class_name": type(denoiser).__name__, **dict(denoiser.config)}
    family = detect(
        ModelDescription(
            unet=config,
            scheduler=dict(pipe.scheduler.config),
            two_text_encoders=architecture == "unet" and getattr(pipe, "text_encoder_2", None) is not None,
            names=(name,),
        )
    )
    modules = {name: getattr(pipe, name, None) for name in backbone_class.parts}
    modules["scheduler"] = pipe.scheduler
    backbone = backbone_class(modules, dict(pipe.scheduler.config), _vae_factor(pipe.vae), family)
    return Components(
        vae=pipe.vae,
        backbone=backbone,
        presets=family_presets(family, native_size(config, dict(pipe.vae.config))),
        folder=None,
        family=family,
    )


TINY_ENCODER_FILES = ["config.json", "diffusion_pytorch_model.safetensors"]


def resolve_tiny_encoder(encoder: str, family: Family, *, local_files_only: bool | None = None) -> tuple[str, Path]:
    """``(id, folder)`` of the tiny autoencoder ``encoder`` names: ``"tiny"`` (the family's own, e.g.
    ``madebyollin/taesd``), a hub id (looked up in the local cache first) or a folder; safetensors only.

    Raises :class:`ModelNotFoundError` saying what is missing and how to get it.
    """
    reference = family.tiny_encoder if encoder == "tiny" else encoder
    path = Path(reference).expanduser()
    if path.is_dir():
        folder = path
    elif reference.startswith((".", "/", "~")) or reference.count("/") != 1:
        raise ModelNotFoundError(f"tiny encoder folder {shorten(reference)} does not exist (nor is it a hub id)")
    else:
        folder = _cached_or_downloaded(reference, TINY_ENCODER_FILES, local_files_only, what="tiny encoder")
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(f"tiny encoder folder {str(folder)!r} has no config.json (an AutoencoderTiny's)")
    if not (folder / "diffusion_pytorch_model.safetensors").is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        found = f" (only {pickles[0]}, a pickle checkpoint: safetensors only)" if pickles else ""
        raise ModelNotFoundError(
            f"tiny encoder folder {str(folder)!r} has no diffusion_pytorch_model.safetensors{found}: "
            f"hf download {reference} --include {' '.join(TINY_ENCODER_FILES)}"
        )
    return reference, folder


def _cached_or_downloaded(repo: str, patterns: list[str], local_files_only: bool | None, *, what: str) -> Path:
    """A small hub repository's folder: from the local cache, else downloaded (unless offline)."""
    from huggingface_hub import constants, snapshot_download

    try:
        folder = Path(snapshot_download(repo, allow_patterns=patterns, local_files_only=True))
        if all((folder / name).is_file() for name in patterns):
            return folder
    except Exception:  # not cached: fall through to the network
        pass
    how = f"download it once where there is internet: hf download {repo} --include {' '.join(patterns)}"
    if bool(local_files_only) or constants.HF_HUB_OFFLINE:
        raise ModelNotFoundError(
            f"{what} {shorten(repo)} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and the hub "
            f"is offline: {how}, or pass a folder"
        )
    try:
        return Path(snapshot_download(repo, allow_patterns=patterns, etag_timeout=float(constants.HF_HUB_ETAG_TIMEOUT)))
    except Exception as error:
        raise ModelNotFoundError(f"could not download {what} {shorten(repo)} ({_first_line(error)}): {how}") from None


def load_tiny_encoder(folder: Path, *, device: torch.device, dtype: torch.dtype, vae) -> torch.nn.Module:
    """An ``AutoencoderTiny`` from ``folder``, checked against the model's own VAE (its factor and latent
    channels must be the VAE's, or its latents would not be the denoiser's)."""
    from diffusers import AutoencoderTiny

    tiny = _load_part(
        folder, "tiny encoder", lambda: AutoencoderTiny.from_pretrained(folder, torch_dtype=dtype, use_safetensors=True)
    )
    factor = 2 ** (len(tiny.config.encoder_block_out_channels) - 1)
    if factor != _vae_factor(vae) or tiny.config.latent_channels != vae.config.latent_channels:
        raise ModelNotFoundError(
            f"tiny encoder {str(folder)!r} makes {tiny.config.latent_channels}-channel latents at 1/{factor} of the "
            f"image, the model's VAE {vae.config.latent_channels}-channel at 1/{_vae_factor(vae)}: use the tiny "
            "encoder made for this model family (encoder='tiny')"
        )
    return tiny.to(device).eval().requires_grad_(False)


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
