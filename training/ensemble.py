"""The combined verdict over several models (issue 6 §2), calibrated like a single model.

Pixel and embedding flows fail on different OOD data, so the service can return one verdict over
the models it ran. The rule, per image:

1. each member's p-value from its own calibration: `p_k = (1 + #{ref_k >= s_k}) / (1 + n_k)`,
   with `s_k` its ood_score and `ref_k` its in-distribution calibration scores (the `calibration`
   split);
2. `combined_score = models.scores.combine_p_values(p, rule, weights)`: weighted Fisher
   `−2 Σ_k w_k ln p_k` (default) or the Bonferroni-corrected minimum `−ln min(1, K · min p_k)`;
3. the members see the same image, so their p-values are dependent and the chi-square law of
   Fisher's method does not hold: the threshold on `combined_score` is set
   (`models.scores.calibrate_combination`) on held-out in-distribution images disjoint from the
   calibration images that gave the members' reference scores (the **combination** split, or its
   calibration half, below). Their member p-values are then exchangeable with a fresh image's, so
   at most `target_fpr` of fresh in-distribution images are flagged, and with continuous scores
   `(n+1−k)/(n+1)` of them exactly (`models.scores.threshold_at_fpr`); the combined score's own
   p-value comes from the same reference scores.

The rule is fixed, not selected on data: Fisher's method. It sums the members' evidence, so two
moderately small p-values that the min-p rule would ignore add up, while one member alone still
decides once its p-value is small enough (a member's smallest p-value is `1/(n+1)`, and
`−2 ln(1/(n+1))` passes any 5% threshold of two members once n is a few hundred); the min-p rule
uses one member's evidence only. The threshold's validity does not depend on the rule. `min_p`
stays available to users who ask for it; the Fashion-MNIST-vs-MNIST comparison of both rules in
docs/reproduction.md is a paper table, not the reason for the choice.

**Member weights** (`weights="auto"`, the default for Fisher). With equal weights a member that is
blind to an OOD family (p-values uniform there) adds noise to the sum and dilutes an informative
member; a weight below 1 dilutes it less. The weights are chosen without any reported OOD set: the
combination images are cut in two disjoint halves by a fixed seeded permutation (`halve`); on the
**selection half** and on `training.selection.make_proxies` of it (the OOD proxies that choose the
pixel statistic), each candidate (`weight_candidates`: equal weights, and for each member k the
vector with `w_k = 1/2`, then with `w_k = 1/4`, the others 1) gets the worst-case AUROC of its
combined score over the proxies, and `training.selection.choose` picks the best, ties within
`TIE_TOLERANCE` going to the simpler candidate (equal weights first). The **calibration half** then
sets the threshold and reference scores: nothing in the combined score was fitted on it, so the
split-conformal guarantee above still holds. `weights="equal"` (or the `min_p` rule, or too few
combination images to halve) keeps every `w_k = 1` and calibrates on all the combination images.

The result is `<repository>/_ensembles/<name>.json` (`models.artifact.EnsembleManifest`, with the
choice in `weights` and `selection`) and a Markdown report beside it with per-model and combined
metrics per OOD set.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from models.artifact import (
    Calibration,
    EnsembleManifest,
    EnsembleMember,
    EnsembleMetrics,
    EnsembleWeightSelection,
    Manifest,
    SelectionImages,
    verify_artifact,
    write_ensemble,
)
from models.scores import CombinationRule, calibrate_combination, combine_p_values, p_value
from training.data import ImageSet
from training.evaluate import ood_metrics
from training.runs import Run, load_splits
from training.selection import PROXIES, TIE_TOLERANCE, auroc, choose, make_proxies
from training.statistics import load_split_scores

__all__ = [
    "RULE_DEFINITIONS",
    "RULE_CHOICE",
    "SELECTION_SEED",
    "WEIGHT_RULE",
    "CombinedScores",
    "WeightsChoice",
    "build_ensemble",
    "can_halve",
    "choose_weights",
    "combine_members",
    "ensemble_markdown",
    "ensemble_manifest",
    "equal_weights",
    "halve",
    "halves_record",
    "member_p_values",
    "rule_definition",
    "select_weights",
    "weight_candidates",
    "weights_line",
]

WeightsChoice = Literal["auto", "equal"]
SELECTION_SEED = 0  # the permutation that halves the combination images, and the proxies' seed

_THRESHOLD_TEXT = (
    "threshold set on held-out in-distribution images disjoint from those that gave the members' "
    "reference scores (split-conformal quantile; members are not independent)"
)
RULE_DEFINITIONS: dict[str, str] = {
    "fisher": "Fisher's method: combined_score = −2 Σ_k w_k ln p_k over the members' calibrated p-values "
    "(w_k: the manifest's weights, every w_k = 1 without them); " + _THRESHOLD_TEXT,
    "min_p": "Bonferroni minimum: combined_score = −ln min(1, K · min_k p_k) over the members' calibrated "
    "p-values; " + _THRESHOLD_TEXT,
}
RULE_CHOICE = (
    "fisher is fixed in advance, not selected on any data: it adds up the members' evidence and still "
    "lets one confident member decide (module docstring of training.ensemble); its member weights are "
    "chosen on OOD proxies of held-out in-distribution images (`selection`)"
)
WEIGHT_RULE = (
    "maximise the worst-case AUROC of the combined score over the OOD proxies (OOD positive; "
    "in-distribution side: the selection half of the combination images); candidates within "
    f"{TIE_TOLERANCE} of the best count as tied and the simplest wins, in the order: equal weights, "
    "one member at 1/2, one member at 1/4 (training.selection.choose; the pixel statistic is chosen "
    "on its mean proxy AUROC, the weights on the combined score's worst case)"
)
_NOT_USED = (
    "the calibration half (the ensemble's threshold), the members' calibration, training and validation "
    "images, the test split and every OOD evaluation set"
)


def rule_definition(rule: CombinationRule, weights: Sequence[float] | None, members: Sequence[str]) -> str:
    """`RULE_DEFINITIONS[rule]`, naming the weights when some differ from 1."""
    text = RULE_DEFINITIONS[rule]
    if rule == "fisher" and weights is not None and any(w != 1.0 for w in weights):
        named = ", ".join(f"{n} {w:g}" for n, w in zip(members, weights, strict=True))
        text = text.replace("(w_k: the manifest's weights, every w_k = 1 without them)", f"(w_k: {named})")
    return text


def weight_candidates(members: Sequence[str]) -> dict[str, tuple[float, ...]]:
    """Candidate weight vectors by name, simplest first: `equal`, then `<member> 1/2` (that member
    at 1/2, the others 1) for each member, then `<member> 1/4`."""
    k = len(members)
    out: dict[str, tuple[float, ...]] = {"equal": (1.0,) * k}
    for fraction, label in ((0.5, "1/2"), (0.25, "1/4")):
        for i, name in enumerate(members):
            out[f"{name} {label}"] = tuple(fraction if j == i else 1.0 for j in range(k))
    return out


def halve(n: int, seed: int = SELECTION_SEED) -> tuple[np.ndarray, np.ndarray]:
    """`(selection, calibration)`: disjoint ascending indices covering `range(n)`, cut by a fixed
    seeded permutation; the calibration half takes the odd image."""
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[: n // 2]), np.sort(order[n // 2 :])


def can_halve(n: int, target_fpr: float) -> bool:
    """Whether n combination images leave both halves large enough for a threshold that holds its
    target (`models.scores.threshold_at_fpr` needs `(1 − α)/α` scores: 19 at 5%)."""
    return n // 2 >= math.ceil((1.0 - target_fpr) / target_fpr - 1e-9)


def halves_record(
    source: str, selection_set: ImageSet, calibration_set: ImageSet, not_used: str = _NOT_USED
) -> SelectionImages:
    """What the weights were chosen on (the selection half) and what they were not (the calibration
    half, which sets the threshold), for the manifest's `selection.images`."""
    return SelectionImages(
        source=source,
        split="selection half",
        size=len(selection_set),
        fingerprint=selection_set.fingerprint(),
        seed=SELECTION_SEED,
        calibration_split="calibration half",
        calibration_size=len(calibration_set),
        calibration_fingerprint=calibration_set.fingerprint(),
        not_used=not_used,
    )


