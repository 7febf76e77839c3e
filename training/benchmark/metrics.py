"""OpenOOD metrics with stratified bootstrap confidence intervals, in one sort per score pair.

Convention (OpenOOD, DESIGN §4): OOD is the positive class for AUROC, AUPR-Out and FPR@95%TPR
(the fraction of in-distribution images flagged at the threshold that flags 95% of the OOD
images); AUPR-In treats in-distribution as positive with the negated score. Higher score = more OOD.

The point estimates equal scikit-learn's (`roc_auc_score`, `average_precision_score`, and the first
point of the full ROC curve, `roc_curve(..., drop_intermediate=False)`, whose TPR reaches 0.95).
The bootstrap resamples the in-distribution and the OOD scores separately (each with replacement,
sizes kept) as integer weights on the once-sorted scores, so a resample costs cumulative sums, not
a sort; the interval is the percentile interval of the resampled metric.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["METRICS", "MetricTable", "binomial_interval", "conformal_flag_range", "ood_metrics_with_ci"]

METRICS: tuple[str, ...] = ("auroc", "aupr_in", "aupr_out", "fpr_at_95_tpr")
_CHUNK = 64  # resamples per vectorised block: (64, n) float64 arrays


@dataclass(frozen=True)
class MetricTable:
    """Point estimates and `(low, high)` 95% bootstrap intervals, keyed by `METRICS`."""

    point: dict[str, float]
    interval: dict[str, tuple[float, float]]


def _order(id_scores: np.ndarray, ood_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Descending-score order of the pooled scores, their labels (1 = OOD) and the last position of
    each group of tied scores. NaN counts as the most OOD score (a graph that fails to give a finite
    score must not look in-distribution)."""
    scores = np.r_[np.asarray(id_scores, dtype=np.float64), np.asarray(ood_scores, dtype=np.float64)]
    scores = np.where(np.isnan(scores), np.inf, scores)
    labels = np.r_[np.zeros(len(id_scores)), np.ones(len(ood_scores))]
    # Integer ranks make ties exact (inf - inf would be NaN in a difference of raw scores).
    ranks = np.unique(scores, return_inverse=True)[1].reshape(-1)
    order = np.argsort(-ranks, kind="stable")
    sorted_ranks = ranks[order]
    ends = np.r_[np.flatnonzero(np.diff(sorted_ranks) != 0), len(scores) - 1]
    return order, labels[order], ends


