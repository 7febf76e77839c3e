"""The one image pipeline: decode a file, conform pixels to a model's input, read array layouts.

Training (`training.data`), the HTTP service and batch scoring all call these functions, so a file
becomes the same uint8 pixels on every path (no train/serve skew). Pure numpy + PIL, no torch.

Decoding (`read_image`, `open_image`): the formats in `DECODABLE_FORMATS` only (decoded in-process
by Pillow; EPS, for one, would start Ghostscript), the first frame, then one mode policy for every
mode PIL can produce (`to_grey_or_rgb`):

- grey stays grey: `1`, `L`, `LA`, `La` -> `L` (alpha dropped); a palette image (`P`, `PA`) whose
  palette holds only greys -> `L`;
- wide grey -> `L` by one rule: `I`, `I;16*` and `F` values are rounded, clipped at 0 and, when
  any exceeds 255, scaled from 0..65535 to 0..255 (`v * 255 // 65535`, i.e. the high byte);
  otherwise kept as 0..255 (PIL's own `convert("L")` would clip 16-bit values at 255);
- everything else -> `RGB` by PIL's `convert("RGB")`: `RGB`, `RGBA`/`RGBa`/`RGBX` (alpha dropped),
  colour palettes, `CMYK`, `YCbCr`, `LAB`, `HSV`.

Conforming (`conform`): RGB -> L by ITU-R 601-2 luma, bit-exact with PIL's `convert("L")`; L -> RGB
by channel replication; size by PIL bilinear resize to (H, W), aspect ratio not kept. Colour is
reduced before resizing (one plane, not three) and replicated after.

Errors are `ImageError` subclasses with one-line messages and no front-door wording (no HTTP
status, no CLI flag): each caller maps them to its own words.
"""

from __future__ import annotations

import io
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "DECODABLE_FORMATS",
    "IMAGE_EXTENSIONS",
    "BadImageArray",
    "ImageError",
    "ImageTooLarge",
    "SizeMismatch",
    "UndecodableImage",
    "check_shape",
    "conform",
    "conform_one",
    "hwc_to_chw",
    "image_to_chw",
    "luma",
    "npz_images",
    "npz_layout",
    "open_image",
    "read_image",
    "resize_plane",
    "to_grey_or_rgb",
    "to_uint8",
]

# Formats Pillow decodes in-process, and the file name endings that hold them.
DECODABLE_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "BMP", "WEBP", "GIF", "TIFF", "PPM", "TGA")
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {
        ".png",
        ".jpg",
        ".jpeg",
        ".bmp",
        ".webp",
        ".gif",
        ".tif",
        ".tiff",
        ".ppm",
        ".pgm",
        ".pbm",
        ".pnm",
        ".tga",
    }
)

_GREY_MODES = frozenset({"1", "L", "LA", "La"})
_PALETTE_MODES = frozenset({"P", "PA"})
_WIDE_GREY_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})


