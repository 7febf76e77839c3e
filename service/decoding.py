"""Images in, model input out: decode encoded files, then fit each model's input spec.

Decoding is model-independent (one request may be scored by several models): every file becomes a
PIL image in mode `L` or `RGB`, following training's image reader exactly (first frame; alpha
dropped; 16-bit greys scaled by their high byte; grey palettes stay grey). Fitting a model then:
RGB -> L by ITU-R 601-2 luma (PIL's `convert("L")`), L -> RGB by channel replication, and a size
check: a wrong size is 422 unless the caller asked for `resize`, then PIL bilinear resize to the
model's (H, W) without keeping aspect ratio, as training's `conform_images` does.

The decompression-bomb guard reads the header's size before any pixel is decoded.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from models.artifact import InputSpec
from service.errors import InvalidImage, PayloadTooLarge, Unprocessable, WrongImageSize

__all__ = ["ALLOWED_FORMATS", "DecodedBatch", "ModelInput", "decode_image", "fit_to_model"]

# Formats decoded in-process by Pillow alone (EPS, for one, would start Ghostscript: never).
ALLOWED_FORMATS = ("PNG", "JPEG", "BMP", "WEBP", "GIF", "TIFF", "PPM", "TGA")


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]


def _palette_is_colour(image: Image.Image) -> bool:
    palette = image.getpalette()
    if not palette:
        return False
    rgb = np.asarray(palette, dtype=np.int64).reshape(-1, 3)
    return bool(np.any(rgb[:, 0] != rgb[:, 1]) or np.any(rgb[:, 1] != rgb[:, 2]))


def _normalise_mode(image: Image.Image) -> Image.Image:
    """Any decoded mode -> `L` or `RGB`, as training's image reader does."""
    mode = image.mode
    if mode in ("L", "RGB"):
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        # PIL's convert("L") clips 16-bit values at 255; keep the high byte instead.
        wide = np.asarray(image).astype(np.int64)
        top = 65535 if wide.max(initial=0) > 255 else 255
        return Image.fromarray((wide.clip(0, top) * 255 // top).astype(np.uint8), mode="L")
    if mode in ("1", "LA", "P", "F") and not (mode == "P" and _palette_is_colour(image)):
        return image.convert("L")
    return image.convert("RGB")


def decode_image(data: bytes, index: int, max_pixels: int) -> Image.Image:
    """One encoded file -> a loaded PIL image in mode `L` or `RGB`.

    Raises InvalidImage (400) for bytes that are not a decodable image, PayloadTooLarge (413) for
    more than `max_pixels` pixels; messages name `images[index]`.
    """
    if not data:
        raise InvalidImage(f"images[{index}]: empty file")
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise PayloadTooLarge(f"images[{index}]: {_short(exc)}") from None
    except UnidentifiedImageError:
        raise InvalidImage(
            f"images[{index}]: not a decodable image (supported: {', '.join(ALLOWED_FORMATS)})"
        ) from None
    except Exception as exc:  # noqa: BLE001 - any parser failure is the file's fault
        raise InvalidImage(f"images[{index}]: not a decodable image ({_short(exc)})") from None
    width, height = image.size
    if width * height > max_pixels:
        raise PayloadTooLarge(
            f"images[{index}]: {width}×{height} = {width * height} pixels exceeds "
            f"max_image_pixels={max_pixels}"
        )
    try:
        image.load()
        return _normalise_mode(image)
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt pixel data
        raise InvalidImage(f"images[{index}]: corrupt or truncated {image.format} ({_short(exc)})") from None


@dataclass(frozen=True)
class DecodedBatch:
    """A request's images, model-independent: decoded files, or one raw `(N, H, W, C)` uint8 array."""

    images: tuple[Image.Image, ...] = ()
    array: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.images) if self.array is None else int(self.array.shape[0])


@dataclass(frozen=True)
class ModelInput:
    images: np.ndarray  # (N, C, H, W) uint8 at the model's input shape
    resized: tuple[bool, ...]


def _luma(rgb: np.ndarray) -> np.ndarray:
    """`(..., 3)` uint8 -> `(...)` ITU-R 601-2 luma, bit-exact with PIL's `convert("L")`."""
    r, g, b = (rgb[..., i].astype(np.uint32) for i in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)


def _size_error(what: str, width: int, height: int, spec: InputSpec, model: str) -> WrongImageSize:
    return WrongImageSize(
        f"{what}: {width}×{height} pixels but model '{model}' takes {spec.width}×{spec.height}; "
        "send resize=true to have the service resize it"
    )


def _fit_image(
    image: Image.Image, spec: InputSpec, resize: bool, index: int, model: str
) -> tuple[np.ndarray, bool]:
    if spec.colour == "L" and image.mode != "L":
        image = image.convert("L")  # fewer channels first: resize one plane, not three
    resized = False
    if image.size != (spec.width, spec.height):
        if not resize:
            raise _size_error(f"images[{index}]", image.size[0], image.size[1], spec, model)
        image = image.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
        resized = True
    pixels = np.asarray(image)
    if pixels.ndim == 2:
        pixels = pixels[None]
        if spec.channels == 3:
            pixels = np.repeat(pixels, 3, axis=0)
    else:
        pixels = pixels.transpose(2, 0, 1)
    return pixels, resized


def _fit_array(array: np.ndarray, spec: InputSpec, resize: bool, model: str) -> tuple[np.ndarray, bool]:
    """`(N, H, W, C)` uint8, C 1 or 3 -> `(N, C', H', W')` for the model."""
    n, height, width, channels = array.shape
    x = array
    if channels == 3 and spec.channels == 1:
        x = _luma(x)[..., None]
    resized = False
    if (height, width) != (spec.height, spec.width):
        if not resize:
            raise _size_error("array images", width, height, spec, model)
        size = (spec.width, spec.height)
        planes = [
            np.asarray(
                Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).resize(
                    size, Image.Resampling.BILINEAR
                )
            )
            for img in x
        ]
        x = np.stack(planes)
        if x.ndim == 3:
            x = x[..., None]
        resized = True
    if x.shape[-1] == 1 and spec.channels == 3:
        x = np.repeat(x, 3, axis=-1)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)), resized


def fit_to_model(batch: DecodedBatch, spec: InputSpec, resize: bool, model: str) -> ModelInput:
    """Convert colour and check (or, with `resize`, fix) the size for one model's input spec."""
    if spec.channels not in (1, 3):
        raise Unprocessable(f"model '{model}' takes {spec.channels} channels; the service handles 1 or 3")
    if batch.array is not None:
        images, resized = _fit_array(batch.array, spec, resize, model)
        return ModelInput(images, (resized,) * len(images))
    fitted = [_fit_image(image, spec, resize, i, model) for i, image in enumerate(batch.images)]
    return ModelInput(np.stack([f[0] for f in fitted]), tuple(f[1] for f in fitted))
