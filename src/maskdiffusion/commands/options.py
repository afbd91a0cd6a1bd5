"""Flags shared by the commands, and how they become a model, a preset and input limits.

Only command modules import this: engines take plain arguments, never an ``argparse.Namespace``.
"""

from __future__ import annotations

import argparse
import math
from datetime import datetime
from pathlib import Path

from ..loading import DEFAULT_MODEL, DTYPES
from ..presets import AUTO, PRESETS, Preset
from ..prompts import ClassName, parse_classes, read_class_file
from ..suite import SCLIP_BACKGROUND_WORDS
from ..views import InputLimits

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C
DEVICES = ["auto", "cpu", "cuda", "mps"]


def parse_class_argument(text: str) -> list[ClassName]:
    """``--classes``: ``"a, b|c"`` inline, or ``@file.txt`` (one class per line)."""
    if text.startswith("@"):
        return read_class_file(text[1:])
    return parse_classes(text)


def above_zero(what: str = "a number"):
    """An argparse type: a finite number > 0; errors say ``expected {what} above 0``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"expected {what} above 0, got {text!r}")
        return value

    return parse


def int_at_least(minimum: int):
    """An argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    return parse


def background_words(text: str) -> tuple[str, ...]:
    """``--background-words``: ``"sky, wall"`` or ``sclip`` (SCLIP's list)."""
    if text.strip().casefold() == "sclip":
        return SCLIP_BACKGROUND_WORDS
    words = tuple(word.strip() for word in text.split(","))
    if not all(words):
        raise argparse.ArgumentTypeError(f"expected comma-separated words or 'sclip', got {text!r}")
    return words


def block_list(text: str) -> tuple[int, ...] | str:
    """``--attention-blocks`` / ``--feature-blocks``: ``"8,9,10"`` or ``auto``."""
    if text.strip().casefold() == AUTO:
        return AUTO
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated block indices or 'auto', got {text!r}") from None


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        default="auto",
        choices=DEVICES,
        help="where the model runs (default auto: cuda if available, then mps, then cpu)",
    )


def add_limits_argument(parser: argparse.ArgumentParser) -> None:
    """``--max-megapixels``: the input limit of every command that reads user images."""
    parser.add_argument(
        "--max-megapixels",
        type=above_zero("a number of megapixels"),
        default=InputLimits.max_pixels / 1e6,
        help=f"refuse larger images, checked from their header before decoding "
        f"(default {InputLimits.max_pixels / 1e6:g}); images may also be at most {InputLimits.max_aspect:g}:1",
    )


def input_limits(args: argparse.Namespace) -> InputLimits:
    return InputLimits(max_pixels=round(args.max_megapixels * 1e6))


def add_model_arguments(parser: argparse.ArgumentParser, *, default_model: str = DEFAULT_MODEL) -> None:
    """Flags shared by every command that loads a model."""
    parser.add_argument(
        "--model",
        default=default_model,
        help=f"hub id or diffusers folder of any family: SD 1.x/2.x/XL, SD3/3.5, FLUX.1, PixArt-Σ (default: "
        f"{default_model}; 'toy' = the bundled toy-world model, 'tiny-random' = random test model)",
    )
    add_device_argument(parser)
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=sorted(DTYPES),
        help="model precision (default float32): weights stored in it, attention maps and mask head in float32; "
        "bfloat16 pays on CPUs with AMX / AVX512-BF16 and on GPUs",
    )
    parser.add_argument(
        "--encoder",
        default="full",
        metavar="full|tiny|HUB_ID_OR_DIR",
        help="what encodes the views: the model's own VAE (full, default), the family's tiny autoencoder (tiny: "
        "madebyollin/taesd, taesdxl, taesd3 or taef1; a fraction of the cost, for previews and bulk labelling), "
        "or an AutoencoderTiny's hub id or folder",
    )
    parser.add_argument("--batch-size", type=int_at_least(1), default=4, help="views per denoiser batch (default 4)")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the VAE encoder and the denoiser's ResNet / feed-forward blocks (slow first call per "
        "shape; default off)",
    )


def preset_default(field: str) -> str:
    """``"default: the preset's (default: X, attention-only: Y, reference: Z)"``, from :data:`PRESETS` itself, so
    the help never says a value the presets do not use; a model's family or folder may change them."""

    def shown(value) -> str:
        if value is None or value == ():
            return "off"
        return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)

    values = {name: shown(getattr(preset, field)) for name, preset in PRESETS.items()}
    if len(set(values.values())) == 1:
        listed = values["default"]
    else:
        listed = ", ".join(f"{name}: {value}" for name, value in values.items())
    return f"default: the preset's ({listed}; a model's family may set its own)"


