"""A run folder: the resolved config, checkpoints, the trained weights and what later steps
(calibrate, evaluate, export) read and write.

    runs/<name>/
      config.json          the full resolved RunConfig
      metrics.jsonl        one JSON object per logged training step
      checkpoints/last.pt  model, optimiser, step and RNG states (resume)
      model.safetensors    the trained (selected) weights
      train_summary.json   steps, time, final losses
      features/*.npy       embedding runs: cached backbone features per split
      calibration.json     threshold and reference scores
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

__all__ = ["Run", "Splits", "load_splits", "resolve_device"]


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
    calibration (held out, for the threshold) / test, and the OOD sets."""

    train: ImageSet
    validation: ImageSet
    calibration: ImageSet
    test: ImageSet | None = None
    ood: dict[str, ImageSet] = field(default_factory=dict)
    fingerprint: str = ""


def load_splits(config: RunConfig, *, with_eval_sets: bool = True) -> Splits:
    data, shape = config.data, config.model.input_shape
    full = load_dataset(data.in_distribution, shape=shape)
    fit_idx, calib_idx = split_train_calibration(len(full), data.calibration_size, data.seed)
    rng = np.random.default_rng(data.seed + 1)
    fit_idx = rng.permutation(fit_idx)
    if data.test_set is None:
        test_idx, fit_idx = fit_idx[: len(calib_idx)], fit_idx[len(calib_idx) :]
    n_val = min(config.train.validation_size, len(fit_idx) // 5)
    val_idx, train_idx = fit_idx[:n_val], fit_idx[n_val:]
    if data.train_limit is not None:
        train_idx = train_idx[: data.train_limit]  # already a seeded random permutation
    train = full.subset(np.sort(train_idx))
    splits = Splits(
        train=train,
        validation=full.subset(np.sort(val_idx)),
        calibration=full.subset(calib_idx),
        test=full.subset(np.sort(test_idx)) if data.test_set is None else None,
        fingerprint=train.fingerprint(),
    )
    if with_eval_sets:
        if data.test_set is not None:
            splits.test = load_dataset(data.test_set, shape=shape, limit=data.test_limit, seed=data.seed)
        for name in data.ood_sets:
            splits.ood[name] = load_dataset(name, shape=shape, limit=data.ood_limit, seed=data.seed)
    return splits


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
