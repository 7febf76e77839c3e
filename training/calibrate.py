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

from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, ValidationError

from models.artifact import BackgroundSpec, Calibration, ComplexitySpec, ScoreSpec, StatisticSelection
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

__all__ = [
    "CALIBRATION_FILE",
    "CalibrationRecord",
    "calibrate",
    "compute_scores",
    "load_background_for",
    "read_calibration",
    "threshold_at_fpr",
]

CALIBRATION_FILE = "calibration.json"


class CalibrationRecord(Calibration):
    """calibration.json: the manifest's `calibration` block (the threshold and sorted reference
    scores) plus the `score` parts that calibration decides (statistic, how it was chosen, typicality
    centre, compressor, background flow) and a few figures for reports. The JSON keys are flat, as
    they were when this was a plain dict, so older run folders still read."""

    statistic: OodStatistic
    selection: StatisticSelection | None = None
    num_dims: int = Field(ge=1)
    reference_bits_per_dim: float | None = None  # typicality's centre (ScoreSpec)
    complexity: ComplexitySpec | None = None  # statistic "complexity" only
    background: BackgroundSpec | None = None  # statistic "likelihood_ratio" only
    calibration_mean_bits_per_dim: float
    combination_size: int | None = Field(None, description="images scored for the ensemble's own threshold")

    def calibration_spec(self) -> Calibration:
        """The manifest's `calibration` block."""
        return Calibration(**{k: getattr(self, k) for k in Calibration.model_fields})

    def score_spec(self, description: str) -> ScoreSpec:
        """The manifest's `score` block."""
        return ScoreSpec(
            statistic=self.statistic,
            reference_bits_per_dim=self.reference_bits_per_dim,
            description=description,
            complexity=self.complexity,
            background=self.background,
            selection=self.selection,
        )


def read_calibration(run: Run) -> CalibrationRecord:
    """The run's calibration.json; a missing or malformed file is a one-line error."""
    path = Path(run.dir) / CALIBRATION_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: run `oodflow calibrate {run.dir}` first")
    try:
        return CalibrationRecord.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "file"
        raise ValueError(
            f"{path}: not a calibration record ({where}: {first['msg']}); recalibrate the run "
            f"(`oodflow calibrate {run.dir}`)"
        ) from None


def compute_scores(calibration: CalibrationRecord, inputs: np.ndarray | StatisticInputs) -> np.ndarray:
    """ood_score per image from the calibration record and the statistic's inputs (or the
    log-likelihoods alone, for statistics that need nothing else)."""
    if not isinstance(inputs, StatisticInputs):
        inputs = StatisticInputs(np.asarray(inputs, dtype=np.float64))
    return score_statistic(
        calibration.statistic,
        inputs,
        num_dims=calibration.num_dims,
        reference_bits_per_dim=calibration.reference_bits_per_dim,
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
) -> CalibrationRecord:
    """Calibrate the run's OOD score; `statistic` / `target_fpr` override the run config's
    (`statistic="auto"`: choose it, `training.selection.select_statistic`). Writes and returns the
    run's calibration.json record."""
    run = Run(run_dir)  # type: ignore[arg-type]
    dev = resolve_device(device)
    model = run.load_model(dev)
    cfg = run.config.calibration
    target_fpr = target_fpr or cfg.target_fpr
    splits = splits or load_splits(run.config, with_eval_sets=False)
    requested = statistic or cfg.statistic
    if requested == "auto":
        selection = select_statistic(run, splits, device=dev)
    else:
        selection = user_choice(requested, "user" if statistic else "run config")
    chosen = selection.chosen
    if chosen == "likelihood_ratio" and not has_background(run):
        train_background(run, splits, device=device, progress=progress)
    background = load_background_for(run, chosen, dev)
    cache = run.dir / "features"
    num_dims = model.num_dims
    # Typicality's centre is the mean bits/dim of training-distribution data the threshold never sees.
    val_ll = statistic_inputs(model, splits.validation, [], cache_dir=cache, key="validation").log_likelihood
    reference = float(np.mean(bits_per_dim(val_ll, num_dims))) if len(val_ll) else None

    def score(inputs: StatisticInputs) -> np.ndarray:
        return score_statistic(chosen, inputs, num_dims=num_dims, reference_bits_per_dim=reference)

    inputs = statistic_inputs(
        model, splits.calibration, [chosen], background=background, cache_dir=cache, key="calibration"
    )
    raw = score(inputs)
    save_split_scores(run.dir / "scores", "calibration", splits.calibration, raw, inputs.log_likelihood)
    stale = run.dir / "scores" / "combination.npz"
    combination_size = None
    if splits.combination is not None and len(splits.combination):
        # The ensemble's own calibration images: scored here so that every member of an ensemble
        # scores them with the statistic and model it ships.
        comb = statistic_inputs(
            model, splits.combination, [chosen], background=background, cache_dir=cache, key="combination"
        )
        comb_scores = score(comb)
        save_split_scores(
            run.dir / "scores", "combination", splits.combination, comb_scores, comb.log_likelihood
        )
        combination_size = len(comb_scores)
    elif stale.is_file():
        stale.unlink()  # from an earlier calibration with other splits
    scores = np.sort(raw)
    threshold = threshold_at_fpr(scores, target_fpr)
    record = CalibrationRecord(
        statistic=chosen,
        selection=selection,
        num_dims=num_dims,
        reference_bits_per_dim=reference,
        target_fpr=target_fpr,
        threshold=threshold,
        validation_set=f"{run.config.data.in_distribution} (held-out calibration split)",
        validation_size=len(scores),
        validation_fpr=float(np.mean(scores > threshold)),
        reference_scores=[float(s) for s in scores],
        complexity=_complexity_spec() if chosen == "complexity" else None,
        background=_background_spec(run) if chosen == "likelihood_ratio" else None,
        calibration_mean_bits_per_dim=float(np.mean(bits_per_dim(inputs.log_likelihood, num_dims))),
        combination_size=combination_size,
    )
    # The optional parts are left out when unused, as in the records written before this class.
    unused = {k for k in ("complexity", "background", "combination_size") if getattr(record, k) is None}
    (run.dir / CALIBRATION_FILE).write_text(record.model_dump_json(indent=2, exclude=unused) + "\n")
    return record


def _complexity_spec() -> ComplexitySpec:
    return ComplexitySpec(compressor="png", compress_level=PNG_COMPRESS_LEVEL, canary=complexity_canary())


def _background_spec(run: Run) -> BackgroundSpec:
    bg_config = background_config(run.config)
    return BackgroundSpec(
        perturbation_rate=run.config.calibration.background.perturbation_rate,
        architecture=bg_config.model.model_dump(mode="json"),
        training={
            **bg_config.train.model_dump(mode="json"),
            "summary": Run(run.dir / "background").read_json("train_summary.json"),
        },
    )
