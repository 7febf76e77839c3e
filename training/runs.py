"""A run folder: the resolved config, checkpoints, the trained weights and what later steps
(calibrate, evaluate, export) read and write.

    runs/<name>/
      config.json          the full resolved RunConfig
      metrics.jsonl        one JSON object per logged training step
      checkpoints/last.pt  model, optimiser, step and RNG states (resume)
      model.safetensors    the trained (selected) weights
      train_summary.json   steps, time, final losses
      splits.json          sizes of the in-distribution splits and the training fingerprint
      features/*.npy       embedding runs: cached backbone features per split
      calibration.json     threshold and reference scores
      scores/*.npz         per-image scores per split (calibration, combination, test, ood-*)
      report/              metrics.json, report.md, PNG figures
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from models.flows import EmbeddingFlow, PixelFlow, build_model
from training.config import RunConfig
from training.data import ImageSet, load_dataset, split_train_calibration

__all__ = ["Run", "Splits", "load_splits", "resolve_device", "splits_record"]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but no CUDA GPU is visible")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got '{device}'")
    return torch.device(device)


@dataclass
class Splits:
    """In-distribution train / validation (held out of train, for model selection) /
    calibration (held out, for each model's threshold) / combination (held out, for the
    ensemble's own threshold) / test, and the OOD sets.

    The held-out calibration images are cut in two halves by a seeded permutation: each model
    calibrates on `calibration`, the ensemble of models on `combination`, so the combined
    verdict's threshold is set on images that gave none of its members' reference scores.
    """

    train: ImageSet
    validation: ImageSet
    calibration: ImageSet
    test: ImageSet | None = None
    ood: dict[str, ImageSet] = field(default_factory=dict)
    fingerprint: str = ""
    combination: ImageSet | None = None


def load_splits(
    config: RunConfig,
    *,
    with_eval_sets: bool = True,
    datasets: dict[tuple[Any, ...], ImageSet] | None = None,
) -> Splits:
    """The splits of `config.data`, every image conformed to the model's input shape.

    Deterministic in `data.seed`: `calibration_size` images are held out (then halved into
    calibration and combination); with no test set, as many again are held out as the test
    split; validation is `train.validation_size` (at most a fifth) of the rest. `datasets`, when
    given, memoises the loaded datasets across calls (two models built on the same data).
    """
    data, shape = config.data, config.model.input_shape

    def load(spec: str, limit: int | None = None) -> ImageSet:
        key = (spec, tuple(shape), limit, data.seed)
        if datasets is not None and key in datasets:
            return datasets[key]
        loaded = load_dataset(spec, shape=shape, limit=limit, seed=data.seed)
        if datasets is not None:
            datasets[key] = loaded
        return loaded

    full = load(data.in_distribution)
    fit_idx, held_idx = split_train_calibration(len(full), data.calibration_size, data.seed)
    rng = np.random.default_rng(data.seed + 1)
    fit_idx = rng.permutation(fit_idx)
    if data.test_set is None:
        test_idx, fit_idx = fit_idx[: len(held_idx)], fit_idx[len(held_idx) :]
    n_val = min(config.train.validation_size, len(fit_idx) // 5)
    val_idx, train_idx = fit_idx[:n_val], fit_idx[n_val:]
    if data.train_limit is not None:
        train_idx = train_idx[: data.train_limit]  # already a seeded random permutation
    halves = np.random.default_rng(data.seed + 2).permutation(held_idx)
    n_calib = (len(halves) + 1) // 2
    calib_idx, comb_idx = np.sort(halves[:n_calib]), np.sort(halves[n_calib:])
    train = full.subset(np.sort(train_idx))
    splits = Splits(
        train=train,
        validation=full.subset(np.sort(val_idx)),
        calibration=full.subset(calib_idx),
        test=full.subset(np.sort(test_idx)) if data.test_set is None else None,
        fingerprint=train.fingerprint(),
        combination=full.subset(comb_idx) if len(comb_idx) else None,
    )
    if with_eval_sets:
        if data.test_set is not None:
            splits.test = load(data.test_set, data.test_limit)
        for name in data.ood_sets:
            splits.ood[name] = load(name, data.ood_limit)
    return splits


def splits_record(splits: Splits) -> dict[str, Any]:
    """What `splits.json` (and the manifest's `training.splits`) says about the splits."""
    return {
        "train_fingerprint": splits.fingerprint,
        "train_size": len(splits.train),
        "validation_size": len(splits.validation),
        "calibration_size": len(splits.calibration),
        "combination_size": 0 if splits.combination is None else len(splits.combination),
        "test_size": None if splits.test is None else len(splits.test),
    }


class Run:
    """Accessor for one run folder."""

    def __init__(self, directory: Path, config: RunConfig | None = None) -> None:
        self.dir = Path(directory)
        if config is None:
            path = self.dir / "config.json"
            if not path.is_file():
                raise FileNotFoundError(f"{self.dir}: no config.json (run `oodflow train` first)")
            config = RunConfig.model_validate_json(path.read_text())
        self.config = config

    # paths
    @property
    def weights_path(self) -> Path:
        return self.dir / "model.safetensors"

    @property
    def checkpoint_path(self) -> Path:
        return self.dir / "checkpoints" / "last.pt"

    @property
    def report_dir(self) -> Path:
        return self.dir / "report"

    def write_config(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "config.json").write_text(self.config.model_dump_json(indent=2) + "\n")

    def read_json(self, name: str) -> dict[str, Any]:
        path = self.dir / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} missing: run the previous step first")
        return json.loads(path.read_text())

    def write_json(self, name: str, payload: dict[str, Any]) -> None:
        (self.dir / name).write_text(json.dumps(payload, indent=2) + "\n")

    def load_model(self, device: torch.device | str = "cpu") -> PixelFlow | EmbeddingFlow:
        if not self.weights_path.is_file():
            raise FileNotFoundError(f"{self.weights_path} missing: run `oodflow train` first")
        model = build_model(self.config.model)
        model.load_state_dict(load_file(str(self.weights_path)), strict=True)
        return model.to(device).eval()
