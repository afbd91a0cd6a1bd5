"""A model folder's own settings file, ``maskdiffusion.json``: preset overrides and the model card.

Read by :mod:`maskdiffusion.loading` when a model is loaded and written by
:mod:`maskdiffusion.tiny` when it builds one, so it sits below both.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .prompts import ClassName, read_small_text, shorten

SETTINGS_FILE = "maskdiffusion.json"  # optional: preset overrides and the model card
MAX_SETTINGS_BYTES = 1 << 20  # a settings file is a few hundred bytes; refuse anything past 1 MiB


@dataclass(frozen=True)
class ModelCard:
    """What a model folder says about itself in ``maskdiffusion.json``, so results can say it too.

    Attributes:
        random_weights: the weights are random (``tiny-random``): outputs exercise the
            code and mean nothing.
        vocabulary: the words the model was trained on (the bundled toy model's world);
            ``None`` = an open vocabulary (Stable Diffusion).
        attention_calibration: word -> the mean attention probability the model gives that
            word over unlabelled images of its domain (measured once, no labels), for
            ``Preset.attention_normalization="calibrated"``; ``None`` = not measured.
        text_length: T5 tokens per prompt this model was trained with, where not its family's
            (the bundled toy transformer has no T5: 0); ``None`` = the family's.
    """

    random_weights: bool = False
    vocabulary: tuple[str, ...] | None = None
    attention_calibration: dict[str, float] | None = None
    text_length: int | None = None

    def class_scale(self, vocabulary: Sequence[ClassName]) -> torch.Tensor:
        """``(C,)`` calibration divisors: the mean over a class's words that were measured.

        A class none of whose words was measured gets the geometric mean of all measured
        words (no correction either way). Raises ``ValueError`` when nothing was measured.
        """
        if not self.attention_calibration:
            raise ValueError(
                'attention_normalization "calibrated" needs the model\'s "attention_calibration" in its '
                "maskdiffusion.json; use 'probabilities' for this model"
            )
        table = {" ".join(w.casefold().split()): v for w, v in self.attention_calibration.items()}
        neutral = math.exp(sum(math.log(v) for v in table.values()) / len(table))
        scales = []
        for cls in vocabulary:
            known = [table[k] for k in (" ".join(w.casefold().split()) for w in cls.synonyms) if k in table]
            scales.append(sum(known) / len(known) if known else neutral)
        return torch.tensor(scales, dtype=torch.float32)


def json_kind(value: object) -> str:
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "true/false", type(None): "null"}
    return kinds.get(type(value), "a number")


def read_settings(folder: Path) -> dict:
    """The folder's ``maskdiffusion.json`` as a dict (``{}`` when absent); every error names the file.

    Top-level keys read here: ``"presets"`` (see :func:`model_presets`), ``"random_weights"``
    and ``"vocabulary"`` (see :func:`model_card`); others are notes and ignored.
    """
    path = Path(folder) / SETTINGS_FILE
    if not path.exists():
        return {}
    text = read_small_text(
        path, what="model settings file", limit=MAX_SETTINGS_BYTES, hint="fix or remove it", error=ValueError
    )
    try:
        settings = json.loads(text)
    except RecursionError:
        raise ValueError(f"model settings file {str(path)!r} nests too deeply: fix or remove it") from None
    except ValueError as error:  # JSONDecodeError, or a number too long to convert
        where = f" at line {error.lineno}, column {error.colno}" if isinstance(error, json.JSONDecodeError) else ""
        reason = error.msg if isinstance(error, json.JSONDecodeError) else str(error)
        raise ValueError(
            f"model settings file {str(path)!r} is not valid JSON ({reason}{where}): fix or remove it"
        ) from None
    if not isinstance(settings, dict):
        raise ValueError(
            f'model settings file {str(path)!r} must hold a JSON object like {{"presets": {{...}}}}, '
            f"not {json_kind(settings)}"
        )
    return settings


def model_card(folder: Path, settings: dict | None = None) -> ModelCard:
    """The folder's :class:`ModelCard` from the top-level ``"random_weights"`` and ``"vocabulary"`` keys."""
    settings = read_settings(folder) if settings is None else settings
    where = f"model settings file {str(Path(folder) / SETTINGS_FILE)!r}"
    random_weights = settings.get("random_weights", False)
    if not isinstance(random_weights, bool):
        raise ValueError(f'{where}: "random_weights" must be true or false, got {shorten(random_weights)}')
    vocabulary = settings.get("vocabulary")
    if vocabulary is not None:
        if not isinstance(vocabulary, list) or not all(isinstance(w, str) and w.strip() for w in vocabulary):
            raise ValueError(
                f'{where}: "vocabulary" must be a list of non-empty words (or absent: an open vocabulary), '
                f"got {shorten(vocabulary)}"
            )
        vocabulary = tuple(vocabulary)
    calibration = settings.get("attention_calibration")
    if calibration is not None:
        valid = isinstance(calibration, dict) and calibration
        if not (valid and all(_is_real(v) and 0 < v < math.inf for v in calibration.values())):
            raise ValueError(
                f'{where}: "attention_calibration" must map words to positive numbers, got {shorten(calibration)}'
            )
        calibration = {str(word): float(value) for word, value in calibration.items()}
    text_length = settings.get("text_length")
    if text_length is not None and not (isinstance(text_length, int) and not isinstance(text_length, bool)
                                        and 0 <= text_length <= 4096):  # fmt: skip
        raise ValueError(
            f'{where}: "text_length" must be a whole number of tokens from 0 to 4096, got {shorten(text_length)}'
        )
    return ModelCard(
        random_weights=random_weights,
        vocabulary=vocabulary,
        attention_calibration=calibration,
        text_length=text_length,
    )


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
