"""The models a benchmark scores, resolved from a repository and run through their exported graphs.

Scoring goes only through the ONNX graph the service runs (never eager PyTorch), loaded, verified
and warmed by the service's scoring core (`service.core.load_model`), and the shipped scores come
from the core's own arithmetic on the graph outputs (`LoadedModel.scores`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.artifact import (
    BACKGROUND_OUTPUT,
    ArtifactError,
    EnsembleManifest,
    Manifest,
    ensemble_path,
    find_versions,
    load_ensemble,
)
from models.scores import OodStatistic, ood_score, png_bits_per_dim
from training.data import DatasetError

__all__ = ["BATCH_SIZE", "GraphModel", "Target", "member_statistics", "resolve_target"]

BATCH_SIZE = 256


class GraphModel:
    """One verified, warmed artifact version and its ONNX graph: `.manifest`, `.run(images)`, `.scores(...)`.

    Loaded by the service's scoring core (`service.core.load_model`: sha256 check, graph checks,
    warm-up); scores by its `LoadedModel.scores`, the service's own arithmetic.
    """

    status = "ready"  # what `service.core.ensembles` reads of a member (loaded, verified, warmed)

    def __init__(self, path: Path, device: str = "cpu") -> None:
        from service.core import ModelLoadError, load_model

        self.path = Path(path)
        try:
            loaded = load_model(self.path, device=device, warm_batch_sizes=(BATCH_SIZE,))  # type: ignore[arg-type]
        except ModelLoadError as exc:
            raise DatasetError(f"{self.path}: {exc}") from None
        self.manifest: Manifest = loaded.manifest
        self._loaded = loaded
        self.output_names: tuple[str, ...] = tuple(loaded.scorer.output_names)

    @property
    def name(self) -> str:
        return self.manifest.name

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Graph outputs (float64) for `images: (N, C, H, W) uint8` at the model's input shape."""
        outputs = self._loaded.run(images, BATCH_SIZE)
        return {k: np.asarray(v, dtype=np.float64) for k, v in outputs.items()}

    def scores(self, outputs: dict[str, np.ndarray], complexity_bits: np.ndarray | None) -> Any:
        """The service's Scores (ood_score, p_value, is_ood, threshold) from graph outputs."""
        return self._loaded.scores(outputs, complexity_bits)


def member_statistics(manifest: Manifest, output_names: tuple[str, ...]) -> list[OodStatistic]:
    """Every statistic the model's graph outputs and manifest allow: `nll` always; `typicality` when the
    manifest records the in-distribution mean bits/dim; `complexity` for pixel models (both of its
    terms are per pixel; an embedding model's bits/dim is per feature); `likelihood_ratio` when the
    graph has the background flow's output."""
    out: list[OodStatistic] = ["nll"]
    if manifest.score.reference_bits_per_dim is not None:
        out.append("typicality")
    if manifest.kind == "pixel":
        out.append("complexity")
    if BACKGROUND_OUTPUT in output_names:
        out.append("likelihood_ratio")
    if manifest.score.statistic not in out:
        out.append(manifest.score.statistic)
    return out


def statistic_scores(
    manifest: Manifest,
    statistic: OodStatistic,
    outputs: dict[str, np.ndarray],
    complexity_bits: np.ndarray | None,
) -> np.ndarray:
    """`(N,)` scores of one statistic from graph outputs (formulas of `models.scores.ood_score`)."""
    background = outputs.get(BACKGROUND_OUTPUT)
    return np.asarray(
        ood_score(
            statistic,
            outputs["log_likelihood"],
            num_dims=manifest.num_dims,
            reference_nll_mean=manifest.score.reference_bits_per_dim,
            complexity_bits=complexity_bits,
            background_log_likelihood=background,
        ),
        dtype=np.float64,
    )


def complexity_bits(images: np.ndarray) -> np.ndarray:
    return png_bits_per_dim(images)


@dataclass(frozen=True)
class Target:
    """What is benchmarked: one model, or an ensemble and its members (in manifest order)."""

    name: str
    kind: str  # "model" | "ensemble"
    member_paths: tuple[Path, ...]
    ensemble: EnsembleManifest | None = None
    ensemble_file: Path | None = None


def _models_in(repository: Path) -> list[str]:
    if not repository.is_dir():
        return []
    return sorted(p.name for p in repository.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))


def resolve_target(target: str, repository: Path) -> Target:
    """A model name (its highest version), an ensemble name (`<repository>/_ensembles/<name>.json`),
    `model:<name>` / `ensemble:<name>` when a name is both, or a path to an artifact version folder.
    Raises `DatasetError` (one line) for anything else."""
    repository = Path(repository)
    prefix, _, rest = target.partition(":")
    forced = prefix if prefix in ("model", "ensemble") and rest else None
    name = rest if forced else target
    path = Path(name)
    if forced is None and (path / "manifest.json").is_file():
        return Target(name=path.parent.name or name, kind="model", member_paths=(path,))
    model_versions = find_versions(repository, name) if forced != "ensemble" else []
    ens_file = ensemble_path(repository, name)
    has_ensemble = forced != "model" and ens_file.is_file()
    if model_versions and has_ensemble:
        raise DatasetError(
            f"'{name}' is both a model and an ensemble in {repository}: say model:{name} or ensemble:{name}"
        )
    if model_versions:
        return Target(name=name, kind="model", member_paths=(repository / name / str(model_versions[-1]),))
    if has_ensemble:
        try:
            ensemble = load_ensemble(ens_file)
        except ArtifactError as exc:
            raise DatasetError(" ".join(str(exc).split())) from None
        paths = []
        for member in ensemble.members:
            folder = repository / member.name / str(member.version)
            if not (folder / "manifest.json").is_file():
                raise DatasetError(
                    f"ensemble '{name}' needs {member.name} version {member.version}, which is not in {repository}"
                )
            paths.append(folder)
        return Target(
            name=name, kind="ensemble", member_paths=tuple(paths), ensemble=ensemble, ensemble_file=ens_file
        )
    models = _models_in(repository)
    ensembles = (
        sorted(p.stem for p in (repository / "_ensembles").glob("*.json")) if repository.is_dir() else []
    )
    raise DatasetError(
        f"unknown model or ensemble '{name}' in {repository} "
        f"(models: {', '.join(models) or 'none'}; ensembles: {', '.join(ensembles) or 'none'})"
    )