def add_preset_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags that override fields of the chosen preset; each help says the presets' own values."""
    parser.add_argument(
        "--preset",
        default="default",
        choices=sorted(PRESETS),
        help="named settings of the model (default: default, the recommended ones; "
        "reference = the MaskDiffusion paper's mask head); the flags below override single fields",
    )
    parser.add_argument(
        "--size",
        type=int,
        help="view short side in pixels, a multiple of the model's block size (64 for SD's UNets, 16 for the "
        "transformers); default: the model's native size (512 for SD 1.5, 1024 for SDXL, SD3, FLUX, PixArt-Σ)",
    )
    parser.add_argument(
        "--timestep",
        type=int,
        help="noise level of the pass, an index into the model's training schedule (0 = the clean image); "
        + preset_default("timestep"),
    )
    parser.add_argument(
        "--class-maps",
        choices=["attention", "concept"],
        help="attention weights, or concept outputs (SD3, FLUX: ConceptAttention, their families' default); "
        + preset_default("class_maps"),
    )
    parser.add_argument(
        "--attention-blocks",
        type=block_list,
        metavar="I,J,...|auto",
        help="transformer blocks whose attention gives the class maps ('auto' = the model's choice); "
        + preset_default("attention_blocks"),
    )
    parser.add_argument(
        "--feature-blocks",
        type=block_list,
        metavar="I,J,...|auto",
        help="blocks whose outputs are the features: a UNet's up blocks, a transformer's blocks; "
        + preset_default("feature_blocks"),
    )
    parser.add_argument(
        "--attention-mode",
        choices=["exp", "softmax"],
        help="cross-attention as exp(QK^T*scale), the paper's choice, or softmax probabilities over the prompt; "
        + preset_default("attention_mode"),
    )
    parser.add_argument(
        "--background-threshold",
        type=float,
        help="pixels whose best class score is under it get no class (255 in label PNGs); scores are cosines in "
        "[-1, 1], EM posteriors in [0, 1] (the reference preset's dot products are unbounded); "
        + preset_default("background_threshold"),
    )
    parser.add_argument(
        "--background-words",
        type=background_words,
        metavar="WORDS|sclip",
        help="comma-separated words for what is none of the classes, each scored as a class and its pixels made "
        "background (on VOC21 / Context60 / COCO-Object: class 0); 'sclip' = SCLIP's 26 words; "
        + preset_default("background_words"),
    )
    parser.add_argument(
        "--refine-steps",
        type=int,
        help="refinement rounds of the mask head (EM or hard prototypes, as the preset's refinement says); "
        + preset_default("refine_steps"),
    )


# Preset fields with a flag of the same name.
PRESET_FLAGS = (
    "size",
    "timestep",
    "class_maps",
    "attention_blocks",
    "feature_blocks",
    "attention_mode",
    "background_threshold",
    "background_words",
    "refine_steps",
)


def preset_overrides(args: argparse.Namespace) -> dict:
    """The preset fields given on the command line."""
    return {name: getattr(args, name) for name in PRESET_FLAGS if getattr(args, name, None) is not None}


def check_overrides(args: argparse.Namespace) -> None:
    """The command line's preset fields, checked before any model is looked up (``ValueError``)."""
    PRESETS[args.preset].replace(**preset_overrides(args)).check()


def chosen_preset(segmenter, args: argparse.Namespace) -> Preset:
    """The model's named preset with the command line's overrides applied."""
    return segmenter.presets[args.preset].replace(**preset_overrides(args))


def load_segmenter(args: argparse.Namespace):
    """The model the flags name (``--model``, ``--device``, ``--dtype``, ...), as a ``MaskDiffusion``."""
    from ..pipeline import MaskDiffusion

    limits = input_limits(args) if hasattr(args, "max_megapixels") else InputLimits()
    return MaskDiffusion.from_pretrained(
        args.model,
        device=args.device,
        dtype=args.dtype,
        batch_size=args.batch_size,
        preset=getattr(args, "preset", None),
        limits=limits,
        compile=args.compile,
        encoder=args.encoder,
    )


def default_out() -> str:
    """``outputs/<timestamp>``: a fresh RUN_DIR when ``--out`` is not given."""
    return str(Path("outputs") / datetime.now().strftime("%Y%m%d-%H%M%S"))
