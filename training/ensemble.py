"""The combined verdict over several models (issue 6 §2), calibrated like a single model.

Pixel and embedding flows fail on different OOD data, so the service can return one verdict over
the models it ran. The rule, per image:

1. each member's p-value from its own calibration: `p_k = (1 + #{ref_k >= s_k}) / (1 + n_k)`,
   with `s_k` its ood_score and `ref_k` its in-distribution calibration scores;
2. `combined_score = models.scores.combine_p_values(p, rule)`: Fisher's `−2 Σ ln p_k` (default) or
   the Bonferroni-corrected minimum `−ln min(1, K · min p_k)`;
3. the members see the same image, so their p-values are dependent and the chi-square law of
   Fisher's method does not hold: the threshold on `combined_score` is calibrated empirically on
   the held-out in-distribution calibration split at the target FPR, from leave-one-out p-values
   of that split (exchangeable with a fresh image's), and the combined score's own p-value comes
   from those reference scores.

The result is `<repository>/_ensembles/<name>.json` (`models.artifact.EnsembleManifest`) and a
Markdown report beside it with per-model and combined metrics per OOD set.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.artifact import (
    Calibration,
    EnsembleManifest,
    EnsembleMember,
    EnsembleMetrics,
    Manifest,
    verify_artifact,
    write_ensemble,
)
from models.scores import CombinationRule, combine_p_values, leave_one_out_p_values, p_value
from training.calibrate import threshold_at_fpr
from training.evaluate import ood_metrics
from training.runs import Run
from training.statistics import load_split_scores

__all__ = [
    "RULE_DEFINITIONS",
    "CombinedScores",
    "build_ensemble",
    "combine_members",
    "ensemble_markdown",
]

RULE_DEFINITIONS: dict[str, str] = {
    "fisher": "Fisher's method: combined_score = −2 Σ_k ln p_k over the members' calibrated p-values; "
    "threshold calibrated empirically on held-out in-distribution data (members are not independent)",
    "min_p": "Bonferroni minimum: combined_score = −ln min(1, K · min_k p_k) over the members' calibrated "
    "p-values; threshold calibrated empirically on held-out in-distribution data",
}


@dataclass
class CombinedScores:
    """The combined score on the calibration split and on every evaluated split."""

    calibration: np.ndarray  # (n,) combined scores of the calibration split (leave-one-out p-values)
    threshold: float
    splits: dict[str, np.ndarray]  # split name -> (N,) combined scores


def combine_members(
    calibration: list[np.ndarray],
    splits: dict[str, list[np.ndarray]],
    rule: CombinationRule = "fisher",
    target_fpr: float = 0.05,
) -> CombinedScores:
    """`calibration[k]`: member k's ood_scores on the shared calibration split (same images, same
    order); `splits[name][k]`: member k's ood_scores on an evaluated split."""
    if len(calibration) < 2:
        raise ValueError("an ensemble needs at least two members")
    sizes = {len(c) for c in calibration}
    if len(sizes) != 1:
        raise ValueError(f"members were calibrated on different splits (sizes {sorted(sizes)})")
    references = [np.sort(np.asarray(c, dtype=np.float64)) for c in calibration]
    cal_p = np.stack([leave_one_out_p_values(c) for c in calibration])
    cal_combined = combine_p_values(cal_p, rule)
    threshold = threshold_at_fpr(cal_combined, target_fpr)
    out: dict[str, np.ndarray] = {}
    for name, member_scores in splits.items():
        if len(member_scores) != len(calibration):
            raise ValueError(f"split '{name}': expected scores of {len(calibration)} members")
        p = np.stack([p_value(s, ref) for s, ref in zip(member_scores, references, strict=True)])
        out[name] = combine_p_values(p, rule)
    return CombinedScores(cal_combined, threshold, out)


def _member_scores(run: Run, split: str) -> tuple[np.ndarray, str]:
    data = load_split_scores(run.dir / "scores", split)
    return np.asarray(data["ood_score"]), str(data["fingerprint"])


