"""Segmentation settings as frozen dataclasses, with named presets.

Layers are chosen by structure, never by absolute size, so every view size keeps the
same layers. In a UNet: cross-attention layers by their down-sampling factor relative to
the view (at a 512-pixel view, factor 32 is the 16x16 layers and 64 the 8x8 mid block),
decoder features by up-block index (diffusers' ``unet.up_blocks[i]``, 0 = deepest). In a
transformer every block works on one token grid: attention and features are chosen by block
index in forward order (:mod:`maskdiffusion.backbones` says what each model has).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, NoReturn, get_args

from .prompts import shorten

AttentionMode = Literal["exp", "softmax"]
AttentionNormalization = Literal["max", "probabilities", "calibrated"]
ClassPresence = Literal["all", "support"]
PrototypeCells = Literal["all", "confident"]
Scoring = Literal["cosine", "dot", "poe", "attention"]
Refinement = Literal["hard", "em"]
LongVocabulary = Literal["batch", "shared-queries"]
ClassMaps = Literal["attention", "concept"]
ImageRefinement = Literal["none", "pamr"]
Auto = Literal["auto"]
AUTO = "auto"  # layer fields chosen from the model's own layout (MaskDiffusion resolves them)

MAX_SIZE = 2048  # view short side: past Stable Diffusion's training sizes (512-1024), and memory grows as its square
SIZE_STEP = 8  # model blocks are multiples of it (64 for SD, 16 for the toy model); the pipeline checks the model's own
NUM_TIMESTEPS = 1000  # Stable Diffusion's training schedule; the pipeline also checks the model's own
MAX_REFINE_STEPS = 100  # refinement converges in a few rounds; past this it only costs time
MAX_SEPARATOR_CHARS = 100
MAX_LAYERS = 16  # entries of attention_factors / attention_blocks / feature_blocks
MAX_BLOCK = 127  # block indices: past FLUX's 57 and SD3.5-large's 38 transformer blocks
COSINE_RANGE = (-1.0, 1.0)  # scores with normalised prototypes
POSTERIOR_RANGE = (0.0, 1.0)  # EM scores are class probabilities
MAX_PASSES = 16  # denoiser passes per view of an ensemble: (1 + extra timesteps) x noise samples
MAX_PROPAGATION_STEPS = 10  # S^k A: past a few steps every map flattens to S's stationary distribution
MAX_SELF_ATTENTION_TOKENS = 4096  # cells of a captured self-attention layer (64x64): N^2 float32 = 64 MiB per view
MAX_IMAGE_REFINE_STEPS = 50  # PAMR iterations: each costs a weighted sum over every neighbour of every pixel
MAX_DILATION = 64  # pixels: past this a "neighbour" is no longer local
MAX_WEIGHT = 1000.0  # poe_weight, em_concentration, em_prior_weight: past this one term is all that counts


@dataclass(frozen=True)
class Preset:
    """Everything that decides a segmentation, besides the model and the class list.

    Every instance is checked when built (:meth:`check`): a wrong type or a value out of
    range is a ``ValueError`` naming the field, the value and the allowed range.

    Attributes:
        size: short side of a view in pixels; a multiple of the model's block size
            (64 for Stable Diffusion), at most :data:`MAX_SIZE` (2048).
        window_overlap: fraction of a view shared by neighbouring sliding windows along
            the long side of wide or tall images, in [0, 1).
        timestep: noise level of the single pass, an index 0 to 999 into the model's training
            schedule (:mod:`maskdiffusion.backbones.noise` says what it means); 0 = the clean latent (as
            the reference). For t > 0 the latent is noised with seeded noise.
        seed: seed of that noise.
        ensemble_timesteps: extra timesteps (0 to 999, distinct, not ``timestep``) of a
            multi-timestep ensemble; ``()`` = off. Each is one more pass per view.
        noise_samples: noise seeds per timestep (``seed``, ``seed + 1``, ...; the same
            noise for every view); 1 = off. Every (timestep, seed) pair is one pass
            (timestep 0 adds no noise: one pass, weighted ``noise_samples``), at most
            :data:`MAX_PASSES` (16) in all; their attention maps are averaged as
            log-mean-exp (like heads and layers), their features as a mean.
        separator: text between class names in a prompt.
        attention_mode: ``"exp"`` = exp(QK^T * scale), the reference's un-normalised
            scores; ``"softmax"`` = attention probabilities over the prompt's tokens (in a
            joint-attention transformer: renormalised over the text keys, see
            :mod:`maskdiffusion.backbones.mmdit`).
        class_maps: where class maps come from. ``"attention"``: the attention weights of
            image queries on each class's text tokens (every model). ``"concept"``: only in
            joint-attention transformers (SD3, FLUX), ConceptAttention's idea: each class is
            an extra stream of tokens that attends to itself and the image (nothing attends
            to it, so the model's pass is unchanged) and the map is the softmax over classes
            of <class output, image output>; needs ``attention_mode="softmax"``.
        attention_factors: down-sampling factors (view size / layer size) of the
            cross-attention layers whose maps are averaged, or ``"auto"``: chosen from
            the UNet (:data:`AUTO`, the reference's intent: every cross-attention level
            at factor >= 32, i.e. at most 16x16 queries at a 512 view; the coarsest level
            if the UNet has none that coarse). A transformer has one level, its token grid
            (factor 16 in SD3, FLUX and PixArt): ``"auto"`` is that.
        attention_blocks: transformer blocks (index in forward order) whose attention
            gives the class maps, or ``"auto"``: the model's choice
            (:mod:`maskdiffusion.backbones` documents each). A UNet takes every
            cross-attention layer at ``attention_factors``: ``"auto"`` only.
        attention_factor: factor of the common grid the maps are resized to
            (16 = 32x32 at a 512 view).
        self_attention_factors: factors of the self-attention layers whose
            probabilities (mean over heads, layers and the view's passes) propagate the
            class attention, ``A' = S^k A`` (iSeg, DiffSegmenter); ``()`` = off. Coarser
            layers are brought to the finest chosen layer's grid; a layer may have at most
            :data:`MAX_SELF_ATTENTION_TOKENS` (4096, 64x64) cells, so ``S`` stays at
            most 64 MiB per view (at 512 pixels: factors >= 8).
        propagation_steps: ``k``, 1 to :data:`MAX_PROPAGATION_STEPS` (10); used only
            with ``self_attention_factors``.
        feature_blocks: up blocks whose outputs are the features (each L2-normalised,
            then concatenated), or ``"auto"``: the decoder's semantic levels by role, the
            first up blocks whose outputs lie at twice and at once the VAE's factor (1/16
            and 1/8 of the view in Stable Diffusion: ``up_blocks[1]`` and ``[2]`` in SD 1.x,
            ``[0]`` and ``[1]`` in SDXL). In a transformer: blocks (index in forward order)
            whose image tokens' output hidden states are the features.
        feature_factor: factor of the grid where features, prototypes and scores live.
        attention_normalization: how class maps are made comparable (see
            :mod:`maskdiffusion.mask_head`): ``"max"`` divides each by its maximum (the
            reference; an absent class gets a peak too); ``"probabilities"`` keeps the
            raw softmax mass of the class's tokens (needs ``attention_mode="softmax"``);
            ``"calibrated"`` divides that mass by a per-class scale the model folder
            measured without labels (``attention_calibration`` in ``maskdiffusion.json``),
            raised to ``calibration_strength``.
        calibration_strength: exponent of the calibration scale: 1 equalises the classes'
            mean attention fully, 0 leaves it raw; on the toy model 0.5 beats both.
        class_presence: ``"all"``: every class may take pixels; ``"support"``: only
            classes that win the attention argmax on at least ``presence_min_cells``
            cells of the feature grid (the others are reported in ``Result.absent``).
        presence_min_cells: see ``class_presence``.
        prototype_cells: ``"all"``: prototypes weight every cell by the class's
            attention; ``"confident"``: only the cells where the class wins the argmax.
        scoring: ``"cosine"`` (ours), ``"dot"`` (the reference's dot product with the
            un-normalised prototype), ``"poe"``: cosine + ``poe_weight`` x log attention,
            a product of experts in which the attention keeps its vote, or ``"attention"``:
            the class attention itself, no features (the attention-only baseline).
        poe_weight: lambda of ``"poe"``.
        background_threshold: pixels whose best score is below it are labelled
            background (-1; 255 in PNGs). ``None`` = every pixel gets a class. Cosine
            scores lie in [-1, 1], EM posteriors in [0, 1].
        background_words: words for what is none of the classes (``"sky"``, ``"wall"``, ...):
            each is prompted and scored as a class of its own, and the pixels any of them
            wins are labelled background (-1), as under the threshold. The way to segment
            "background", which no model can look for as a word; a word that is also one of
            the classes is left out of them. ``()`` = none.
        refinement: what ``refine_steps`` rounds do: ``"hard"`` recomputes prototypes
            from the current labelling; ``"em"`` runs EM on a von Mises-Fisher mixture with
            the attention as a per-pixel prior, and the scores become class posteriors.
        refine_steps: rounds of ``refinement`` (0 = none), at most
            :data:`MAX_REFINE_STEPS` (100).
        refinement_on_image: ``"pamr"``: the class scores, upsampled to the image, are refined on
            the image's own colours before the argmax (pixel-adaptive mask refinement,
            :mod:`maskdiffusion.pamr`): each pixel takes a softmax-weighted mean of its neighbours'
            scores, the weights favouring similar colours; ``"none"``: off.
        image_refine_steps: PAMR iterations, 1 to :data:`MAX_IMAGE_REFINE_STEPS` (NACLIP, DiffCut: 10).
        image_refine_dilations: the rings of neighbours PAMR looks at, in pixels (distinct, 1 to
            :data:`MAX_DILATION`).
        em_concentration: kappa of the EM mixture (how sharply features decide).
        em_prior_weight: exponent of the attention prior in EM (how much it decides).
        long_vocabulary: how vocabularies that need several prompts are run.
            ``"batch"``: one pass per prompt (batched); features are the mean over
            the passes. ``"shared-queries"``: one pass with the first prompt; the other
            prompts attend to that pass's stored queries of the captured layers (keys and
            values come only from the text), so 171 classes cost about what 10 do; an
            approximation, since later layers' queries saw only the first prompt.
    """

    size: int = 512
    window_overlap: float = 0.5
    timestep: int = 0
    seed: int = 0
    ensemble_timesteps: tuple[int, ...] = ()
    noise_samples: int = 1
    separator: str = " and "
    attention_mode: AttentionMode = "exp"
    class_maps: ClassMaps = "attention"
    attention_factors: tuple[int, ...] | Auto = (32, 64)
    attention_blocks: tuple[int, ...] | Auto = AUTO
    attention_factor: int = 16
    self_attention_factors: tuple[int, ...] = ()
    propagation_steps: int = 1
    feature_blocks: tuple[int, ...] | Auto = (1, 2)
    feature_factor: int = 8
    attention_normalization: AttentionNormalization = "max"
    calibration_strength: float = 0.5
    class_presence: ClassPresence = "all"
    presence_min_cells: int = 2
    prototype_cells: PrototypeCells = "all"
    scoring: Scoring = "cosine"
    poe_weight: float = 0.1
    background_threshold: float | None = None
    background_words: tuple[str, ...] = ()
    refinement: Refinement = "hard"
    refine_steps: int = 0
    refinement_on_image: ImageRefinement = "none"
    image_refine_steps: int = 10
    image_refine_dilations: tuple[int, ...] = (1, 2, 4, 8)
    em_concentration: float = 20.0
    em_prior_weight: float = 2.0
    long_vocabulary: LongVocabulary = "batch"

    def __post_init__(self) -> None:
        """Normalise JSON-like values (lists -> tuples, numpy scalars -> Python) and :meth:`check` them."""
        for name in (
            "attention_factors",
            "attention_blocks",
            "feature_blocks",
            "self_attention_factors",
            "ensemble_timesteps",
            "image_refine_dilations",
        ):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                object.__setattr__(self, name, tuple(_as_int(v) for v in value))
        if isinstance(self.background_words, list):
            object.__setattr__(self, "background_words", tuple(self.background_words))
        for name, kind in _NUMBERS.items():
            value = getattr(self, name)
            if kind is int:
                object.__setattr__(self, name, _as_int(value))
            elif isinstance(value, numbers.Real) and not isinstance(value, bool):
                object.__setattr__(self, name, float(value))
        self.check()

    def replace(self, **changes) -> Preset:
        """A checked copy with ``changes`` applied (unknown names raise ``TypeError``)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping) -> Preset:
        """Build from JSON-like values (lists become tuples); unknown keys and bad values are errors."""
        if not isinstance(values, Mapping):
            raise ValueError(f"a preset must be an object of field values, got {shorten(values)}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [key for key in values if key not in names]
        if unknown:
            raise ValueError(
                f"unknown preset field(s) {shorten(', '.join(map(str, unknown)))}; known fields: {', '.join(names)}"
            )
        return cls(**values)

    def check(self) -> None:
        """Raise ``ValueError`` naming the field, the value and the allowed range when a value cannot work."""
        size = _whole(self, "size", SIZE_STEP, MAX_SIZE, f"a whole number of pixels from {SIZE_STEP} to {MAX_SIZE}")
        if size % SIZE_STEP:
            suggestion = max(64, round(size / 64) * 64)
            raise ValueError(
                f"size {size} is not a multiple of {SIZE_STEP}: views are cut into the model's blocks (a multiple "
                f"of 64 for Stable Diffusion); use e.g. {suggestion}"
            )
        overlap = self.window_overlap
        if not (_is_real(overlap) and 0.0 <= overlap < 1.0):
            _refuse("window_overlap", overlap, "a fraction in [0, 1)")
        _whole(self, "timestep", 0, NUM_TIMESTEPS - 1, f"a whole number from 0 to {NUM_TIMESTEPS - 1}")
        _whole(self, "seed", 0, 2**64 - 1, "a whole number from 0 to 2**64 - 1")
        self._check_ensemble()
        if not isinstance(self.separator, str) or len(self.separator) > MAX_SEPARATOR_CHARS:
            _refuse("separator", self.separator, f"text of at most {MAX_SEPARATOR_CHARS} characters")
        _choice("attention_mode", self.attention_mode, AttentionMode)
        _choice("class_maps", self.class_maps, ClassMaps)
        if self.class_maps == "concept" and self.attention_mode != "softmax":
            _refuse(
                "class_maps",
                self.class_maps,
                "'attention' with attention_mode 'exp' (concept maps are probabilities over the classes; use "
                "attention_mode 'softmax')",
            )
        _factors(
            self, "attention_factors", 1, size, f"down-sampling factors from 1 to size ({size}), or 'auto'", auto=True
        )
        _factors(self, "attention_blocks", 0, MAX_BLOCK, f"block indices from 0 to {MAX_BLOCK}, or 'auto'", auto=True)
        _whole(self, "attention_factor", 1, size, f"a down-sampling factor from 1 to size ({size})")
        self._check_self_attention(size)
        _factors(self, "feature_blocks", 0, MAX_BLOCK, f"block indices from 0 to {MAX_BLOCK}, or 'auto'", auto=True)
        _whole(self, "feature_factor", 1, size, f"a down-sampling factor from 1 to size ({size})")
        _choice("attention_normalization", self.attention_normalization, AttentionNormalization)
        if self.attention_normalization != "max" and self.attention_mode != "softmax":
            _refuse(
                "attention_normalization",
                self.attention_normalization,
                "'max' with attention_mode 'exp' (exp scores are not probabilities; use attention_mode 'softmax')",
            )
        strength = self.calibration_strength
        if not (_is_real(strength) and 0.0 <= strength <= 1.0):
            _refuse("calibration_strength", strength, "an exponent from 0 to 1")
        _choice("class_presence", self.class_presence, ClassPresence)
        _whole(self, "presence_min_cells", 1, 10**6, "a whole number of cells from 1 to 10**6")
        _choice("prototype_cells", self.prototype_cells, PrototypeCells)
        _choice("scoring", self.scoring, Scoring)
        for name in ("poe_weight", "em_concentration", "em_prior_weight"):
            value = getattr(self, name)
            if not (_is_real(value) and 0.0 <= value <= MAX_WEIGHT):
                _refuse(name, value, f"a number from 0 to {MAX_WEIGHT:g}")
        _choice("refinement", self.refinement, Refinement)
        if self.scoring == "attention" and self.refine_steps:
            _refuse("refine_steps", self.refine_steps, "0 with scoring 'attention' (no features to refine with)")
        _whole(self, "refine_steps", 0, MAX_REFINE_STEPS, f"a whole number from 0 to {MAX_REFINE_STEPS}")
        _choice("refinement_on_image", self.refinement_on_image, ImageRefinement)
        rule = f"a whole number from 1 to {MAX_IMAGE_REFINE_STEPS}"
        _whole(self, "image_refine_steps", 1, MAX_IMAGE_REFINE_STEPS, rule)
        _factors(self, "image_refine_dilations", 1, MAX_DILATION, f"distances in pixels from 1 to {MAX_DILATION}")
        threshold = self.background_threshold
        if threshold is not None:
            if not (_is_real(threshold) and math.isfinite(threshold)):
                _refuse("background_threshold", threshold, "a finite number or None (off)")
            bounds = self.score_range()
            if bounds is not None and not bounds[0] <= threshold <= bounds[1]:
                low, high = bounds
                _refuse(
                    "background_threshold",
                    threshold,
                    f"in [{low:g}, {high:g}]: this preset's {self.score_kind()} lie in [{low:g}, {high:g}], "
                    "so a threshold outside makes every pixel background or none",
                )
        words = self.background_words
        if not (isinstance(words, tuple) and all(isinstance(w, str) and w.strip() and "|" not in w for w in words)):
            _refuse("background_words", words, "a list of non-empty words without '|' (or empty: none)")
        _choice("long_vocabulary", self.long_vocabulary, LongVocabulary)

    def _check_ensemble(self) -> None:
        rule = f"timesteps from 0 to {NUM_TIMESTEPS - 1}, other than timestep ({self.timestep})"
        extra = _optional_factors(self, "ensemble_timesteps", 0, NUM_TIMESTEPS - 1, rule)
        if self.timestep in extra:
            _refuse("ensemble_timesteps", extra, "distinct " + rule)
        samples = _whole(self, "noise_samples", 1, MAX_PASSES, f"a whole number from 1 to {MAX_PASSES}")
        passes = (1 + len(extra)) * samples
        if passes > MAX_PASSES:
            raise ValueError(
                f"ensemble_timesteps {extra} x noise_samples {samples} ask for {passes} passes per view; "
                f"at most {MAX_PASSES}: use fewer timesteps or noise samples"
            )
        if self.seed + samples - 1 > 2**64 - 1:
            _refuse("noise_samples", samples, f"at most {2**64 - self.seed} with seed {self.seed} (seeds < 2**64)")

    def _check_self_attention(self, size: int) -> None:
        rule = f"down-sampling factors from 1 to size ({size})"
        factors = _optional_factors(self, "self_attention_factors", 1, size, rule)
        side = math.isqrt(MAX_SELF_ATTENTION_TOKENS)
        big = [f for f in factors if (size // f) ** 2 > MAX_SELF_ATTENTION_TOKENS]
        if big:
            smallest = -(-size // side)
            raise ValueError(
                f"self_attention_factors {big}: at a {size}-pixel view such a layer has "
                f"{(size // big[0]) ** 2} cells and its self-attention {(size // big[0]) ** 4:,} numbers per view; "
                f"the cap is {MAX_SELF_ATTENTION_TOKENS} cells ({side}x{side}): use factors >= {smallest} "
                "at this size, or a smaller size"
            )
        _whole(self, "propagation_steps", 1, MAX_PROPAGATION_STEPS, f"a whole number from 1 to {MAX_PROPAGATION_STEPS}")

    def score_kind(self) -> str:
        """What the head's scores are, for messages: ``cosine scores``, ``EM posteriors``, ..."""
        if self.refinement == "em" and self.refine_steps:
            return "EM posteriors"
        kinds = {
            "cosine": "cosine scores",
            "dot": "dot-product scores",
            "poe": "cosine + weight x log-attention scores",
        }
        return kinds[self.scoring]

    def score_range(self) -> tuple[float, float] | None:
        """Bounds of the head's scores, or ``None`` where they are unbounded (dot, product of experts)."""
        if self.refinement == "em" and self.refine_steps:
            return POSTERIOR_RANGE
        if self.scoring == "attention" and self.attention_normalization != "calibrated":
            return POSTERIOR_RANGE  # max-normalised maps and probabilities both lie in [0, 1]
        return COSINE_RANGE if self.scoring == "cosine" else None


_NUMBERS = {
    "size": int,
    "window_overlap": float,
    "timestep": int,
    "seed": int,
    "noise_samples": int,
    "propagation_steps": int,
    "attention_factor": int,
    "feature_factor": int,
    "background_threshold": float,
    "refine_steps": int,
    "image_refine_steps": int,
    "presence_min_cells": int,
    "calibration_strength": float,
    "poe_weight": float,
    "em_concentration": float,
    "em_prior_weight": float,
}


def _as_int(value: object) -> object:
    """numpy and other integers -> ``int``; anything else (bools, floats, text) unchanged, for :meth:`Preset.check`."""
    return int(value) if isinstance(value, numbers.Integral) and not isinstance(value, bool) else value


def _refuse(name: str, value: object, rule: str) -> NoReturn:
    raise ValueError(f"{name} must be {rule}, got {shorten(value)}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _whole(preset: Preset, name: str, low: int, high: int, rule: str) -> int:
    value = getattr(preset, name)
    if not (_is_int(value) and low <= value <= high):
        _refuse(name, value, rule)
    return value


def _factors(preset: Preset, name: str, low: int, high: int, rule: str, *, auto: bool = False) -> None:
    """A non-empty tuple of distinct whole numbers in ``[low, high]`` (or ``"auto"`` where allowed)."""
    value = getattr(preset, name)
    if auto and value == AUTO:
        return
    if not isinstance(value, tuple) or not 1 <= len(value) <= MAX_LAYERS:
        _refuse(name, value, f"a list of 1 to {MAX_LAYERS} {rule}")
    if not all(_is_int(v) and low <= v <= high for v in value) or len(set(value)) != len(value):
        _refuse(name, value, f"distinct {rule}")


def _optional_factors(preset: Preset, name: str, low: int, high: int, rule: str) -> tuple[int, ...]:
    """Like :func:`_factors`, empty allowed (= off)."""
    value = getattr(preset, name)
    if value != ():
        _factors(preset, name, low, high, rule)
    return value


def _choice(name: str, value: object, allowed: object) -> None:
    choices = get_args(allowed)
    if value not in choices or not isinstance(value, str):
        _refuse(name, value, " or ".join(repr(c) for c in choices))


# Ours, for Stable Diffusion (its numbers cannot be measured here; docs/ablation.md has the
# reasons and the toy model's measurements): layers chosen from the UNet ("auto": in SD 1.x
# the reference's 16x16 + 8x8 cross-attention layers and the decoder's up_blocks[1] and [2],
# the training-free counterpart of the reference's ODISE features); softmax probabilities,
# not max-normalised (an absent class keeps its low mass instead of getting a peak);
# t = 250 (DIFT: most semantic near t = 261; on the toy model 200-300 beat 0-100 by 3-4
# points); 10 EM rounds of a von Mises-Fisher mixture with the attention as prior, kappa 20 /
# beta 2 (lambda = beta / kappa = 0.1, the product-of-experts weight that held over 0.05-0.3).
_DEFAULT = Preset(
    attention_factors=AUTO,
    feature_blocks=AUTO,
    timestep=250,
    attention_mode="softmax",
    attention_normalization="probabilities",
    refinement="em",
    refine_steps=10,
    em_concentration=20.0,
    em_prior_weight=2.0,
)

PRESETS: dict[str, Preset] = {
    "default": _DEFAULT,
    # The baseline the head must beat: the default pass's class attention, argmax, no features.
    "attention-only": _DEFAULT.replace(scoring="attention", refinement="hard", refine_steps=0),
    # The reference mask head: exp scores, 16x16 + 8x8 layers, 32x32 maps, max-normalised,
    # dot product with the un-normalised prototype; features on the same 1/16 grid as the maps.
    "reference": Preset(
        attention_mode="exp",
        attention_factors=(32, 64),
        attention_factor=16,
        feature_factor=16,
        scoring="dot",
        window_overlap=0.5,
    ),
}


def resolve_preset(preset: str | Preset | None, fallback: Preset) -> Preset:
    """A preset from a name, an instance, or ``None`` (= ``fallback``)."""
    if preset is None:
        return fallback
    if isinstance(preset, Preset):
        return preset
    if not isinstance(preset, str) or preset not in PRESETS:
        raise ValueError(f"unknown preset {shorten(preset)}; choose one of {sorted(PRESETS)}")
    return PRESETS[preset]
