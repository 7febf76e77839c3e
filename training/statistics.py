"""The inputs every OOD statistic needs, computed once per split, and the statistics themselves.

`models.scores.ood_score` holds the formulas (shared with the service); this module gathers what
they read from a trained run: the main flow's log-likelihoods, the background flow's (likelihood
ratio) and the PNG code lengths of the images (input complexity), and saves per-image scores so
that later steps (the ensemble) can pair them image by image.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.flows import EmbeddingFlow, PixelFlow
from models.scores import OOD_STATISTICS, OodStatistic, ood_score, png_bits_per_dim
from training.data import ImageSet
from training.scoring import log_likelihoods

__all__ = [
    "StatisticInputs",
    "load_split_scores",
    "save_split_scores",
    "score_statistic",
    "statistic_inputs",
]


@dataclass
class StatisticInputs:
    """Per image, `(N,)` float64: nats, nats, PNG bits per dimension."""

    log_likelihood: np.ndarray
    background_log_likelihood: np.ndarray | None = None
    complexity_bits: np.ndarray | None = None


def statistic_inputs(
    model: PixelFlow | EmbeddingFlow,
    dataset: ImageSet,
    statistics: Iterable[str],
    *,
    background: PixelFlow | None = None,
    cache_dir: Path | None = None,
    key: str = "",
) -> StatisticInputs:
    """What `statistics` need for `dataset`, in evaluation mode (deterministic)."""
    wanted = set(statistics)
    unknown = wanted - set(OOD_STATISTICS)
    if unknown:
        raise ValueError(f"unknown OOD statistic(s) {sorted(unknown)}; known: {', '.join(OOD_STATISTICS)}")
    if wanted & {"complexity", "likelihood_ratio"} and not isinstance(model, PixelFlow):
        raise ValueError("complexity and likelihood_ratio are pixel-flow statistics")
    inputs = StatisticInputs(log_likelihoods(model, dataset, cache_dir=cache_dir, key=key))
    if "likelihood_ratio" in wanted:
        if background is None:
            raise ValueError("the likelihood_ratio statistic needs a background flow")
        inputs.background_log_likelihood = log_likelihoods(background, dataset)
    if "complexity" in wanted:
        inputs.complexity_bits = png_bits_per_dim(dataset.images)
    return inputs


def score_statistic(
    statistic: OodStatistic,
    inputs: StatisticInputs,
    *,
    num_dims: int,
    reference_bits_per_dim: float | None = None,
) -> np.ndarray:
    """`(N,)` ood_score (higher = more OOD), exactly as the service computes it."""
    return ood_score(
        statistic,
        inputs.log_likelihood,
        num_dims=num_dims,
        reference_nll_mean=reference_bits_per_dim,
        complexity_bits=inputs.complexity_bits,
        background_log_likelihood=inputs.background_log_likelihood,
    )


def _file_name(split: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", split) + ".npz"


def save_split_scores(
    folder: Path, split: str, dataset: ImageSet, scores: np.ndarray, log_likelihood: np.ndarray
) -> None:
    """`<folder>/<split>.npz`: per-image ood_score and log_likelihood plus the images' fingerprint
    (no pickles: plain float and unicode arrays)."""
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(
        folder / _file_name(split),
        ood_score=np.asarray(scores, dtype=np.float64),
        log_likelihood=np.asarray(log_likelihood, dtype=np.float64),
        fingerprint=np.array(dataset.fingerprint()),
        dataset=np.array(dataset.name),
    )


def load_split_scores(folder: Path, split: str) -> dict[str, np.ndarray | str]:
    path = folder / _file_name(split)
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: calibrate and evaluate the run first")
    with np.load(path, allow_pickle=False) as data:
        return {
            "ood_score": data["ood_score"],
            "log_likelihood": data["log_likelihood"],
            "fingerprint": str(data["fingerprint"]),
            "dataset": str(data["dataset"]),
        }
