"""`oodflow benchmark`: an OpenOOD-style near-/far-OOD table for any built model or ensemble.

For a model (its highest version) or an ensemble (`<repository>/_ensembles/<name>.json`):

- the in-distribution test set is the one the model was evaluated on (the manifest's training data
  config: a dataset spec with its limit and seed, or the held-out test split reproduced from the
  spec and seed), or `test=` when given;
- near-OOD sets are transforms of that test split that change what an image shows (flips,
  rotations, transpose, contrast inversion, tile shuffling); transforms declared as symmetries of
  the data are scored too but reported as a false-positive check, not as OOD;
- far-OOD sets are other datasets (`training.data.load_dataset` specs) and seeded synthetic images;
- every statistic each member's graph outputs allow, the member's shipped ood_score (with its
  threshold) and, for an ensemble, the combined verdict, get AUROC, AUPR-In, AUPR-Out and
  FPR@95%TPR (OOD positive) with stratified bootstrap intervals.

Scores come only from the exported ONNX graphs, computed like the service computes them.
`run_benchmark` returns the result as a JSON-ready dict; `training.benchmark.report` writes it.
"""

from __future__ import annotations

import hashlib
import platform
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from models.artifact import Manifest
from service.core.ensembles import ServedEnsemble, combine, resolve_ensembles
from training.benchmark.compare import Baseline, BaselineError, check_comparable, compare, goal_findings
from training.benchmark.graphs import (
    GraphModel,
    Target,
    complexity_bits,
    member_statistics,
    resolve_target,
    statistic_scores,
)
from training.benchmark.metrics import METRICS, binomial_interval, conformal_flag_range, ood_metrics_with_ci
from training.benchmark.sets import (
    NEAR_TRANSFORMS,
    SYNTHETIC,
    BenchmarkSet,
    default_far_specs,
    default_symmetries,
    far_set,
    near_set,
    parse_transforms,
)
from training.data import DatasetError, ImageSet, conform_images, load_dataset

__all__ = ["DEFAULT_NEAR", "DEFAULT_RESAMPLES", "BaselineError", "BenchmarkError", "run_benchmark"]

DEFAULT_NEAR: tuple[str, ...] = tuple(NEAR_TRANSFORMS)
DEFAULT_RESAMPLES = 500
DEFAULT_SYNTHETIC_COUNT = 1000
COMBINED = "combined"
CONVENTION = (
    "OpenOOD: OOD is the positive class for AUROC, AUPR-Out and FPR@95%TPR (the fraction of "
    "in-distribution test images flagged at the threshold that flags 95% of the OOD set); AUPR-In "
    "treats in-distribution as positive"
)


class BenchmarkError(DatasetError):
    """A benchmark that cannot run as asked; the message is one line."""


def _training_data(manifest: Manifest) -> dict[str, Any] | None:
    data = manifest.training.get("data") if isinstance(manifest.training, dict) else None
    return data if isinstance(data, dict) and "in_distribution" in data else None


def _held_out_test(manifest: Manifest) -> ImageSet:
    """Reproduce the run's held-out test split from the data spec and seed in its manifest."""
    from training.config import RunConfig
    from training.runs import load_splits

    # The run config as exported (model config under `architecture`); bookkeeping keys added by
    # the exporter (summary, split sizes) are not config.
    raw = {k: v for k, v in manifest.training.items() if k in RunConfig.model_fields}
    try:
        config = RunConfig.model_validate({**raw, "model": manifest.architecture})
    except ValueError as exc:
        raise BenchmarkError(
            f"{manifest.name}: cannot rebuild the run config to reproduce its held-out test split "
            f"({' '.join(str(exc).split())[:200]}); pass --test SPEC"
        ) from None
    splits = load_splits(config, with_eval_sets=False)
    assert splits.test is not None
    # The same seed and spec give the same permutation: the training split's fingerprint proves it.
    if splits.fingerprint != manifest.data.fingerprint:
        raise BenchmarkError(
            f"{manifest.name}: the split rebuilt from the manifest's data config does not reproduce the "
            "training images the model saw (fingerprint mismatch: the data changed?); pass --test SPEC"
        )
    return ImageSet(
        f"{config.data.in_distribution} (held-out test split)",
        splits.test.images,
        splits.test.labels,
        f"held-out test split of {config.data.in_distribution} (seed {config.data.seed}), reproduced "
        "from the manifest's data config",
        splits.test.class_names,
    )


