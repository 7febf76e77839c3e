"""Drift: has the input stream shifted since the model was calibrated? (pure numpy + stdlib maths)

Every served p-value is the rank of an image's `ood_score` among the model's `n` in-distribution
reference scores (`models.scores.p_value`, DESIGN §4). On in-distribution data a fresh score and
the reference are exchangeable, so the ranks have an exact, distribution-free law. Both detectors
here use only that law, so their error rates hold for any model, statistic and ensemble.

**Batch test** (`batch_drift_test`): "do these m scores come from the reference distribution?"
Three exact or near-exact rank tests, combined by Bonferroni (valid under any dependence):

- `upper_tail`: K = #{images with p <= k/(n+1)} (k = floor(alpha_tail·(n+1)), alpha_tail = 1%),
  the images beyond the reference's k-th largest score. Given the reference, an in-distribution
  image lands there with probability q ~ Beta(k, n+1-k) (the order statistic's coverage), so
  K ~ BetaBinomial(m, k, n+1-k) *exactly*, with the reference's finite size accounted for. Power
  against a small fraction of far-OOD images, which all get the smallest p-value 1/(n+1).
- `lower_tail`: the same count below the reference's k-th smallest score. The paper's point
  (Nalisnick et al. 2019; Kirichenko et al. 2020) is that OOD images can get *higher* likelihood
  than in-distribution ones (MNIST under a Fashion-MNIST flow, constant images): with a one-sided
  score they get p-values near 1, and a drift test must see them too.
- `rank_sum`: two-sided Wilcoxon–Mann–Whitney of the batch scores against the reference (the
  mean p-value, done properly: its variance includes the reference's finite size; normal
  approximation with tie and continuity corrections). Power against a slight shift of the whole
  batch, either way.

The batch p-value is `min(1, 3 · min_j p_j)`; its size is at most the nominal level (checked by
simulation in tests/service/test_drift.py). The batch's OOD rate (fraction with `is_ood`) comes
with a Wilson score interval.

**Online detector** (`OnlineDriftDetector`): two Bernoulli CUSUMs over the served p-values, one on
the upper-tail indicator `p <= k/(n+1)`, one on the lower-tail indicator (the top k p-value
levels), each with in-control rate k/(n+1) ~ alpha = 1% and designed for a rate of alpha1 = 5%
(the smallest contamination the benchmark looks at, chosen before any data). The increments are
integers (+r on an exceedance, −1 otherwise, r = round(ln(alpha1/alpha) / ln((1-alpha)/(1-alpha1)))),
so the CUSUM is a finite Markov chain and its average run length (ARL) to a false alarm is *exact*
(Brook & Evans 1972; Reynolds & Stoumbos 1999): `design_cusum` solves the chain and picks the
smallest integer threshold h whose combined ARL is at least the requested one. The two channels
alarm on disjoint rare events, so their run lengths are nearly independent and nearly geometric and
the combined ARL is taken as half a channel's (the simulation in the tests agrees within its error).

A deployment sees one reference, so its true in-control rate q is one draw of Beta(k, n+1-k), not
alpha itself; the ARL is steep in q. The threshold is therefore computed at the `assurance` (90%)
quantile of that Beta law: with probability >= 90% over the calibration draw, the expected run
length to a false alarm is at least the configured value. Memory is O(window) (the windowed OOD
rate), updates are serialised by a lock.

**Monitor** (`DriftMonitor`): one online detector per served model and per ensemble, each bound to
the loaded object it watches (a model's `LoadedModel`, an ensemble's resolved reference array):
when that object is replaced (a model reloaded, an ensemble re-resolved) the next look-up starts a fresh detector, so a reload
resets the drift state without any hook in the loading code.
"""

from __future__ import annotations

import math
import sys
import threading
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from statistics import NormalDist
from typing import Any

import numpy as np

__all__ = [
    "BATCH_METHOD",
    "DEFAULT_ALPHA",
    "DEFAULT_ALPHA1",
    "DEFAULT_ASSURANCE",
    "DEFAULT_RUN_LENGTH",
    "DEFAULT_WINDOW",
    "BatchDrift",
    "CusumDesign",
    "DriftComponent",
    "DriftMonitor",
    "OnlineDriftDetector",
    "batch_drift_test",
    "beta_binomial_sf",
    "beta_quantile",
    "cusum_arl",
    "design_cusum",
    "tail_levels",
    "wilson_interval",
]

