import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from maskdiffusion.views import ImageLoadError, InputLimits, ViewLayout, load_image, upsample_rows


@pytest.mark.parametrize(
    "width, height", [(512, 512), (2048, 1024), (1024, 2048), (4000, 300), (300, 4000), (3, 5), (650, 512), (513, 700)]
)
def test_sliding_windows_cover_every_pixel_of_the_resized_image(width, height):
    layout = ViewLayout.for_image((width, height), size=128, unit=64, overlap=0.5)
    assert min(layout.height, layout.width) == 128
    assert layout.height % 64 == 0 and layout.width % 64 == 0
    covered = np.zeros((layout.height, layout.width), dtype=int)
    for top, left in layout.offsets:
        assert top % 64 == 0 and left % 64 == 0
        assert top + 128 <= layout.height and left + 128 <= layout.width
        covered[top : top + 128, left : left + 128] += 1
    assert covered.min() >= 1


def test_long_side_keeps_the_aspect_ratio_to_within_one_block():
    layout = ViewLayout.for_image((2048, 1024), size=512, unit=64, overlap=0.5)
    assert (layout.height, layout.width) == (512, 1024)
    assert len(layout.offsets) == 3


def test_zero_overlap_windows_do_not_overlap_when_they_tile():
    layout = ViewLayout.for_image((1536, 512), size=512, unit=64, overlap=0.0)
    assert [left for _, left in layout.offsets] == [0, 512, 1024]


