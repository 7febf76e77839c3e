"""The background flow of the likelihood-ratio score (Ren et al. 2019).

The background flow is trained like the main flow, on the same training images, but with each
pixel replaced by a uniform random value in 0..255 with probability μ
(`calibration.background.perturbation_rate`). The noise corrupts the semantics and keeps the
population-level statistics, so `log p(x) − log p_background(x)` cancels the part of the likelihood
that makes a Fashion-MNIST flow prefer MNIST digits.

As Ren et al. 2019 train it: a fresh perturbation of every batch at every step (drawn from a
seeded, checkpointed generator inside the training loop, `train(perturbation_rate=μ)`), and an
L2 penalty `calibration.background.weight_decay` (Ren et al. regularise the background model;
> 0 is what they use). It lives in the main run's folder (`<run>/background/`, a run folder of its
own with checkpoints, so it resumes like any run). Its validation images (model selection and the
summary only) carry one fixed seeded perturbation, so the validation figure is repeatable.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from models.config import PixelFlowConfig
from models.flows import PixelFlow
from models.ratio import LikelihoodRatioModel
from training.config import RunConfig
from training.data import ImageSet
from training.runs import Run, Splits
from training.train import TrainResult, train

__all__ = [
    "background_config",
    "background_dir",
    "has_background",
    "load_background",
    "perturb",
    "scoring_model",
    "train_background",
]


def perturb(images: np.ndarray, rate: float, seed: int) -> np.ndarray:
    """`images: (N, C, H, W) uint8` -> a copy with each value replaced, with probability `rate`, by
    a uniform random integer in 0..255 (Ren et al. 2019, §4)."""
    rng = np.random.default_rng(seed)
    out = np.array(images, dtype=np.uint8, copy=True)
    mask = rng.random(out.shape) < rate
    out[mask] = rng.integers(0, 256, size=int(mask.sum()), dtype=np.uint8)
    return out


def background_dir(run: Run) -> Path:
    return run.dir / "background"


def background_config(config: RunConfig) -> RunConfig:
    """The background flow's own run config, derived from the main run's."""
    bg = config.calibration.background
    main_model = config.model
    if not isinstance(main_model, PixelFlowConfig):
        raise ValueError("the likelihood-ratio statistic needs a pixel flow")
    model = bg.model or main_model
    train_cfg = config.train.model_copy(
        update={
            "max_steps": bg.max_steps or config.train.max_steps,
            "weight_decay": bg.weight_decay,
            "seed": config.train.seed + bg.seed,
        }
    )
    return config.model_copy(
        update={
            "name": f"{config.name}-background",
            "description": f"background flow (μ={bg.perturbation_rate}) for {config.name}",
            "model": model.model_copy(update={"seed": model.seed + bg.seed}),
            "train": train_cfg,
        }
    )


def _perturbed(dataset: ImageSet, rate: float, seed: int) -> ImageSet:
    return ImageSet(f"{dataset.name}+noise{rate}", perturb(dataset.images, rate, seed), source=dataset.source)


def has_background(run: Run) -> bool:
    folder = background_dir(run)
    return (folder / "model.safetensors").is_file() and (folder / "train_summary.json").is_file()


def train_background(
    run: Run,
    splits: Splits,
    *,
    device: str = "auto",
    max_minutes: float | None = None,
    progress: bool = False,
) -> TrainResult | None:
    """Train (or resume, or skip if done) the run's background flow. Returns None when it was done."""
    if has_background(run):
        return None
    config = background_config(run.config)
    rate = run.config.calibration.background.perturbation_rate
    seed = config.train.seed
    perturbed = Splits(
        train=splits.train,
        validation=_perturbed(splits.validation, rate, seed + 1),
        calibration=splits.calibration,
        fingerprint=splits.fingerprint,
    )
    folder = background_dir(run)
    resume = (folder / "checkpoints" / "last.pt").is_file()
    return train(
        config,
        folder,
        resume=resume,
        max_minutes=max_minutes,
        device=device,
        progress=progress,
        splits=perturbed,
        perturbation_rate=rate,
    )


def load_background(run: Run, device: torch.device | str = "cpu") -> PixelFlow:
    if not has_background(run):
        raise FileNotFoundError(
            f"{background_dir(run)}: no trained background flow (the likelihood-ratio statistic needs one)"
        )
    model = Run(background_dir(run)).load_model(device)
    assert isinstance(model, PixelFlow)
    return model


def scoring_model(run: Run, statistic: str, device: torch.device | str = "cpu") -> torch.nn.Module:
    """What gets exported: the main flow, or main + background for the likelihood ratio."""
    model = run.load_model(device)
    if statistic != "likelihood_ratio":
        return model
    assert isinstance(model, PixelFlow)
    return LikelihoodRatioModel(model, load_background(run, device)).eval()
