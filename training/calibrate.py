"""`oodflow calibrate`: the OOD threshold, set on held-out in-distribution data only.

`ood_score` is computed by the statistic in the run config (or the one passed in) with
`models.scores.ood_score`: `nll`, `typicality`, `complexity` (input complexity, Serrà et al. 2020)
or `likelihood_ratio` (Ren et al. 2019; trains the run's background flow first if it has none).
The threshold is the (1 − target_fpr) quantile of the calibration split's scores, so about
`target_fpr` of in-distribution images are flagged; the sorted scores are kept for p-values and
the per-image scores under `scores/` for the ensemble.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from models.flows import PixelFlow
from models.scores import PNG_COMPRESS_LEVEL, OodStatistic, bits_per_dim, complexity_canary
from training.background import background_config, has_background, load_background, train_background
from training.runs import Run, Splits, load_splits, resolve_device
from training.statistics import StatisticInputs, save_split_scores, score_statistic, statistic_inputs

__all__ = ["calibrate", "compute_scores", "load_background_for", "threshold_at_fpr"]


def threshold_at_fpr(scores: np.ndarray, target_fpr: float) -> float:
    """Smallest observed score such that at most `target_fpr` of `scores` lie strictly above."""
    return float(np.quantile(np.asarray(scores, dtype=np.float64), 1.0 - target_fpr, method="higher"))


def compute_scores(
    run: Run, calibration: dict[str, Any], log_likelihood: np.ndarray | StatisticInputs
) -> np.ndarray:
    """ood_score per image from the calibration payload and the statistic's inputs."""
    inputs = (
        log_likelihood
        if isinstance(log_likelihood, StatisticInputs)
        else StatisticInputs(np.asarray(log_likelihood, dtype=np.float64))
    )
    return score_statistic(
        calibration["statistic"],
        inputs,
        num_dims=int(calibration["num_dims"]),
        reference_bits_per_dim=calibration.get("reference_bits_per_dim"),
    )


def load_background_for(run: Run, statistic: str, device: Any) -> PixelFlow | None:
    return load_background(run, device) if statistic == "likelihood_ratio" else None


def calibrate(
    run_dir: str,
    *,
    device: str = "auto",
    splits: Splits | None = None,
    statistic: OodStatistic | None = None,
    target_fpr: float | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Calibrate the run's OOD score; `statistic` / `target_fpr` override the run config's."""
    run = Run(run_dir)  # type: ignore[arg-type]
    dev = resolve_device(device)
    model = run.load_model(dev)
    cfg = run.config.calibration
    statistic = statistic or cfg.statistic
    target_fpr = target_fpr or cfg.target_fpr
    splits = splits or load_splits(run.config, with_eval_sets=False)
    if statistic == "likelihood_ratio" and not has_background(run):
        train_background(run, splits, device=device, progress=progress)
    background = load_background_for(run, statistic, dev)
    cache = run.dir / "features"
    num_dims = model.num_dims
    # Typicality's centre is the mean bits/dim of training-distribution data the threshold never sees.
    val_ll = statistic_inputs(model, splits.validation, [], cache_dir=cache, key="validation").log_likelihood
    reference = float(np.mean(bits_per_dim(val_ll, num_dims))) if len(val_ll) else None
    inputs = statistic_inputs(
        model, splits.calibration, [statistic], background=background, cache_dir=cache, key="calibration"
    )
    payload: dict[str, Any] = {
        "statistic": statistic,
        "num_dims": num_dims,
        "reference_bits_per_dim": reference,
        "target_fpr": target_fpr,
        "validation_set": f"{run.config.data.in_distribution} (held-out calibration split)",
        "validation_size": len(inputs.log_likelihood),
    }
    if statistic == "complexity":
        payload["complexity"] = {
            "compressor": "png",
            "compress_level": PNG_COMPRESS_LEVEL,
            "canary": complexity_canary(),
        }
    if statistic == "likelihood_ratio":
        bg_config = background_config(run.config)
        payload["background"] = {
            "perturbation_rate": cfg.background.perturbation_rate,
            "architecture": bg_config.model.model_dump(mode="json"),
            "training": {
                **bg_config.train.model_dump(mode="json"),
                "summary": Run(run.dir / "background").read_json("train_summary.json"),
            },
        }
    raw = compute_scores(run, payload, inputs)
    save_split_scores(run.dir / "scores", "calibration", splits.calibration, raw, inputs.log_likelihood)
    scores = np.sort(raw)
    threshold = threshold_at_fpr(scores, target_fpr)
    payload.update(
        threshold=threshold,
        validation_fpr=float(np.mean(scores > threshold)),
        calibration_mean_bits_per_dim=float(np.mean(bits_per_dim(inputs.log_likelihood, num_dims))),
        reference_scores=[float(s) for s in scores],
    )
    run.write_json("calibration.json", payload)
    return payload
