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
   their p-values (`--rule`, Fisher's method by default) sets the threshold at `--target-fpr`;
4. member weights (`--weights auto`, the default for Fisher; `training.ensemble`): the images are
   halved by a fixed seeded permutation; the **selection half** and its OOD proxies
   (`training.selection.make_proxies`) choose the weights (best worst-case proxy AUROC of the
   combined score, ties within 0.01 to equal weights), and the
   **calibration half** alone sets the threshold, so it still holds its target FPR. `--weights
   equal` (or `--rule min_p`, or too few images to halve) keeps today's equal weights and
   calibrates on all the images. The choice is recorded in the manifest (`weights`, `selection`).

`list` reads every ensemble manifest and resolves it as the service would (`service.core`):
`valid`, `stale` (a member missing, refused, or at another version, kind or statistic) or
`failed` (unreadable manifest), with the reason.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
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
    labels: np.ndarray | None = None  # (N,) where known (the proxies blend images of different classes)
    source: str = ""  # where the images come from (the split or the --data spec)


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
    combination_labels: np.ndarray | None = None
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
            combination_labels = splits.combination.labels
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
        images, labels = combination, combination_labels
        source = f"combination split of {combination_of}"
        if limit is not None and limit < len(images):
            chosen = np.sort(np.random.default_rng(seed).choice(len(images), size=limit, replace=False))
            images, labels = images[chosen], None if labels is None else labels[chosen]
    else:
        try:
            loaded = load_dataset(data, shape=shape, limit=limit, seed=seed)
        except DatasetError as exc:
            raise EnsembleCreateError(f"--data {data}: {exc}") from None
        images, labels, source = loaded.images, loaded.labels, data
    keep = np.asarray([h not in calibrated for h in _image_hashes(images)], dtype=bool)
    dropped = int((~keep).sum())
    images = np.ascontiguousarray(images[keep])
    labels = None if labels is None else labels[keep]
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
    return CalibrationData(images, f"{source}: {len(images)} images; {'; '.join(notes)}", labels, source)


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
    weights: str = "auto",
    target_fpr: float = 0.05,
    limit: int | None = None,
    seed: int = 0,
    description: str = "",
    force: bool = False,
    device: str = "auto",
    batch_size: int = 256,
    say: Callable[[str], None] | None = None,
) -> tuple[Path, EnsembleManifest]:
    """Calibrate and write `<repository>/_ensembles/<name>.json`; returns its path and manifest.
    `say`: where the one-line account of the weights goes (`training.ensemble.weights_line`)."""
    from pydantic import ValidationError

    from models.artifact import (
        ensemble_path,
        write_ensemble,
    )
    from models.scores import COMBINATION_RULES, calibrate_combination
    from service.core.ensembles import discover_ensembles, resolve_ensembles
    from training.data import ImageSet
    from training.ensemble import (
        can_halve,
        choose_weights,
        ensemble_manifest,
        equal_weights,
        halve,
        halves_record,
        weights_line,
    )

    repository = Path(repository)
    if rule not in COMBINATION_RULES:
        raise EnsembleCreateError(f"--rule must be one of {', '.join(COMBINATION_RULES)}, got '{rule}'")
    if weights not in ("auto", "equal"):
        raise EnsembleCreateError(f"--weights must be auto or equal, got '{weights}'")
    if not 0.0 < target_fpr < 1.0:
        raise EnsembleCreateError(f"--target-fpr must lie in (0, 1), got {target_fpr}")
    if ensemble_path(repository, name).exists() and not force:
        raise EnsembleCreateError(f"{ensemble_path(repository, name)} exists: pass --force to replace it")
    registry, models = _load_members(repository, members, device)
    manifests = [m.manifest for m in models]
    names = [m.name for m in manifests]
    calib = calibration_images(manifests, data, limit, seed)
    if len(calib.images) < 2:
        raise EnsembleCreateError(f"only {len(calib.images)} calibration images left ({calib.description})")

    def score(images: np.ndarray) -> np.ndarray:  # (K, N) member p-values through the graphs
        return np.stack([m.score(images, batch_size).p_value for m in models])

    p = score(calib.images)
    n = len(calib.images)
    chosen: list[float] | None = None
    validation_set = calib.description
    if rule != "fisher":
        selection = equal_weights(names, "rule", f"{rule} takes no member weights")
    elif weights == "equal":
        selection = equal_weights(
            names, "user", "equal weights, asked for (--weights equal); no selection on data"
        )
    elif not can_halve(n, target_fpr):
        selection = equal_weights(
            names,
            "rule",
            f"equal weights: {n} calibration images are too few to halve (pass more, or --weights equal)",
        )
    else:
        sel_idx, cal_idx = halve(n)
        full = ImageSet(calib.source or "calibration images", calib.images, calib.labels)
        selection_set, calibration_set = full.subset(sel_idx), full.subset(cal_idx)
        selection = choose_weights(
            names,
            selection_set,
            score,
            selection_p=p[:, sel_idx],
            images=halves_record(
                calib.source,
                selection_set,
                calibration_set,
                "the calibration half (the ensemble's threshold), the members' calibration, training "
                "and validation images, and every test or OOD evaluation set",
            ),
        )
        chosen, p = selection.weights, p[:, cal_idx]
        validation_set = f"calibration half ({len(cal_idx)} images) of {calib.description}"
    try:
        threshold, reference = calibrate_combination(p, rule, target_fpr, chosen)  # type: ignore[arg-type]
    except ValueError as exc:
        raise EnsembleCreateError(f"cannot calibrate on {p.shape[1]} images: {exc}") from None
    try:
        manifest = ensemble_manifest(
            name,
            description
            or f"{rule} over {', '.join(f'{m.name} v{m.version}' for m in manifests)} (oodflow ensemble create)",
            rule,  # type: ignore[arg-type]
            manifests,
            chosen,
            selection,
            target_fpr=target_fpr,
            threshold=threshold,
            reference=reference,
            validation_set=validation_set,
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
    if say is not None:
        say(weights_line(manifest))
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
