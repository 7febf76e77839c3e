"""`oodflow calibrate`: the OOD threshold, set on held-out in-distribution data only.

`ood_score` is computed from bits/dim by the statistic in the run config (models.scores);
the threshold is the (1 − target_fpr) quantile of the calibration split's scores, so about
`target_fpr` of in-distribution images are flagged; the sorted scores are kept for p-values.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from models.scores import bits_per_dim, ood_score
from training.runs import Run, Splits, load_splits, resolve_device
from training.scoring import log_likelihoods

__all__ = ["calibrate", "compute_scores", "threshold_at_fpr"]


def threshold_at_fpr(scores: np.ndarray, target_fpr: float) -> float:
    """Smallest observed score such that at most `target_fpr` of `scores` lie strictly above."""
    return float(np.quantile(np.asarray(scores, dtype=np.float64), 1.0 - target_fpr, method="higher"))


def compute_scores(run: Run, calibration: dict[str, Any], log_likelihood: np.ndarray) -> np.ndarray:
    return ood_score(
        calibration["statistic"],
        log_likelihood,
        num_dims=int(calibration["num_dims"]),
        reference_nll_mean=calibration.get("reference_bits_per_dim"),
    )


def calibrate(run_dir: str, *, device: str = "auto", splits: Splits | None = None) -> dict[str, Any]:
    run = Run(run_dir)  # type: ignore[arg-type]
    model = run.load_model(resolve_device(device))
    splits = splits or load_splits(run.config, with_eval_sets=False)
    cfg = run.config.calibration
    cache = run.dir / "features"
    num_dims = model.num_dims
    # Typicality's centre is the mean bits/dim of training-distribution data the threshold never sees.
    val_ll = log_likelihoods(model, splits.validation, cache_dir=cache, key="validation")
    reference = float(np.mean(bits_per_dim(val_ll, num_dims))) if len(val_ll) else None
    calib_ll = log_likelihoods(model, splits.calibration, cache_dir=cache, key="calibration")
    payload: dict[str, Any] = {
        "statistic": cfg.statistic,
        "num_dims": num_dims,
        "reference_bits_per_dim": reference,
        "target_fpr": cfg.target_fpr,
        "validation_set": f"{run.config.data.in_distribution} (held-out calibration split)",
        "validation_size": len(calib_ll),
    }
    scores = np.sort(compute_scores(run, payload, calib_ll))
    threshold = threshold_at_fpr(scores, cfg.target_fpr)
    payload.update(
        threshold=threshold,
        validation_fpr=float(np.mean(scores > threshold)),
        calibration_mean_bits_per_dim=float(np.mean(bits_per_dim(calib_ll, num_dims))),
        reference_scores=[float(s) for s in scores],
    )
    run.write_json("calibration.json", payload)
    return payload