def _member_test_set(manifest: Manifest) -> tuple[ImageSet, str]:
    """The in-distribution test set a model was evaluated on, and how it was obtained."""
    data = _training_data(manifest)
    shape = manifest.input.shape
    if data is None:
        spec = manifest.data.test_set
        if not spec or "held-out" in spec:
            raise BenchmarkError(
                f"{manifest.name}: the manifest does not say how to reproduce its test set "
                f"({spec or 'none recorded'}); pass --test SPEC"
            )
        return load_dataset(spec, shape=shape), f"`{spec}` (the manifest's test set)"
    if data.get("test_set") is None:
        test = _held_out_test(manifest)
        return test, test.source
    spec, limit, seed = data["test_set"], data.get("test_limit"), int(data.get("seed", 0))
    how = f"`{spec}`" + (
        f", the seeded sample of {limit} (seed {seed}) the model was evaluated on" if limit else ""
    )
    return load_dataset(spec, shape=shape, limit=limit, seed=seed), how


def _in_distribution(
    members: Sequence[GraphModel], test: str | None, limit: int | None, seed: int
) -> tuple[ImageSet, str, str, set[bytes]]:
    """`(test set, how it was obtained, in-distribution spec, digests of the whole test set's images)`
    shared by every member."""
    first = members[0].manifest
    in_spec = first.data.in_distribution
    if test is not None:
        dataset, how = load_dataset(test, shape=first.input.shape), f"`{test}` (given with --test)"
    else:
        found = [_member_test_set(m.manifest) for m in members]
        same_shape = all(d.shape == found[0][0].shape for d, _ in found)
        prints = {d.fingerprint() if same_shape else f"{d.name}:{len(d)}" for d, _ in found}
        if len(prints) != 1:
            raise BenchmarkError(
                "the ensemble's members were evaluated on different test sets; pass --test SPEC"
            )
        dataset, how = found[0]
    if len(dataset) < 2:
        raise BenchmarkError(f"the in-distribution test set has {len(dataset)} image(s); need at least 2")
    full_hashes = _image_hashes(dataset.images)
    if limit is not None and limit < len(dataset):
        # Random order, never a prefix (sources such as MNIST are stored sorted by label).
        chosen = np.random.default_rng(seed).choice(len(dataset), size=limit, replace=False)
        dataset = dataset.subset(np.sort(chosen))
        how += f"; seeded sample of {limit} (--limit, seed {seed})"
    return dataset, how, in_spec, full_hashes


def _image_hashes(images: np.ndarray) -> set[bytes]:
    """One digest per image's pixels: finds the same images in two sets (e.g. a far-OOD dataset
    that is the in-distribution data under another name)."""
    return {hashlib.blake2b(np.ascontiguousarray(image).data, digest_size=16).digest() for image in images}


def _selection_proxies(manifest: Manifest) -> dict[str, Any] | None:
    """`score.selection` (the record of how the pixel statistic was chosen), when present."""
    score = manifest.model_dump(mode="json").get("score", {})
    selection = score.get("selection")
    return selection if isinstance(selection, dict) else None


_ALIASES = {
    "verticalflip": "vflip", "flipud": "vflip", "vflip": "vflip", "upsidedown": "vflip",
    "horizontalflip": "hflip", "fliplr": "hflip", "hflip": "hflip", "mirror": "hflip",
    "rot90": "rot90", "rotate90": "rot90", "rotation90": "rot90",
    "rot180": "rot180", "rotate180": "rot180", "rotation180": "rot180",
    "rot270": "rot270", "rotate270": "rot270", "rotation270": "rot270",
    "transpose": "transpose", "invert": "invert", "inversion": "invert", "contrastinversion": "invert",
    "negative": "invert", "jigsaw": "jigsaw", "tileshuffle": "jigsaw",
}  # fmt: skip


def _proxy_transforms(selection: dict[str, Any]) -> set[str]:
    """Transform names among a selection record's proxies (names or dicts with a name)."""
    raw = selection.get("proxies", [])
    items = raw.items() if isinstance(raw, dict) else enumerate(raw if isinstance(raw, list) else [])
    found: set[str] = set()
    for key, value in items:
        texts = [str(key)] if isinstance(raw, dict) else []
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, dict):
            texts += [str(value[k]) for k in ("name", "family", "transform", "proxy") if k in value]
        for text in texts:
            norm = "".join(ch for ch in text.lower() if ch.isalnum())
            if norm in _ALIASES:  # exact names only: 'local-permutation' is not a jigsaw
                found.add(_ALIASES[norm])
    return found


