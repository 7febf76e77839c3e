"""Score helpers shared by training, export and the service (pure numpy/PIL maths).

Units: `log_likelihood` in nats, `bits_per_dim` in bits per dimension, `ood_score` higher
means more out-of-distribution.

Everything the service needs to turn graph outputs into a verdict lives here, so training,
calibration, batch scoring and the HTTP service compute it with the same code:

- `ood_score`: the four statistics (likelihood, typicality, input complexity, likelihood ratio);
- `png_bits_per_dim`: the compressor code length L(x) of the input-complexity score;
- `p_value`: p-values against the calibration reference scores;
- `threshold_at_fpr`: the conformal threshold at a target false-positive rate;
- `combine_p_values` / `calibrate_combination`: the combined verdict of several models (Fisher's
  method, optionally weighted, or min-p) and its own threshold.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
from PIL import Image

__all__ = [
    "COMBINATION_RULES",
    "LN2",
    "LN256",
    "OOD_STATISTICS",
    "PNG_COMPRESS_LEVEL",
    "CombinationRule",
    "OodStatistic",
    "bits_per_dim",
    "calibrate_combination",
    "combine_p_values",
    "complexity_canary",
    "complexity_canary_mismatch",
    "combined_verdict",
    "combination_weights",
    "discrete_log_likelihood",
    "leave_one_out_p_values",
    "ood_score",
    "p_value",
    "png_bits_per_dim",
    "threshold_at_fpr",
]

LN2 = math.log(2.0)
LN256 = math.log(256.0)

OodStatistic = Literal["nll", "typicality", "complexity", "likelihood_ratio"]
OOD_STATISTICS: tuple[OodStatistic, ...] = ("nll", "typicality", "complexity", "likelihood_ratio")
CombinationRule = Literal["fisher", "min_p"]
COMBINATION_RULES: tuple[CombinationRule, ...] = ("fisher", "min_p")
PNG_COMPRESS_LEVEL = 9


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


def leave_one_out_p_values(scores: np.ndarray) -> np.ndarray:
    """p-values of the reference scores themselves, each against the other n − 1:
    `(1 + #{j != i: s_j >= s_i}) / n`. Each has nearly the marginal law of a fresh image's `p_value`,
    but jointly across several members they are ranks within one set, not p-values against fixed
    references: a combined threshold set on them misses its target on small splits. The ensemble
    therefore calibrates on disjoint images (`calibrate_combination`); kept for analysis and tests."""
    s = np.asarray(scores, dtype=np.float64)
    ref = np.sort(s)
    at_least = ref.size - np.searchsorted(ref, s, side="left") - 1  # minus the point itself
    return (1.0 + at_least) / max(1, ref.size)


def combination_weights(
    weights: Sequence[float] | np.ndarray | None, num_members: int, rule: CombinationRule
) -> np.ndarray | None:
    """Checked member weights as a `(K,)` float64 array, or None for equal weights.

    Weights must be K finite positive numbers. They only mean something for `fisher`; `min_p`
    takes equal weights only (any constant vector, which changes nothing), so unequal ones are a
    ValueError. A constant vector is returned as given (for `fisher` it scales the score, which
    changes no ranking and no verdict once the threshold is calibrated on the same weights)."""
    if weights is None:
        return None
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.shape[0] != num_members:
        raise ValueError(f"weights must be {num_members} numbers (one per member), got shape {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError(f"weights must be finite and positive, got {w.tolist()}")
    if rule == "min_p" and np.any(w != w[0]):
        raise ValueError(f"the min_p rule takes no member weights (only fisher does), got {w.tolist()}")
    return w


def combine_p_values(
    p_values: np.ndarray,
    rule: CombinationRule,
    weights: Sequence[float] | np.ndarray | None = None,
) -> np.ndarray:
    """Combine per-model p-values `(K, N)` (K models, N images) into one score per image,
    `(N,)` float64, higher = more OOD. The score is not itself a p-value: the models see the same
    image, so they are not independent, and its threshold must be calibrated on held-out
    in-distribution data like any other score.

    - `fisher`: Fisher's method, `−2 Σ_k w_k ln p_k`, with `weights` `w` (K positive numbers;
      None: every `w_k = 1`, the classical `−2 Σ_k ln p_k`, chi-square with 2K degrees of freedom
      under independence); sensitive to several moderately small p-values. A smaller `w_k` makes
      member k count less: a member blind to some OOD family then dilutes the others less.
    - `min_p`: the Bonferroni-corrected minimum, `−ln min(1, K · min_k p_k)`; driven by the single
      most confident model. Unequal weights are a ValueError (`combination_weights`).
    """
    p = np.asarray(p_values, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] < 1:
        raise ValueError(f"p_values must be (K models, N images), got shape {p.shape}")
    if rule not in COMBINATION_RULES:
        raise ValueError(f"unknown combination rule '{rule}', expected one of {COMBINATION_RULES}")
    w = combination_weights(weights, p.shape[0], rule)
    if np.any(~(p > 0)) or np.any(p > 1):
        raise ValueError("p-values must lie in (0, 1]")
    if rule == "fisher":
        if w is None:
            return -2.0 * np.log(p).sum(axis=0)
        return -2.0 * (w[:, None] * np.log(p)).sum(axis=0)
    return -np.log(np.minimum(1.0, p.shape[0] * p.min(axis=0)))


def threshold_at_fpr(scores: np.ndarray, target_fpr: float) -> float:
    """Threshold on `scores` (in-distribution, higher = more OOD) that flags at most `target_fpr` of
    fresh in-distribution images: the k-th smallest score, `k = ⌈(n + 1)(1 − target_fpr)⌉`.

    This is the split-conformal order statistic: when `scores` and a fresh image's score are
    exchangeable (the fresh image is drawn like the n held-out ones and nothing in the score was
    fitted on them), `P(fresh > threshold) ≤ target_fpr`, and with no ties
    `P(fresh > threshold) = (n + 1 − k) / (n + 1)`, which lies in `(target_fpr − 1/(n+1), target_fpr]`
    and equals `target_fpr` when `(n + 1)(1 − target_fpr)` is a whole number. Ties (discrete p-values)
    only make it conservative: `P(fresh ≥ threshold) ≥ (n + 1 − k)/(n + 1)`. Needs
    `n ≥ (1 − target_fpr) / target_fpr` (19 at 5%); below that the largest score is returned and the
    rate is `1/(n + 1)`, above the target.
    """
    s = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    if s.size == 0:
        raise ValueError("cannot set a threshold on zero scores")
    if not 0.0 < target_fpr < 1.0:
        raise ValueError(f"target_fpr must lie in (0, 1), got {target_fpr}")
    # the epsilon keeps (n+1)(1-α) = 57.000000000000007 from rounding up to 58
    k = math.ceil((s.size + 1) * (1.0 - target_fpr) - 1e-9)
    return float(s[min(max(k, 1), s.size) - 1])


def calibrate_combination(
    member_p_values: np.ndarray,
    rule: CombinationRule,
    target_fpr: float,
    weights: Sequence[float] | np.ndarray | None = None,
) -> tuple[float, np.ndarray]:
    """The combined verdict's own calibration.

    `member_p_values: (K, N)`: each member's `p_value` of N held-out in-distribution images against
    that member's reference scores, where the N images are disjoint from those that gave the
    reference scores (the `combination` split; the members calibrate on `calibration`). Then a fresh
    image's member p-values are exchangeable with these N columns, whatever the dependence between
    the members, and `threshold_at_fpr` of the N combined scores holds the target exactly (see
    there). Returns `(threshold, reference_sorted)`: the combined-score threshold and the N combined
    scores, ascending, for the combined p-value (`p_value(score, reference_sorted)`). `weights`:
    as in `combine_p_values`; they must not have been chosen on these N images, or the combined
    score would be fitted on its own calibration data and the rate would no longer hold.

    Leave-one-out p-values of the members' own calibration images are not exchangeable with a fresh
    image's (they are ranks within the very set they are compared against): on small splits the
    realised rate drifts below the target, and p-values of those images against references that
    include them drift above it (tests/training/test_ensemble_calibration.py measures both).
    """
    p = np.asarray(member_p_values, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 1:
        raise ValueError(f"member_p_values must be (K members, N images) with N >= 1, got shape {p.shape}")
    combined = np.sort(combine_p_values(p, rule, weights))
    return threshold_at_fpr(combined, target_fpr), combined


def combined_verdict(
    member_p_values: Sequence[np.ndarray],
    rule: CombinationRule,
    threshold: float,
    reference_sorted: np.ndarray,
    weights: Sequence[float] | np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The combined verdict of an ensemble (`models.artifact.EnsembleManifest`) for N images.

    `member_p_values`: one `(N,)` array per member, in the manifest's member order, each the
    member's own `p_value`; `threshold`, `reference_sorted` and `weights` (None: equal) are the
    ensemble's calibration and member weights. Returns `(combined_score, p_value, is_ood)`, each `(N,)`.
    """
    score = combine_p_values(
        np.stack([np.asarray(p, dtype=np.float64) for p in member_p_values]), rule, weights
    )
    return score, p_value(score, reference_sorted), np.asarray(score > threshold, dtype=bool)


