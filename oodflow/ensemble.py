"""`oodflow ensemble create|list`: combined verdicts over any served models that share an input.

`create NAME --member a --member b ...` writes `<repository>/_ensembles/NAME.json`
(`models.artifact.EnsembleManifest`):

1. every member is found, verified and warmed by the scoring core (`service.core.Registry`, the
   service's own checks) at its highest version (or `name:version`); they must take the same input
   spec (shape and colour), so one image means the same pixels to each;
2. calibration images: in-distribution images **disjoint from the images behind every member's
   reference scores** (its calibration split), so that their member p-values are exchangeable with
   a fresh image's and the threshold holds its target FPR (`models.scores.calibrate_combination`).
   Each member's calibration split is rebuilt from its manifest (data spec, seed and sizes in
   `training`, checked against the manifest's train fingerprint and calibration size). By default
   the images are the members' **combination split** (the held-out half the members did not
   calibrate on); `--data SPEC` takes any dataset spec instead. Either way every image that equals
   one of a member's calibration, training or validation images (pixel for pixel) is dropped. When a member's calibration
   split cannot be rebuilt (an artifact exported by other means), disjointness cannot be checked:
   then `--data` is required and the manifest says the disjointness was the caller's word;
3. the images are scored through the members' exported graphs by the core; the combined score of
   their p-values (`--rule`, Fisher's method by default) sets the threshold at `--target-fpr`.

`list` reads every ensemble manifest and resolves it as the service would (`service.core`):
`valid`, `stale` (a member missing, refused, or at another version, kind or statistic) or
`failed` (unreadable manifest), with the reason.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from models.artifact import EnsembleManifest, Manifest
    from service.core import LoadedModel, Registry, ServedEnsemble

__all__ = [
    "CalibrationData",
    "EnsembleCreateError",
    "calibration_images",
    "create_ensemble",
    "list_ensembles",
]


class EnsembleCreateError(ValueError):
    """`ensemble create` cannot proceed; the message (one line) says why and what to pass."""


@dataclass(frozen=True)
class CalibrationData:
    images: np.ndarray  # (N, C, H, W) uint8 at the members' input shape
    description: str  # what the images are and how disjointness was established


def _image_hashes(images: np.ndarray) -> list[bytes]:
    return [hashlib.sha256(np.ascontiguousarray(image).tobytes()).digest() for image in images]


def _member_splits(manifest: Manifest, datasets: dict[tuple[Any, ...], Any]) -> Any:
    """The member's splits rebuilt from its manifest (`training.runs.load_splits`), checked against
    the manifest's train fingerprint and calibration size. Raises EnsembleCreateError."""
    from pydantic import ValidationError

    from training.config import RunConfig
    from training.data import DatasetError
    from training.runs import load_splits

    recorded = {k: v for k, v in manifest.training.items() if k not in ("summary", "splits")}
    try:
        config = RunConfig.model_validate({**recorded, "model": manifest.architecture})
    except ValidationError:
        raise EnsembleCreateError(
            f"model '{manifest.name}': its manifest does not record the training data config"
        ) from None
    try:
        splits = load_splits(config, with_eval_sets=False, datasets=datasets)
    except DatasetError as exc:
        raise EnsembleCreateError(f"model '{manifest.name}': its data cannot be loaded ({exc})") from None
    if (
        splits.fingerprint != manifest.data.fingerprint
        or len(splits.calibration) != manifest.calibration.validation_size
    ):
        raise EnsembleCreateError(
            f"model '{manifest.name}': the data rebuilt from its manifest is not the data it was trained "
            "and calibrated on (fingerprint or calibration size differ)"
        )
    return splits


