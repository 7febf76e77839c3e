"""Decoding and fitting agree with training's image reader, mode by mode."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.artifact import InputSpec
from service.decoding import DecodedBatch, decode_image, fit_to_model
from service.errors import InvalidImage, PayloadTooLarge, WrongImageSize
from training.data import _read_image_file, conform_images

RNG = np.random.default_rng(5)
RGB = RNG.integers(0, 256, (12, 10, 3), dtype=np.uint8)
GREY = RNG.integers(0, 256, (12, 10), dtype=np.uint8)


def _image(mode: str) -> Image.Image:
    if mode == "RGB":
        return Image.fromarray(RGB)
    if mode == "RGBA":
        return Image.fromarray(np.dstack([RGB, np.full((12, 10), 128, np.uint8)]))
    if mode == "L":
        return Image.fromarray(GREY)
    if mode == "LA":
        return Image.fromarray(GREY).convert("LA")
    if mode == "P-grey":
        return Image.fromarray(GREY).convert("P")  # an all-grey palette
    if mode == "P-colour":
        return Image.fromarray(RGB).quantize(16)
    if mode == "I;16":
        return Image.fromarray(GREY.astype(np.uint16) * 257)  # 16-bit grey
    if mode == "1":
        return Image.fromarray(GREY > 128)
    raise ValueError(mode)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P-grey", "P-colour", "I;16", "1"])
@pytest.mark.parametrize("colour", ["L", "RGB"])
def test_matches_training_reader(tmp_path: Path, mode: str, colour: str) -> None:
    path = tmp_path / "x.png"
    _image(mode).save(path)
    trained = _read_image_file(path)  # (C, H, W) as training reads it
    expected = conform_images(trained[None], (1 if colour == "L" else 3, 12, 10))[0]
    decoded = decode_image(path.read_bytes(), 0, 10_000)
    spec = InputSpec(channels=1 if colour == "L" else 3, height=12, width=10, colour=colour)
    fitted = fit_to_model(DecodedBatch(images=(decoded,)), spec, resize=False, model="m")
    np.testing.assert_array_equal(fitted.images[0], expected)


@pytest.mark.parametrize("colour", ["L", "RGB"])
def test_resize_matches_training_conform(colour: str) -> None:
    spec = InputSpec(channels=1 if colour == "L" else 3, height=7, width=9, colour=colour)
    expected = conform_images(RGB.transpose(2, 0, 1)[None], spec.shape)[0]
    buffer = io.BytesIO()
    Image.fromarray(RGB).save(buffer, format="PNG")
    decoded = decode_image(buffer.getvalue(), 0, 10_000)
    from_file = fit_to_model(DecodedBatch(images=(decoded,)), spec, resize=True, model="m")
    from_array = fit_to_model(DecodedBatch(array=RGB.transpose(2, 0, 1)[None]), spec, resize=True, model="m")
    np.testing.assert_array_equal(from_file.images[0], expected)
    np.testing.assert_array_equal(from_array.images[0], expected)
    assert from_file.resized == (True,) and from_array.resized == (True,)
    with pytest.raises(WrongImageSize):
        fit_to_model(DecodedBatch(array=RGB.transpose(2, 0, 1)[None]), spec, resize=False, model="m")


def test_limits_and_garbage() -> None:
    buffer = io.BytesIO()
    Image.fromarray(GREY).save(buffer, format="PNG")
    with pytest.raises(PayloadTooLarge, match="max_image_pixels=100"):
        decode_image(buffer.getvalue(), 3, 100)
    with pytest.raises(InvalidImage, match=r"images\[2\]"):
        decode_image(b"GIF89a garbage", 2, 100)
    with pytest.raises(InvalidImage, match="empty"):
        decode_image(b"", 0, 100)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
    with pytest.raises(InvalidImage):  # never handed to Ghostscript
        decode_image(eps, 0, 100)