class ImageError(ValueError):
    """An image that cannot be read or conformed. The message is one line, without the caller's
    wording (which file or request index, which flag or parameter fixes it)."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))

    @property
    def message(self) -> str:
        return str(self)


class UndecodableImage(ImageError):
    """Empty, not an image, a format outside `DECODABLE_FORMATS`, or corrupt/truncated pixel data."""


class ImageTooLarge(ImageError):
    """More pixels than allowed (`limit` is None when PIL's own decompression-bomb guard fired)."""

    def __init__(self, message: str, *, width: int, height: int, limit: int | None) -> None:
        super().__init__(message)
        self.width, self.height, self.limit = width, height, limit


class SizeMismatch(ImageError):
    """An image of another size than the target, and resizing was not allowed.

    `index` is the image's position in the batch given to `conform`."""

    def __init__(self, *, index: int, width: int, height: int, target_width: int, target_height: int):
        super().__init__(f"{width}×{height} pixels but the target size is {target_width}×{target_height}")
        self.index, self.width, self.height = index, width, height
        self.target_width, self.target_height = target_width, target_height


class BadImageArray(ImageError):
    """An array that is not uint8 pixels 0..255 in a known layout, or a wrong target shape."""


def _short(exc: BaseException) -> str:
    return (" ".join(str(exc).split()) or type(exc).__name__)[:200]


# --------------------------------------------------------------------------- decoding


def _palette_is_colour(image: Image.Image) -> bool:
    palette = image.getpalette()
    if not palette:
        return False
    rgb = np.asarray(palette, dtype=np.int64).reshape(-1, 3)
    return bool(np.any(rgb[:, 0] != rgb[:, 1]) or np.any(rgb[:, 1] != rgb[:, 2]))


def _wide_grey(image: Image.Image) -> Image.Image:
    values = np.asarray(image)
    if values.dtype.kind == "f":
        values = np.rint(np.nan_to_num(values, nan=0.0, posinf=65535.0, neginf=0.0))
    wide = values.astype(np.float64).clip(0, 65535).astype(np.int64)
    top = 65535 if wide.max(initial=0) > 255 else 255
    return Image.fromarray((wide * 255 // top).astype(np.uint8), mode="L")


def to_grey_or_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> mode `L` or `RGB` by the module's one policy (see the module docstring)."""
    mode = image.mode
    if mode in ("L", "RGB"):
        return image
    if mode in _WIDE_GREY_MODES:
        return _wide_grey(image)
    if mode in _GREY_MODES or (mode in _PALETTE_MODES and not _palette_is_colour(image)):
        return image.getchannel("L") if mode == "La" else image.convert("L")
    return image.convert("RGB")


def open_image(source: bytes | str | os.PathLike[str], *, max_pixels: int | None = None) -> Image.Image:
    """One encoded image (file bytes or a path) -> a loaded PIL image in mode `L` or `RGB`.

    The size is checked against `max_pixels` from the header, before any pixel is decoded.
    Raises UndecodableImage, ImageTooLarge; OSError when a path cannot be read.
    """
    data = source if isinstance(source, bytes | bytearray | memoryview) else Path(source).read_bytes()
    if not data:
        raise UndecodableImage("empty file")
    try:
        image = Image.open(io.BytesIO(data), formats=DECODABLE_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(_short(exc), width=0, height=0, limit=None) from None
    except UnidentifiedImageError:
        raise UndecodableImage(f"not a decodable image (supported: {', '.join(DECODABLE_FORMATS)})") from None
    except Exception as exc:  # noqa: BLE001 - any parser failure is the file's fault
        raise UndecodableImage(f"not a decodable image ({_short(exc)})") from None
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLarge(
            f"{width}×{height} = {width * height} pixels exceeds the limit of {max_pixels}",
            width=width,
            height=height,
            limit=max_pixels,
        )
    try:
        image.load()
        return to_grey_or_rgb(image)
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(_short(exc), width=width, height=height, limit=None) from None
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt pixel data
        raise UndecodableImage(f"corrupt or truncated {image.format} ({_short(exc)})") from None


def image_to_chw(image: Image.Image) -> np.ndarray:
    """A PIL image in mode `L` or `RGB` -> `(C, H, W)` uint8, C 1 or 3."""
    pixels = np.asarray(image)
    if pixels.ndim == 2:
        return pixels[None].copy()
    return pixels.transpose(2, 0, 1).copy()


def read_image(source: bytes | str | os.PathLike[str], *, max_pixels: int | None = None) -> np.ndarray:
    """One encoded image (file bytes or a path) -> `(C, H, W)` uint8, C 1 or 3 (`open_image`)."""
    return image_to_chw(open_image(source, max_pixels=max_pixels))


# --------------------------------------------------------------------------- conforming


def luma(rgb: np.ndarray, axis: int = -1) -> np.ndarray:
    """ITU-R 601-2 luma of uint8 RGB along `axis`, bit-exact with PIL's `convert("L")`."""
    r, g, b = (np.take(rgb, i, axis=axis).astype(np.uint32) for i in range(3))
    # PIL's fixed-point form of L = 0.299 R + 0.587 G + 0.114 B, rounded.
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)


def resize_plane(plane: np.ndarray, height: int, width: int) -> np.ndarray:
    """`(H, W)` or `(H, W, 3)` uint8 -> `(height, width[, 3])` by PIL bilinear (antialiased)."""
    return np.asarray(Image.fromarray(plane).resize((width, height), Image.Resampling.BILINEAR))


def check_shape(shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """`(C, H, W)` with C 1 or 3 and positive ints, as plain ints; BadImageArray otherwise."""
    if (
        not isinstance(shape, tuple | list)
        or len(shape) != 3
        or not all(isinstance(d, int | np.integer) and not isinstance(d, bool) and d > 0 for d in shape)
        or shape[0] not in (1, 3)
    ):
        raise BadImageArray(f"shape must be (C, H, W) with C 1 or 3 and positive H, W, got {shape!r}")
    return int(shape[0]), int(shape[1]), int(shape[2])


def conform(images: np.ndarray, shape: tuple[int, int, int], *, resize: bool = True) -> np.ndarray:
    """`images: (N, C, H, W) uint8`, C 1 or 3 -> `(N, *shape)` uint8, C-contiguous.

    RGB -> L by `luma`, L -> RGB by replication, then (if `resize`) PIL bilinear resize to (H, W)
    without keeping the aspect ratio; without `resize` another size raises SizeMismatch. The same
    array comes back when nothing changes.
    """
    c_out, h_out, w_out = check_shape(shape)
    if images.ndim != 4 or images.dtype != np.uint8 or images.shape[1] not in (1, 3):
        raise BadImageArray(
            f"expected (N, C, H, W) uint8 images with C 1 or 3, got {images.dtype} {images.shape}"
        )
    x = images
    if x.shape[2:] != (h_out, w_out) and not resize:
        raise SizeMismatch(
            index=0, width=x.shape[3], height=x.shape[2], target_width=w_out, target_height=h_out
        )
    if x.shape[1] == 3 and c_out == 1:
        x = luma(x, axis=1)[:, None]  # fewer channels first: resize one plane, not three
    if x.shape[2:] != (h_out, w_out):
        if x.shape[1] == 1:
            x = np.stack([resize_plane(img[0], h_out, w_out) for img in x])[:, None]
        else:
            x = np.stack([resize_plane(img.transpose(1, 2, 0), h_out, w_out) for img in x]).transpose(
                0, 3, 1, 2
            )
    if x.shape[1] == 1 and c_out == 3:
        x = np.repeat(x, 3, axis=1)
    return np.ascontiguousarray(x)


def conform_one(
    image: np.ndarray, shape: tuple[int, int, int], *, resize: bool = True, index: int = 0
) -> tuple[np.ndarray, bool]:
    """One `(C, H, W)` uint8 image -> (`shape` uint8, whether it was resized). A SizeMismatch
    (without `resize`) carries `index`."""
    try:
        out = conform(image[None], shape, resize=resize)[0]
    except SizeMismatch as exc:
        raise SizeMismatch(
            index=index,
            width=exc.width,
            height=exc.height,
            target_width=exc.target_width,
            target_height=exc.target_height,
        ) from None
    return out, image.shape[1:] != tuple(shape[1:])


# --------------------------------------------------------------------------- arrays


def to_uint8(array: np.ndarray) -> np.ndarray:
    """Integer-valued arrays in 0..255 of any numeric dtype -> uint8; anything else BadImageArray."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool or not (
        np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
    ):
        raise BadImageArray(f"dtype {array.dtype} is not an image type, expected uint8 values 0..255")
    if array.size:
        low, high = array.min(), array.max()
        integral = np.issubdtype(array.dtype, np.integer) or bool(np.all(np.floor(array) == array))
        if not (np.isfinite(low) and np.isfinite(high) and low >= 0 and high <= 255 and integral):
            raise BadImageArray(
                f"non-uint8 values out of 0..255 (dtype {array.dtype}, min {low}, max {high}"
                f"{'' if integral else ', not all integers'}): scale images to uint8 0..255 first"
            )
    return array.astype(np.uint8)


def hwc_to_chw(pixels: np.ndarray) -> np.ndarray:
    """`(H, W)` or `(H, W, C)` uint8, C in 1..4 -> `(C', H, W)` with C' 1 or 3 (alpha dropped)."""
    if pixels.ndim == 2:
        return pixels[None]
    if pixels.ndim != 3 or pixels.shape[2] not in (1, 2, 3, 4):
        raise BadImageArray(f"pixels must be (H, W) or (H, W, C) with C 1..4, got {pixels.shape}")
    if pixels.shape[2] in (1, 2):  # L or LA
        return pixels[None, :, :, 0]
    return pixels[:, :, :3].transpose(2, 0, 1)  # RGB or RGBA


def npz_layout(array: np.ndarray) -> np.ndarray:
    """`(N, H, W)`, `(N, H, W, C)` or `(N, C, H, W)` with C in 1..4 -> `(N, C', H, W)`, C' 1 or 3
    (alpha dropped). A 4-d array is channels-last when its last axis is 1..4 and no larger than
    its second."""
    if array.ndim == 3:
        return array[:, None]
    if array.ndim != 4:
        raise BadImageArray(
            f"images array has ndim {array.ndim} (shape {array.shape}), "
            "expected (N, H, W), (N, H, W, C) or (N, C, H, W)"
        )
    first, last = array.shape[1], array.shape[3]
    channels_last = last in (1, 2, 3, 4) and (first not in (1, 2, 3, 4) or last <= first)
    if not channels_last and first not in (1, 2, 3, 4):
        raise BadImageArray(f"images shape {array.shape} has no channel axis of size 1, 3 or 4")
    nchw = array.transpose(0, 3, 1, 2) if channels_last else array
    if nchw.shape[1] in (1, 2):  # L or LA: drop alpha
        return nchw[:, :1]
    return nchw[:, :3]  # RGB or RGBA: drop alpha


def npz_images(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray | None]:
    """An .npz file -> (`(N, C, H, W)` uint8 C-contiguous images, its `labels` array or None).

    The images are the array `images`, or the file's only array; `labels` is read only beside
    `images`. Raises BadImageArray (content), OSError (file).
    """
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = list(archive.files)
            if "images" in keys:
                array = archive["images"]
            elif len(keys) == 1:
                array = archive[keys[0]]
            else:
                raise BadImageArray(
                    f"npz without images array (keys: {', '.join(keys) or 'none'}); "
                    "store the images under 'images' or as the only array"
                )
            labels = archive["labels"] if "labels" in keys and "images" in keys else None
    except (ValueError, EOFError, zlib.error, zipfile.BadZipFile) as exc:
        if isinstance(exc, BadImageArray):
            raise
        raise BadImageArray(f"not a readable npz file ({_short(exc)})") from None
    return np.ascontiguousarray(npz_layout(to_uint8(array))), labels