def calibration_images(
    manifests: Sequence[Manifest], data: str | None, limit: int | None, seed: int
) -> CalibrationData:
    """In-distribution images for the ensemble's threshold, disjoint from every member's
    calibration images (see the module docstring). Raises EnsembleCreateError."""
    from training.data import DatasetError, load_dataset

    shape = manifests[0].input.shape
    calibrated: set[bytes] = set()
    unverified: dict[str, str] = {}
    combination = None
    combination_of = ""
    datasets: dict[tuple[Any, ...], Any] = {}  # members on the same data load it once
    for manifest in manifests:
        try:
            splits = _member_splits(manifest, datasets)
        except EnsembleCreateError as exc:
            unverified[manifest.name] = str(exc)
            continue
        # Reference scores come from the calibration split; training (and validation) images would
        # score lower than fresh ones and bias the threshold down: all three are excluded.
        for part in (splits.calibration, splits.train, splits.validation):
            calibrated.update(_image_hashes(part.images))
        if combination is None and splits.combination is not None:
            combination, combination_of = splits.combination.images, manifest.data.in_distribution
    if data is None:
        if unverified:
            reason = next(iter(unverified.values()))
            raise EnsembleCreateError(
                f"{reason}, so the images it calibrated on are unknown and the default calibration data "
                "cannot be checked disjoint from them: pass --data SPEC with in-distribution images none of "
                "the members calibrated on"
            )
        if combination is None:
            raise EnsembleCreateError(
                "the members' runs kept no combination split (held-out images they did not calibrate on): "
                "pass --data SPEC with in-distribution images none of the members calibrated on"
            )
        images, source = combination, f"combination split of {combination_of}"
        if limit is not None and limit < len(images):
            chosen = np.random.default_rng(seed).choice(len(images), size=limit, replace=False)
            images = images[np.sort(chosen)]
    else:
        try:
            images, source = load_dataset(data, shape=shape, limit=limit, seed=seed).images, data
        except DatasetError as exc:
            raise EnsembleCreateError(f"--data {data}: {exc}") from None
    keep = np.asarray([h not in calibrated for h in _image_hashes(images)], dtype=bool)
    dropped = int((~keep).sum())
    images = np.ascontiguousarray(images[keep])
    checked = [m.name for m in manifests if m.name not in unverified]
    notes = []
    if checked:
        notes.append(
            f"disjoint from the calibration and training images of {', '.join(checked)} (checked pixel "
            f"for pixel; {dropped} equal images dropped)"
        )
    if unverified:
        notes.append(
            f"disjointness from the calibration images of {', '.join(unverified)} not checked "
            "(their calibration split cannot be rebuilt from the manifest): the caller's --data vouches for it"
        )
    return CalibrationData(images, f"{source}: {len(images)} images; {'; '.join(notes)}")


def _load_members(
    repository: Path, members: Sequence[str], device: str
) -> tuple[Registry, list[LoadedModel]]:
    from service.core import LoadOptions, Registry

    if len(members) < 2:
        raise EnsembleCreateError("an ensemble needs at least two --member models")
    names = [m.partition(":")[0] for m in members]
    if len(set(names)) != len(names):
        raise EnsembleCreateError(f"members must be distinct models, got {', '.join(members)}")
    registry = Registry(repository, members, LoadOptions(device=device, warm_batch_sizes=(1,)))  # type: ignore[arg-type]
    registry.load_all()
    refused = [f"'{e.name}': {e.reason}" for e in registry.models.values() if e.status != "ready"]
    if refused:
        raise EnsembleCreateError(f"member {refused[0]}")
    loaded = [registry.models[n].model for n in names]
    models = [m for m in loaded if m is not None]
    specs = {m.manifest.name: m.manifest.input for m in models}
    if len({(s.shape, s.colour) for s in specs.values()}) > 1:
        described = ", ".join(f"{n} {s.channels}×{s.height}×{s.width} {s.colour}" for n, s in specs.items())
        raise EnsembleCreateError(f"members must take the same input, got {described}")
    return registry, models


