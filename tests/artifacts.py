"""Small but real model artifacts for the service tests (built once per test session).

`build_small_artifacts(repository)` trains two tiny RealNVP pixel flows for a few dozen Adam steps
on real images, calibrates each on held-out real images (threshold at 5% FPR) and exports them with
the production exporter, so the service is tested on exactly the files it serves in production:

- `fmnist-tiny`: 1×28×28 grey, Fashion-MNIST, statistic `nll`;
- `photo-tiny`: 3×32×32 RGB, random crops of scikit-image's bundled photos, statistic `typicality`.

The models are barely trained: the tests need real graphs and manifests, not good detectors.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from models.artifact import (
    Calibration,
    DataSpec,
    InputSpec,
    Manifest,
    ScoreSpec,
    write_ensemble,
)
from models.config import PixelFlowConfig
from models.flows import PixelFlow
from models.scores import ood_score
from training.data import load_dataset
from training.export import export_artifact

__all__ = [
    "GREY_MODEL",
    "RGB_MODEL",
    "build_small_artifacts",
    "fashion_mnist_images",
    "photo_patches",
    "write_test_ensemble",
]

GREY_MODEL = "fmnist-tiny"
RGB_MODEL = "photo-tiny"
TARGET_FPR = 0.05
_STEPS = 30


def fashion_mnist_images(limit: int, seed: int = 0, split: str = "train") -> np.ndarray:
    """`(limit, 1, 28, 28) uint8` real Fashion-MNIST images (a seeded random sample)."""
    return load_dataset(f"fashion-mnist:{split}", limit=limit, seed=seed).images


def photo_patches(count: int, seed: int = 0, size: int = 32) -> np.ndarray:
    """`(count, 3, size, size) uint8` random crops of the real photos bundled with scikit-image."""
    photos = load_dataset("photos", shape=(3, 128, 128)).images
    rng = np.random.default_rng(seed)
    which = rng.integers(0, len(photos), count)
    top = rng.integers(0, 128 - size + 1, count)
    left = rng.integers(0, 128 - size + 1, count)
    return np.stack(
        [photos[k, :, t : t + size, s : s + size] for k, t, s in zip(which, top, left, strict=True)]
    )


def _train(model: PixelFlow, images: np.ndarray, steps: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    data = torch.from_numpy(images)
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(steps):
        batch = data[torch.randint(0, len(data), (64,), generator=generator)]
        loss = -model.log_likelihood(batch, "uniform", generator).mean() / model.num_dims
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()


def _build(
    repository: Path,
    name: str,
    config: PixelFlowConfig,
    train: np.ndarray,
    calibration: np.ndarray,
    statistic: str,
    dataset: str,
) -> Path:
    torch.manual_seed(config.seed)
    model = PixelFlow(config)
    _train(model, train, _STEPS, config.seed)
    with torch.no_grad():
        log_likelihood = model(torch.from_numpy(calibration))[0].double().numpy()
    c, h, w = config.input_shape
    num_dims = c * h * w
    bpd = -log_likelihood / (num_dims * np.log(2.0))
    reference = float(bpd.mean()) if statistic == "typicality" else None
    scores = ood_score(statistic, log_likelihood, num_dims=num_dims, reference_nll_mean=reference)  # type: ignore[arg-type]
    threshold = float(np.quantile(scores, 1.0 - TARGET_FPR))
    manifest = Manifest(
        name=name,
        version=1,
        kind="pixel",
        description=f"test artifact: tiny RealNVP on {dataset}, {_STEPS} Adam steps",
        input=InputSpec(channels=c, height=h, width=w, colour="L" if c == 1 else "RGB"),
        num_dims=num_dims,
        bits_per_dim_unit="pixel",
        log_likelihood_definition="log P(8-bit image), midpoint dequantization, nats",
        architecture=config.model_dump(mode="json"),
        training={"steps": _STEPS, "optimiser": "adam", "lr": 2e-3, "batch_size": 64},
        parameters=sum(p.numel() for p in model.parameters()),
        data=DataSpec(
            in_distribution=dataset,
            fingerprint="test",
            train_size=len(train),
            calibration_size=len(calibration),
        ),
        score=ScoreSpec(
            statistic=statistic,  # type: ignore[arg-type]
            reference_bits_per_dim=reference,
            description=f"{statistic} in bits/dim",
        ),
        calibration=Calibration(
            target_fpr=TARGET_FPR,
            threshold=threshold,
            validation_set=f"{dataset} held-out",
            validation_size=len(calibration),
            validation_fpr=float(np.mean(scores > threshold)),
            reference_scores=sorted(float(s) for s in scores),
        ),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        return export_artifact(model, manifest, repository, torch.from_numpy(calibration[:8]))


def build_small_artifacts(repository: Path) -> dict[str, Path]:
    """Train, calibrate and export the two test models into `repository`; returns name -> version dir."""
    repository = Path(repository)
    repository.mkdir(parents=True, exist_ok=True)
    # One thread: on a small shared CPU, more threads on tiny convolutions only contend.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _build_both(repository)
    finally:
        torch.set_num_threads(threads)


def _build_both(repository: Path) -> dict[str, Path]:
    tiny = {"num_scales": 2, "couplings_per_scale": 2, "channel_couplings": 1, "final_couplings": 2}
    grey = fashion_mnist_images(600, seed=1)
    rgb = photo_patches(500, seed=2)
    return {
        GREY_MODEL: _build(
            repository,
            GREY_MODEL,
            PixelFlowConfig(input_shape=(1, 28, 28), width=8, depth=1, **tiny),
            grey[:400],
            grey[400:],
            "nll",
            "fashion-mnist:train",
        ),
        RGB_MODEL: _build(
            repository,
            RGB_MODEL,
            PixelFlowConfig(input_shape=(3, 32, 32), width=8, depth=1, seed=1, **tiny),
            rgb[:300],
            rgb[300:],
            "typicality",
            "skimage-photo-crops",
        ),
    }


def write_test_ensemble(
    repository: Path,
    name: str,
    manifests: list[Manifest],
    reference: np.ndarray,
    threshold: float,
    *,
    validation_set: str = "calibration",
    weights: list[float] | None = None,
) -> Path:
    """A Fisher ensemble over `manifests` (at their versions) whose calibration is the given sorted
    combined `reference` scores and `threshold` (target FPR 5%); the fixtures compute those. The
    manifest is assembled by the build's own `training.ensemble.ensemble_manifest`."""
    from training.ensemble import ensemble_manifest

    return write_ensemble(
        repository,
        ensemble_manifest(
            name,
            f"test ensemble {name}",
            "fisher",
            manifests,
            weights,
            None,
            target_fpr=TARGET_FPR,
            threshold=threshold,
            reference=np.asarray(reference, dtype=np.float64),
            validation_set=validation_set,
        ),
    )