def _curves(weights: np.ndarray, labels: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per resample (rows), true and false positives at every distinct threshold, descending."""
    tp = np.cumsum(weights * labels, axis=1)[:, ends]
    fp = np.cumsum(weights, axis=1)[:, ends] - tp
    return tp, fp


def _average_precision(tp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """sklearn's AP: sum over thresholds of (recall step) x precision."""
    total = tp[:, -1:]
    recall = tp / total
    step = np.diff(np.concatenate([np.zeros_like(recall[:, :1]), recall], axis=1), axis=1)
    flagged = tp + fp
    precision = np.divide(tp, flagged, out=np.ones_like(tp), where=flagged > 0)
    return np.sum(step * precision, axis=1)


def _metrics(
    weights: np.ndarray, labels: np.ndarray, ends: np.ndarray, rev: tuple[np.ndarray, ...]
) -> np.ndarray:
    """`(B, 4)` metrics for `(B, n)` weights given in descending-score order."""
    tp, fp = _curves(weights, labels, ends)
    tpr = tp / tp[:, -1:]
    fpr = fp / fp[:, -1:]
    zero = np.zeros_like(tpr[:, :1])
    tpr0 = np.concatenate([zero, tpr], axis=1)
    fpr0 = np.concatenate([zero, fpr], axis=1)
    auroc = np.sum(np.diff(fpr0, axis=1) * (tpr0[:, 1:] + tpr0[:, :-1]) / 2.0, axis=1)
    aupr_out = _average_precision(tp, fp)
    # In-distribution positive, score negated: the same pooled order read backwards.
    rev_labels, rev_ends = rev
    tp_in, fp_in = _curves(weights[:, ::-1], rev_labels, rev_ends)
    aupr_in = _average_precision(tp_in, fp_in)
    first = np.argmax(tpr >= 0.95, axis=1)
    fpr95 = fpr[np.arange(len(fpr)), first]
    return np.stack([auroc, aupr_in, aupr_out, fpr95], axis=1)


def _resample_counts(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """`(size, n)`: how often each of n items is drawn in each of `size` resamples of n draws."""
    draws = rng.integers(0, n, size=(size, n)) + np.arange(size)[:, None] * n
    return np.bincount(draws.ravel(), minlength=size * n).reshape(size, n).astype(np.float64)


def ood_metrics_with_ci(
    id_scores: np.ndarray,
    ood_scores: np.ndarray,
    *,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> MetricTable:
    """AUROC, AUPR-In, AUPR-Out, FPR@95%TPR (OOD positive) with percentile bootstrap intervals.

    `id_scores: (n0,)`, `ood_scores: (n1,)`, higher = more OOD. `resamples = 0` gives no interval
    (NaN bounds). The same inputs and seed always give the same intervals.
    """
    n0, n1 = len(id_scores), len(ood_scores)
    if n0 < 1 or n1 < 1:
        raise ValueError(f"need at least one in-distribution and one OOD score, got {n0} and {n1}")
    order, labels, ends = _order(id_scores, ood_scores)
    rev_labels = 1.0 - labels[::-1]
    # Tie groups read backwards: a group's first position (descending) becomes its last.
    starts = np.r_[0, ends[:-1] + 1]
    rev_ends = np.sort(len(labels) - 1 - starts)
    rev = (rev_labels, rev_ends)
    point = _metrics(np.ones((1, len(labels))), labels, ends, rev)[0]
    low = np.full(len(METRICS), np.nan)
    high = np.full(len(METRICS), np.nan)
    if resamples > 0:
        rng = np.random.default_rng(seed)
        is_ood = np.r_[np.zeros(n0, dtype=bool), np.ones(n1, dtype=bool)]
        blocks = []
        for start in range(0, resamples, _CHUNK):
            size = min(_CHUNK, resamples - start)
            weights = np.empty((size, n0 + n1))
            weights[:, ~is_ood] = _resample_counts(rng, n0, size)
            weights[:, is_ood] = _resample_counts(rng, n1, size)
            blocks.append(_metrics(weights[:, order], labels, ends, rev))
        sampled = np.concatenate(blocks)
        tail = (1.0 - level) / 2.0 * 100.0
        low, high = np.nanpercentile(sampled, [tail, 100.0 - tail], axis=0)
    return MetricTable(
        point={m: float(v) for m, v in zip(METRICS, point, strict=True)},
        interval={m: (float(a), float(b)) for m, a, b in zip(METRICS, low, high, strict=True)},
    )


def binomial_interval(flagged: int, total: int, level: float = 0.95) -> tuple[float, float]:
    """Clopper-Pearson (exact) interval for a proportion `flagged / total`."""
    from scipy.stats import beta

    if total < 1:
        return (float("nan"), float("nan"))
    tail = (1.0 - level) / 2.0
    low = 0.0 if flagged == 0 else float(beta.ppf(tail, flagged, total - flagged + 1))
    high = 1.0 if flagged == total else float(beta.ppf(1.0 - tail, flagged + 1, total - flagged))
    return (low, high)


def conformal_flag_range(
    calibration_size: int, target_fpr: float, test_size: int, level: float = 0.95
) -> tuple[int, int]:
    """The central `level` range of the number of fresh in-distribution images, out of `test_size`,
    that a split-conformal threshold set on `calibration_size` images flags.

    The threshold is the k-th smallest of n calibration scores, `k = ⌈(n + 1)(1 − target_fpr)⌉`
    (`models.scores.threshold_at_fpr`). Over the draw of the n calibration images, the fraction of
    the in-distribution law above it is Beta(n + 1 − k, k) (continuous scores; exchangeable images),
    and given it the test count is binomial: the count is beta-binomial(test_size, n + 1 − k, k).
    This is the range a flagged count must fall in for the threshold to be "at its target"; a
    binomial interval on the test images alone ignores the threshold's own sampling spread, which
    for n = 1,250 at 5% is ±1.2 points (95%). Raises ValueError for n below `(1 − α)/α`."""
    from scipy.stats import betabinom

    n = int(calibration_size)
    k = int(np.ceil((n + 1) * (1.0 - target_fpr)))
    if n < 1 or k > n or not 0.0 < target_fpr < 1.0:
        raise ValueError(
            f"a {target_fpr:.1%} conformal threshold needs at least {int(np.ceil((1 - target_fpr) / target_fpr))} "
            f"calibration images, got {n}"
        )
    tail = (1.0 - level) / 2.0
    law = betabinom(int(test_size), n + 1 - k, k)
    return int(law.ppf(tail)), int(law.ppf(1.0 - tail))
