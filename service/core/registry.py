"""The model registry: find, verify, load and warm every served model (DESIGN §3).

A model that fails any check is refused with its reason (logged, and reported by `/v1/models` and
`/readyz`); the others keep serving. Checks, in order: the version folder exists; the manifest
validates and every listed file matches its sha256 (`models.artifact.verify_artifact`); the
manifest's name is its folder's name; the graph loads on the configured runtime and device, takes
`images` at the manifest's input shape and has the outputs the score statistic needs; warm-up
batches give finite `(N,)` outputs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from models.artifact import ArtifactError, Manifest, find_versions, verify_artifact
from service.ensemble import ServedEnsemble, discover_ensembles, resolve_ensembles
from service.errors import ModelNotFound, ModelUnavailable, NotReady
from service.runtime import BACKGROUND_OUTPUT, GRAPH_FILES, REQUIRED_OUTPUTS, Scorer, load_scorer
from service.settings import Settings

if TYPE_CHECKING:
    from service.batcher import Batcher

__all__ = ["ModelStatus", "Registry", "ServedModel", "ScorerWrapper"]

log = logging.getLogger("service.registry")

ModelStatus = Literal["loading", "ready", "failed"]
ScorerWrapper = Callable[[str, Scorer], Scorer]


@dataclass(eq=False)
class ServedModel:
    name: str
    version: int | None
    path: Path | None
    status: ModelStatus = "loading"
    reason: str | None = None
    manifest: Manifest | None = None
    scorer: Scorer | None = None
    batcher: Batcher | None = None
    load_seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def require_ready(self) -> tuple[Manifest, Batcher]:
        """The manifest and batcher of a model that serves, or 503 saying why it does not."""
        if self.status == "ready" and self.manifest is not None and self.batcher is not None:
            return self.manifest, self.batcher
        if self.status == "loading":
            raise NotReady(f"model '{self.name}' is still loading", code="model_loading")
        raise ModelUnavailable(f"model '{self.name}' was refused: {self.reason}", retry_after_s=None)

    def summary(self, detail: bool = False) -> dict[str, Any]:
        """Manifest summary, calibration and metrics for `/v1/models` (`detail`: architecture too)."""
        out: dict[str, Any] = {
            "name": self.name,
            "version": self.version,
            "status": self.status,
            "reason": self.reason,
        }
        m = self.manifest
        if m is None:
            return out
        cal = m.calibration
        out.update(
            kind=m.kind,
            description=m.description,
            created_at=m.created_at.isoformat(),
            input=m.input.model_dump(mode="json"),
            num_dims=m.num_dims,
            bits_per_dim_unit=m.bits_per_dim_unit,
            parameters=m.parameters,
            score=m.score.model_dump(mode="json"),
            calibration={
                "threshold": cal.threshold,
                "target_fpr": cal.target_fpr,
                "validation_set": cal.validation_set,
                "validation_size": cal.validation_size,
                "validation_fpr": cal.validation_fpr,
                "reference_scores": len(cal.reference_scores),
            },
            in_distribution_test=m.in_distribution_test,
            metrics=[metric.model_dump(mode="json") for metric in m.metrics],
            data=m.data.model_dump(mode="json"),
        )
        if self.scorer is not None:
            out["runtime"] = {"name": self.scorer.runtime, "device": self.scorer.device}
        if detail:
            out.update(
                architecture=m.architecture, training=m.training, export=m.export, baselines=m.baselines
            )
        return out


def _warm_images(shape: tuple[int, int, int], n: int) -> np.ndarray:
    """A deterministic, non-constant uint8 batch (a constant image can hit degenerate fast paths)."""
    count = n * shape[0] * shape[1] * shape[2]
    return (np.arange(count, dtype=np.int64) * 37 % 256).astype(np.uint8).reshape(n, *shape)


class Registry:
    def __init__(self, settings: Settings, wrap_scorer: ScorerWrapper | None = None) -> None:
        self.settings = settings
        self._wrap_scorer = wrap_scorer
        self.models: dict[str, ServedModel] = {}
        self.ensembles: dict[str, ServedEnsemble] = {}

    # ------------------------------------------------------------------ discovery

    def discover(self) -> list[ServedModel]:
        """One entry per model to serve, status `loading` (or `failed` if it cannot even be found)."""
        repository = Path(self.settings.model_repository)
        entries: list[ServedModel] = []
        if self.settings.models:
            for spec in self.settings.models:
                name, _, version_text = spec.partition(":")
                versions = find_versions(repository, name)
                if version_text:
                    version = int(version_text) if version_text.isdigit() else None
                    if version is None or version not in versions:
                        entries.append(self._missing(name, version, f"version '{version_text}' not found"))
                        continue
                elif not versions:
                    entries.append(self._missing(name, None, f"no versions under {repository / name}"))
                    continue
                else:
                    version = versions[-1]
                entries.append(ServedModel(name, version, repository / name / str(version)))
        elif repository.is_dir():
            for folder in sorted(
                p for p in repository.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))
            ):  # `_ensembles` and other `_` folders are not models
                versions = find_versions(repository, folder.name)
                if not versions:
                    log.warning("skipping %s: no numbered version folders", folder)
                    continue
                entries.append(ServedModel(folder.name, versions[-1], folder / str(versions[-1])))
        else:
            log.error("model repository %s does not exist", repository)
        self.models = {entry.name: entry for entry in entries}
        self.ensembles = {e.name: e for e in discover_ensembles(repository)} if repository.is_dir() else {}
        return entries

    def resolve_ensembles(self) -> None:
        """Once loading is done: each ensemble is valid only if its members serve at its versions."""
        resolve_ensembles(self.ensembles.values(), self.models)

    def _missing(self, name: str, version: int | None, reason: str) -> ServedModel:
        log.error("refusing model %s: %s", name, reason, extra={"model": name})
        return ServedModel(name, version, None, status="failed", reason=reason)

    # ------------------------------------------------------------------ loading

    def load(self, entry: ServedModel) -> None:
        """Verify, load and warm one model (blocking; run it in a thread). Sets status and reason."""
        start = time.perf_counter()
        try:
            manifest, scorer = self._load(entry)
        except Exception as exc:  # noqa: BLE001 - any failure refuses this model only
            entry.status, entry.reason = "failed", " ".join(str(exc).split()) or type(exc).__name__
            log.error("refusing model %s: %s", entry.name, entry.reason, extra={"model": entry.name})
            return
        entry.manifest, entry.scorer = manifest, scorer
        entry.load_seconds = time.perf_counter() - start
        entry.status = "ready"
        log.info(
            "model %s v%s ready on %s/%s in %.2f s",
            entry.name,
            entry.version,
            scorer.runtime,
            scorer.device,
            entry.load_seconds,
            extra={"model": entry.name},
        )

    def _load(self, entry: ServedModel) -> tuple[Manifest, Scorer]:
        assert entry.path is not None
        settings = self.settings
        graph = GRAPH_FILES[settings.runtime]
        try:
            manifest = verify_artifact(entry.path, required=(graph,))
        except ArtifactError as exc:
            raise RuntimeError(f"artifact check failed: {exc}") from None
        if manifest.name != entry.name:
            raise RuntimeError(f"manifest names model '{manifest.name}' but it lies in folder '{entry.name}'")
        scorer = load_scorer(
            entry.path,
            settings.runtime,
            settings.device,
            settings.intra_op_threads,
            settings.ort_allow_spinning,
        )
        if self._wrap_scorer is not None:
            scorer = self._wrap_scorer(entry.name, scorer)
        spec = manifest.input.shape
        if any(d is not None and d != want for d, want in zip(scorer.input_shape, spec, strict=True)):
            raise RuntimeError(f"{graph} takes images {scorer.input_shape} but the manifest says {spec}")
        # Warm at the batch sizes the batcher will run, and check the outputs on the way.
        for n in sorted({1, settings.max_batch_images}):
            for _ in range(2):  # TorchScript's profiling executor optimises on the second call
                outputs = scorer.run(_warm_images(spec, n))
            for name in REQUIRED_OUTPUTS:
                if name not in outputs:
                    raise RuntimeError(f"{graph} has no output '{name}' (outputs: {sorted(outputs)})")
                if outputs[name].shape != (n,) or not np.all(np.isfinite(outputs[name])):
                    raise RuntimeError(f"{graph} output '{name}' is not {n} finite values at batch {n}")
        if manifest.score.statistic == "likelihood_ratio" and BACKGROUND_OUTPUT not in scorer.output_names:
            raise RuntimeError(
                f"score statistic 'likelihood_ratio' needs graph output '{BACKGROUND_OUTPUT}', "
                f"which {graph} lacks"
            )
        if manifest.score.statistic == "typicality" and manifest.score.reference_bits_per_dim is None:
            raise RuntimeError(
                "score statistic 'typicality' needs score.reference_bits_per_dim in the manifest"
            )
        return manifest, scorer

    # ------------------------------------------------------------------ lookup

    def get(self, name: str) -> ServedModel:
        try:
            return self.models[name]
        except KeyError:
            known = ", ".join(sorted(self.models)) or "none"
            raise ModelNotFound(f"no model named '{name}' (served: {known})") from None

    def ready_models(self) -> list[ServedModel]:
        return [m for m in self.models.values() if m.status == "ready"]
