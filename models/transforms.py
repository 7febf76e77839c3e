"""The transform contract shared by every flow layer.

A transform maps data to latent with `forward(x) -> (z, logabsdet)` and back with
`inverse(z) -> (x, logabsdet)`; `logabsdet` has shape `(B,)` and is the log absolute
determinant of the Jacobian of the map that was applied (so the forward and inverse
log-dets of the same point cancel). Modules keep no per-call state, so one instance can
serve concurrent requests (nflows' `transforms/base.py` is the model).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

__all__ = [
    "CompositeTransform",
    "InverseTransform",
    "SplitApply",
    "Squeeze",
    "Transform",
]


class Transform(nn.Module):
    """Base class: an invertible map with a tractable log-determinant."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # noqa: D102
        raise NotImplementedError

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


def _zeros(x: Tensor) -> Tensor:
    return x.new_zeros(x.shape[0])


class CompositeTransform(Transform):
    """Applies transforms in order on `forward` and in reverse order on `inverse`."""

    def __init__(self, transforms: Iterable[Transform]) -> None:
        super().__init__()
        self.transforms = nn.ModuleList(transforms)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        total = _zeros(x)
        for transform in self.transforms:
            x, logabsdet = transform(x)  # type: ignore[operator]
            total = total + logabsdet
        return x, total

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        total = _zeros(z)
        for transform in reversed(self.transforms):
            z, logabsdet = transform.inverse(z)  # type: ignore[operator]
            total = total + logabsdet
        return z, total


class InverseTransform(Transform):
    """Swaps the directions of a transform."""

    def __init__(self, transform: Transform) -> None:
        super().__init__()
        self.base = transform

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.base.inverse(x)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return self.base(z)


class Squeeze(Transform):
    """Space-to-depth: `(B, C, H, W) -> (B, 4C, H/2, W/2)`, volume preserving (RealNVP §3.6)."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        b, c, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"Squeeze needs even height and width, got {h}x{w}")
        x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
        return x.reshape(b, c * 4, h // 2, w // 2), _zeros(x)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        b, c, h, w = z.shape
        if c % 4:
            raise ValueError(f"Unsqueeze needs channels divisible by 4, got {c}")
        z = z.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
        return z.reshape(b, c // 4, h * 2, w * 2), _zeros(z)


class SplitApply(Transform):
    """Multi-scale factor-out: the first `keep` channels leave for the latent unchanged,
    the rest go through `inner` (the next, coarser scale of the flow).

    Keeping the factored-out half in place makes the latent of a multi-scale flow the
    same shape as its input, so it can be laid out on the image grid for analysis.
    """

    def __init__(self, keep: int, inner: Transform) -> None:
        super().__init__()
        self.keep = keep
        self.inner = inner

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out, rest = x[:, : self.keep], x[:, self.keep :]
        rest, logabsdet = self.inner(rest)
        return torch.cat([out, rest], dim=1), logabsdet

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        out, rest = z[:, : self.keep], z[:, self.keep :]
        rest, logabsdet = self.inner.inverse(rest)
        return torch.cat([out, rest], dim=1), logabsdet