def test_stitching_averages_overlaps_and_is_exact_for_constant_maps():
    layout = ViewLayout.for_image((640, 256), size=256, unit=64, overlap=0.5)
    views = len(layout.offsets)
    maps = torch.full((views, 2, 256 // 16, 256 // 16), 3.0)
    stitched = layout.stitch(maps, 16)
    assert stitched.shape == (2, 256 // 16, layout.width // 16)
    assert torch.allclose(stitched, torch.full_like(stitched, 3.0))


def test_stitch_log_is_log_of_mean_of_exp():
    layout = ViewLayout.for_image((640, 256), size=256, unit=64, overlap=0.5)
    gen = torch.Generator().manual_seed(0)
    logs = torch.randn(len(layout.offsets), 3, 16, 16, generator=gen, dtype=torch.float64) * 4
    expected = layout.stitch(logs.exp(), 16).log()
    torch.testing.assert_close(layout.stitch_log(logs, 16), expected)
    big = layout.stitch_log(logs.float() + 400.0, 16)  # exp would overflow float32
    assert torch.isfinite(big).all()
    torch.testing.assert_close(big.double() - 400.0, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size", [(37, 53), (300, 40), (16, 16), (5, 3)])
def test_row_band_upsampling_equals_full_bilinear_interpolation(size):
    grid = torch.randn(3, 8, 10)
    full = F.interpolate(grid[None], size=size, mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(upsample_rows(grid, size, slice(None)), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(upsample_rows(grid, size, slice(2, 4)), full[:, 2:4], rtol=1e-5, atol=1e-5)


def save(image, fmt="PNG", **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    buffer.seek(0)
    return buffer


def test_rgba_is_composited_on_white(tmp_path):
    pixels = np.zeros((4, 4, 4), dtype=np.uint8)
    pixels[..., 0] = 200
    pixels[:2, :, 3] = 255  # top half opaque red-ish, bottom half transparent
    path = tmp_path / "rgba.png"
    Image.fromarray(pixels, mode="RGBA").save(path)
    rgb = np.asarray(load_image(path))
    assert rgb.shape == (4, 4, 3)
    assert (rgb[:2] == [200, 0, 0]).all()
    assert (rgb[2:] == 255).all()


def test_grayscale_palette_and_cmyk_become_rgb(tmp_path):
    gray = Image.fromarray(np.full((3, 5), 77, dtype=np.uint8), mode="L")
    assert np.asarray(load_image(gray)).tolist() == [[[77, 77, 77]] * 5] * 3
    palette = Image.new("P", (4, 2))
    palette.putpalette([10, 20, 30] * 256)
    assert (np.asarray(load_image(palette)) == [10, 20, 30]).all()
    cmyk = Image.new("CMYK", (4, 2), (0, 255, 255, 0))  # pure red in CMYK
    path = tmp_path / "cmyk.jpg"
    cmyk.save(path)
    red = np.asarray(load_image(path)).astype(int)
    assert red[..., 0].min() > 200 and red[..., 1:].max() < 60


def test_sixteen_bit_png_is_scaled_to_eight_bits(tmp_path):
    values = np.array([[0, 32896, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    rgb = np.asarray(load_image(path))
    assert rgb[0, :, 0].tolist() == [0, 128, 255]


def test_exif_rotated_jpeg_is_turned_upright(tmp_path):
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)  # stored landscape, 40 wide
    pixels[:, :20] = 255  # left half white
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif.tobytes(), quality=95)
    upright = load_image(path)
    assert upright.size == (20, 40)  # portrait once rotated
    arr = np.asarray(upright).astype(int)
    assert arr[:15].mean() > 200 and arr[25:].mean() < 50  # white half now on top


def test_corrupt_file_error_names_the_file(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ImageLoadError, match=r"broken\.png"):
        load_image(path)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ImageLoadError, match=r"notes\.txt"):
        load_image(text)
    with pytest.raises(ImageLoadError, match="does not exist"):
        load_image(tmp_path / "missing.jpg")


def test_arrays_are_accepted_and_bad_arrays_explained():
    assert load_image(np.zeros((5, 6), dtype=np.uint8)).size == (6, 5)
    assert np.asarray(load_image(np.ones((2, 2, 3)))).max() == 255
    with pytest.raises(ImageLoadError, match="shape"):
        load_image(np.zeros((2, 2, 5), dtype=np.uint8))
    with pytest.raises(ImageLoadError, match="dtype"):
        load_image(np.zeros((2, 2), dtype=np.int32))
    with pytest.raises(ImageLoadError, match="unsupported"):
        load_image(42)


def png_header_only(path, width: int, height: int) -> None:
    """A PNG whose header claims ``width x height`` RGB pixels, with almost no data: a tiny file."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    row = zlib.compress(b"\x00" + b"\x00" * 3 * width)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", row) + chunk(b"IEND", b""))


@pytest.mark.parametrize("width, height", [(30000, 30000), (12000, 12000)])
def test_images_over_the_pixel_limit_are_refused_before_decoding(tmp_path, width, height):
    # 30000^2 is a PIL "decompression bomb"; 12000^2 is only over our limit. Neither is decoded.
    path = tmp_path / "huge.png"
    png_header_only(path, width, height)
    assert path.stat().st_size < 100_000
    with pytest.raises(ImageLoadError, match=r"huge\.png.*(megapixels|pixels)") as error:
        load_image(path)
    assert "downscale" in str(error.value)


def test_the_pixel_limit_can_be_raised_or_lowered():
    image = Image.new("RGB", (300, 200))
    with pytest.raises(ImageLoadError, match=r"0\.06 megapixels, over the limit of 0\.05"):
        load_image(image, limits=InputLimits(max_pixels=50_000))
    assert load_image(image, limits=InputLimits(max_pixels=60_000)).size == (300, 200)


@pytest.mark.parametrize("shape", [(1, 20000, 3), (4000, 16, 3)])
def test_thin_or_tall_images_are_refused_with_the_limit_and_how_to_crop(shape):
    with pytest.raises(ImageLoadError, match=r"aspect ratio of \d+\.\d:1, over the limit of 16:1.*crop"):
        load_image(np.zeros(shape, dtype=np.uint8))
    assert load_image(np.zeros((100, 1600, 3), dtype=np.uint8)).size == (1600, 100)  # 16:1 is allowed


def test_non_finite_arrays_and_empty_images_are_refused():
    bad = np.full((4, 4, 3), 0.5)
    bad[1, 2, 0] = np.nan
    with pytest.raises(ImageLoadError, match="NaN or infinite"):
        load_image(bad)
    bad[1, 2, 0] = np.inf
    with pytest.raises(ImageLoadError, match="NaN or infinite"):
        load_image(bad)
    with pytest.raises(ImageLoadError, match="empty"):
        load_image(Image.new("RGB", (0, 0)))


def test_premultiplied_alpha_modes_are_converted():
    for mode in ("La", "RGBa"):
        rgb = load_image(Image.new(mode, (3, 2)))
        assert rgb.mode == "RGB" and rgb.size == (3, 2)


def test_a_folder_given_as_an_image_is_named(tmp_path):
    with pytest.raises(ImageLoadError, match="is a folder"):
        load_image(tmp_path)
