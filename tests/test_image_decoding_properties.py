"""Property-based tests: any bytes or array handed to ``load_image`` give an RGB image or an ImageLoadError."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from maskdiffusion.views import ImageLoadError, InputLimits, load_image

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SMALL = InputLimits(max_pixels=1_000_000, max_aspect=16.0)


def encoded(format_name: str, mode: str, size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color=None).save(buffer, format=format_name)
    return buffer.getvalue()


VALID = [
    encoded("PNG", "RGB", (13, 7)),
    encoded("PNG", "RGBA", (5, 9)),
    encoded("PNG", "P", (8, 8)),
    encoded("PNG", "I;16", (6, 4)),
    encoded("JPEG", "RGB", (16, 16)),
    encoded("JPEG", "CMYK", (9, 9)),
    encoded("GIF", "P", (7, 3)),
    encoded("BMP", "RGB", (4, 4)),
    encoded("TIFF", "RGB", (5, 5)),
    encoded("WEBP", "RGB", (6, 6)),
]


def outcome(source, tmp_path, name="input.bin"):
    """What load_image does with ``source``: ``"image"`` or ``"refused"``; anything else fails the test."""
    if isinstance(source, bytes):
        path = tmp_path / name
        path.write_bytes(source)
        source = path
    try:
        image = load_image(source, limits=SMALL)
    except ImageLoadError as error:
        text = str(error)
        assert text and len(text) < 600, text
        if isinstance(source, (str, type(tmp_path))):
            assert name in text  # the message names the file
        return "refused"
    assert image.mode == "RGB" and image.width >= 1 and image.height >= 1
    return "image"


@SETTINGS
@given(data=st.binary(max_size=4096))
def test_arbitrary_bytes_never_escape_as_another_exception(tmp_path, data):
    outcome(data, tmp_path)


@SETTINGS
@given(
    which=st.sampled_from(range(len(VALID))),
    cut=st.integers(min_value=0, max_value=4096),
    flips=st.lists(st.tuples(st.integers(min_value=0, max_value=4095), st.integers(0, 255)), max_size=8),
)
def test_truncated_or_corrupted_real_files_are_images_or_named_refusals(tmp_path, which, cut, flips):
    data = bytearray(VALID[which][:cut] if cut < len(VALID[which]) else VALID[which])
    for position, value in flips:
        if data:
            data[position % len(data)] = value
    outcome(bytes(data), tmp_path)


def test_every_valid_format_decodes():
    for data in VALID:
        assert load_image(Image.open(io.BytesIO(data))).mode == "RGB"


@SETTINGS
@given(
    array=hnp.arrays(
        dtype=st.sampled_from([np.uint8, np.float32, np.float64, np.int16, np.bool_, np.complex64]),
        shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=12),
        elements=None,
    )
)
def test_arbitrary_arrays_are_images_or_refusals(tmp_path, array):
    outcome(array, tmp_path)


@pytest.mark.parametrize("value", [None, "", 3.5, object(), [[1, 2], [3, 4]]])
def test_other_python_values_are_refused(value, tmp_path):
    with pytest.raises(ImageLoadError):
        load_image(value)
