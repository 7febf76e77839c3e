"""Member weights of the combined verdict, chosen without any reported OOD set (training.ensemble).

- the rule (`select_weights`) on synthetic members: a member blind to the proxies is down-weighted
  and the combined worst-case AUROC rises; two equally useful members keep equal weights (ties go
  to the simpler candidate); its AUROC table equals an independent computation;
- the whole procedure (halve, choose on the selection half and its proxies, calibrate on the
  calibration half) holds the target FPR on fresh in-distribution images (synthetic, many
  repetitions, like the split-conformal test in test_ensemble_calibration.py);
- `build_ensemble` on the session's quick models: the halves, the record, the threshold and the
  selection table recomputed from the exported graphs; `weights="equal"` and `min_p` are today's
  ensemble.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from models.artifact import load_ensemble, verify_artifact
from models.scores import calibrate_combination, combine_p_values, p_value
from service.core import load_model
from training.config import load_run_config
from training.ensemble import (
    build_ensemble,
    ensemble_markdown,
    halve,
    select_weights,
    weight_candidates,
    weights_line,
)
from training.runs import load_splits
from training.selection import TIE_TOLERANCE, make_proxies
from training.statistics import load_split_scores

ALPHA = 0.05
MEMBERS = ["pixel", "embedding"]
PRESETS = ("fmnist-pixel-realnvp-quick", "fmnist-embedding-quick")


def _auroc(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    """Mann-Whitney by brute force (ties half), independent of training.selection.auroc."""
    a, b = np.asarray(id_scores)[:, None], np.asarray(ood_scores)[None, :]
    return float(np.mean((b > a) + 0.5 * (b == a)))


def _members(rng: np.random.Generator, shifts: dict[str, tuple[float, float]], n: int, n_ref: int = 500):  # type: ignore[no-untyped-def]
    """Member p-values `(2, n)` of in-distribution images and of each proxy: member k's score is
    N(shift_k, 1) on a proxy and N(0, 1) in distribution, against a reference of `n_ref` scores."""
    refs = [np.sort(rng.normal(size=n_ref)) for _ in MEMBERS]

    def p(shift: tuple[float, float]) -> np.ndarray:
        return np.stack([p_value(rng.normal(s, 1.0, size=n), r) for s, r in zip(shift, refs, strict=True)])

    return p((0.0, 0.0)), {name: p(shift) for name, shift in shifts.items()}


# ------------------------------------------------------------------------ the rule, synthetic


def test_candidates_simplest_first() -> None:
    candidates = weight_candidates(["a", "b", "c"])
    assert list(candidates) == ["equal", "a 1/2", "b 1/2", "c 1/2", "a 1/4", "b 1/4", "c 1/4"]
    assert candidates["equal"] == (1.0, 1.0, 1.0) and candidates["b 1/4"] == (1.0, 0.25, 1.0)


def test_a_blind_member_is_down_weighted_and_the_worst_case_rises() -> None:
    """The pixel member is blind to both proxies (its scores there are in-distribution ones); the
    embedding member separates them (AUROC ~0.97). Equal weights dilute it; the rule down-weights
    the pixel member (1/2: within the tie tolerance of 1/4, and simpler)."""
    rng = np.random.default_rng(0)
    selection_p, proxy_p = _members(rng, {"blur": (0.0, 2.6), "mosaic": (0.0, 2.6)}, n=2000)
    record = select_weights(MEMBERS, selection_p, proxy_p)
    print(record.worst_case_auroc)
    worst = record.worst_case_auroc
    assert record.by == "selection" and record.chosen == "pixel 1/2" and record.weights == [0.5, 1.0]
    assert worst["pixel 1/2"] > worst["equal"] + TIE_TOLERANCE
    assert worst["pixel 1/4"] >= worst["pixel 1/2"] - TIE_TOLERANCE  # the tie that simplicity breaks
    assert worst["embedding 1/4"] < worst["equal"]  # down-weighting the informative one hurts
    # the table is the combined score's AUROC, computed here independently
    for name, weights in record.candidates.items():
        id_scores = -2 * (np.asarray(weights)[:, None] * np.log(selection_p)).sum(axis=0)
        for proxy, p in proxy_p.items():
            ood = -2 * (np.asarray(weights)[:, None] * np.log(p)).sum(axis=0)
            assert record.auroc[name][proxy] == pytest.approx(_auroc(id_scores, ood), abs=1e-6)
        assert worst[name] == min(record.auroc[name].values())
    assert [p["name"] for p in record.proxies] == ["blur", "mosaic"]
    assert all(p["size"] == 2000 for p in record.proxies)


def test_two_useful_members_keep_equal_weights() -> None:
    """Each member sees one proxy family: down-weighting either loses that family's worst case."""
    rng = np.random.default_rng(1)
    selection_p, proxy_p = _members(rng, {"blur": (2.0, 0.0), "mosaic": (0.0, 2.0)}, n=2000)
    record = select_weights(MEMBERS, selection_p, proxy_p)
    assert record.chosen == "equal" and record.weights == [1.0, 1.0]
    best = max(record.worst_case_auroc.values())
    assert record.worst_case_auroc["equal"] >= best - TIE_TOLERANCE