DEFAULT_ALPHA = 0.01  # tail level of the exceedance counts (batch and online)
DEFAULT_ALPHA1 = 0.05  # the online CUSUM's design rate: 5 % of images beyond the 1 % tail
DEFAULT_RUN_LENGTH = 10_000  # images to a false alarm without drift, on average
DEFAULT_ASSURANCE = 0.9
DEFAULT_WINDOW = 1_000  # images in the windowed OOD rate
BATCH_METHOD = "bonferroni(upper_tail, lower_tail, rank_sum)"
_NORMAL = NormalDist()
_TINY = sys.float_info.min  # the smallest p-value reported: below it a double underflows


# ---------------------------------------------------------------------------------------------
# distributions (stdlib maths; no scipy on the serving path)


def _log_beta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def _log_sum_exp(values: Sequence[float]) -> float:
    top = max(values)
    if top == -math.inf:
        return -math.inf
    return top + math.log(math.fsum(math.exp(v - top) for v in values))


def beta_binomial_sf(x: int, m: int, a: float, b: float) -> float:
    """P(X >= x) for X ~ BetaBinomial(m, a, b); the pmf is summed from x upwards (precise for tiny
    tails), or its complement below x when x lies under the mean, stopping once terms are negligible."""
    if x <= 0:
        return 1.0
    if x > m:
        return 0.0

    def log_pmf(j: int) -> float:
        return (
            math.lgamma(m + 1)
            - math.lgamma(j + 1)
            - math.lgamma(m - j + 1)
            + _log_beta(j + a, m - j + b)
            - _log_beta(a, b)
        )

    mean = m * a / (a + b)
    upwards = x > mean
    j = x if upwards else x - 1
    log_term = log_pmf(j)
    terms = [log_term]
    while True:  # pmf(j+1)/pmf(j) = (m-j)(j+a) / ((j+1)(m-j-1+b)); downwards its inverse
        if upwards:
            if j >= m:
                break
            log_term += math.log((m - j) * (j + a)) - math.log((j + 1) * (m - j - 1 + b))
            j += 1
        else:
            if j <= 0:
                break
            log_term -= math.log((m - j + 1) * (j - 1 + a)) - math.log(j * (m - j + b))
            j -= 1
        terms.append(log_term)
        if log_term < max(terms) - 45.0:  # past the mode, the rest is below 1e-19 of the sum
            break
    total = math.exp(_log_sum_exp(terms))
    if upwards:
        return min(1.0, max(_TINY, total))  # x <= m: never exactly 0 after underflow
    return min(1.0, max(0.0, 1.0 - total))


def _binomial_sf(k: int, n: int, p: float) -> float:
    """P(Bin(n, p) >= k)."""
    if k <= 0:
        return 1.0
    if k > n or p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    lp, lq = math.log(p), math.log1p(-p)
    base = math.lgamma(n + 1)
    # The complement (j < k) has few terms when k is small: the usual case.
    below = [base - math.lgamma(j + 1) - math.lgamma(n - j + 1) + j * lp + (n - j) * lq for j in range(k)]
    return max(0.0, 1.0 - math.exp(_log_sum_exp(below)))


