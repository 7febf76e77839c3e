"""The HTTP wording of the image pipeline: decode request files and fit them to a model.

Decoding and conforming are `models.images` (the code training and batch scoring run); this module
maps its errors to the service's: an undecodable, empty or truncated file is 400 `invalid_image`,
more than `max_image_pixels` pixels 413, a wrong size without `resize=true` 422
`wrong_image_size`. Messages name the image (`images[i]`, or `array images`).
"""

from __future__ import annotations

import numpy as np

from models.artifact import InputSpec
from models.images import ImageTooLarge, SizeMismatch, UndecodableImage, read_image
from service.core.inputs import DecodedBatch, ModelInput, UnsupportedInput
from service.core.inputs import fit_to_model as core_fit_to_model
from service.errors import InvalidImage, PayloadTooLarge, Unprocessable, WrongImageSize

__all__ = ["DecodedBatch", "ModelInput", "decode_image", "fit_to_model"]


def decode_image(data: bytes, index: int, max_pixels: int) -> np.ndarray:
    """One encoded file -> `(C, H, W)` uint8, C 1 or 3 (`models.images.read_image`).

    Raises InvalidImage (400) for bytes that are not a decodable image, PayloadTooLarge (413) for
    more than `max_pixels` pixels; messages name `images[index]`.
    """
    try:
        return read_image(data, max_pixels=max_pixels)
    except ImageTooLarge as exc:
        if exc.limit is None:  # PIL's own decompression-bomb guard
            raise PayloadTooLarge(f"images[{index}]: {exc}") from None
        raise PayloadTooLarge(
            f"images[{index}]: {exc.width}×{exc.height} = {exc.width * exc.height} pixels exceeds "
            f"max_image_pixels={max_pixels}"
        ) from None
    except UndecodableImage as exc:
        raise InvalidImage(f"images[{index}]: {exc}") from None


def fit_to_model(batch: DecodedBatch, spec: InputSpec, resize: bool, model: str) -> ModelInput:
    """Convert colour and check (or, with `resize`, fix) the size for one model's input spec."""
    try:
        return core_fit_to_model(batch, spec, resize)
    except UnsupportedInput:
        raise Unprocessable(
            f"model '{model}' takes {spec.channels} channels; the service handles 1 or 3"
        ) from None
    except SizeMismatch as exc:
        what = "array images" if batch.array is not None else f"images[{exc.index}]"
        raise WrongImageSize(
            f"{what}: {exc.width}×{exc.height} pixels but model '{model}' takes {spec.width}×{spec.height}; "
            "send resize=true to have the service resize it"
        ) from None
