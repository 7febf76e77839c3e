"""Ensembles: combined verdicts over served models (`<repository>/_ensembles/<name>.json`).

The same rules for every front door (HTTP `POST /v1/score`, `oodflow score-batch`,
`oodflow ensemble list`):

- every ensemble manifest under the repository is read (`discover_ensembles`); an unreadable one
  is `failed` with its reason, never silently skipped;
- once the models are loaded, an ensemble is `valid` only if every member is loaded and ready at
  exactly the version, kind and statistic the manifest lists; otherwise it is `stale` with the
  first reason found (`resolve_ensembles`);
- a verdict comes from the first valid ensemble (by name) whose members, at their versions, were
  all scored (`select_ensemble`): per image, each member's `p_value` in manifest order goes through
  `models.scores.combined_verdict` with the ensemble's calibration and member weights (`combine`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from models.artifact import ArtifactError, EnsembleManifest, Manifest, find_ensembles, load_ensemble
from models.scores import combined_verdict

__all__ = [
    "CombinedScores",
    "EnsembleStatus",
    "MemberState",
    "ServedEnsemble",
    "combine",
    "discover_ensembles",
    "ensemble_problem",
    "resolve_ensembles",
    "select_ensemble",
]

log = logging.getLogger("service.core.ensembles")

EnsembleStatus = Literal["loading", "valid", "stale", "failed"]


class MemberState(Protocol):
    """What ensemble resolution reads of a model: its load status and manifest."""

    @property
    def status(self) -> str: ...

    @property
    def manifest(self) -> Manifest | None: ...


@dataclass(eq=False)
class ServedEnsemble:
    name: str
    path: Path
    manifest: EnsembleManifest | None
    status: EnsembleStatus = "loading"
    reason: str | None = None
    reference_sorted: np.ndarray | None = None


@dataclass(frozen=True)
class CombinedScores:
    """One ensemble's verdict for N images, `(N,)` each."""

    ensemble: ServedEnsemble
    combined_score: np.ndarray  # float64, higher = more OOD
    p_value: np.ndarray  # float64
    is_ood: np.ndarray  # bool


def discover_ensembles(repository: Path) -> list[ServedEnsemble]:
    """Read every ensemble manifest under the repository; unreadable ones are `failed`."""
    out: list[ServedEnsemble] = []
    for path in find_ensembles(Path(repository)):
        try:
            manifest = load_ensemble(path)
        except ArtifactError as exc:
            reason = " ".join(str(exc).split())
            log.error("refusing ensemble %s: %s", path.stem, reason)
            out.append(ServedEnsemble(path.stem, path, None, "failed", reason))
            continue
        out.append(ServedEnsemble(manifest.name, path, manifest))
    return sorted(out, key=lambda e: e.name)


def ensemble_problem(manifest: EnsembleManifest, models: Mapping[str, MemberState]) -> str | None:
    """Why the ensemble cannot be used over `models` (name -> loaded model), or None."""
    for member in manifest.members:
        served = models.get(member.name)
        if served is None:
            return f"member '{member.name}' is not served"
        if served.status != "ready" or served.manifest is None:
            return f"member '{member.name}' is not ready ({served.status})"
        if served.manifest.version != member.version:
            return (
                f"member '{member.name}' is served at version {served.manifest.version}, "
                f"the ensemble needs version {member.version}"
            )
        if (served.manifest.kind, served.manifest.score.statistic) != (member.kind, member.statistic):
            return (
                f"member '{member.name}' is a {served.manifest.kind}/{served.manifest.score.statistic} "
                f"model, the ensemble needs {member.kind}/{member.statistic}"
            )
    return None


def resolve_ensembles(ensembles: Iterable[ServedEnsemble], models: Mapping[str, MemberState]) -> None:
    """After model loading: mark each readable ensemble `valid` or `stale` (with its reason)."""
    for ens in ensembles:
        if ens.manifest is None:
            continue
        reason = ensemble_problem(ens.manifest, models)
        if reason is None:
            ens.status, ens.reason = "valid", None
            ens.reference_sorted = np.asarray(ens.manifest.calibration.reference_scores, dtype=np.float64)
            log.info("ensemble %s valid over %s", ens.name, ", ".join(m.name for m in ens.manifest.members))
        else:
            ens.status, ens.reason, ens.reference_sorted = "stale", reason, None
            log.warning("skipping stale ensemble %s: %s", ens.name, reason)


def select_ensemble(ensembles: Iterable[ServedEnsemble], scored: Mapping[str, int]) -> ServedEnsemble | None:
    """The first valid ensemble (by name) whose members, at their versions, were all scored
    (`scored`: model name -> version)."""
    for ens in sorted(ensembles, key=lambda e: e.name):
        if ens.status != "valid" or ens.manifest is None:
            continue
        if all(scored.get(m.name) == m.version for m in ens.manifest.members):
            return ens
    return None


def combine(ensemble: ServedEnsemble, p_values: Mapping[str, np.ndarray]) -> CombinedScores:
    """The verdict of a valid ensemble from each member's `(N,)` p-values (by member name)."""
    manifest, reference = ensemble.manifest, ensemble.reference_sorted
    if ensemble.status != "valid" or manifest is None or reference is None:
        raise ValueError(f"ensemble '{ensemble.name}' is {ensemble.status}: {ensemble.reason}")
    ps = [np.asarray(p_values[m.name], dtype=np.float64) for m in manifest.members]
    score, p, is_ood = combined_verdict(
        ps, manifest.rule, manifest.calibration.threshold, reference, manifest.weights
    )
    return CombinedScores(ensemble, score, p, is_ood)
