"""Segmentation settings as frozen dataclasses, with named presets.

Layers are chosen by structure, never by absolute size, so every view size keeps the
same layers: cross-attention layers by their down-sampling factor relative to the view
(at a 512-pixel view, factor 32 is the 16x16 layers and 64 the 8x8 mid block), decoder
features by up-block index (diffusers' ``unet.up_blocks[i]``, 0 = deepest).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

AttentionMode = Literal["exp", "softmax"]
LongVocabulary = Literal["batch", "shared-queries"]


@dataclass(frozen=True)
class Preset:
    """Everything that decides a segmentation, besides the model and the class list.

    Attributes:
        size: short side of a view in pixels; a multiple of the model's block size
            (64 for Stable Diffusion).
        window_overlap: fraction of a view shared by neighbouring sliding windows along
            the long side of wide or tall images.
        timestep: UNet timestep of the single pass; 0 = the clean latent (as the
            reference). For t > 0 the latent is noised with seeded noise.
        seed: seed of that noise.
        separator: text between class names in a prompt.
        attention_mode: ``"exp"`` = exp(QK^T * scale), the reference's un-normalised
            scores; ``"softmax"`` = attention probabilities over the prompt's tokens.
        attention_factors: down-sampling factors (view size / layer size) of the
            cross-attention layers whose maps are averaged.
        attention_factor: factor of the common grid the maps are resized to
            (16 = 32x32 at a 512 view).
        feature_blocks: up blocks whose outputs are the features (each L2-normalised,
            then concatenated).
        feature_factor: factor of the grid where features, prototypes and scores live.
        normalize_prototypes: cosine scores (ours) or the reference's dot product with
            the un-normalised prototype.
        background_threshold: pixels whose best score is below it are labelled
            background (-1; 255 in PNGs). ``None`` = every pixel gets a class.
        refine_steps: extra rounds where prototypes are recomputed from the current
            labelling (hard assignment) instead of the attention.
        long_vocabulary: how vocabularies that need several prompts are run.
            ``"batch"``: one UNet pass per prompt (batched); features are the mean over
            the passes. ``"shared-queries"``: one pass with the first prompt; the other
            prompts attend to that pass's stored queries of the captured layers (keys and
            values come only from the text), so 171 classes cost about what 10 do; an
            approximation, since later layers' queries saw only the first prompt.
    """

    size: int = 512
    window_overlap: float = 0.5
    timestep: int = 0
    seed: int = 0
    separator: str = " and "
    attention_mode: AttentionMode = "exp"
    attention_factors: tuple[int, ...] = (32, 64)
    attention_factor: int = 16
    feature_blocks: tuple[int, ...] = (1, 2)
    feature_factor: int = 8
    normalize_prototypes: bool = True
    background_threshold: float | None = None
    refine_steps: int = 0
    long_vocabulary: LongVocabulary = "batch"

    def replace(self, **changes) -> Preset:
        """A copy with ``changes`` applied (unknown names raise ``TypeError``)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> Preset:
        """Build from JSON-like values (lists become tuples); unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown preset field(s) {unknown}; known fields: {sorted(names)}")
        fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(**fixed)

    def check(self) -> None:
        """Raise ``ValueError`` naming the field when a value cannot work."""
        if self.size <= 0:
            raise ValueError(f"size must be positive, got {self.size}")
        if not 0.0 <= self.window_overlap < 1.0:
            raise ValueError(f"window_overlap must be in [0, 1), got {self.window_overlap}")
        if self.timestep < 0:
            raise ValueError(f"timestep must be >= 0, got {self.timestep}")
        if self.attention_mode not in ("exp", "softmax"):
            raise ValueError(f"attention_mode must be 'exp' or 'softmax', got {self.attention_mode!r}")
        if not self.attention_factors:
            raise ValueError("attention_factors is empty: name at least one cross-attention layer factor")
        if not self.feature_blocks:
            raise ValueError("feature_blocks is empty: name at least one up block")
        if self.long_vocabulary not in ("batch", "shared-queries"):
            raise ValueError(f"long_vocabulary must be 'batch' or 'shared-queries', got {self.long_vocabulary!r}")
        if self.refine_steps < 0:
            raise ValueError(f"refine_steps must be >= 0, got {self.refine_steps}")


PRESETS: dict[str, Preset] = {
    # Ours: reference layers for attention, raw decoder features of up_blocks[1] and
    # up_blocks[2] (the training-free counterpart of the reference's ODISE features),
    # cosine scores on a 1/8 grid.
    "default": Preset(),
    # The reference mask head: exp scores, 16x16 + 8x8 layers, 32x32 maps, dot product
    # with the un-normalised prototype; features on the same 1/16 grid as the maps.
    "reference": Preset(
        attention_mode="exp",
        attention_factors=(32, 64),
        attention_factor=16,
        feature_factor=16,
        normalize_prototypes=False,
        window_overlap=0.5,
    ),
}


def resolve_preset(preset: str | Preset | None, fallback: Preset) -> Preset:
    """A preset from a name, an instance, or ``None`` (= ``fallback``)."""
    if preset is None:
        return fallback
    if isinstance(preset, Preset):
        return preset
    try:
        return PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}") from None