def beta_quantile(level: float, k: int, n: int) -> float:
    """The `level` quantile of Beta(k, n+1-k), the coverage of the reference's k-th largest of n
    scores; by `P(Beta(k, n+1-k) <= x) = P(Bin(n, x) >= k)` and bisection (to 1e-12)."""
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if _binomial_sf(k, n, mid) < level:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def wilson_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; (0, 1) when there are no trials."""
    if trials <= 0:
        return 0.0, 1.0
    z = _NORMAL.inv_cdf(0.5 + confidence / 2.0)
    phat = successes / trials
    denom = 1.0 + z * z / trials
    centre = (phat + z * z / (2.0 * trials)) / denom
    half = z / denom * math.sqrt(phat * (1.0 - phat) / trials + z * z / (4.0 * trials * trials))
    low = 0.0 if successes <= 0 else max(0.0, centre - half)
    high = 1.0 if successes >= trials else min(1.0, centre + half)
    return low, high


def tail_levels(reference_size: int | None, alpha: float) -> tuple[int | None, float]:
    """`(k, rate)`: the tail's order statistic k = max(1, floor(alpha·(n+1))) and its exact
    in-control rate k/(n+1); `(None, alpha)` for continuous p-values (no reference size)."""
    if not 0.0 < alpha < 0.5:
        raise ValueError(f"alpha must lie in (0, 0.5), got {alpha}")
    if reference_size is None:
        return None, alpha
    if reference_size < 1:
        raise ValueError(f"the reference needs at least one score, got {reference_size}")
    k = max(1, math.floor(alpha * (reference_size + 1) + 1e-9))
    return k, k / (reference_size + 1)


# ---------------------------------------------------------------------------------------------
# batch test


@dataclass(frozen=True)
class DriftComponent:
    name: str
    statistic: float
    p_value: float
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "statistic": self.statistic, "p_value": self.p_value, **self.detail}


@dataclass(frozen=True)
class BatchDrift:
    """The batch test's answer. `statistic` is the smallest component p-value (the min-p
    statistic), `p_value` its Bonferroni correction: P(a batch this extreme | no drift)."""

    images: int
    reference_size: int
    statistic: float
    p_value: float
    ood_images: int
    ood_rate: float
    ood_rate_interval: tuple[float, float]
    confidence: float
    components: tuple[DriftComponent, ...]
    method: str = BATCH_METHOD

    def to_dict(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "reference_size": self.reference_size,
            "method": self.method,
            "statistic": self.statistic,
            "p_value": self.p_value,
            "ood_images": self.ood_images,
            "ood_rate": self.ood_rate,
            "ood_rate_interval": list(self.ood_rate_interval),
            "confidence": self.confidence,
            "components": [c.to_dict() for c in self.components],
        }


def _tail_component(name: str, count: int, m: int, k: int, n: int) -> DriftComponent:
    p = beta_binomial_sf(count, m, k, n + 1 - k)
    return DriftComponent(
        name,
        float(count),
        p,
        {"expected": m * k / (n + 1), "level": k / (n + 1)},
    )


def _rank_sum(scores: np.ndarray, ref: np.ndarray) -> DriftComponent:
    m, n = scores.size, ref.size
    less = np.searchsorted(ref, scores, side="left")
    less_equal = np.searchsorted(ref, scores, side="right")
    u = float(less.sum() + 0.5 * (less_equal - less).sum())  # pairs (batch > reference), ties 1/2
    mean = 0.5 * m * n
    total = m + n
    _, counts = np.unique(np.concatenate([ref, scores]), return_counts=True)
    ties = float(np.sum(counts.astype(np.float64) ** 3 - counts))
    variance = m * n / 12.0 * ((total + 1) - ties / (total * (total - 1)))
    if variance <= 0.0:
        return DriftComponent("rank_sum", 0.0, 1.0, {"u": u, "mean_p_value": 0.5})
    sd = math.sqrt(variance)
    z = (u - mean) / sd
    corrected = max(0.0, abs(u - mean) - 0.5) / sd
    p = min(1.0, max(_TINY, 2.0 * _NORMAL.cdf(-corrected)))  # never exactly 0 after underflow
    # mean of the served p-values ~ 1 - u/(m n): below 1/2 means the batch scores are higher (more OOD)
    return DriftComponent("rank_sum", z, p, {"u": u, "mean_p_value": 1.0 - u / (m * n)})


def batch_drift_test(
    scores: np.ndarray,
    reference_sorted: np.ndarray,
    *,
    is_ood: np.ndarray | None = None,
    alpha: float = DEFAULT_ALPHA,
    confidence: float = 0.95,
) -> BatchDrift:
    """Test "these scores come from the in-distribution reference" (see the module docstring).

    scores: `(m,)` ood_score (or an ensemble's combined score), m >= 2, finite.
    reference_sorted: `(n,)` the calibration reference scores, ascending (the served p-values'
        reference).
    is_ood: `(m,)` the verdicts, for the OOD rate; default: the `upper_tail` images (p <= alpha).
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    ref = np.asarray(reference_sorted, dtype=np.float64).reshape(-1)
    if s.size < 2:
        raise ValueError(f"a drift test needs at least 2 images, got {s.size}")
    if ref.size < 2:
        raise ValueError(f"a drift test needs at least 2 reference scores, got {ref.size}")
    if not (np.all(np.isfinite(s)) and np.all(np.isfinite(ref))):
        raise ValueError("scores and reference must be finite")
    if np.any(np.diff(ref) < 0):
        raise ValueError("reference_sorted must be ascending")
    m, n = s.size, ref.size
    k, _ = tail_levels(n, alpha)
    assert k is not None
    at_least = n - np.searchsorted(ref, s, side="left")  # #{ref >= s}: p = (1 + at_least)/(n + 1)
    at_most = np.searchsorted(ref, s, side="right")  # #{ref <= s}
    upper = int(np.count_nonzero(at_least < k))
    lower = int(np.count_nonzero(at_most < k))
    components = (
        _tail_component("upper_tail", upper, m, k, n),
        _tail_component("lower_tail", lower, m, k, n),
        _rank_sum(s, ref),
    )
    smallest = min(c.p_value for c in components)
    flags = (at_least < k) if is_ood is None else np.asarray(is_ood, dtype=bool).reshape(-1)
    if flags.size != m:
        raise ValueError(f"is_ood has {flags.size} entries for {m} scores")
    ood = int(np.count_nonzero(flags))
    return BatchDrift(
        images=m,
        reference_size=n,
        statistic=smallest,
        p_value=min(1.0, len(components) * smallest),
        ood_images=ood,
        ood_rate=ood / m,
        ood_rate_interval=wilson_interval(ood, m, confidence),
        confidence=confidence,
        components=components,
    )


# ---------------------------------------------------------------------------------------------
# online detector: integer Bernoulli CUSUMs with exact run lengths


def cusum_arl(weight: int, threshold: int, rate: float) -> float:
    """Exact average run length of the integer CUSUM `S <- max(0, S + weight·X - (1 - X))`,
    X ~ Bernoulli(rate) iid, started at 0, alarm when S >= threshold (a Markov chain on
    0..threshold-1; Brook & Evans 1972)."""
    return _cusum_arl(int(weight), int(threshold), float(rate))


@lru_cache(maxsize=256)
def _cusum_arl(weight: int, threshold: int, rate: float) -> float:
    if weight < 1 or threshold < 1:
        raise ValueError("weight and threshold must be positive integers")
    h = threshold
    transition = np.zeros((h, h))
    for state in range(h):
        up = state + weight
        if up < h:
            transition[state, up] += rate
        transition[state, max(0, state - 1)] += 1.0 - rate
    arl = np.linalg.solve(np.eye(h) - transition, np.ones(h))
    return float(arl[0])


@dataclass(frozen=True)
class CusumDesign:
    """One CUSUM channel's design (both channels share it: their in-control laws are the same)."""

    alpha: float  # in-control exceedance rate, k/(n+1)
    alpha1: float  # rate the CUSUM is tuned to detect
    k: int | None  # the tail's order statistic (None: continuous p-values)
    reference_size: int | None
    weight: int  # r: units added by an exceedance (one unit is taken off otherwise)
    threshold: int  # h, in units
    nats_per_unit: float  # ln((1-alpha)/(1-alpha1)): the log-likelihood ratio of one unit
    design_rate: float  # the in-control rate the ARL is computed at (the assurance quantile)
    assurance: float
    expected_run_length: float  # the requested combined ARL
    run_length_at_alpha: float  # combined ARL at rate alpha exactly
    run_length_at_design: float  # combined ARL at design_rate (>= expected_run_length)


def design_cusum(
    expected_run_length: float = DEFAULT_RUN_LENGTH,
    *,
    reference_size: int | None = None,
    alpha: float = DEFAULT_ALPHA,
    alpha1: float = DEFAULT_ALPHA1,
    assurance: float = DEFAULT_ASSURANCE,
) -> CusumDesign:
    """The smallest integer threshold whose combined (two-channel) ARL is >= `expected_run_length`.

    The two channels (upper and lower tail) alarm on nearly independent, rare events, so the
    combined run length is the minimum of two nearly geometric ones: ARL ≈ 1/(2/ARL_channel).
    """
    return _design(float(expected_run_length), reference_size, float(alpha), float(alpha1), float(assurance))


@lru_cache(maxsize=64)
def _design(
    run_length: float, reference_size: int | None, alpha: float, alpha1: float, assurance: float
) -> CusumDesign:
    if not run_length >= 10:
        raise ValueError(f"expected_run_length must be at least 10 images, got {run_length}")
    if not 0.5 <= assurance < 1.0:
        raise ValueError(f"assurance must lie in [0.5, 1), got {assurance}")
    k, rate = tail_levels(reference_size, alpha)
    if not rate < alpha1 < 1.0:
        raise ValueError(f"alpha1 must lie in ({rate}, 1), got {alpha1}")
    if k is None or reference_size is None:
        design_rate = rate
    else:
        design_rate = max(rate, beta_quantile(assurance, k, reference_size))
    unit = math.log((1.0 - rate) / (1.0 - alpha1))
    weight = max(1, round(math.log(alpha1 / rate) / unit))
    if design_rate * weight >= 1.0 - design_rate:
        raise ValueError(
            f"the tail rate {design_rate:.4f} is too high for a CUSUM weight of {weight}: use a larger reference"
        )
    lo, hi = 1, weight
    while 0.5 * cusum_arl(weight, hi, design_rate) < run_length:  # grow to a bracket
        lo, hi = hi, hi * 2
        if hi > 1_000_000:
            raise ValueError(f"expected_run_length {run_length} is out of reach")
    while lo < hi:  # smallest h with combined ARL >= run_length
        mid = (lo + hi) // 2
        if 0.5 * cusum_arl(weight, mid, design_rate) >= run_length:
            hi = mid
        else:
            lo = mid + 1
    return CusumDesign(
        alpha=rate,
        alpha1=alpha1,
        k=k,
        reference_size=reference_size,
        weight=weight,
        threshold=hi,
        nats_per_unit=unit,
        design_rate=design_rate,
        assurance=assurance,
        expected_run_length=run_length,
        run_length_at_alpha=0.5 * cusum_arl(weight, hi, rate),
        run_length_at_design=0.5 * cusum_arl(weight, hi, design_rate),
    )


class OnlineDriftDetector:
    """Sequential drift detection over the stream of served p-values (see the module docstring).

    `update(p_values, is_ood)` from any thread; `state()` for the API and the metrics; `reset()`.
    The alarm latches (with the image count at which it rose) until `reset()`; the CUSUM statistics
    keep running meanwhile.
    """

    def __init__(
        self,
        expected_run_length: float = DEFAULT_RUN_LENGTH,
        *,
        reference_size: int | None = None,
        alpha: float = DEFAULT_ALPHA,
        alpha1: float = DEFAULT_ALPHA1,
        assurance: float = DEFAULT_ASSURANCE,
        window: int = DEFAULT_WINDOW,
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1 image, got {window}")
        self.design = design_cusum(
            expected_run_length,
            reference_size=reference_size,
            alpha=alpha,
            alpha1=alpha1,
            assurance=assurance,
        )
        self.window = int(window)
        self._lock = threading.Lock()
        self._ring = np.zeros(self.window, dtype=bool)
        self._reset_locked()

    def _reset_locked(self) -> None:
        self._upper = 0
        self._lower = 0
        self._images = 0
        self._alarm_at: int | None = None
        self._alarm_tail: str | None = None
        self._ring[:] = False
        self._ring_pos = 0
        self._ring_fill = 0
        self._ring_ood = 0

    def reset(self) -> None:
        with self._lock:
            self._reset_locked()

    def indicators(self, p_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`(upper, lower)` exceedance indicators, `(N,)` bool each, of served p-values."""
        p = np.asarray(p_values, dtype=np.float64).reshape(-1)
        d = self.design
        if d.k is None or d.reference_size is None:
            return p <= d.alpha, p > 1.0 - d.alpha
        # p = (1 + #{ref >= s})/(n + 1): recover the integer rank count exactly.
        at_least = np.rint(p * (d.reference_size + 1)).astype(np.int64) - 1
        return at_least < d.k, at_least > d.reference_size - d.k

    def update(self, p_values: np.ndarray, is_ood: np.ndarray | None = None) -> bool:
        """Feed the p-values of served images, in serving order; `is_ood` (same length) feeds the
        windowed OOD rate (default: the upper-tail indicator). Returns the alarm state."""
        upper, lower = self.indicators(p_values)
        flags = upper if is_ood is None else np.asarray(is_ood, dtype=bool).reshape(-1)
        if flags.size != upper.size:
            raise ValueError(f"is_ood has {flags.size} entries for {upper.size} p-values")
        w, h = self.design.weight, self.design.threshold
        with self._lock:
            su, sl, seen = self._upper, self._lower, self._images
            alarm_at, alarm_tail = self._alarm_at, self._alarm_tail
            for u, lo in zip(upper.tolist(), lower.tolist(), strict=True):
                su = su + w if u else max(0, su - 1)
                sl = sl + w if lo else max(0, sl - 1)
                seen += 1
                if alarm_at is None and (su >= h or sl >= h):
                    alarm_at, alarm_tail = seen, ("upper_tail" if su >= h else "lower_tail")
            self._upper, self._lower, self._images = su, sl, seen
            self._alarm_at, self._alarm_tail = alarm_at, alarm_tail
            self._push_window(flags)
            return alarm_at is not None

    def _push_window(self, flags: np.ndarray) -> None:
        if flags.size >= self.window:
            self._ring[:] = flags[-self.window :]
            self._ring_pos, self._ring_fill = 0, self.window
            self._ring_ood = int(np.count_nonzero(self._ring))
            return
        for flag in flags.tolist():
            if self._ring_fill == self.window:
                self._ring_ood -= int(self._ring[self._ring_pos])
            else:
                self._ring_fill += 1
            self._ring[self._ring_pos] = flag
            self._ring_ood += int(flag)
            self._ring_pos = (self._ring_pos + 1) % self.window

    @property
    def alarm(self) -> bool:
        with self._lock:
            return self._alarm_at is not None

    def state(self) -> dict[str, Any]:
        """The detector's state for `GET .../drift` and the metrics (statistics in nats)."""
        d = self.design
        with self._lock:
            upper, lower, seen = self._upper, self._lower, self._images
            alarm_at, alarm_tail = self._alarm_at, self._alarm_tail
            fill, ood = self._ring_fill, self._ring_ood
        low, high = wilson_interval(ood, fill)
        return {
            "method": "bernoulli_cusum(upper_tail, lower_tail)",
            "images": seen,
            "statistic": max(upper, lower) * d.nats_per_unit,
            "statistics": {"upper_tail": upper * d.nats_per_unit, "lower_tail": lower * d.nats_per_unit},
            "threshold": d.threshold * d.nats_per_unit,
            "alarm": alarm_at is not None,
            "alarm_at_image": alarm_at,
            "alarm_tail": alarm_tail,
            "window_images": fill,
            "window_ood_rate": ood / fill if fill else None,
            "window_ood_rate_interval": [low, high] if fill else None,
            "expected_run_length": d.expected_run_length,
            "design": {
                "alpha": d.alpha,
                "alpha1": d.alpha1,
                "reference_size": d.reference_size,
                "weight": d.weight,
                "threshold_units": d.threshold,
                "assurance": d.assurance,
                "design_rate": d.design_rate,
                "run_length_at_alpha": d.run_length_at_alpha,
                "run_length_at_design": d.run_length_at_design,
            },
        }

    def run_lengths(self, chunks: Iterable[np.ndarray]) -> np.ndarray:
        """Simulation helper: R independent streams, each from a fresh detector, fed chunk by chunk
        (`(R, T_i)` p-values per chunk, so long streams need not sit in memory); returns `(R,)` int,
        the 1-based image at which each stream first alarms, 0 if none. The same arithmetic as
        `update`, vectorised over streams (the detector itself is not touched)."""
        w, h = self.design.weight, self.design.threshold
        su = sl = first = np.zeros(0, dtype=np.int64)
        offset = 0
        for chunk in chunks:
            p = np.asarray(chunk, dtype=np.float64)
            if p.ndim != 2:
                raise ValueError(f"each chunk must be (streams, images), got shape {p.shape}")
            if offset == 0:
                su, sl, first = (np.zeros(p.shape[0], dtype=np.int64) for _ in range(3))
            elif p.shape[0] != first.size:
                raise ValueError("every chunk must hold the same number of streams")
            upper, lower = (x.reshape(p.shape) for x in self.indicators(p.reshape(-1)))
            for t in range(p.shape[1]):
                su = np.where(upper[:, t], su + w, np.maximum(su - 1, 0))
                sl = np.where(lower[:, t], sl + w, np.maximum(sl - 1, 0))
                first = np.where((first == 0) & ((su >= h) | (sl >= h)), offset + t + 1, first)
            offset += p.shape[1]
            if np.all(first > 0):
                break
        return first


class DriftMonitor:
    """Online detectors keyed by `(kind, name)`, kind `model` or `ensemble` (thread-safe).

    `watch(kind, name, source, reference_size)` returns the detector for `source` (the loaded model
    or ensemble object), creating a fresh one when there is none or `source` is a different object
    than the one it was made for (a reload). Detectors share the monitor's configuration.
    """

    def __init__(
        self,
        expected_run_length: float = DEFAULT_RUN_LENGTH,
        *,
        window: int = DEFAULT_WINDOW,
        alpha: float = DEFAULT_ALPHA,
        alpha1: float = DEFAULT_ALPHA1,
        assurance: float = DEFAULT_ASSURANCE,
    ) -> None:
        self.expected_run_length = float(expected_run_length)
        self._config: dict[str, Any] = {
            "window": window,
            "alpha": alpha,
            "alpha1": alpha1,
            "assurance": assurance,
        }
        design_cusum(self.expected_run_length, alpha=alpha, alpha1=alpha1, assurance=assurance)  # validate
        self._lock = threading.Lock()
        self._detectors: dict[tuple[str, str], tuple[Any, OnlineDriftDetector]] = {}

    @staticmethod
    def _ref(source: object) -> Any:
        try:
            return weakref.ref(source)
        except TypeError:  # not weak-referenceable: hold it (a small object)
            return lambda: source

    def watch(self, kind: str, name: str, source: object, reference_size: int | None) -> OnlineDriftDetector:
        key = (kind, name)
        with self._lock:
            entry = self._detectors.get(key)
            if entry is not None and entry[0]() is source:
                return entry[1]
            detector = OnlineDriftDetector(
                self.expected_run_length, reference_size=reference_size, **self._config
            )
            self._detectors[key] = (self._ref(source), detector)
            return detector

    def observe(
        self,
        kind: str,
        name: str,
        source: object,
        reference_size: int | None,
        p_values: np.ndarray,
        is_ood: np.ndarray | None = None,
    ) -> bool:
        """Feed served p-values to the detector of `source`; returns its alarm state."""
        try:
            detector = self.watch(kind, name, source, reference_size)
        except ValueError:
            # Too few reference scores for a CUSUM design (a model calibrated on a small split,
            # e.g. `oodflow build` on a few hundred images): no online detector for it, and
            # scoring must not fail because of that.
            return False
        return detector.update(p_values, is_ood)

    def get(self, kind: str, name: str) -> OnlineDriftDetector | None:
        with self._lock:
            entry = self._detectors.get((kind, name))
            return None if entry is None else entry[1]

    def reset(self, kind: str, name: str) -> bool:
        """Reset one detector; False if there is none."""
        detector = self.get(kind, name)
        if detector is not None:
            detector.reset()
        return detector is not None

    def forget(self, kind: str, name: str) -> None:
        """Drop a detector (its model or ensemble is no longer served)."""
        with self._lock:
            self._detectors.pop((kind, name), None)

    def items(self) -> list[tuple[str, str, OnlineDriftDetector]]:
        """`(kind, name, detector)`, sorted; detectors whose watched object is gone (a model unloaded
        and released) are dropped, so their series leave the exposition."""
        with self._lock:
            for key in [k for k, entry in self._detectors.items() if entry[0]() is None]:
                del self._detectors[key]
            return [(k, n, entry[1]) for (k, n), entry in sorted(self._detectors.items())]
