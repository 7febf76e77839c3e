"""The model registry: find, verify, load and warm the models of a repository (DESIGN §3).

A model that fails any check (`service.core.model.load_model`) is refused with its reason (logged,
and kept on its entry for the front doors to report); the others keep serving. Ensembles under
`<repository>/_ensembles` are read at discovery and resolved against the loaded models
(`service.core.ensembles`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from models.artifact import Manifest, find_versions
from service.core.ensembles import ServedEnsemble, discover_ensembles, resolve_ensembles
from service.core.model import LoadedModel, ModelLoadError, ScorerWrapper, load_model
from service.core.runtime import Device, RuntimeName, Scorer

__all__ = ["LoadOptions", "ModelStatus", "Registry", "ServedModel", "UnknownModel"]

log = logging.getLogger("service.core.registry")

ModelStatus = Literal["loading", "ready", "failed"]


class UnknownModel(LookupError):
    """No model of that name in the registry; the message lists the known ones."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown model"


@dataclass(frozen=True)
class LoadOptions:
    """How every model of a registry is loaded (`service.core.model.load_model`'s arguments)."""

    runtime: RuntimeName = "onnx"
    device: Device = "auto"
    intra_op_threads: int = 0
    allow_spinning: bool = False
    warm_batch_sizes: tuple[int, ...] = (1,)
    wrap_scorer: ScorerWrapper | None = None


@dataclass(eq=False)
class ServedModel:
    """One model of the registry: where it lies, its status (and reason when refused), once
    loaded its `LoadedModel`."""

    name: str
    version: int | None
    path: Path | None
    status: ModelStatus = "loading"
    reason: str | None = None
    model: LoadedModel | None = None
    load_seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def manifest(self) -> Manifest | None:
        return None if self.model is None else self.model.manifest

    @property
    def scorer(self) -> Scorer | None:
        return None if self.model is None else self.model.scorer


class Registry:
    def __init__(
        self, repository: str | Path, models: Sequence[str] = (), options: LoadOptions | None = None
    ) -> None:
        """`models`: 'name' or 'name:version' to serve; empty: the highest version of each model."""
        self.repository = Path(repository)
        self.requested = tuple(models)
        self.options = options or LoadOptions()
        self.models: dict[str, ServedModel] = {}
        self.ensembles: dict[str, ServedEnsemble] = {}

    # ------------------------------------------------------------------ discovery

    def discover(self) -> list[ServedModel]:
        """One entry per model to serve, status `loading` (or `failed` if it cannot even be found)."""
        repository = self.repository
        entries: list[ServedModel] = []
        if self.requested:
            for spec in self.requested:
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
        assert entry.path is not None
        start = time.perf_counter()
        o = self.options
        try:
            model = load_model(
                entry.path,
                runtime=o.runtime,
                device=o.device,
                intra_op_threads=o.intra_op_threads,
                allow_spinning=o.allow_spinning,
                warm_batch_sizes=o.warm_batch_sizes,
                expected_name=entry.name,
                wrap_scorer=o.wrap_scorer,
            )
        except ModelLoadError as exc:
            entry.status, entry.reason = "failed", " ".join(str(exc).split()) or "ModelLoadError"
            log.error("refusing model %s: %s", entry.name, entry.reason, extra={"model": entry.name})
            return
        entry.model = model
        entry.load_seconds = time.perf_counter() - start
        entry.status = "ready"
        log.info(
            "model %s v%s ready on %s/%s in %.2f s",
            entry.name,
            entry.version,
            model.scorer.runtime,
            model.scorer.device,
            entry.load_seconds,
            extra={"model": entry.name},
        )

    def load_all(self) -> None:
        """Discover (if not yet done), load every model, then resolve the ensembles (blocking)."""
        if not self.models:
            self.discover()
        for entry in self.models.values():
            if entry.status == "loading":
                self.load(entry)
        self.resolve_ensembles()

    # ------------------------------------------------------------------ lookup

    def get(self, name: str) -> ServedModel:
        try:
            return self.models[name]
        except KeyError:
            known = ", ".join(sorted(self.models)) or "none"
            raise UnknownModel(f"no model named '{name}' (served: {known})") from None

    def ready_models(self) -> list[ServedModel]:
        return [m for m in self.models.values() if m.status == "ready"]