def create_ensemble(
    repository: str | Path,
    name: str,
    members: Sequence[str],
    *,
    data: str | None = None,
    rule: str = "fisher",
    target_fpr: float = 0.05,
    limit: int | None = None,
    seed: int = 0,
    description: str = "",
    force: bool = False,
    device: str = "auto",
    batch_size: int = 256,
) -> tuple[Path, EnsembleManifest]:
    """Calibrate and write `<repository>/_ensembles/<name>.json`; returns its path and manifest."""
    from pydantic import ValidationError

    from models.artifact import (
        Calibration,
        EnsembleManifest,
        EnsembleMember,
        ensemble_path,
        write_ensemble,
    )
    from models.scores import COMBINATION_RULES, calibrate_combination
    from service.core.ensembles import discover_ensembles, resolve_ensembles
    from training.ensemble import RULE_DEFINITIONS

    repository = Path(repository)
    if rule not in COMBINATION_RULES:
        raise EnsembleCreateError(f"--rule must be one of {', '.join(COMBINATION_RULES)}, got '{rule}'")
    if not 0.0 < target_fpr < 1.0:
        raise EnsembleCreateError(f"--target-fpr must lie in (0, 1), got {target_fpr}")
    if ensemble_path(repository, name).exists() and not force:
        raise EnsembleCreateError(f"{ensemble_path(repository, name)} exists: pass --force to replace it")
    registry, models = _load_members(repository, members, device)
    manifests = [m.manifest for m in models]
    calib = calibration_images(manifests, data, limit, seed)
    if len(calib.images) < 2:
        raise EnsembleCreateError(f"only {len(calib.images)} calibration images left ({calib.description})")
    p = np.stack([m.score(calib.images, batch_size).p_value for m in models])  # (K, N)
    try:
        threshold, reference = calibrate_combination(p, rule, target_fpr)  # type: ignore[arg-type]
    except ValueError as exc:
        raise EnsembleCreateError(f"cannot calibrate on {len(calib.images)} images: {exc}") from None
    try:
        manifest = EnsembleManifest(
            name=name,
            description=description
            or f"{rule} over {', '.join(f'{m.name} v{m.version}' for m in manifests)} (oodflow ensemble create)",
            rule=rule,  # type: ignore[arg-type]
            rule_definition=RULE_DEFINITIONS[rule],
            members=[
                EnsembleMember(name=m.name, version=m.version, kind=m.kind, statistic=m.score.statistic)
                for m in manifests
            ],
            calibration=Calibration(
                target_fpr=target_fpr,
                threshold=float(threshold),
                validation_set=calib.description,
                validation_size=len(reference),
                validation_fpr=float(np.mean(reference > threshold)),
                reference_scores=np.asarray(reference, dtype=np.float64).tolist(),
            ),
        )
    except ValidationError as exc:
        first = " ".join(str(exc).split())[:300]
        raise EnsembleCreateError(f"invalid ensemble: {first}") from None
    path = write_ensemble(repository, manifest)
    written = [e for e in discover_ensembles(repository) if e.name == name]
    resolve_ensembles(written, registry.models)
    if not written or written[0].status != "valid":  # the service would not use it: say so now
        reason = written[0].reason if written else "not found after writing"
        raise EnsembleCreateError(f"{path} was written but does not resolve as valid: {reason}")
    return path, manifest


def list_ensembles(repository: str | Path, device: str = "cpu") -> list[ServedEnsemble]:
    """Every ensemble of the repository, resolved against the models the service would serve
    (the highest version of each, loaded and checked by the core)."""
    from service.core import LoadOptions, Registry

    registry = Registry(repository, (), LoadOptions(device=device, warm_batch_sizes=(1,)))  # type: ignore[arg-type]
    registry.discover()
    needed = {
        m.name for e in registry.ensembles.values() if e.manifest is not None for m in e.manifest.members
    }
    for entry in registry.models.values():
        if entry.name in needed and entry.status == "loading":
            registry.load(entry)
    registry.resolve_ensembles()
    return list(registry.ensembles.values())
