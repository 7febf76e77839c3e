"""The OOD sets of a benchmark: far-OOD datasets and synthetic images, near-OOD transforms of the
held-out in-distribution test split, and the transforms a user declares as symmetries.

Every set is `(N, C, H, W)` uint8 at the in-distribution test set's own shape; each model then
sees it conformed to its input spec, as the service would with `resize` (training.data.conform_images).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

import numpy as np

from training.data import DatasetError, ImageSet, load_dataset

__all__ = [
    "DEFAULT_FAR",
    "DEFAULT_SYMMETRIES",
    "NEAR_TRANSFORMS",
    "SYNTHETIC",
    "BenchmarkSet",
    "Family",
    "default_far_specs",
    "default_symmetries",
    "far_set",
    "near_set",
    "parse_transforms",
]

Family = Literal["near", "far", "symmetry"]

# 4x4 tiles for the jigsaw transform: each tile keeps local strokes and texture, the layout is gone.
_JIGSAW_GRID = 4


def _jigsaw(images: np.ndarray, seed: int) -> np.ndarray:
    """Each image's 4x4 grid of tiles in its own seeded random order (never the identity); pixels
    beyond the last full tile row/column stay where they are."""
    out = images.copy()
    _, _, h, w = images.shape
    th, tw = h // _JIGSAW_GRID, w // _JIGSAW_GRID
    if th < 1 or tw < 1:
        raise DatasetError(f"jigsaw needs images of at least {_JIGSAW_GRID}x{_JIGSAW_GRID} pixels")
    tiles = _JIGSAW_GRID * _JIGSAW_GRID
    rng = np.random.default_rng(seed)
    for i, image in enumerate(images):
        order = rng.permutation(tiles)
        while np.all(order == np.arange(tiles)):
            order = rng.permutation(tiles)
        for dst, src in enumerate(order):
            dy, dx = divmod(int(dst), _JIGSAW_GRID)
            sy, sx = divmod(int(src), _JIGSAW_GRID)
            out[i, :, dy * th : (dy + 1) * th, dx * tw : (dx + 1) * tw] = image[
                :, sy * th : (sy + 1) * th, sx * tw : (sx + 1) * tw
            ]
    return out


# name -> (description, transform of (N, C, H, W) uint8 and a seed). Rotations are counter-clockwise.
NEAR_TRANSFORMS: Mapping[str, tuple[str, Callable[[np.ndarray, int], np.ndarray]]] = MappingProxyType(
    {
        "vflip": ("upside down (vertical flip)", lambda x, s: x[:, :, ::-1, :]),
        "hflip": ("mirrored left-right (horizontal flip)", lambda x, s: x[:, :, :, ::-1]),
        "rot90": ("rotated 90° counter-clockwise", lambda x, s: np.rot90(x, 1, axes=(2, 3))),
        "rot180": ("rotated 180°", lambda x, s: np.rot90(x, 2, axes=(2, 3))),
        "rot270": (
            "rotated 270° counter-clockwise (90° clockwise)",
            lambda x, s: np.rot90(x, 3, axes=(2, 3)),
        ),
        "transpose": (
            "reflected about the main diagonal (rows become columns)",
            lambda x, s: x.transpose(0, 1, 3, 2),
        ),
        "invert": ("contrast inverted (255 − pixel)", lambda x, s: 255 - x),
        "jigsaw": (
            f"{_JIGSAW_GRID}x{_JIGSAW_GRID} tiles shuffled (seeded, per image): local texture kept, layout destroyed",
            _jigsaw,
        ),
    }
)

# Symmetries of built-in in-distribution datasets, used when the user declares none: a Fashion-MNIST
# garment mirrored left-right is still a garment of its class (the dataset's own images face both ways).
DEFAULT_SYMMETRIES: Mapping[str, tuple[str, ...]] = MappingProxyType({"fashion-mnist": ("hflip",)})

SYNTHETIC: Mapping[str, str] = MappingProxyType(
    {
        "noise": "uniform noise: every pixel independent, uniform in 0..255 (seeded)",
        "constant": "constant images: one value per image, uniform in 0..255 (seeded)",
    }
)
DEFAULT_FAR: tuple[str, ...] = (
    "fashion-mnist:test",
    "mnist",
    "sklearn-digits",
    "photos",
    "noise",
    "constant",
)


@dataclass(frozen=True, eq=False)
class BenchmarkSet:
    """One evaluated set: `images: (N, C, H, W) uint8`; `labels` where the source has them."""

    name: str
    family: Family
    description: str
    images: np.ndarray
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0])


def _family_of(spec: str) -> str:
    """`fashion-mnist:test` -> `fashion-mnist`; folder/npz specs are their own family."""
    kind, _, _ = spec.partition(":")
    return spec if kind in ("folder", "npz") else kind


def default_far_specs(in_distribution: Iterable[str]) -> list[str]:
    """Every built-in far-OOD source except those of the in-distribution data's own family."""
    own = {_family_of(s) for s in in_distribution}
    return [s for s in DEFAULT_FAR if _family_of(s) not in own]


def default_symmetries(in_distribution: str) -> tuple[str, ...]:
    return DEFAULT_SYMMETRIES.get(_family_of(in_distribution), ())


def parse_transforms(names: Iterable[str], what: str) -> list[str]:
    """Validate transform names (`none` alone means the empty list); one-line error otherwise."""
    out: list[str] = []
    for raw in names:
        for name in (n.strip() for n in raw.split(",")):
            if not name or name == "none":
                continue
            if name not in NEAR_TRANSFORMS:
                raise DatasetError(
                    f"unknown {what} transform {name!r}: expected one of {', '.join(NEAR_TRANSFORMS)} (or none)"
                )
            if name not in out:
                out.append(name)
    return out


def near_set(test: ImageSet, name: str, family: Family, seed: int) -> BenchmarkSet:
    """`test` transformed by `NEAR_TRANSFORMS[name]`, same images in the same order."""
    description, transform = NEAR_TRANSFORMS[name]
    images = np.ascontiguousarray(transform(test.images, seed))
    return BenchmarkSet(name, family, f"{test.name} test images {description}", images, test.labels)


def far_set(
    spec: str, shape: tuple[int, int, int], *, limit: int | None, seed: int, synthetic_count: int
) -> BenchmarkSet:
    """A far-OOD set at `shape`: a `training.data.load_dataset` spec or one of `SYNTHETIC`."""
    if spec in SYNTHETIC:
        count = synthetic_count if limit is None else min(limit, synthetic_count)
        # A seed per set name: noise and constant images do not share random draws.
        rng = np.random.default_rng([seed, sum(spec.encode())])
        if spec == "noise":
            images = rng.integers(0, 256, size=(count, *shape), dtype=np.uint8)
        else:
            values = rng.integers(0, 256, size=count, dtype=np.uint8)
            images = np.broadcast_to(values[:, None, None, None], (count, *shape)).copy()
        return BenchmarkSet(spec, "far", SYNTHETIC[spec], images)
    dataset = load_dataset(spec, shape=shape, limit=limit, seed=seed)
    if len(dataset) == 0:
        raise DatasetError(f"far-OOD set {spec!r} has no images")
    return BenchmarkSet(spec, "far", dataset.source or spec, dataset.images, dataset.labels)