def _score_set(
    model: GraphModel, images: np.ndarray, statistics: Sequence[str]
) -> tuple[dict[str, np.ndarray], Any]:
    """Every statistic's scores and the service's Scores (shipped ood_score) for one set."""
    fitted = conform_images(images, model.manifest.input.shape)
    outputs = model.run(fitted)
    bits = complexity_bits(fitted) if "complexity" in statistics else None
    per_stat = {s: statistic_scores(model.manifest, s, outputs, bits) for s in statistics}  # type: ignore[arg-type]
    return per_stat, model.scores(outputs, bits)


def _metrics_row(id_scores: np.ndarray, ood: np.ndarray, resamples: int, seed: int) -> dict[str, Any]:
    table = ood_metrics_with_ci(id_scores, ood, resamples=resamples, seed=seed)
    row: dict[str, Any] = {}
    for m in METRICS:
        row[m] = table.point[m]
        row[f"{m}_ci"] = list(table.interval[m])
    return row


def run_benchmark(
    target: str,
    repository: Path,
    *,
    far: Sequence[str] | None = None,
    near: Sequence[str] | None = None,
    symmetries: Sequence[str] | None = None,
    test: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    resamples: int = DEFAULT_RESAMPLES,
    synthetic_count: int = DEFAULT_SYNTHETIC_COUNT,
    device: str = "cpu",
    progress: bool = True,
    command: str = "",
    baseline: Baseline | None = None,
) -> dict[str, Any]:
    """Benchmark a model or ensemble; returns the JSON-ready result (see `training.benchmark.report`).

    `far`: dataset specs or `noise` / `constant` (None: every built-in source outside the
    in-distribution family); `near`: transform names (None: all of `NEAR_TRANSFORMS` that are not
    symmetries); `symmetries`: transforms of the test split that are in-distribution (None: those
    the models were built with, `oodflow build --symmetry`, else the built-in dataset's known ones,
    e.g. `hflip` for Fashion-MNIST; `["none"]` for none).
    `baseline`: an earlier run's checked `benchmark.json` (`compare.load_baseline`); it must be for
    the same in-distribution test set (checked before any scoring), and the result then carries
    `baseline`, `comparison` and `goal` (see `training.benchmark.compare`).
    Raises `DatasetError` / `BenchmarkError` / `BaselineError` with one-line messages on bad input.
    """
    if limit is not None and limit < 2:
        raise BenchmarkError(f"--limit must be at least 2, got {limit}")
    if resamples < 0:
        raise BenchmarkError(f"the number of bootstrap resamples must be >= 0, got {resamples}")
    chosen_near = parse_transforms(near, "near-OOD") if near is not None else None
    declared = parse_transforms(symmetries, "symmetry") if symmetries is not None else None
    resolved: Target = resolve_target(target, Path(repository))
    members = [GraphModel(p, device) for p in resolved.member_paths]
    ensemble = resolved.ensemble
    served: ServedEnsemble | None = None
    if ensemble is not None:
        # The service's own rule: valid only over members at exactly the listed version, kind, statistic.
        assert resolved.ensemble_file is not None
        served = ServedEnsemble(ensemble.name, resolved.ensemble_file, ensemble)
        resolve_ensembles([served], {m.name: m for m in members})
        if served.status != "valid":
            raise BenchmarkError(f"ensemble '{ensemble.name}' is {served.status}: {served.reason}")
    test_set, test_how, in_spec, test_hashes = _in_distribution(members, test, limit, seed)
    test_fingerprint = test_set.fingerprint()
    if baseline is not None:
        check_comparable(
            baseline,
            in_distribution=in_spec,
            dataset=test_set.name,
            size=len(test_set),
            shape=list(test_set.shape),
            fingerprint=test_fingerprint,
        )
    symmetry_source = "declared with --symmetries"
    if declared is None:
        # what the models were built with (`oodflow build --symmetry`), else the dataset's known ones
        built = [
            t
            for m in members
            for t in (m.manifest.training.get("data") or {}).get("symmetries") or []
            if t in NEAR_TRANSFORMS
        ]
        declared = list(dict.fromkeys(built))
        symmetry_source = "declared when the models were built"
        if not declared:
            declared = list(default_symmetries(in_spec))
            symmetry_source = f"default for {in_spec}" if declared else "none declared"
    if chosen_near is None:
        chosen_near = [t for t in DEFAULT_NEAR if t not in declared]
    else:
        clash = [t for t in chosen_near if t in declared]
        if clash:
            raise BenchmarkError(f"transform(s) {', '.join(clash)} given both as near-OOD and as symmetries")
    far_specs = list(far) if far is not None else default_far_specs([in_spec, test_set.name])
    shape = test_set.shape

    sets: list[BenchmarkSet] = [
        BenchmarkSet("test", "far", test_set.source, test_set.images, test_set.labels)
    ]
    sets += [near_set(test_set, t, "near", seed) for t in chosen_near]
    sets += [near_set(test_set, t, "symmetry", seed) for t in declared]
    skipped: dict[str, str] = {}
    for spec in far_specs:
        try:
            candidate = far_set(spec, shape, limit=limit, seed=seed, synthetic_count=synthetic_count)
        except DatasetError as exc:
            if far is not None:
                raise
            skipped[spec] = str(exc)  # a default source that does not load here is reported, not fatal
            continue
        shared = 0 if spec in SYNTHETIC else len(_image_hashes(candidate.images) & test_hashes)
        if shared and far is None and shared >= 0.01 * len(candidate):
            # e.g. `mnist` for a model trained on a folder of MNIST digits: not OOD at all.
            skipped[spec] = f"{shared} of its {len(candidate)} images are in-distribution test images"
            continue
        if shared:
            candidate = BenchmarkSet(
                candidate.name,
                candidate.family,
                f"{candidate.description} (**{shared} images also in the in-distribution test set**)",
                candidate.images,
                candidate.labels,
            )
        sets.append(candidate)

    # Scores: per set, per score key. Keys: "<member>/<statistic>", and "combined" for an ensemble.
    statistics = {m.name: member_statistics(m.manifest, m.output_names) for m in members}
    scores: dict[str, dict[str, np.ndarray]] = {s.name: {} for s in sets}
    flags: dict[str, dict[str, np.ndarray]] = {s.name: {} for s in sets}
    member_p: dict[str, list[np.ndarray]] = {s.name: [] for s in sets}
    bar = tqdm(total=len(sets) * len(members), desc="benchmark", unit="set", disable=not progress)
    for model in members:
        for benchmark_set in sets:
            bar.set_postfix(model=model.name, set=benchmark_set.name)
            per_stat, shipped = _score_set(model, benchmark_set.images, statistics[model.name])
            for stat, values in per_stat.items():
                scores[benchmark_set.name][f"{model.name}/{stat}"] = values
            flags[benchmark_set.name][f"{model.name}/{model.manifest.score.statistic}"] = shipped.is_ood
            member_p[benchmark_set.name].append(shipped.p_value)
            bar.update(1)
    bar.close()
    if served is not None:
        for name, ps in member_p.items():
            verdict = combine(served, {m.name: p for m, p in zip(members, ps, strict=True)})
            scores[name][COMBINED] = verdict.combined_score
            flags[name][COMBINED] = verdict.is_ood

    score_keys = list(scores["test"])
    thresholded = list(flags["test"])
    headline = (
        COMBINED if ensemble is not None else f"{members[0].name}/{members[0].manifest.score.statistic}"
    )
    target_fpr = {
        **{f"{m.name}/{m.manifest.score.statistic}": m.manifest.calibration.target_fpr for m in members},
        **({COMBINED: ensemble.calibration.target_fpr} if ensemble is not None else {}),
    }

    calibration_size = {
        **{f"{m.name}/{m.manifest.score.statistic}": m.manifest.calibration.validation_size for m in members},
        **({COMBINED: ensemble.calibration.validation_size} if ensemble is not None else {}),
    }

    proxies: dict[str, list[str]] = {}
    for m in members:
        selection = _selection_proxies(m.manifest)
        if selection is not None:
            for t in _proxy_transforms(selection):
                proxies.setdefault(t, []).append(m.name)

    test_scores = scores["test"]
    rows: list[dict[str, Any]] = []
    metric_bar = tqdm(
        total=sum(1 for s in sets if s.family != "symmetry" and s.name != "test") * len(score_keys),
        desc="bootstrap",
        unit="row",
        disable=not progress,
    )
    for benchmark_set in sets:
        if benchmark_set.name == "test" or benchmark_set.family == "symmetry":
            continue
        for key in score_keys:
            row = {
                "set": benchmark_set.name,
                "family": benchmark_set.family,
                "score": key,
                "size": len(benchmark_set),
            }
            row.update(_metrics_row(test_scores[key], scores[benchmark_set.name][key], resamples, seed))
            if key in flags[benchmark_set.name]:
                row["flagged_fraction"] = float(np.mean(flags[benchmark_set.name][key]))
            rows.append(row)
            metric_bar.update(1)
    metric_bar.close()

    def flagged_entry(set_name: str, key: str) -> dict[str, Any]:
        flagged = flags[set_name][key]
        k, n = int(np.sum(flagged)), len(flagged)
        low, high = binomial_interval(k, n)
        expected_low, expected_high = conformal_flag_range(calibration_size[key], target_fpr[key], n)
        return {
            "score": key,
            "flagged": k,
            "size": n,
            "flagged_fraction": k / n,
            "flagged_ci": [low, high],
            "target_fpr": target_fpr[key],
            "target_within_ci": bool(low <= target_fpr[key] <= high),
            # the count split-conformal calibration on `calibration_size` images predicts (95%)
            "calibration_size": calibration_size[key],
            "conformal_range": [expected_low, expected_high],
            "within_conformal_range": bool(expected_low <= k <= expected_high),
        }

    in_distribution = [flagged_entry("test", key) for key in thresholded]
    symmetry_checks = []
    for benchmark_set in (s for s in sets if s.family == "symmetry"):
        for key in score_keys:
            entry: dict[str, Any] = {"set": benchmark_set.name, "score": key, "size": len(benchmark_set)}
            if key in thresholded:
                entry.update(flagged_entry(benchmark_set.name, key))
                entry["test_flagged_fraction"] = float(np.mean(flags["test"][key]))
            shift = ood_metrics_with_ci(
                test_scores[key], scores[benchmark_set.name][key], resamples=resamples, seed=seed
            )
            entry["auroc_vs_test"] = shift.point["auroc"]
            entry["auroc_vs_test_ci"] = list(shift.interval["auroc"])
            symmetry_checks.append(entry)

    per_class: dict[str, dict[str, float]] = {}
    class_names = test_set.class_names
    if test_set.labels is not None:
        labels = test_set.labels
        for benchmark_set in (s for s in sets if s.family == "near"):
            per_class[benchmark_set.name] = {}
            for label in np.unique(labels):
                mask = labels == label
                name = class_names[label] if label < len(class_names) else str(label)
                per_class[benchmark_set.name][name] = ood_metrics_with_ci(
                    test_scores[headline][mask], scores[benchmark_set.name][headline][mask], resamples=0
                ).point["auroc"]

    result: dict[str, Any] = {
        "benchmark": resolved.name,
        "kind": resolved.kind,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command,
        "machine": f"{platform.machine()}, {platform.system()}",
        "convention": CONVENTION,
        "bootstrap": {
            "resamples": resamples,
            "seed": seed,
            "method": "stratified (in-distribution and OOD resampled separately, sizes kept), percentile 95% "
            "interval; a near-OOD set is the test images transformed, and resampling the two separately "
            "ignores that pairing",
        },
        "members": [
            {
                "name": m.name,
                "version": m.manifest.version,
                "kind": m.manifest.kind,
                "path": str(m.path),
                "statistic": m.manifest.score.statistic,
                "statistics": statistics[m.name],
                "threshold": m.manifest.calibration.threshold,
                "target_fpr": m.manifest.calibration.target_fpr,
                "in_distribution": m.manifest.data.in_distribution,
                "selection": _selection_proxies(m.manifest),
            }
            for m in members
        ],
        "ensemble": None
        if ensemble is None
        else {
            "name": ensemble.name,
            "rule": ensemble.rule,
            "threshold": ensemble.calibration.threshold,
            "target_fpr": ensemble.calibration.target_fpr,
            "members": [f"{m.name} v{m.version}" for m in ensemble.members],
        },
        "headline": headline,
        "scores": score_keys,
        "thresholded": thresholded,
        "in_distribution_test": {
            "dataset": test_set.name,
            "how": test_how,
            "size": len(test_set),
            "shape": list(shape),
            "fingerprint": test_fingerprint,
            "flagged": in_distribution,
        },
        "sets": [
            {
                "name": s.name,
                "family": s.family,
                "description": s.description,
                "size": len(s),
                "selection_proxy_of": proxies.get(s.name, []) if s.family != "far" else [],
            }
            for s in sets
            if s.name != "test"
        ],
        "symmetries": {"transforms": declared, "source": symmetry_source},
        "skipped": skipped,
        "results": rows,
        "symmetry_checks": symmetry_checks,
        "per_class_auroc": {"score": headline, "classes": list(class_names), "sets": per_class},
        "_arrays": {"scores": scores, "families": {s.name: s.family for s in sets}},
    }
    if baseline is not None:
        result.update(compare(result, baseline))
        result["goal"] = goal_findings(result)
    return result
