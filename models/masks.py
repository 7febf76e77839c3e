"""Coupling masks as data: which entries condition a coupling and which it transforms.

A mask is a small frozen object; `tensors(shape)` returns `(condition, transformed)`, two
disjoint {0, 1} float tensors broadcastable to a batch of that shape. Entries in neither
set pass through unchanged and are hidden from the st-network (the cycle mask uses this).

The spatial variants come from Kirichenko et al. 2020: checkerboard and channel-wise masks let
a coupling predict a pixel from its neighbours and let consecutive couplings co-adapt (§6);
horizontal and cycle (quadrant) masks take that shortcut away (§7). The paper's cycle-mask flow
is single-scale: 8 couplings, step i transforms quadrant i+1 from quadrant i, twice around.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = ["Mask", "MaskKind"]

MaskKind = Literal["checkerboard", "channel", "horizontal", "cycle", "alternate", "half"]


@dataclass(frozen=True)
class Mask:
    """`kind` picks the pattern, `index` the position in a stack (parity or cycle step)."""

    kind: MaskKind
    index: int = 0

    def tensors(self, shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """Return `(condition, transformed)` with shape `(1, *shape)`."""
        if self.kind in ("alternate", "half"):
            if len(shape) != 1:
                raise ValueError(f"mask '{self.kind}' is for vectors (D,), got shape {shape}")
            (d,) = shape
            if self.kind == "alternate":
                base = (torch.arange(d) % 2).float()
            else:
                base = (torch.arange(d) >= d // 2).float()
            cond = base if self.index % 2 == 0 else 1 - base
            return cond[None], (1 - cond)[None]
        if len(shape) != 3:
            raise ValueError(f"mask '{self.kind}' is for images (C, H, W), got shape {shape}")
        c, h, w = shape
        rows = torch.arange(h)[:, None].expand(h, w)
        cols = torch.arange(w)[None, :].expand(h, w)
        if self.kind == "checkerboard":
            cond = ((rows + cols + self.index) % 2 == 0).float()[None].expand(c, h, w)
            trans = 1 - cond
        elif self.kind == "horizontal":
            top = (rows < h // 2).float()
            cond = (top if self.index % 2 == 0 else 1 - top)[None].expand(c, h, w)
            trans = 1 - cond
        elif self.kind == "channel":
            if c < 2:
                raise ValueError(f"channel mask needs at least 2 channels, got {c}")
            first = (torch.arange(c) < c // 2).float()[:, None, None].expand(c, h, w)
            cond = first if self.index % 2 == 0 else 1 - first
            trans = 1 - cond
        elif self.kind == "cycle":
            # Quadrants in cycle order TL, TR, BR, BL: step i predicts quadrant i+1 from quadrant i
            # and sees nothing else.
            top, left = rows < h // 2, cols < w // 2
            quadrants = [top & left, top & ~left, ~top & ~left, ~top & left]
            cond = quadrants[self.index % 4].float()[None].expand(c, h, w)
            trans = quadrants[(self.index + 1) % 4].float()[None].expand(c, h, w)
        else:
            raise ValueError(f"unknown mask kind '{self.kind}'")
        return cond.contiguous()[None], trans.contiguous()[None]