# ------------------------------------------------------------------------ the threshold holds


def test_threshold_on_the_calibration_half_holds_the_rate_after_choosing_weights() -> None:
    """The product's procedure, repeated: 237 held-out images with dependent member scores (they see
    the same image) are halved; the weights are chosen on the 118 of the selection half and its proxy
    (where the pixel member is the weaker one, so the choice varies from draw to draw), the threshold
    is set on the 119 of the calibration half ((n+1)(1-α) = 114 is whole, so the rate is α for
    continuous scores; discrete p-values make `>` at most α and `>=` at least α, in expectation).
    2,000 repetitions × 400 fresh images put the standard error near 0.0005."""
    rng = np.random.default_rng(2)
    repetitions, fresh, n_held, n_ref = 2000, 400, 237, 300
    cov = np.array([[1.0, 0.6], [0.6, 1.0]])
    strict, loose, chosen = [], [], set()
    for _ in range(repetitions):
        refs = [np.sort(r) for r in rng.multivariate_normal([0, 0], cov, size=n_ref).T]

        def p(scores: np.ndarray, refs: list[np.ndarray] = refs) -> np.ndarray:
            return np.stack([p_value(s, r) for s, r in zip(scores, refs, strict=True)])

        held = p(rng.multivariate_normal([0, 0], cov, size=n_held).T)
        sel, cal = halve(n_held, seed=int(rng.integers(1 << 30)))
        proxies = {"proxy": p(rng.multivariate_normal([0.6, 1.0], cov, size=len(sel)).T)}
        record = select_weights(MEMBERS, held[:, sel], proxies)
        chosen.add(record.chosen)
        threshold, _ = calibrate_combination(held[:, cal], "fisher", ALPHA, record.weights)
        scores = combine_p_values(
            p(rng.multivariate_normal([0, 0], cov, size=fresh).T), "fisher", record.weights
        )
        strict.append(float(np.mean(scores > threshold)))
        loose.append(float(np.mean(scores >= threshold)))
    se = float(np.std(strict) / math.sqrt(repetitions))
    print(
        f"realised FPR > {np.mean(strict):.4f}, >= {np.mean(loose):.4f} (se {se:.4f}); chosen {sorted(chosen)}"
    )
    assert len(chosen) > 1  # the weights really were chosen, differently on different draws
    assert np.mean(strict) <= ALPHA + 4 * se and np.mean(loose) >= ALPHA - 4 * se


def test_halves_are_disjoint_fixed_and_cover_everything() -> None:
    a, b = halve(11)
    assert len(a) == 5 and len(b) == 6 and not set(a) & set(b) and set(a) | set(b) == set(range(11))
    assert all(np.array_equal(x, y) for x, y in zip(halve(11), (a, b), strict=True))  # seeded
    assert not np.array_equal(halve(11, seed=1)[0], a)


# ------------------------------------------------------------------------ the quick models


def _members_of(quick_repository: dict[str, Path]) -> list[tuple[Path, Path]]:
    return [(quick_repository[p + ":run"], quick_repository[p]) for p in PRESETS]


