"""From 8-bit pixels to the flow's input space, with the log-determinant accounted for.

Dequantization (the image as a point in [0, 1]^D):
- training: uniform, `y = (x + u) / 256` with `u ~ U[0, 1)^D` (Theis et al. 2016), so the
  continuous density lower-bounds the discrete probability;
- evaluation and every exported graph: the bin mid-point, `y = (x + 0.5) / 256`, so the same
  image always gets the same score.

Then the logit of RealNVP §4.1: `p = alpha + (1 − 2 alpha) y`, `z = log p − log(1 − p)`, with the
paper's `alpha = 0.05`, so the flow never sees the infinite tails of logit(0) and logit(1).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from models.transforms import Transform

__all__ = ["Dequantization", "LogitTransform", "dequantize"]

Dequantization = Literal["uniform", "midpoint"]


def dequantize(images: Tensor, mode: Dequantization, generator: torch.Generator | None = None) -> Tensor:
    """`images: (N, ...)` integer values 0..255 (any dtype) -> float32 in (0, 1)."""
    x = images if images.is_floating_point() else images.to(torch.float32)
    if mode == "uniform":
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return (x + noise) / 256.0
    if mode == "midpoint":
        return (x + 0.5) / 256.0
    raise ValueError(f"unknown dequantization '{mode}', expected 'uniform' or 'midpoint'")


class LogitTransform(Transform):
    """`y in (0, 1)^D -> logit(alpha + (1 − 2 alpha) y)` with its exact log-determinant."""

    def __init__(self, alpha: float = 0.05) -> None:
        super().__init__()
        if not 0.0 <= alpha < 0.5:
            raise ValueError(f"alpha must be in [0, 0.5), got {alpha}")
        self.alpha = alpha

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        p = self.alpha + (1.0 - 2.0 * self.alpha) * x
        z = torch.log(p) - torch.log1p(-p)
        logabsdet = (math.log(1.0 - 2.0 * self.alpha) - torch.log(p) - torch.log1p(-p)).flatten(1).sum(1)
        return z, logabsdet

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        p = torch.sigmoid(z)
        x = (p - self.alpha) / (1.0 - 2.0 * self.alpha)
        logabsdet = (torch.log(p) + torch.log1p(-p) - math.log(1.0 - 2.0 * self.alpha)).flatten(1).sum(1)
        return x, logabsdet