def select_weights(
    members: Sequence[str],
    selection_p: np.ndarray,
    proxy_p: Mapping[str, np.ndarray],
    *,
    images: SelectionImages | None = None,
) -> EnsembleWeightSelection:
    """Choose Fisher weights by `WEIGHT_RULE`. `selection_p: (K, n)`: member p-values of the
    selection-half images; `proxy_p[name]: (K, m)`: of each proxy set (`training.selection.PROXIES`
    names). Pure arithmetic on p-values; `choose_weights` computes them."""
    if not proxy_p:
        raise ValueError("no proxy p-values")
    candidates = weight_candidates(members)
    table: dict[str, dict[str, float]] = {}
    for name, w in candidates.items():
        id_scores = combine_p_values(selection_p, "fisher", w)
        table[name] = {p: auroc(id_scores, combine_p_values(ps, "fisher", w)) for p, ps in proxy_p.items()}
    worst = {c: min(row.values()) for c, row in table.items()}
    chosen = choose(worst, order=list(candidates))
    sizes = {name: int(np.asarray(ps).shape[1]) for name, ps in proxy_p.items()}
    known = {p.name: p for p in PROXIES}
    return EnsembleWeightSelection(
        by="selection",
        chosen=chosen,
        weights=list(candidates[chosen]),
        rule=WEIGHT_RULE,
        candidates={c: list(w) for c, w in candidates.items()},
        proxies=[
            {
                "name": name,
                "family": known[name].family if name in known else "",
                "description": known[name].description if name in known else "",
                "size": sizes[name],
            }
            for name in proxy_p
        ],
        auroc={c: {p: round(v, 6) for p, v in row.items()} for c, row in table.items()},
        worst_case_auroc={c: round(v, 6) for c, v in worst.items()},
        mean_auroc={c: round(float(np.mean(list(row.values()))), 6) for c, row in table.items()},
        images=images,
    )


