"""The combined verdict: ensembles of served models (`<repository>/_ensembles/<name>.json`).

At startup every ensemble manifest is read (`models.artifact.find_ensembles`/`load_ensemble`); once
the models have loaded, an ensemble is `valid` only if every member is served, ready and at exactly
the version (and kind and statistic) the manifest lists; otherwise it is `stale` (logged, listed by
`/v1/models`, never used). An unreadable manifest is `failed`.

`POST /v1/score` adds the verdict of the first valid ensemble (by name) whose members were all
scored: per image, each member's `p_value` in manifest order goes through
`models.scores.combined_verdict` with the ensemble's calibration (threshold and reference scores).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from models.artifact import ArtifactError, EnsembleManifest, find_ensembles, load_ensemble
from models.scores import combined_verdict

if TYPE_CHECKING:
    from service.registry import ServedModel
    from service.scoring import ModelOutcome

__all__ = [
    "EnsembleStatus",
    "ServedEnsemble",
    "combined_block",
    "discover_ensembles",
    "resolve_ensembles",
    "select_ensemble",
]

log = logging.getLogger("service.ensemble")

EnsembleStatus = Literal["loading", "valid", "stale", "failed"]


@dataclass(eq=False)
class ServedEnsemble:
    name: str
    path: Path
    manifest: EnsembleManifest | None
    status: EnsembleStatus = "loading"
    reason: str | None = None
    reference_sorted: np.ndarray | None = None

    def summary(self) -> dict[str, Any]:
        """For `/v1/models`."""
        m = self.manifest
        return {
            "name": self.name,
            "status": self.status,
            "reason": self.reason,
            "rule": None if m is None else m.rule,
            "members": [] if m is None else [{"name": k.name, "version": k.version} for k in m.members],
            "threshold": None if m is None else m.calibration.threshold,
            "target_fpr": None if m is None else m.calibration.target_fpr,
            "description": "" if m is None else m.description,
        }


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


def _stale_reason(manifest: EnsembleManifest, models: Mapping[str, ServedModel]) -> str | None:
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


def resolve_ensembles(ensembles: Iterable[ServedEnsemble], models: Mapping[str, ServedModel]) -> None:
    """After model loading: mark each readable ensemble `valid` or `stale` (with its reason)."""
    for ens in ensembles:
        if ens.manifest is None:
            continue
        reason = _stale_reason(ens.manifest, models)
        if reason is None:
            ens.status, ens.reason = "valid", None
            ens.reference_sorted = np.asarray(ens.manifest.calibration.reference_scores, dtype=np.float64)
            log.info("ensemble %s valid over %s", ens.name, ", ".join(m.name for m in ens.manifest.members))
        else:
            ens.status, ens.reason = "stale", reason
            log.warning("skipping stale ensemble %s: %s", ens.name, reason)


def select_ensemble(
    ensembles: Iterable[ServedEnsemble], outcomes: Sequence[ModelOutcome]
) -> ServedEnsemble | None:
    """The first valid ensemble (by name) whose members, at their versions, were all scored."""
    scored = {o.manifest.name: o.manifest.version for o in outcomes}
    for ens in sorted(ensembles, key=lambda e: e.name):
        if ens.status != "valid" or ens.manifest is None:
            continue
        if all(scored.get(m.name) == m.version for m in ens.manifest.members):
            return ens
    return None


def combined_block(
    ensembles: Iterable[ServedEnsemble], outcomes: Sequence[ModelOutcome]
) -> dict[str, Any] | None:
    """The `combined` field of a `/v1/score` response, or None when no valid ensemble applies."""
    ens = select_ensemble(ensembles, outcomes)
    if ens is None:
        return None
    manifest = ens.manifest
    assert manifest is not None and ens.reference_sorted is not None
    by_name = {o.manifest.name: o for o in outcomes}
    ps = [by_name[m.name].scores.p_value for m in manifest.members]
    score, p, is_ood = combined_verdict(
        ps, manifest.rule, manifest.calibration.threshold, ens.reference_sorted
    )
    return {
        "ensemble": ens.name,
        "rule": manifest.rule,
        "members": [{"name": m.name, "version": m.version} for m in manifest.members],
        "threshold": manifest.calibration.threshold,
        "target_fpr": manifest.calibration.target_fpr,
        "results": [
            {"combined_score": s, "p_value": pv, "is_ood": flag}
            for s, pv, flag in zip(score.tolist(), p.tolist(), is_ood.tolist(), strict=True)
        ],
    }