def build_ensemble(
    members: list[tuple[Path, Path]],
    repository: Path,
    name: str,
    *,
    rule: CombinationRule = "fisher",
    target_fpr: float = 0.05,
    description: str = "",
) -> tuple[Path, EnsembleManifest]:
    """`members`: (run folder, exported artifact folder) per model, each calibrated and evaluated.

    Every member must have been calibrated and evaluated on the same images (checked by
    fingerprint), and its run must match its artifact (checked on the calibration scores).
    """
    runs = [Run(Path(r)) for r, _ in members]
    manifests: list[Manifest] = [verify_artifact(Path(a)) for _, a in members]
    cal: list[np.ndarray] = []
    cal_prints: set[str] = set()
    for run, manifest in zip(runs, manifests, strict=True):
        scores, fingerprint = _member_scores(run, "calibration")
        ref = np.asarray(manifest.calibration.reference_scores)
        if len(ref) != len(scores) or not np.allclose(np.sort(scores), ref, rtol=1e-9, atol=1e-12):
            raise ValueError(f"{run.dir}: its calibration scores do not match artifact {manifest.name}")
        cal.append(scores)
        cal_prints.add(fingerprint)
    if len(cal_prints) != 1:
        raise ValueError("ensemble members were calibrated on different images; use the same data config")
    evaluations = [run.read_json("evaluation.json") for run in runs]
    ood_names = [m["dataset"] for m in evaluations[0]["ood"]]
    common = [n for n in ood_names if all(n in [m["dataset"] for m in e["ood"]] for e in evaluations)]
    split_keys = {"test": "test", **{n: f"ood-{n}" for n in common}}
    splits: dict[str, list[np.ndarray]] = {}
    for label, key in split_keys.items():
        loaded = [_member_scores(run, key) for run in runs]
        if len({fp for _, fp in loaded}) != 1:
            raise ValueError(f"ensemble members were evaluated on different '{label}' images")
        splits[label] = [s for s, _ in loaded]
    combined = combine_members(cal, splits, rule, target_fpr)
    test = combined.splits["test"]
    metrics = []
    for ood in common:
        scores = combined.splits[ood]
        m = ood_metrics(test, scores)
        member_m = [ood_metrics(splits["test"][k], splits[ood][k]) for k in range(len(runs))]
        metrics.append(
            EnsembleMetrics(
                dataset=ood,
                size=len(scores),
                **m,
                flagged_fraction=float(np.mean(scores > combined.threshold)),
                member_auroc={mf.name: mm["auroc"] for mf, mm in zip(manifests, member_m, strict=True)},
                member_fpr_at_95_tpr={
                    mf.name: mm["fpr_at_95_tpr"] for mf, mm in zip(manifests, member_m, strict=True)
                },
            )
        )
    reference = np.sort(combined.calibration)
    ensemble = EnsembleManifest(
        name=name,
        description=description or f"combined verdict of {', '.join(m.name for m in manifests)}",
        rule=rule,
        rule_definition=RULE_DEFINITIONS[rule],
        members=[
            EnsembleMember(name=m.name, version=m.version, kind=m.kind, statistic=m.score.statistic)
            for m in manifests
        ],
        calibration=Calibration(
            target_fpr=target_fpr,
            threshold=combined.threshold,
            validation_set=manifests[0].calibration.validation_set,
            validation_size=len(reference),
            validation_fpr=float(np.mean(reference > combined.threshold)),
            reference_scores=[float(x) for x in reference],
        ),
        in_distribution_test={
            "size": float(len(test)),
            "flagged_fraction": float(np.mean(test > combined.threshold)),
        },
        metrics=metrics,
    )
    path = write_ensemble(repository, ensemble)
    path.with_suffix(".md").write_text(ensemble_markdown(ensemble))
    return path, ensemble


def ensemble_markdown(ensemble: EnsembleManifest) -> str:
    names = [m.name for m in ensemble.members]
    lines = [
        f"# Ensemble {ensemble.name}: combined OOD verdict",
        "",
        f"- members: {', '.join(f'`{m.name}` v{m.version} ({m.kind}, {m.statistic})' for m in ensemble.members)}",
        f"- rule: **{ensemble.rule}**: {ensemble.rule_definition}",
        f"- threshold {ensemble.calibration.threshold:.4f} at target FPR {ensemble.calibration.target_fpr:.0%} "
        f"on {ensemble.calibration.validation_size} held-out in-distribution images; "
        f"{ensemble.in_distribution_test.get('flagged_fraction', float('nan')):.1%} of the test set flagged",
        "- convention: OpenOOD, OOD is the positive class",
        "",
        "| OOD set | n | " + " | ".join(f"{n} AUROC" for n in names) + " | combined AUROC | "
        "combined FPR@95%TPR | flagged |",
        "|---|---|" + "---|" * len(names) + "---|---|---|",
    ]
    for m in ensemble.metrics:
        lines.append(
            f"| {m.dataset} | {m.size} | "
            + " | ".join(f"{m.member_auroc[n]:.4f}" for n in names)
            + f" | **{m.auroc:.4f}** | {m.fpr_at_95_tpr:.4f} | {m.flagged_fraction:.1%} |"
        )
    lines.append("")
    return "\n".join(lines)
