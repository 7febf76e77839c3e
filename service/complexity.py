"""Input complexity for the `complexity` OOD statistic (Serrà et al. 2020).

L(x) is the PNG code length of the image the model scores (after colour conversion and resize),
at the strongest compression level, in bits per dimension: `8 · len(PNG) / D`. The one
implementation lives in `models.scores`, so calibration in training and scoring here measure the
same bytes; this module names it for the service.
"""

from __future__ import annotations

from models.scores import png_bits_per_dim

__all__ = ["png_bits_per_dim"]
