"""The combined verdict over several models (issue 6 §2), calibrated like a single model.

Pixel and embedding flows fail on different OOD data, so the service can return one verdict over
the models it ran. The rule, per image:

1. each member's p-value from its own calibration: `p_k = (1 + #{ref_k >= s_k}) / (1 + n_k)`,
   with `s_k` its ood_score and `ref_k` its in-distribution calibration scores (the `calibration`
   split);
2. `combined_score = models.scores.combine_p_values(p, rule)`: Fisher's `−2 Σ ln p_k` (default) or
   the Bonferroni-corrected minimum `−ln min(1, K · min p_k)`;
3. the members see the same image, so their p-values are dependent and the chi-square law of
   Fisher's method does not hold: the threshold on `combined_score` is set
   (`models.scores.calibrate_combination`) on the **combination** split, held-out in-distribution
   images disjoint from the calibration images that gave the members' reference scores. Their
   member p-values are then exchangeable with a fresh image's, so at most `target_fpr` of fresh
   in-distribution images are flagged, and with continuous scores `(n+1−k)/(n+1)` of them
   exactly (`models.scores.threshold_at_fpr`); the combined score's own p-value comes from the same
   reference scores.

The rule is fixed, not selected on data: Fisher's method. It sums the members' evidence, so two
moderately small p-values that the min-p rule would ignore add up, while one member alone still
decides once its p-value is small enough (a member's smallest p-value is `1/(n+1)`, and
`−2 ln(1/(n+1))` passes any 5% threshold of two members once n is a few hundred); the min-p rule
uses one member's evidence only. The threshold's validity does not depend on the rule. `min_p`
stays available to users who ask for it; the Fashion-MNIST-vs-MNIST comparison of both rules in
docs/reproduction.md is a paper table, not the reason for the choice.

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
from models.scores import CombinationRule, calibrate_combination, combine_p_values, p_value
from training.evaluate import ood_metrics
from training.runs import Run
from training.statistics import load_split_scores

__all__ = [
    "RULE_DEFINITIONS",
    "RULE_CHOICE",
    "CombinedScores",
    "build_ensemble",
    "combine_members",
    "ensemble_markdown",
    "member_p_values",
]

_THRESHOLD_TEXT = (
    "threshold set on held-out in-distribution images disjoint from those that gave the members' "
    "reference scores (split-conformal quantile; members are not independent)"
)
RULE_DEFINITIONS: dict[str, str] = {
    "fisher": "Fisher's method: combined_score = −2 Σ_k ln p_k over the members' calibrated p-values; "
    + _THRESHOLD_TEXT,
    "min_p": "Bonferroni minimum: combined_score = −ln min(1, K · min_k p_k) over the members' calibrated "
    "p-values; " + _THRESHOLD_TEXT,
}
RULE_CHOICE = (
    "fisher is fixed in advance, not selected on any data: it adds up the members' evidence and still "
    "lets one confident member decide (module docstring of training.ensemble)"
)


@dataclass
class CombinedScores:
    """The combined score on the combination split and on every evaluated split."""

    combination: np.ndarray  # (n,) ascending combined scores of the combination split; () without one
    threshold: float | None  # None without a combination split
    splits: dict[str, np.ndarray]  # split name -> (N,) combined scores


def member_p_values(scores: list[np.ndarray], references: list[np.ndarray]) -> np.ndarray:
    """`(K, N)`: member k's `p_value` of `scores[k]` (N images, same order for every member)
    against its reference scores `references[k]` (any order)."""
    if len(scores) != len(references):
        raise ValueError(f"expected scores of {len(references)} members, got {len(scores)}")
    if len({len(s) for s in scores}) > 1:
        raise ValueError(f"members scored different numbers of images: {[len(s) for s in scores]}")
    return np.stack(
        [
            p_value(np.asarray(s, dtype=np.float64), np.sort(np.asarray(r, dtype=np.float64)))
            for s, r in zip(scores, references, strict=True)
        ]
    )


def combine_members(
    references: list[np.ndarray],
    splits: dict[str, list[np.ndarray]],
    rule: CombinationRule = "fisher",
    target_fpr: float = 0.05,
    *,
    combination: list[np.ndarray] | None = None,
) -> CombinedScores:
    """`references[k]`: member k's in-distribution reference (calibration) ood_scores;
    `combination[k]`: member k's ood_scores of the combination images (the same images in the same
    order for every member, none of them among any member's reference images): they set the
    threshold; `splits[name][k]`: member k's ood_scores on an evaluated split. Without
    `combination` only the combined scores are computed (AUROC needs no threshold)."""
    if len(references) < 2:
        raise ValueError("an ensemble needs at least two members")
    out = {name: combine_p_values(member_p_values(s, references), rule) for name, s in splits.items()}
    if combination is None:
        return CombinedScores(np.zeros(0), None, out)
    threshold, reference = calibrate_combination(member_p_values(combination, references), rule, target_fpr)
    return CombinedScores(reference, threshold, out)


def _member_scores(run: Run, split: str) -> tuple[np.ndarray, str]:
    data = load_split_scores(run.dir / "scores", split)
    return np.asarray(data["ood_score"]), str(data["fingerprint"])


def _combination_scores(run: Run) -> tuple[np.ndarray, str]:
    try:
        return _member_scores(run, "combination")
    except FileNotFoundError:
        raise ValueError(
            f"{run.dir}: no scores of the combination split (scores/combination.npz), so an ensemble could "
            f"only be calibrated on its members' own calibration images; recalibrate it (`oodflow calibrate "
            f"{run.dir}`), which halves the held-out images into calibration and combination"
        ) from None


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

    The ensemble's threshold is set on the members' scores of the combination split: every member
    must have scored the same combination images (checked by fingerprint), none of which gave any
    member's reference scores (checked: the fingerprints differ from every member's calibration
    images); each run must match its artifact (checked on the calibration scores), and the members
    must have been evaluated on the same images.
    """
    runs = [Run(Path(r)) for r, _ in members]
    manifests: list[Manifest] = [verify_artifact(Path(a)) for _, a in members]
    references: list[np.ndarray] = []
    combination: list[np.ndarray] = []
    cal_prints: dict[str, str] = {}
    comb_prints: dict[str, str] = {}
    for run, manifest in zip(runs, manifests, strict=True):
        scores, fingerprint = _member_scores(run, "calibration")
        ref = np.asarray(manifest.calibration.reference_scores)
        if len(ref) != len(scores) or not np.allclose(np.sort(scores), ref, rtol=1e-9, atol=1e-12):
            raise ValueError(f"{run.dir}: its calibration scores do not match artifact {manifest.name}")
        references.append(ref)
        cal_prints[manifest.name] = fingerprint
        comb, comb_print = _combination_scores(run)
        combination.append(comb)
        comb_prints[manifest.name] = comb_print
    if len(set(comb_prints.values())) != 1:
        detail = ", ".join(f"{n}: {fp[:12]}" for n, fp in comb_prints.items())
        raise ValueError(
            f"ensemble members scored different combination images ({detail}); build them from the same "
            "data config (in_distribution, calibration_size, seed)"
        )
    comb_print = next(iter(comb_prints.values()))
    if comb_print in cal_prints.values():
        raise ValueError(
            "the combination images are some member's calibration images; recalibrate the members"
        )
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
    combined = combine_members(references, splits, rule, target_fpr, combination=combination)
    assert combined.threshold is not None
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
    reference = combined.combination
    in_distribution = runs[0].config.data.in_distribution
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
            validation_set=f"{in_distribution} (held-out combination split, disjoint from the members' "
            "calibration images)",
            validation_size=len(reference),
            validation_fpr=float(np.mean(reference > combined.threshold)),
            reference_scores=[float(x) for x in reference],
        ),
        calibration_images={
            "split": "combination",
            "dataset": in_distribution,
            "size": len(reference),
            "fingerprint": comb_print,
            "disjoint_from_member_calibration": cal_prints,
            "rule_choice": RULE_CHOICE if rule == "fisher" else "min_p, chosen by the user",
        },
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
        f"on {ensemble.calibration.validation_size} held-out in-distribution images (combination split, "
        "disjoint from the images that gave the members' reference scores); "
        f"{ensemble.in_distribution_test.get('flagged_fraction', float('nan')):.1%} of the test set flagged",
        "- convention: OpenOOD, OOD is the positive class",
        "- no choice was made on the sets below (the test split and every OOD set): the rule is fixed in "
        "advance, each member's statistic was chosen as its manifest's `score.selection` records, and every "
        "threshold comes from held-out in-distribution images",
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
