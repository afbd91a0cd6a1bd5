"""Preset values are checked where presets are built: type, range, and a message naming the field."""

import dataclasses
import math

import numpy as np
import pytest

from maskdiffusion.presets import MAX_REFINE_STEPS, MAX_SIZE, PRESETS, Preset, resolve_preset

DEFAULT = PRESETS["default"]


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"size": "big"}, r"size must be a whole number of pixels from 8 to 2048, got 'big'"),
        ({"size": True}, r"size must be a whole number"),  # bool is not an int
        ({"size": 512.0}, r"size must be a whole number"),  # nor is a float
        ({"size": 8192}, r"size must be .* to 2048, got 8192"),
        ({"size": 0}, r"size must be"),
        ({"size": 100}, r"size 100 is not a multiple of 8.*multiple of 64 for Stable Diffusion.*128"),
        ({"timestep": 10**6}, r"timestep must be a whole number from 0 to 999, got 1000000"),
        ({"timestep": 1000}, r"timestep .* 0 to 999"),
        ({"timestep": -1}, r"timestep .* 0 to 999"),
        ({"refine_steps": 10**9}, r"refine_steps must be a whole number from 0 to 100, got 1000000000"),
        ({"refine_steps": 1.5}, r"refine_steps must be a whole number"),
        ({"window_overlap": 1.0}, r"window_overlap must be a fraction in \[0, 1\), got 1.0"),
        ({"window_overlap": math.nan}, r"window_overlap .* got nan"),
        ({"window_overlap": "0.5"}, r"window_overlap .* got '0.5'"),
        (
            {"refine_steps": 0, "background_threshold": 2.0},
            r"background_threshold .*cosine scores lie in \[-1, 1\].*got 2.0",
        ),
        ({"refine_steps": 0, "background_threshold": -1.5}, r"cosine scores lie in \[-1, 1\]"),
        ({"background_threshold": 1.5}, r"background_threshold .*EM posteriors lie in \[0, 1\].*got 1.5"),
        ({"background_threshold": math.inf}, r"background_threshold must be a finite number or None"),
        ({"background_threshold": math.nan}, r"background_threshold must be a finite number"),
        ({"background_threshold": False}, r"background_threshold must be a finite number"),
        ({"attention_factors": ()}, r"attention_factors must be a list of 1 to 16"),
        ({"attention_factors": (32, "64")}, r"attention_factors must be distinct down-sampling factors"),
        ({"attention_factors": (32, 32)}, r"attention_factors must be distinct"),
        ({"attention_factors": (1024,)}, r"attention_factors .* from 1 to size \(512\)"),
        ({"attention_factors": 32}, r"attention_factors must be a list"),
        ({"attention_factor": 0}, r"attention_factor must be a down-sampling factor from 1 to size"),
        ({"feature_factor": 8.0}, r"feature_factor must be"),
        ({"feature_blocks": (-1,)}, r"feature_blocks must be distinct block indices from 0 to 127"),
        ({"feature_blocks": (True,)}, r"feature_blocks must be distinct"),
        ({"scoring": "cos"}, r"scoring must be 'cosine' or 'dot' or 'poe' or 'attention', got 'cos'"),
        ({"attention_mode": "exp"}, r"attention_normalization must be 'max' with .*softmax"),
        ({"attention_mode": "softmax", "attention_normalization": "none"}, r"attention_normalization must be 'max'"),
        ({"class_presence": True}, r"class_presence must be 'all' or 'support'"),
        ({"presence_min_cells": 0}, r"presence_min_cells must be a whole number of cells from 1"),
        ({"prototype_cells": "some"}, r"prototype_cells must be 'all' or 'confident'"),
        ({"poe_weight": -0.1}, r"poe_weight must be a number from 0 to 1000"),
        ({"em_concentration": float("nan")}, r"em_concentration must be a number from 0"),
        ({"refinement": "soft"}, r"refinement must be 'hard' or 'em'"),
        ({"refinement": "em", "refine_steps": 3, "background_threshold": 1.5}, r"EM posteriors lie in \[0, 1\]"),
        ({"attention_mode": "EXP"}, r"attention_mode must be 'exp' or 'softmax', got 'EXP'"),
        ({"long_vocabulary": ["batch"]}, r"long_vocabulary must be 'batch' or 'shared-queries'"),
        ({"separator": 3}, r"separator must be text of at most 100 characters"),
        ({"seed": -1}, r"seed must be a whole number from 0"),
    ],
)
def test_bad_values_are_refused_naming_field_value_and_range(changes, message):
    with pytest.raises(ValueError, match=message):
        DEFAULT.replace(**changes)
    with pytest.raises(ValueError, match=message):
        Preset.from_dict({**DEFAULT.to_dict(), **changes})


def test_limits_themselves_are_accepted():
    assert DEFAULT.replace(size=MAX_SIZE, timestep=999, refine_steps=MAX_REFINE_STEPS).size == MAX_SIZE
    cosine = DEFAULT.replace(refine_steps=0)
    assert cosine.replace(background_threshold=-1).background_threshold == -1.0
    assert cosine.replace(background_threshold=1).background_threshold == 1.0
    assert DEFAULT.replace(background_threshold=0).background_threshold == 0.0  # EM posteriors: [0, 1]
    # the dot-product scores of the reference head are not bounded: any finite threshold
    assert PRESETS["reference"].replace(background_threshold=250.0).background_threshold == 250.0


def test_json_and_numpy_values_are_normalised():
    preset = Preset.from_dict({"size": np.int64(256), "attention_factors": [16, np.int32(32)], "window_overlap": 0})
    assert preset.size == 256 and type(preset.size) is int
    assert preset.attention_factors == (16, 32) and all(type(f) is int for f in preset.attention_factors)
    assert preset.window_overlap == 0.0 and type(preset.window_overlap) is float
    assert hash(preset) == hash(Preset.from_dict(preset.to_dict()))


def test_long_values_are_shortened_in_messages():
    with pytest.raises(ValueError) as error:
        DEFAULT.replace(attention_mode="x" * 10_000)
    assert len(str(error.value)) < 200 and "10,000 characters" in str(error.value)
    with pytest.raises(ValueError) as error:
        Preset.from_dict({"y" * 10_000: 1})
    known = ", ".join(f.name for f in dataclasses.fields(Preset))  # the message lists them for the fix
    assert len(str(error.value)) < 200 + len(known) and "unknown preset field" in str(error.value)


@pytest.mark.parametrize("values", [[["size", 64]], "size=64", None, 3])
def test_a_preset_that_is_not_an_object_is_refused(values):
    with pytest.raises(ValueError, match="a preset must be an object of field values"):
        Preset.from_dict(values)


@pytest.mark.parametrize("name", [["default"], 3, "fastest"])
def test_unknown_preset_names_are_value_errors(name):
    with pytest.raises(ValueError, match="unknown preset"):
        resolve_preset(name, DEFAULT)
