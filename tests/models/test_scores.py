"""Weighted Fisher combination (`models.scores.combine_p_values(p, rule, weights)`) and the ensemble
manifest's `weights`: equal weights are today's numbers bit for bit, the weighted formula equals a
hand computation, a down-weighted blind member dilutes the informative one less, and bad weights are
one-line errors (in the maths and in the manifest)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from models.artifact import ArtifactError, EnsembleManifest, load_ensemble, write_ensemble
from models.scores import (
    calibrate_combination,
    combination_weights,
    combine_p_values,
    combined_verdict,
    p_value,
)

ALPHA = 0.05


def _p(seed: int = 0, k: int = 3, n: int = 200) -> np.ndarray:
    """`(k, n)` p-values on the grid of a 99-image reference, as members produce them."""
    rng = np.random.default_rng(seed)
    return rng.integers(1, 101, size=(k, n)) / 100.0


def _auroc(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    """Mann-Whitney by brute force (ties half): independent of any production helper."""
    a, b = np.asarray(id_scores)[:, None], np.asarray(ood_scores)[None, :]
    return float(np.mean((b > a) + 0.5 * (b == a)))


# ------------------------------------------------------------------------ formula


@pytest.mark.parametrize("rule", ["fisher", "min_p"])
def test_no_weights_and_unit_weights_are_todays_numbers_exactly(rule: str) -> None:
    p = _p()
    today = -2.0 * np.log(p).sum(axis=0) if rule == "fisher" else -np.log(np.minimum(1.0, 3 * p.min(axis=0)))
    assert np.array_equal(combine_p_values(p, rule), today)  # type: ignore[arg-type]
    assert np.array_equal(combine_p_values(p, rule, None), today)  # type: ignore[arg-type]
    assert np.array_equal(combine_p_values(p, rule, [1.0, 1.0, 1.0]), today)  # type: ignore[arg-type]
    t0, r0 = calibrate_combination(p, rule, ALPHA)  # type: ignore[arg-type]
    t1, r1 = calibrate_combination(p, rule, ALPHA, [1.0, 1.0, 1.0])  # type: ignore[arg-type]
    assert t0 == t1 and np.array_equal(r0, r1)
    v0 = combined_verdict(list(p), rule, t0, r0)  # type: ignore[arg-type]
    v1 = combined_verdict(list(p), rule, t0, r0, [1.0, 1.0, 1.0])  # type: ignore[arg-type]
    assert all(np.array_equal(a, b) for a, b in zip(v0, v1, strict=True))


def test_weighted_fisher_by_hand() -> None:
    p = np.array([[0.5, 1.0, 0.01], [0.25, 1.0, 0.8]])  # 2 members x 3 images
    w = [0.5, 2.0]
    expected = [
        -2 * (0.5 * math.log(0.5) + 2.0 * math.log(0.25)),
        0.0,
        -2 * (0.5 * math.log(0.01) + 2.0 * math.log(0.8)),
    ]
    np.testing.assert_allclose(combine_p_values(p, "fisher", w), expected, rtol=1e-15, atol=0)
    # a constant vector scales the score: the same order, the same verdicts once calibrated on it
    q = _p(1, k=2)
    np.testing.assert_allclose(combine_p_values(q, "fisher", [3.0, 3.0]), 3 * combine_p_values(q, "fisher"))
    threshold, reference = calibrate_combination(q, "fisher", ALPHA, w)
    assert threshold in reference and reference.tolist() == sorted(combine_p_values(q, "fisher", w).tolist())
    score, p_comb, is_ood = combined_verdict(list(p), "fisher", threshold, reference, w)
    np.testing.assert_allclose(score, expected, rtol=1e-15)
    np.testing.assert_allclose(p_comb, p_value(np.asarray(expected), reference))
    assert is_ood.tolist() == [e > threshold for e in expected]


def test_down_weighting_a_blind_member_dilutes_the_informative_one_less() -> None:
    """Member A separates OOD (AUROC ~0.97); member B is blind (uniform p-values on both sides).
    Equal-weight Fisher adds B's noise and loses AUROC; weight 1/2, then 1/4 on B gives most of it back
    (the pattern measured on the real members in /work/notes/h-explore/quick4.py)."""
    rng = np.random.default_rng(3)
    n_ref, n = 1000, 4000
    ref = np.sort(rng.normal(size=n_ref))
    a_id, a_ood = p_value(rng.normal(size=n), ref), p_value(rng.normal(2.6, 1.0, size=n), ref)
    b_id, b_ood = rng.integers(1, n_ref + 2, size=(2, n)) / (n_ref + 1.0)
    alone = _auroc(-np.log(a_id), -np.log(a_ood))
    aurocs = {
        w: _auroc(
            combine_p_values(np.stack([a_id, b_id]), "fisher", [1.0, w]),
            combine_p_values(np.stack([a_ood, b_ood]), "fisher", [1.0, w]),
        )
        for w in (1.0, 0.5, 0.25)
    }
    print(f"member alone {alone:.4f}; Fisher with the blind member at w: {aurocs}")
    assert alone > 0.95
    assert aurocs[1.0] < alone - 0.01  # equal weights dilute
    assert aurocs[1.0] < aurocs[0.5] < aurocs[0.25] <= alone + 1e-3


# ------------------------------------------------------------------------ bad weights


@pytest.mark.parametrize(
    ("weights", "rule", "message"),
    [
        ([1.0], "fisher", "2 numbers"),
        ([1.0, 1.0, 1.0], "fisher", "2 numbers"),
        ([[1.0, 1.0]], "fisher", "2 numbers"),
        ([1.0, 0.0], "fisher", "finite and positive"),
        ([1.0, -0.5], "fisher", "finite and positive"),
        ([1.0, float("nan")], "fisher", "finite and positive"),
        ([1.0, float("inf")], "fisher", "finite and positive"),
        ([1.0, 0.5], "min_p", "min_p rule takes no member weights"),
    ],
)
def test_bad_weights_are_one_line_errors(weights: list[float], rule: str, message: str) -> None:
    p = _p(k=2, n=5)
    with pytest.raises(ValueError, match=message) as info:
        combine_p_values(p, rule, weights)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=message):
        calibrate_combination(p, rule, ALPHA, weights)  # type: ignore[arg-type]


def test_min_p_accepts_equal_weights_and_ignores_them() -> None:
    p = _p(k=2)
    assert np.array_equal(combine_p_values(p, "min_p", [2.0, 2.0]), combine_p_values(p, "min_p"))
    assert combination_weights(None, 2, "min_p") is None


# ------------------------------------------------------------------------ the manifest


def _manifest(**extra: object) -> dict[str, object]:
    reference = [1.0, 2.0, 3.0, 4.0]
    return {
        "name": "e",
        "rule": "fisher",
        "rule_definition": "x",
        "members": [
            {"name": "a", "version": 1, "kind": "pixel", "statistic": "complexity"},
            {"name": "b", "version": 2, "kind": "embedding", "statistic": "nll"},
        ],
        "calibration": {
            "target_fpr": 0.25,
            "threshold": 3.0,
            "validation_set": "combination",
            "validation_size": 4,
            "validation_fpr": 0.25,
            "reference_scores": reference,
        },
        **extra,
    }


def test_old_manifests_without_weights_load_and_score_identically(tmp_path: Path) -> None:
    old = _manifest()  # written before weights existed: no `weights`, no `selection`
    path = tmp_path / "_ensembles" / "e.json"
    path.parent.mkdir()
    path.write_text(json.dumps(old))
    loaded = load_ensemble(path)
    assert loaded.weights is None and loaded.selection is None and loaded.member_weights == [1.0, 1.0]
    p = _p(k=2, n=50)
    reference = np.asarray(loaded.calibration.reference_scores)
    today = combined_verdict(list(p), "fisher", 3.0, reference)
    now = combined_verdict(list(p), loaded.rule, loaded.calibration.threshold, reference, loaded.weights)
    assert all(np.array_equal(a, b) for a, b in zip(today, now, strict=True))


def test_weights_round_trip_and_are_checked_against_the_members(tmp_path: Path) -> None:
    good = EnsembleManifest.model_validate(_manifest(weights=[0.5, 1.0]))
    assert good.member_weights == [0.5, 1.0]
    written = write_ensemble(tmp_path, good)
    assert load_ensemble(written) == good
    for weights, rule in (([0.5], "fisher"), ([0.5, 1.0, 1.0], "fisher"), ([0.0, 1.0], "fisher"),
                          ([-1.0, 1.0], "fisher"), ([0.5, 1.0], "min_p")):  # fmt: skip
        path = tmp_path / "_ensembles" / "bad.json"
        path.write_text(json.dumps(_manifest(weights=weights, rule=rule, name="bad")))
        with pytest.raises(ArtifactError, match="invalid ensemble manifest") as info:
            load_ensemble(path)
        assert "\n" not in str(info.value)
    # NaN cannot even be written as JSON by the standard library's strict mode; pydantic refuses it too
    with pytest.raises(ValueError, match="finite and positive"):
        EnsembleManifest.model_validate(_manifest(weights=[float("nan"), 1.0]))