def choose_weights(
    members: Sequence[str],
    selection: ImageSet,
    score: Callable[[np.ndarray], np.ndarray],
    *,
    images: SelectionImages,
    seed: int = SELECTION_SEED,
    selection_p: np.ndarray | None = None,
) -> EnsembleWeightSelection:
    """Choose Fisher weights on the selection-half images and their OOD proxies (module docstring).

    `score(images (N, C, H, W) uint8) -> (K, N)`: each member's p-value of each image, in member
    order (the members' exported graphs); `selection_p`: those of `selection` when already known."""
    p_sel = score(selection.images) if selection_p is None else selection_p
    proxies = make_proxies(selection, seed=seed)
    return select_weights(
        members, p_sel, {name: score(proxy.images) for name, proxy in proxies.items()}, images=images
    )


def equal_weights(members: Sequence[str], by: Literal["user", "rule"], why: str) -> EnsembleWeightSelection:
    """The selection record of equal weights that no procedure chose."""
    k = len(members)
    return EnsembleWeightSelection(
        by=by, chosen="equal", weights=[1.0] * k, rule=why, candidates={"equal": [1.0] * k}
    )


def weights_line(ensemble: EnsembleManifest) -> str:
    """One line: which weights, chosen how and on what, and which images set the threshold."""
    sel, cal = ensemble.selection, ensemble.calibration
    named = ", ".join(
        f"{m.name} {w:g}" for m, w in zip(ensemble.members, ensemble.member_weights, strict=True)
    )
    if sel is None or sel.by != "selection" or sel.images is None:
        why = "" if sel is None else f" ({sel.rule})"
        return f"weights: {named}{why}; threshold on {cal.validation_size} images"
    worst = sel.worst_case_auroc
    on = (
        f"on {len(sel.proxies)} OOD proxies of the {sel.images.size} {sel.images.split} images of "
        f"{sel.images.source}); threshold on the other {sel.images.calibration_size} "
        f"({sel.images.calibration_split})"
    )
    if sel.chosen == "equal":
        best = max(worst, key=lambda c: worst[c])
        return (
            f"weights: {named} (equal: worst-case proxy AUROC {worst['equal']:.4f}, the best candidate "
            f"'{best}' {worst[best]:.4f} is within {TIE_TOLERANCE}; {on}"
        )
    return (
        f"weights: {named} ('{sel.chosen}': worst-case proxy AUROC {worst[sel.chosen]:.4f} vs "
        f"{worst['equal']:.4f} for equal weights, {on}"
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
    weights: Sequence[float] | None = None,
) -> CombinedScores:
    """`references[k]`: member k's in-distribution reference (calibration) ood_scores;
    `combination[k]`: member k's ood_scores of the combination images (the same images in the same
    order for every member, none of them among any member's reference images): they set the
    threshold; `splits[name][k]`: member k's ood_scores on an evaluated split; `weights`: Fisher
    member weights (None: equal), not chosen on the `combination` images. Without `combination`
    only the combined scores are computed (AUROC needs no threshold)."""
    if len(references) < 2:
        raise ValueError("an ensemble needs at least two members")
    out = {
        name: combine_p_values(member_p_values(s, references), rule, weights) for name, s in splits.items()
    }
    if combination is None:
        return CombinedScores(np.zeros(0), None, out)
    threshold, reference = calibrate_combination(
        member_p_values(combination, references), rule, target_fpr, weights
    )
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


