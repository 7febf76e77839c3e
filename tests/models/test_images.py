"""`models.images`, the one image pipeline: the mode policy, decoding errors, conforming, layouts.

The cross-path check (training loader = HTTP service = score-batch, on real files of every mode) is
tests/service/test_image_paths.py.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from models.images import (
    IMAGE_EXTENSIONS,
    BadImageArray,
    ImageTooLarge,
    SizeMismatch,
    UndecodableImage,
    conform,
    conform_one,
    image_to_chw,
    luma,
    npz_layout,
    read_image,
    to_grey_or_rgb,
    to_uint8,
)

RNG = np.random.default_rng(3)
RGB = RNG.integers(0, 256, (12, 10, 3), dtype=np.uint8)
GREY = RNG.integers(0, 256, (12, 10), dtype=np.uint8)

GREY_MODES = ["1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"]
COLOUR_MODES = ["RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"]


@pytest.mark.parametrize("mode", GREY_MODES + COLOUR_MODES)
def test_every_mode_becomes_grey_or_rgb(mode: str) -> None:
    image = (
        Image.fromarray(RGB).convert("RGBA").convert(mode)
        if mode not in ("La", "I;16N", "I;16L", "I;16B", "HSV", "LAB")
        else Image.new(mode, (10, 12))
    )
    out = to_grey_or_rgb(image)
    assert out.mode == ("L" if mode in GREY_MODES else "RGB")
    assert image_to_chw(out).shape == ((1 if mode in GREY_MODES else 3), 12, 10)


def test_palettes_follow_their_colours() -> None:
    grey_palette = Image.fromarray(GREY).convert("P")
    colour_palette = Image.fromarray(RGB).quantize(16)
    assert to_grey_or_rgb(grey_palette).mode == "L"
    np.testing.assert_array_equal(
        np.asarray(to_grey_or_rgb(grey_palette)), np.asarray(grey_palette.convert("L"))
    )
    assert to_grey_or_rgb(colour_palette).mode == "RGB"
    assert to_grey_or_rgb(colour_palette.convert("PA")).mode == "RGB"
    assert to_grey_or_rgb(grey_palette.convert("PA")).mode == "L"


def test_float_and_integer_modes_share_one_policy() -> None:
    """`F`, `I` and `I;16` images of the same values give the same grey pixels: 16-bit ranges keep
    the high byte, 8-bit ranges stay as they are (PIL's own convert("L") would clip or differ)."""
    values = np.add.outer(np.arange(16), np.arange(16)).astype(np.int64) * 250  # up to 7500
    for scale, top in ((1, 65535), (1 / 30, 255)):
        v = np.round(values * scale)
        as_int = image_to_chw(to_grey_or_rgb(Image.fromarray(v.astype(np.int32), mode="I")))
        as_float = image_to_chw(to_grey_or_rgb(Image.fromarray(v.astype(np.float32), mode="F")))
        as_16 = image_to_chw(to_grey_or_rgb(Image.fromarray(v.astype(np.uint16))))
        np.testing.assert_array_equal(as_int, as_float)
        np.testing.assert_array_equal(as_int, as_16)
        np.testing.assert_array_equal(as_int[0], (v.astype(np.int64) * 255 // top).astype(np.uint8))


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_decoding_errors_are_typed_and_one_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UndecodableImage, match="empty"):
        read_image(b"")
    with pytest.raises(UndecodableImage, match="not a decodable image"):
        read_image(b"GIF89a garbage")
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
    with pytest.raises(UndecodableImage):  # never handed to Ghostscript
        read_image(eps)
    with pytest.raises(UndecodableImage, match="truncated"):
        read_image(_png(RGB)[:80])
    with pytest.raises(ImageTooLarge) as info:
        read_image(_png(GREY), max_pixels=100)
    assert (info.value.width, info.value.height, info.value.limit) == (10, 12, 100)
    assert "\n" not in str(info.value)
    path = tmp_path / "x.png"
    path.write_bytes(_png(RGB))
    np.testing.assert_array_equal(read_image(path), RGB.transpose(2, 0, 1))
    assert {".pnm", ".tga", ".webp", ".tif"} <= IMAGE_EXTENSIONS


def test_conform_is_pil_bit_for_bit() -> None:
    chw = np.ascontiguousarray(RGB.transpose(2, 0, 1)[None])
    np.testing.assert_array_equal(luma(RGB), np.asarray(Image.fromarray(RGB).convert("L")))
    grey = conform(chw, (1, 7, 9))[0, 0]
    np.testing.assert_array_equal(
        grey, np.asarray(Image.fromarray(RGB).convert("L").resize((9, 7), Image.Resampling.BILINEAR))
    )
    colour = conform(GREY[None, None], (3, 12, 10))
    assert colour.shape == (1, 3, 12, 10) and all(np.array_equal(colour[0, k], GREY) for k in range(3))
    assert conform(chw, (3, 12, 10)) is chw  # nothing to do: the same array
    with pytest.raises(SizeMismatch) as info:
        conform_one(chw[0], (3, 7, 9), resize=False, index=4)
    assert (info.value.index, info.value.width, info.value.height) == (4, 10, 12)
    out, resized = conform_one(chw[0], (1, 7, 9))
    assert resized and out.shape == (1, 7, 9)


def test_array_layouts_and_dtypes() -> None:
    nhwc = RNG.integers(0, 256, (2, 5, 6, 4), dtype=np.uint8)
    assert npz_layout(nhwc).shape == (2, 3, 5, 6)  # alpha dropped
    assert npz_layout(nhwc.transpose(0, 3, 1, 2)).shape == (2, 3, 5, 6)
    assert npz_layout(nhwc[..., :2]).shape == (2, 1, 5, 6)
    assert npz_layout(nhwc[..., 0]).shape == (2, 1, 5, 6)
    with pytest.raises(BadImageArray):
        npz_layout(np.zeros((2, 7, 7, 7), np.uint8))
    assert to_uint8(np.array([0.0, 255.0])).dtype == np.uint8
    with pytest.raises(BadImageArray, match="out of 0..255"):
        to_uint8(np.array([0.5, 300.0]))
    with pytest.raises(BadImageArray):
        to_uint8(np.array([True]))
