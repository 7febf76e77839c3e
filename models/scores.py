"""Score helpers shared by training, export and the service (pure numpy/torch maths).

Units: `log_likelihood` in nats, `bits_per_dim` in bits per dimension, `ood_score` higher
means more out-of-distribution.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

__all__ = [
    "LN2",
    "LN256",
    "OodStatistic",
    "bits_per_dim",
    "discrete_log_likelihood",
    "ood_score",
    "p_value",
]

LN2 = math.log(2.0)
LN256 = math.log(256.0)

OodStatistic = Literal["nll", "typicality", "complexity", "likelihood_ratio"]


def discrete_log_likelihood(log_density_unit, num_dims: int):  # type: ignore[no-untyped-def]
    """Log-probability (nats) of a discrete 8-bit image from the continuous density of its
    dequantized version on [0, 1]^D: each of the D bins has width 1/256 (DESIGN.md §3).

    Works on floats, numpy arrays and torch tensors alike.
    """
    return log_density_unit - num_dims * LN256


def bits_per_dim(log_likelihood, num_dims: int):  # type: ignore[no-untyped-def]
    """`-log_likelihood / (D ln 2)`: a uniform density on 8-bit data gives exactly 8."""
    return -log_likelihood / (num_dims * LN2)


def ood_score(
    statistic: OodStatistic,
    log_likelihood: np.ndarray,
    *,
    num_dims: int,
    reference_nll_mean: float | None = None,
    complexity_bits: np.ndarray | None = None,
    background_log_likelihood: np.ndarray | None = None,
) -> np.ndarray:
    """OOD score per image (higher = more OOD) from its log-likelihood (nats).

    - `nll`: negative log-likelihood in bits/dim (one-sided: low likelihood is OOD).
    - `typicality`: |bits/dim − mean in-distribution bits/dim| (Nalisnick et al. 2019, two-sided).
    - `complexity`: bits(x) − L(x), the flow's code length minus the PNG code length of the
      image, both in bits/dim (Serrà et al. 2020).
    - `likelihood_ratio`: −(log p(x) − log p_background(x)) in bits/dim (Ren et al. 2019).
    """
    bpd = np.asarray(bits_per_dim(np.asarray(log_likelihood, dtype=np.float64), num_dims))
    if statistic == "nll":
        return bpd
    if statistic == "typicality":
        if reference_nll_mean is None:
            raise ValueError("typicality needs reference_nll_mean (mean in-distribution bits/dim)")
        return np.abs(bpd - reference_nll_mean)
    if statistic == "complexity":
        if complexity_bits is None:
            raise ValueError("complexity needs complexity_bits (PNG bits per dimension)")
        return bpd - np.asarray(complexity_bits, dtype=np.float64)
    if statistic == "likelihood_ratio":
        if background_log_likelihood is None:
            raise ValueError("likelihood_ratio needs background_log_likelihood")
        background_bpd = bits_per_dim(np.asarray(background_log_likelihood, dtype=np.float64), num_dims)
        return bpd - background_bpd
    raise ValueError(f"unknown OOD statistic '{statistic}'")


def p_value(scores: np.ndarray, reference_sorted: np.ndarray) -> np.ndarray:
    """Fraction of in-distribution reference scores at least as large as each score, with +1
    smoothing: `(1 + #{ref >= s}) / (1 + n)`. `reference_sorted` must be ascending."""
    ref = np.asarray(reference_sorted, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    at_least = ref.size - np.searchsorted(ref, s, side="left")
    return (1.0 + at_least) / (1.0 + ref.size)
