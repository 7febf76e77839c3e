"""Affine coupling with a mask object and an injected st-network (nflows' coupling.py shape).

    y = x                          where the mask does not transform
    y = x * exp(s(x_c)) + t(x_c)   where it does, with x_c = x * condition

The log-scale is soft-clamped, `s = clamp * tanh(raw / clamp)`, so odd inputs give large but
finite scores.
"""

from __future__ import annotations

import torch
from torch import Tensor

from models.masks import Mask
from models.nets import NetFactory
from models.transforms import Transform

__all__ = ["AffineCoupling"]


class AffineCoupling(Transform):
    condition: Tensor
    transformed: Tensor

    def __init__(self, shape: tuple[int, ...], mask: Mask, net_factory: NetFactory, clamp: float = 2.0):
        super().__init__()
        self.shape = tuple(shape)
        self.mask = mask
        cond, trans = mask.tensors(self.shape)
        self.register_buffer("condition", cond, persistent=False)
        self.register_buffer("transformed", trans, persistent=False)
        channels = self.shape[0]
        self.net = net_factory(self.shape, 2 * channels)
        self.clamp = clamp

    def _scale_shift(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"coupling expects inputs of shape (N, {self.shape}), got {tuple(x.shape)}")
        raw_s, t = self.net(x * self.condition).chunk(2, dim=1)
        s = self.clamp * torch.tanh(raw_s / self.clamp) * self.transformed
        return s, t * self.transformed

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        s, t = self._scale_shift(x)
        return x * torch.exp(s) + t, s.flatten(1).sum(1)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        s, t = self._scale_shift(z)
        return (z - t) * torch.exp(-s), -s.flatten(1).sum(1)
