"""Decoded images -> one model's input, by `models.images` (the pipeline training uses too).

Decoding is model-independent (one request or input row may be scored by several models): a
`DecodedBatch` holds images as `(C, H, W)` uint8 arrays (C 1 or 3), one per file, or one raw
`(N, C, H, W)` array. `fit_to_model` then conforms them to a model's `InputSpec` with
`models.images.conform`: colour by luma / replication; another size raises
`models.images.SizeMismatch` unless `resize`, then PIL bilinear resize without keeping aspect.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.artifact import InputSpec
from models.images import conform, conform_one

__all__ = ["DecodedBatch", "ModelInput", "UnsupportedInput", "fit_to_model"]


class UnsupportedInput(ValueError):
    """A model whose input spec this core cannot feed (not 1 or 3 channels)."""


@dataclass(frozen=True)
class DecodedBatch:
    """Images, model-independent: decoded files (`(C, H, W)` each), or one `(N, C, H, W)` array."""

    images: tuple[np.ndarray, ...] = ()
    array: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.images) if self.array is None else int(self.array.shape[0])


@dataclass(frozen=True)
class ModelInput:
    images: np.ndarray  # (N, C, H, W) uint8 at the model's input shape
    resized: tuple[bool, ...]


def fit_to_model(batch: DecodedBatch, spec: InputSpec, resize: bool) -> ModelInput:
    """Convert colour and check (or, with `resize`, fix) the size for one model's input spec.

    Raises `models.images.SizeMismatch` (its `index` names the image; 0 for an array),
    UnsupportedInput."""
    if spec.channels not in (1, 3):
        raise UnsupportedInput(f"model takes {spec.channels} channels; only 1 or 3 are supported")
    if batch.array is not None:
        images = conform(batch.array, spec.shape, resize=resize)
        resized = batch.array.shape[2:] != (spec.height, spec.width)
        return ModelInput(images, (resized,) * len(images))
    fitted = [conform_one(image, spec.shape, resize=resize, index=i) for i, image in enumerate(batch.images)]
    return ModelInput(np.stack([f[0] for f in fitted]), tuple(f[1] for f in fitted))