def test_build_ensemble_chooses_on_one_half_and_calibrates_on_the_other(
    quick_repository: dict[str, Path], tmp_path: Path
) -> None:
    members = _members_of(quick_repository)
    lines: list[str] = []
    path, ensemble = build_ensemble(members, tmp_path, "weighted", device="cpu", say=lines.append)
    assert load_ensemble(path) == ensemble
    sel = ensemble.selection
    assert sel is not None and sel.by == "selection" and sel.images is not None
    assert ensemble.weights == sel.weights == list(sel.candidates[sel.chosen])
    assert lines == [f"ensemble weighted: {weights_line(ensemble)}"] and sel.chosen in lines[0]

    combination = load_splits(load_run_config(PRESETS[0]), with_eval_sets=False).combination
    assert combination is not None and len(combination) == 128
    sel_idx, cal_idx = halve(len(combination))
    assert sel.images.size == len(sel_idx) == 64 and sel.images.calibration_size == len(cal_idx) == 64
    assert sel.images.fingerprint == combination.subset(sel_idx).fingerprint()
    assert sel.images.calibration_fingerprint == combination.subset(cal_idx).fingerprint()
    assert ensemble.calibration_images["fingerprint"] == sel.images.calibration_fingerprint
    assert "test split" in sel.images.not_used and "OOD" in sel.images.not_used

    # the threshold: the members' scores of the calibration half only, with the chosen weights
    manifests = [verify_artifact(a) for _, a in members]
    refs = [np.sort(m.calibration.reference_scores) for m in manifests]
    comb = [load_split_scores(run / "scores", "combination")["ood_score"] for run, _ in members]
    p_cal = np.stack([p_value(np.asarray(c)[cal_idx], r) for c, r in zip(comb, refs, strict=True)])
    threshold, reference = calibrate_combination(p_cal, "fisher", ALPHA, ensemble.weights)
    assert ensemble.calibration.threshold == threshold
    assert ensemble.calibration.reference_scores == reference.tolist()

    # the selection table: the exported graphs on the selection half and its proxies
    graphs = [load_model(a, device="cpu") for _, a in members]
    half = combination.subset(sel_idx)
    sets = {"in-distribution": half, **make_proxies(half, seed=sel.images.seed)}
    p = {k: np.stack([g.score(v.images).p_value for g in graphs]) for k, v in sets.items()}
    for name, weights in sel.candidates.items():
        id_scores = combine_p_values(p["in-distribution"], "fisher", weights)
        for proxy in sel.auroc[name]:
            expected = _auroc(id_scores, combine_p_values(p[proxy], "fisher", weights))
            assert sel.auroc[name][proxy] == pytest.approx(expected, abs=1e-6)
    best = max(sel.worst_case_auroc.values())
    order = list(sel.candidates)
    first_tied = next(c for c in order if sel.worst_case_auroc[c] >= best - TIE_TOLERANCE)
    assert sel.chosen == first_tied
    text = ensemble_markdown(ensemble)
    assert "Member weights: chosen on OOD proxies" in text and f"**{sel.chosen}**" in text


@pytest.mark.parametrize(("rule", "weights"), [("fisher", "equal"), ("min_p", "auto")])
def test_equal_weights_and_min_p_are_todays_ensemble(
    quick_repository: dict[str, Path], tmp_path: Path, rule: str, weights: str
) -> None:
    members = _members_of(quick_repository)
    _, ensemble = build_ensemble(members, tmp_path, "plain", rule=rule, weights=weights)  # type: ignore[arg-type]
    assert ensemble.weights is None and ensemble.member_weights == [1.0, 1.0]
    assert ensemble.selection is not None and ensemble.selection.by == (
        "user" if rule == "fisher" else "rule"
    )
    assert (
        ensemble.calibration.validation_size == 128 and ensemble.calibration_images["split"] == "combination"
    )
    manifests = [verify_artifact(a) for _, a in members]
    comb = [load_split_scores(run / "scores", "combination")["ood_score"] for run, _ in members]
    p = np.stack(
        [
            p_value(np.asarray(c), np.sort(m.calibration.reference_scores))
            for c, m in zip(comb, manifests, strict=True)
        ]
    )
    threshold, reference = calibrate_combination(p, rule, ALPHA)  # type: ignore[arg-type]
    assert ensemble.calibration.threshold == threshold
    assert ensemble.calibration.reference_scores == reference.tolist()


def test_bad_weights_choice_is_a_one_line_error(quick_repository: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="weights must be 'auto' or 'equal'") as info:
        build_ensemble(_members_of(quick_repository), tmp_path, "bad", weights="heavy")  # type: ignore[arg-type]
    assert "\n" not in str(info.value)
