"""Export a finished run as an artifact; chain the steps of one run (train → calibrate → evaluate →
export). `oodflow build` (training.build) and `build-defaults` (training.defaults) sit above this."""

from __future__ import annotations

from pathlib import Path

import torch

from models.artifact import DataSpec, InputSpec, Manifest, OodMetrics
from models.scores import LN256, OodStatistic
from training.background import scoring_model, train_background
from training.calibrate import calibrate, read_calibration
from training.config import RunConfig
from training.evaluate import evaluate
from training.export import export_artifact, next_version
from training.runs import Run, Splits, load_splits, splits_record
from training.train import train

__all__ = ["build_run", "export_run"]

_STATISTIC_TEXT: dict[OodStatistic, str] = {
    "nll": "negative log-likelihood in bits/dim (one-sided: low likelihood is OOD)",
    "typicality": "two-sided typicality |bits/dim − mean in-distribution bits/dim| (Nalisnick et al. 2019)",
    "complexity": "input complexity S(x) = bits/dim under the flow − PNG bits/dim of the image at "
    "compression level 9 (Serrà et al. 2020); the PNG length is computed outside the graph by "
    "models.scores.png_bits_per_dim",
    "likelihood_ratio": "likelihood ratio: bits/dim under the flow − bits/dim under the background flow "
    "trained on perturbed images (Ren et al. 2019); the graph's background_log_likelihood output",
}


def _manifest(run: Run, name: str, version: int) -> Manifest:
    config = run.config
    model_cfg = config.model
    calibration = read_calibration(run)
    evaluation = run.read_json("evaluation.json")
    summary = run.read_json("train_summary.json")
    c, h, w = model_cfg.input_shape
    pixel = model_cfg.kind == "pixel"
    splits_info = run.read_json("splits.json")
    return Manifest(
        name=name,
        version=version,
        kind=model_cfg.kind,
        description=config.description,
        input=InputSpec(channels=c, height=h, width=w, colour="L" if c == 1 else "RGB"),
        num_dims=calibration.num_dims,
        bits_per_dim_unit="pixel" if pixel else "feature",
        log_likelihood_definition=(
            "log P(x) of the discrete 8-bit image in nats: continuous density of the mid-point "
            f"dequantized image on [0,1]^D minus D·ln 256 (D·ln 256 = {calibration.num_dims * LN256:.2f})"
            if pixel
            else "log-density in nats of the L2-normalised, whitened EfficientNet-Lite0 feature vector under the flow"
        ),
        architecture=model_cfg.model_dump(mode="json"),
        training={
            **config.model_dump(mode="json", exclude={"model"}),
            "summary": summary,
            "splits": {k: v for k, v in splits_info.items() if k != "train_fingerprint"},
        },
        parameters=int(summary["parameters"]),
        data=DataSpec(
            in_distribution=config.data.in_distribution,
            fingerprint=splits_info["train_fingerprint"],
            train_size=splits_info["train_size"],
            calibration_size=splits_info["calibration_size"],
            test_set=evaluation["in_distribution"]["dataset"],
        ),
        score=calibration.score_spec(_STATISTIC_TEXT[calibration.statistic]),
        calibration=calibration.calibration_spec(),
        in_distribution_test={
            "mean_bits_per_dim": evaluation["in_distribution"]["mean_bits_per_dim"],
            "flagged_fraction": evaluation["in_distribution"]["flagged_fraction"],
            "size": evaluation["in_distribution"]["size"],
        },
        metrics=[OodMetrics(**{k: m[k] for k in OodMetrics.model_fields}) for m in evaluation["ood"]],
        baselines=evaluation.get("baselines", {}),
    )


def export_run(
    run_dir: Path,
    repository: Path,
    *,
    name: str | None = None,
    version: int | None = None,
    splits: Splits | None = None,
) -> Path:
    """Write the run as `<repository>/<name>/<version>/` after the parity check."""
    run = Run(run_dir)
    name = name or run.config.name
    version = version or next_version(repository, name)
    model = scoring_model(run, read_calibration(run).statistic, "cpu")
    splits = splits or load_splits(run.config, with_eval_sets=True)
    # Parity on real images: in-distribution test images and, where there is one, an OOD set.
    pool = [splits.test.images[:4]] if splits.test is not None else [splits.calibration.images[:4]]
    pool += [d.images[:4] for d in splits.ood.values()]
    images = torch.from_numpy(
        __import__("numpy").concatenate(pool + [splits.calibration.images[:8]])[:8].copy()
    )
    return export_artifact(
        model, _manifest(run, name, version), repository, images, report_dir=run.report_dir
    )


def build_run(
    config: RunConfig,
    run_dir: Path,
    repository: Path,
    *,
    name: str | None = None,
    device: str = "auto",
    progress: bool = True,
    max_minutes: float | None = None,
    resume: bool = True,
) -> Path:
    """train → calibrate → evaluate → export, resuming a half-finished run."""
    run = Run(run_dir, config)
    splits = load_splits(config)
    run.dir.mkdir(parents=True, exist_ok=True)
    run.write_json("splits.json", splits_record(splits))
    done = (run.dir / "train_summary.json").is_file() and run.weights_path.is_file()
    ratio = config.calibration.statistic == "likelihood_ratio"
    # The background flow of the likelihood ratio shares the time budget with the main flow.
    share = config.calibration.background.time_fraction if ratio else 0.0
    if not done:
        train(
            config,
            run_dir,
            resume=resume and run.checkpoint_path.is_file(),
            device=device,
            progress=progress,
            splits=splits,
            max_minutes=None if max_minutes is None else max_minutes * (1 - share),
        )
    if ratio:
        train_background(
            run,
            splits,
            device=device,
            progress=progress,
            max_minutes=None if max_minutes is None else max_minutes * share,
        )
    calibrate(str(run_dir), device=device, splits=splits)
    evaluate(str(run_dir), device=device, splits=splits)
    return export_run(run_dir, repository, name=name, splits=splits)
