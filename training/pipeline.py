"""Export a finished run as an artifact, and chain the steps for `build-defaults`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from models.artifact import (
    ArtifactError,
    Calibration,
    DataSpec,
    InputSpec,
    Manifest,
    OodMetrics,
    ScoreSpec,
    find_versions,
    verify_artifact,
)
from models.scores import LN256
from training.calibrate import calibrate
from training.config import PRESETS, RunConfig
from training.evaluate import evaluate
from training.export import export_artifact, next_version
from training.runs import Run, load_splits, resolve_device
from training.train import train

__all__ = ["DEFAULT_MODELS", "build_defaults", "build_run", "export_run"]

DEFAULT_MODELS: dict[str, str] = {
    "fmnist-embedding": "fmnist-embedding",
    "fmnist-pixel": "fmnist-pixel-realnvp",
}
# Training-time caps that keep `build-defaults` within 15 minutes on a 2-core CPU even when the
# machine is slower than the one the step counts were sized on (the run then stops cleanly).
DEFAULT_TRAIN_MINUTES: dict[str, float] = {"fmnist-embedding": 3.0, "fmnist-pixel": 9.0}

_STATISTIC_TEXT = {
    "nll": "negative log-likelihood in bits/dim (one-sided: low likelihood is OOD)",
    "typicality": "two-sided typicality |bits/dim − mean in-distribution bits/dim| (Nalisnick et al. 2019)",
}


def _manifest(run: Run, name: str, version: int) -> Manifest:
    config = run.config
    model_cfg = config.model
    calibration = run.read_json("calibration.json")
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
        num_dims=int(calibration["num_dims"]),
        bits_per_dim_unit="pixel" if pixel else "feature",
        log_likelihood_definition=(
            "log P(x) of the discrete 8-bit image in nats: continuous density of the mid-point "
            f"dequantized image on [0,1]^D minus D·ln 256 (D·ln 256 = {int(calibration['num_dims']) * LN256:.2f})"
            if pixel
            else "log-density in nats of the L2-normalised, whitened EfficientNet-Lite0 feature vector under the flow"
        ),
        architecture=model_cfg.model_dump(mode="json"),
        training={**config.model_dump(mode="json", exclude={"model"}), "summary": summary},
        parameters=int(summary["parameters"]),
        data=DataSpec(
            in_distribution=config.data.in_distribution,
            fingerprint=splits_info["train_fingerprint"],
            train_size=splits_info["train_size"],
            calibration_size=splits_info["calibration_size"],
            test_set=evaluation["in_distribution"]["dataset"],
        ),
        score=ScoreSpec(
            statistic=calibration["statistic"],
            reference_bits_per_dim=calibration.get("reference_bits_per_dim"),
            description=_STATISTIC_TEXT.get(calibration["statistic"], calibration["statistic"]),
        ),
        calibration=Calibration(
            target_fpr=calibration["target_fpr"],
            threshold=calibration["threshold"],
            validation_set=calibration["validation_set"],
            validation_size=calibration["validation_size"],
            validation_fpr=calibration["validation_fpr"],
            reference_scores=calibration["reference_scores"],
        ),
        in_distribution_test={
            "mean_bits_per_dim": evaluation["in_distribution"]["mean_bits_per_dim"],
            "flagged_fraction": evaluation["in_distribution"]["flagged_fraction"],
            "size": evaluation["in_distribution"]["size"],
        },
        metrics=[OodMetrics(**{k: m[k] for k in OodMetrics.model_fields}) for m in evaluation["ood"]],
        baselines=evaluation.get("baselines", {}),
    )


def export_run(
    run_dir: Path, repository: Path, *, name: str | None = None, version: int | None = None
) -> Path:
    """Write the run as `<repository>/<name>/<version>/` after the parity check."""
    run = Run(run_dir)
    name = name or run.config.name
    version = version or next_version(repository, name)
    model = run.load_model("cpu")
    splits = load_splits(run.config, with_eval_sets=True)
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
    run.write_json(
        "splits.json",
        {
            "train_fingerprint": splits.fingerprint,
            "train_size": len(splits.train),
            "validation_size": len(splits.validation),
            "calibration_size": len(splits.calibration),
        },
    )
    done = (run.dir / "train_summary.json").is_file() and run.weights_path.is_file()
    if not done:
        train(
            config,
            run_dir,
            resume=resume and run.checkpoint_path.is_file(),
            device=device,
            progress=progress,
            splits=splits,
            max_minutes=max_minutes,
        )
    calibrate(str(run_dir), device=device, splits=splits)
    evaluate(str(run_dir), device=device, splits=splits)
    return export_run(run_dir, repository, name=name)


def _verified(repository: Path, name: str) -> bool:
    versions = find_versions(repository, name)
    if not versions:
        return False
    try:
        verify_artifact(repository / name / str(versions[-1]))
        return True
    except ArtifactError:
        return False


def build_defaults(
    repository: Path,
    *,
    runs_dir: Path = Path("runs"),
    device: str = "auto",
    progress: bool = True,
    force: bool = False,
) -> dict[str, Any]:
    """Build the default models into `repository`, skipping those already built and verified."""
    repository = Path(repository)
    built: dict[str, Any] = {}
    todo = [
        (name, preset) for name, preset in DEFAULT_MODELS.items() if force or not _verified(repository, name)
    ]
    for name in DEFAULT_MODELS:
        if (name, DEFAULT_MODELS[name]) not in todo:
            built[name] = "already built and verified"
    overall = tqdm(total=len(todo), desc="build-defaults", unit="model", disable=not progress, position=1)
    for name, preset in todo:
        overall.set_postfix(model=name)
        start = time.monotonic()
        minutes = None if resolve_device(device).type == "cuda" else DEFAULT_TRAIN_MINUTES.get(name)
        path = build_run(
            PRESETS[preset],
            runs_dir / name,
            repository,
            name=name,
            device=device,
            progress=progress,
            max_minutes=minutes,
        )
        built[name] = {"path": str(path), "seconds": round(time.monotonic() - start, 1)}
        overall.update(1)
    overall.close()
    return built