def _graph_p_values(artifacts: Sequence[Path], device: str) -> Callable[[np.ndarray], np.ndarray]:
    """`images -> (K, N)` member p-values through the members' exported graphs, scored by the
    service's core (what a served request gets)."""
    from service.core import load_model

    loaded = [load_model(Path(a), device=device, warm_batch_sizes=(1,)) for a in artifacts]  # type: ignore[arg-type]

    def score(images: np.ndarray) -> np.ndarray:
        return np.stack([m.score(images, 256).p_value for m in loaded])

    return score


def ensemble_manifest(
    name: str,
    description: str,
    rule: CombinationRule,
    manifests: Sequence[Manifest],
    weights: list[float] | None,
    selection: EnsembleWeightSelection | None,
    *,
    target_fpr: float,
    threshold: float,
    reference: np.ndarray,
    validation_set: str,
    **extra: Any,
) -> EnsembleManifest:
    """The ensemble manifest over `manifests` at their versions, calibrated by `threshold` and the
    sorted combined `reference` scores it was set on (`extra`: the optional record fields)."""
    reference = np.asarray(reference, dtype=np.float64)
    return EnsembleManifest(
        name=name,
        description=description,
        rule=rule,
        rule_definition=rule_definition(rule, weights, [m.name for m in manifests]),
        members=[
            EnsembleMember(name=m.name, version=m.version, kind=m.kind, statistic=m.score.statistic)
            for m in manifests
        ],
        weights=weights,
        selection=selection,
        calibration=Calibration(
            target_fpr=target_fpr,
            threshold=float(threshold),
            validation_set=validation_set,
            validation_size=len(reference),
            validation_fpr=float(np.mean(reference > threshold)),
            reference_scores=reference.tolist(),
        ),
        **extra,
    )