def png_bits_per_dim(images: np.ndarray) -> np.ndarray:
    """L(x) of the input-complexity score (Serrà et al. 2020): the PNG code length of each image at
    the strongest compression level, in bits per dimension, `8 · len(PNG bytes) / (C·H·W)`.

    `images: (N, C, H, W) uint8`, C 1 or 3: exactly what the exported graph sees (after colour
    conversion and resize), so training and the service measure the same bytes. Deterministic for
    a given Pillow/zlib build. The PNG container overhead (signature, IHDR, IEND: 57 bytes) is a
    constant per shape and does not change any ranking.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1] not in (1, 3) or images.dtype != np.uint8:
        raise ValueError(f"expected (N, C, H, W) uint8 with C 1 or 3, got {images.dtype} {images.shape}")
    _, c, h, w = images.shape
    out = np.empty(len(images), dtype=np.float64)
    for i, image in enumerate(images):
        plane = image[0] if c == 1 else image.transpose(1, 2, 0)
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(plane)).save(
            buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL
        )
        out[i] = 8.0 * buffer.getbuffer().nbytes / (c * h * w)
    return out


# --------------------------------------------------------------------------- compressor canary

# Input complexity depends on the PNG encoder's output length, which comes from the zlib that
# Pillow was built with, outside the exported graph: a container with another zlib (zlib-ng in
# newer Pillow wheels, for one) shifts every score and threshold silently. The canary is the
# compressed length of a few fixed images, recorded at calibration and compared before serving.


def _canary_images() -> list[np.ndarray]:
    """Fixed `(1, C, H, W)` uint8 images from integer arithmetic only (no RNG whose stream could
    change): a smooth gradient, a hard-edged pattern, a busy texture and a colour image."""
    i, j = np.meshgrid(np.arange(28, dtype=np.int64), np.arange(28, dtype=np.int64), indexing="ij")
    gradient = (i * 9 + j * 3) % 256
    pattern = np.where(((i // 4) + (j // 7)) % 2 == 0, 230, 20)
    texture = (i * 37 + j * 101 + (i * j) % 13 * 17) % 256
    colour = np.stack([gradient, texture, (255 - gradient)])
    return [
        np.asarray(x, dtype=np.uint8).reshape(1, -1, 28, 28) for x in (gradient, pattern, texture, colour)
    ]


def complexity_canary() -> dict[str, object]:
    """`{"png_bytes": [...], "compress_level": 9, "pillow": ..., "zlib": ...}` on this machine.

    `png_bytes` is what `png_bits_per_dim` measures on the canary images, in bytes; the versions
    are informative only: two machines agree when the lengths agree."""
    import PIL
    from PIL import features

    lengths = [round(float(png_bits_per_dim(image)[0]) * image[0].size / 8.0) for image in _canary_images()]
    return {
        "png_bytes": lengths,
        "compress_level": PNG_COMPRESS_LEVEL,
        "pillow": PIL.__version__,
        "zlib": features.version("zlib") or "unknown",
    }


def complexity_canary_mismatch(recorded: dict[str, object] | None) -> str | None:
    """None when this machine's PNG encoder gives the recorded canary lengths, else the reason
    (one line, naming both library versions). A manifest without a canary is not checked."""
    if not recorded:
        return None
    here = complexity_canary()
    if list(recorded.get("png_bytes", [])) == here["png_bytes"]:  # type: ignore[call-overload]
        return None
    return (
        "input-complexity compressor differs from the one the model was calibrated with: canary PNG "
        f"lengths {here['png_bytes']} bytes here (Pillow {here['pillow']}, zlib {here['zlib']}) vs "
        f"{recorded.get('png_bytes')} recorded (Pillow {recorded.get('pillow')}, zlib {recorded.get('zlib')}); "
        "scores and threshold would shift: serve it with the recorded libraries or recalibrate"
    )
