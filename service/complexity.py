"""Input complexity for the `complexity` OOD statistic (Serrà et al. 2020).

L(x) is the PNG code length of the image the model scores (after colour conversion and resize),
at the strongest compression level, in bits per dimension: `8 · len(PNG) / D`.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

__all__ = ["png_bits_per_dim"]


def png_bits_per_dim(images: np.ndarray) -> np.ndarray:
    """`images: (N, C, H, W) uint8`, C 1 or 3 -> `(N,)` float64 PNG bits per dimension."""
    if images.ndim != 4 or images.shape[1] not in (1, 3) or images.dtype != np.uint8:
        raise ValueError(f"expected (N, C, H, W) uint8 with C 1 or 3, got {images.dtype} {images.shape}")
    _, c, h, w = images.shape
    out = np.empty(len(images), dtype=np.float64)
    for i, image in enumerate(images):
        plane = image[0] if c == 1 else image.transpose(1, 2, 0)
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(plane)).save(buffer, format="PNG", compress_level=9)
        out[i] = 8.0 * buffer.getbuffer().nbytes / (c * h * w)
    return out