def build_ensemble(
    members: list[tuple[Path, Path]],
    repository: Path,
    name: str,
    *,
    rule: CombinationRule = "fisher",
    target_fpr: float = 0.05,
    description: str = "",
    weights: WeightsChoice = "auto",
    combination_images: ImageSet | None = None,
    device: str = "auto",
    say: Callable[[str], None] | None = None,
) -> tuple[Path, EnsembleManifest]:
    """`members`: (run folder, exported artifact folder) per model, each calibrated and evaluated.

    The ensemble's threshold is set on the members' scores of the combination split: every member
    must have scored the same combination images (checked by fingerprint), none of which gave any
    member's reference scores (checked: the fingerprints differ from every member's calibration
    images); each run must match its artifact (checked on the calibration scores), and the members
    must have been evaluated on the same images.

    `weights="auto"` (Fisher only): the combination images are halved (`halve`); the member weights
    are chosen on the selection half and its OOD proxies, scored through the exported graphs on
    `device`, and the calibration half sets the threshold (module docstring). `combination_images`:
    the combination split's images when the caller has them (else rebuilt from the first run's
    config; checked against the scored fingerprint). `say`: where the one-line account of the
    choice goes (`weights_line`).
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
    if weights not in ("auto", "equal"):
        raise ValueError(f"weights must be 'auto' or 'equal', got '{weights}'")
    in_distribution = runs[0].config.data.in_distribution
    names = [m.name for m in manifests]
    n_comb = len(combination[0])
    calibration_record: dict[str, object] = {
        "split": "combination",
        "dataset": in_distribution,
        "size": n_comb,
        "fingerprint": comb_print,
    }
    chosen: list[float] | None = None
    if rule != "fisher":
        selection = equal_weights(names, "rule", f"{rule} takes no member weights")
    elif weights == "equal":
        selection = equal_weights(names, "user", "equal weights, asked for; no selection on data")
    elif not can_halve(n_comb, target_fpr):
        selection = equal_weights(
            names,
            "rule",
            f"equal weights: {n_comb} combination images are too few to halve into a selection half and a "
            f"calibration half of at least {math.ceil((1 - target_fpr) / target_fpr - 1e-9)} each",
        )
    else:
        images = combination_images
        if images is None:
            rebuilt = load_splits(runs[0].config, with_eval_sets=False).combination
            if rebuilt is None:
                raise ValueError(f"{runs[0].dir}: its data config keeps no combination split")
            images = rebuilt
        if images.fingerprint() != comb_print:
            raise ValueError(
                "the combination images given (or rebuilt from the run config) are not the ones the members "
                "scored (fingerprints differ)"
            )
        sel_idx, cal_idx = halve(n_comb)
        selection_set, calibration_set = images.subset(sel_idx), images.subset(cal_idx)
        selection = choose_weights(
            names,
            selection_set,
            _graph_p_values([a for _, a in members], device),
            images=halves_record(f"combination split of {in_distribution}", selection_set, calibration_set),
        )
        chosen = selection.weights
        combination = [c[cal_idx] for c in combination]
        calibration_record.update(
            split="combination (calibration half)",
            size=len(cal_idx),
            fingerprint=calibration_set.fingerprint(),
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
    combined = combine_members(references, splits, rule, target_fpr, combination=combination, weights=chosen)
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
    half = ": its calibration half" if chosen is not None else ""
    ensemble = ensemble_manifest(
        name,
        description or f"combined verdict of {', '.join(m.name for m in manifests)}",
        rule,
        manifests,
        chosen,
        selection,
        target_fpr=target_fpr,
        threshold=combined.threshold,
        reference=reference,
        validation_set=f"{in_distribution} (held-out combination split{half}, disjoint from the "
        "members' calibration images)",
        calibration_images={
            **calibration_record,
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
    if say is not None:
        say(f"ensemble {name}: {weights_line(ensemble)}")
    return path, ensemble


def ensemble_markdown(ensemble: EnsembleManifest) -> str:
    names = [m.name for m in ensemble.members]
    sel = ensemble.selection
    weights_choice = (
        "the member weights were chosen on OOD proxies of held-out in-distribution images (below)"
        if sel is not None and sel.by == "selection"
        else "the member weights are equal"
    )
    lines = [
        f"# Ensemble {ensemble.name}: combined OOD verdict",
        "",
        f"- members: {', '.join(f'`{m.name}` v{m.version} ({m.kind}, {m.statistic})' for m in ensemble.members)}",
        f"- rule: **{ensemble.rule}**: {ensemble.rule_definition}",
        f"- {weights_line(ensemble)}",
        f"- threshold {ensemble.calibration.threshold:.4f} at target FPR {ensemble.calibration.target_fpr:.0%} "
        f"on {ensemble.calibration.validation_size} held-out in-distribution images (combination split, "
        "disjoint from the images that gave the members' reference scores); "
        f"{ensemble.in_distribution_test.get('flagged_fraction', float('nan')):.1%} of the test set flagged",
        "- convention: OpenOOD, OOD is the positive class",
        "- no choice was made on the sets below (the test split and every OOD set): the rule is fixed in "
        f"advance, {weights_choice}, each member's statistic was chosen as its manifest's `score.selection` "
        "records, and every threshold comes from held-out in-distribution images",
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
    if sel is not None and sel.by == "selection" and sel.auroc:
        proxies = [p["name"] for p in sel.proxies]
        lines += [
            "## Member weights: chosen on OOD proxies",
            "",
            f"Rule: {sel.rule}.",
            "",
            "| candidate | weights | " + " | ".join(proxies) + " | worst case |",
            "|---|---|" + "---|" * len(proxies) + "---|",
        ]
        for c, w in sel.candidates.items():
            mark = "**" if c == sel.chosen else ""
            lines.append(
                f"| {mark}{c}{mark} | {', '.join(f'{x:g}' for x in w)} | "
                + " | ".join(f"{sel.auroc[c][p]:.4f}" for p in proxies)
                + f" | {sel.worst_case_auroc[c]:.4f} |"
            )
        if sel.images is not None:
            lines += [
                "",
                f"Images: {sel.images.size} ({sel.images.split} of {sel.images.source}, fingerprint "
                f"`{sel.images.fingerprint[:12]}`, seed {sel.images.seed}); not used: {sel.images.not_used}.",
            ]
        lines.append("")
    return "\n".join(lines)
