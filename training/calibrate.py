"""`oodflow calibrate`: the OOD threshold, set on held-out in-distribution data only.

`ood_score` is computed by the statistic passed in, else the run config's, with
`models.scores.ood_score`: `nll`, `typicality`, `complexity` (input complexity, Serrà et al. 2020)
or `likelihood_ratio` (Ren et al. 2019; trains the run's background flow first if it has none).
`auto` chooses among the statistics the run can compute on validation data and OOD proxies only
(`training.selection`); the record of how the statistic was chosen (`selection`: by the procedure,
by the user, or fixed by the run config) goes into calibration.json and the manifest.

The threshold is the split-conformal quantile of the calibration split's scores
(`models.scores.threshold_at_fpr`), so at most `target_fpr` of fresh in-distribution images are
flagged; the sorted scores are kept for p-values. Per-image scores go under `scores/`: the
calibration split's, and the combination split's (held-out images disjoint from the calibration
split, on which the ensemble sets its own threshold: `training.ensemble`).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from models.flows import PixelFlow
from models.scores import (
    PNG_COMPRESS_LEVEL,
    OodStatistic,
    bits_per_dim,
    complexity_canary,
    threshold_at_fpr,
)
from training.background import background_config, has_background, load_background, train_background
from training.runs import Run, Splits, load_splits, resolve_device
from training.selection import select_statistic, user_choice
from training.statistics import StatisticInputs, save_split_scores, score_statistic, statistic_inputs

__all__ = ["calibrate", "compute_scores", "load_background_for", "threshold_at_fpr"]


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
    statistic: OodStatistic | Literal["auto"] | None = None,
    target_fpr: float | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Calibrate the run's OOD score; `statistic` / `target_fpr` override the run config's
    (`statistic="auto"`: choose it, `training.selection.select_statistic`)."""
    run = Run(run_dir)  # type: ignore[arg-type]
    dev = resolve_device(device)
    model = run.load_model(dev)
    cfg = run.config.calibration
    target_fpr = target_fpr or cfg.target_fpr
    splits = splits or load_splits(run.config, with_eval_sets=False)
    requested = statistic or cfg.statistic
    if requested == "auto":
        selection = select_statistic(run, splits, device=dev)
        statistic = selection["chosen"]
    else:
        selection = user_choice(requested, "user" if statistic else "run config")
        statistic = requested
    assert statistic is not None and statistic != "auto"
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
        "selection": selection,
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
    stale = run.dir / "scores" / "combination.npz"
    if splits.combination is not None and len(splits.combination):
        # The ensemble's own calibration images: scored here so that every member of an ensemble
        # scores them with the statistic and model it ships.
        comb = statistic_inputs(
            model, splits.combination, [statistic], background=background, cache_dir=cache, key="combination"
        )
        comb_scores = compute_scores(run, payload, comb)
        save_split_scores(
            run.dir / "scores", "combination", splits.combination, comb_scores, comb.log_likelihood
        )
        payload["combination_size"] = len(comb_scores)
    elif stale.is_file():
        stale.unlink()  # from an earlier calibration with other splits
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
