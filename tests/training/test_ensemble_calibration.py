"""The false-positive rate of the combined verdict (issue 10 §3).

Members calibrate on the `calibration` split, the ensemble on the disjoint `combination` split, and
the realised rate on fresh in-distribution images is the target: measured on synthetic dependent
scores at large N (where the leave-one-out and same-split procedures measurably miss it and the
chi-square law of Fisher's method misses it badly), and on real tiny models against held-out
Fashion-MNIST images that no calibration saw.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from scipy.stats import chi2

from models.artifact import Manifest, verify_artifact
from models.scores import (
    calibrate_combination,
    combine_p_values,
    combined_verdict,
    leave_one_out_p_values,
    ood_score,
    p_value,
    png_bits_per_dim,
    threshold_at_fpr,
)
from training.config import load_run_config
from training.data import load_dataset
from training.ensemble import build_ensemble, combine_members, halve
from training.pipeline import build_run
from training.runs import load_splits

ALPHA = 0.05

# ------------------------------------------------------------------------ the order statistic


def test_threshold_is_the_conformal_order_statistic() -> None:
    scores = np.arange(1.0, 100.0)  # n = 99: k = ⌈100 · 0.95⌉ = 95
    assert threshold_at_fpr(scores[::-1], ALPHA) == 95.0
    assert np.mean(scores > 95.0) == 4 / 99  # 4 of 99 here; 5 of 100 for a fresh image (rank argument)
    assert threshold_at_fpr(np.arange(1.0, 60.0), ALPHA) == 57.0  # n = 59: k = 57 exactly, no float slip
    assert threshold_at_fpr(np.arange(1.0, 11.0), ALPHA) == 10.0  # too few: the largest score
    with pytest.raises(ValueError):
        threshold_at_fpr(np.zeros(0), ALPHA)
    with pytest.raises(ValueError):
        threshold_at_fpr(scores, 1.5)


def test_calibrate_combination_by_hand() -> None:
    p = np.array([[0.5, 0.25, 1.0, 0.1], [0.5, 1.0, 0.2, 0.1]])
    threshold, reference = calibrate_combination(p, "fisher", 0.5)
    expected = np.sort(-2 * np.log(p).sum(axis=0))
    np.testing.assert_allclose(reference, expected)
    assert threshold == expected[2]  # k = ⌈5 · 0.5⌉ = 3
    with pytest.raises(ValueError):
        calibrate_combination(np.array([0.5, 0.5]), "fisher", ALPHA)
    with pytest.raises(ValueError):
        calibrate_combination(np.zeros((2, 3)), "fisher", ALPHA)


# ------------------------------------------------------------------------ synthetic, large N


def _realised_rates(
    n: int, rule: str, repetitions: int, fresh: int, seed: int = 1
) -> dict[str, tuple[float, float, float]]:
    """Mean realised FPR over `repetitions` independent calibrations, `fresh` fresh in-distribution
    images each, for four ways of setting the combined threshold. Three strongly dependent members
    (correlation 0.8: they see the same image). Per procedure: (mean rate with `>`, mean rate with
    `>=`, standard error)."""
    rng = np.random.default_rng(seed)
    k_members, rho = 3, 0.8
    cholesky = np.linalg.cholesky(np.full((k_members, k_members), rho) + (1 - rho) * np.eye(k_members))

    def draw(m: int) -> np.ndarray:
        return (rng.normal(size=(m, k_members)) @ cholesky.T).T  # (K, m)

    rates: dict[str, list[tuple[float, float]]] = {"split": [], "loo": [], "same": [], "chi2": []}
    for _ in range(repetitions):
        calibration, combination, test = draw(n), draw(n), draw(fresh)
        references = [np.sort(c) for c in calibration]
        scores = combine_p_values(
            np.stack([p_value(t, r) for t, r in zip(test, references, strict=True)]),
            rule,  # type: ignore[arg-type]
        )
        thresholds = {
            # the product: p-values of images disjoint from the members' references
            "split": calibrate_combination(
                np.stack([p_value(c, r) for c, r in zip(combination, references, strict=True)]),
                rule,  # type: ignore[arg-type]
                ALPHA,
            )[0],
            # the old way: leave-one-out p-values of the members' own calibration images
            "loo": threshold_at_fpr(
                combine_p_values(np.stack([leave_one_out_p_values(c) for c in calibration]), rule),  # type: ignore[arg-type]
                ALPHA,
            ),
            # p-values of the calibration images against references that include them
            "same": threshold_at_fpr(
                combine_p_values(
                    np.stack([p_value(c, r) for c, r in zip(calibration, references, strict=True)]),
                    rule,  # type: ignore[arg-type]
                ),
                ALPHA,
            ),
            # Fisher's chi-square law, as if the members were independent
            "chi2": float(chi2.ppf(1 - ALPHA, 2 * k_members)),
        }
        for name, t in thresholds.items():
            rates[name].append((float(np.mean(scores > t)), float(np.mean(scores >= t))))
    out = {}
    for name, values in rates.items():
        v = np.asarray(values)
        out[name] = (float(v[:, 0].mean()), float(v[:, 1].mean()), float(v[:, 0].std() / math.sqrt(len(v))))
    return out


def test_split_calibration_holds_the_rate_where_same_split_procedures_miss_it() -> None:
    """n = 59 calibration and 59 combination images: (n + 1)(1 − α) = 57 is whole, so the
    split-conformal rate is exactly α for continuous scores; p-values are discrete, so ties make
    `>` at most α and `>=` at least α (both in expectation). 3,000 calibrations × 500 fresh images
    (1.5 million fresh in-distribution images) put the standard error near 0.0005."""
    rates = _realised_rates(59, "fisher", repetitions=3000, fresh=500)
    print({k: tuple(round(x, 4) for x in v) for k, v in rates.items()})
    strict, loose, se = rates["split"]
    assert strict <= ALPHA + 4 * se and loose >= ALPHA - 4 * se, rates["split"]
    # Same split, leave-one-out (the previous procedure): too few flagged, by far more than the error.
    assert rates["loo"][1] < ALPHA - 4 * rates["loo"][2], rates["loo"]
    # Same split, references including the image itself: too many flagged.
    assert rates["same"][0] > ALPHA + 4 * rates["same"][2], rates["same"]
    # Fisher's chi-square law ignores the members' dependence: about twice the target.
    assert rates["chi2"][0] > 1.5 * ALPHA, rates["chi2"]


def test_split_calibration_bounds_the_rate_for_min_p_too() -> None:
    """min-p scores tie heavily (a few p-value grid points); the bound still holds both ways."""
    strict, loose, se = _realised_rates(59, "min_p", repetitions=1500, fresh=400)["split"]
    assert strict <= ALPHA + 4 * se and loose >= ALPHA - 4 * se


def test_one_large_calibration_is_within_binomial_error() -> None:
    """One calibration as a product would do it, 5,000 + 5,000 images, 200,000 fresh images: the
    realised rate is α to within the binomial error of the combination split and the fresh sample."""
    rng = np.random.default_rng(7)
    cov = np.array([[1.0, 0.6], [0.6, 1.0]])
    calibration, combination, fresh = (
        rng.multivariate_normal([0, 0], cov, size=m).T for m in (5000, 5000, 200_000)
    )
    references = [np.sort(c) for c in calibration]
    p_comb = np.stack([p_value(c, r) for c, r in zip(combination, references, strict=True)])
    threshold, reference = calibrate_combination(p_comb, "fisher", ALPHA)
    p_fresh = [p_value(f, r) for f, r in zip(fresh, references, strict=True)]
    _, combined_p, is_ood = combined_verdict(p_fresh, "fisher", threshold, reference)
    error = math.sqrt(ALPHA * (1 - ALPHA) * (1 / 5000 + 1 / 200_000))
    assert abs(float(np.mean(is_ood)) - ALPHA) < 3 * error, float(np.mean(is_ood))
    # the combined p-value is (super-)uniform on fresh in-distribution images
    assert abs(float(np.mean(combined_p <= ALPHA)) - ALPHA) < 3 * error


def test_combine_members_needs_a_combination_split_for_a_threshold() -> None:
    rng = np.random.default_rng(0)
    refs = [rng.normal(size=100), rng.normal(size=100)]
    out = combine_members(refs, {"test": [rng.normal(size=10), rng.normal(size=10)]})
    assert out.threshold is None and out.splits["test"].shape == (10,)
    with pytest.raises(ValueError, match="different numbers"):
        combine_members(refs, {"x": [np.zeros(3), np.zeros(4)]})


# ------------------------------------------------------------------------ real tiny models

# Held-out sizes large enough for a binomial check: 600 calibration + 600 combination images.
_OVERRIDES = ["data.calibration_size=1200", "data.test_limit=64", "data.ood_limit=64"]
_FRESH = 3000
_PRESETS = ("fmnist-pixel-realnvp-quick", "fmnist-embedding-quick")


def _fresh_images() -> np.ndarray:
    """`_FRESH` Fashion-MNIST training-file images that neither run trained, validated or calibrated
    on: drawn exactly like the calibration and combination images (the same file, at random), so
    the realised rate is the one a user would see (the test file is a separate collection)."""
    used: set[bytes] = set()
    for preset in _PRESETS:
        splits = load_splits(load_run_config(preset, _OVERRIDES), with_eval_sets=False)
        assert splits.combination is not None
        for part in (splits.train, splits.validation, splits.calibration, splits.combination):
            used |= {image.tobytes() for image in part.images}
    full = load_dataset("fashion-mnist:train").images
    order = np.random.default_rng(123).permutation(len(full))
    fresh = [i for i in order[: 2 * _FRESH] if full[i].tobytes() not in used][:_FRESH]
    assert len(fresh) == _FRESH
    return full[np.sort(fresh)]


@pytest.fixture(scope="module")
def calibrated_pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fpr")
    out: dict[str, Path] = {"repository": root / "repository"}
    for preset in _PRESETS:
        config = load_run_config(preset, _OVERRIDES)
        out[preset] = build_run(config, root / "runs" / preset, out["repository"], progress=False)
        out[preset + ":run"] = root / "runs" / preset
    return out


def _graph_scores(artifact: Path, manifest: Manifest, images: np.ndarray) -> np.ndarray:
    """ood_score as the service computes it: the exported ONNX graph, then models.scores."""
    session = ort.InferenceSession(str(artifact / "model.onnx"), providers=["CPUExecutionProvider"])
    outputs = [session.run(None, {"images": images[i : i + 500]}) for i in range(0, len(images), 500)]
    ll = np.concatenate([o[0] for o in outputs]).astype(np.float64)
    background = np.concatenate([o[2] for o in outputs]).astype(np.float64) if len(outputs[0]) > 2 else None
    return ood_score(
        manifest.score.statistic,
        ll,
        num_dims=manifest.num_dims,
        reference_nll_mean=manifest.score.reference_bits_per_dim,
        complexity_bits=png_bits_per_dim(images) if manifest.score.statistic == "complexity" else None,
        background_log_likelihood=background,
    )


def test_realised_fpr_on_held_out_images_for_members_and_ensemble(
    calibrated_pair: dict[str, Path], tmp_path: Path
) -> None:
    members = [
        (calibrated_pair[p + ":run"], calibrated_pair[p])
        for p in ("fmnist-pixel-realnvp-quick", "fmnist-embedding-quick")
    ]
    _, ensemble = build_ensemble(members, tmp_path, "pair", device="cpu")
    splits = load_splits(load_run_config("fmnist-pixel-realnvp-quick", _OVERRIDES), with_eval_sets=False)
    assert splits.combination is not None
    n_cal, n_comb = len(splits.calibration), len(splits.combination)
    assert (n_cal, n_comb) == (600, 600)
    # the combination images are halved: 300 choose the member weights, the other 300 set the threshold
    _, calibration_half = halve(n_comb)
    n_comb = len(calibration_half)
    record = ensemble.calibration_images
    assert record["size"] == n_comb == ensemble.calibration.validation_size == 300
    assert record["fingerprint"] == splits.combination.subset(calibration_half).fingerprint()
    assert set(record["disjoint_from_member_calibration"].values()) == {splits.calibration.fingerprint()}
    print(f"ensemble weights: {ensemble.member_weights} ({ensemble.selection and ensemble.selection.chosen})")

    fresh = _fresh_images()
    manifests = [verify_artifact(a) for _, a in members]
    p = []
    for (_, artifact), manifest in zip(members, manifests, strict=True):
        scores = _graph_scores(artifact, manifest, fresh)
        reference = np.asarray(manifest.calibration.reference_scores)
        assert len(reference) == n_cal
        rate = float(np.mean(scores > manifest.calibration.threshold))
        # the realised rate varies with the calibration sample (n_cal) and the fresh sample
        error = math.sqrt(ALPHA * (1 - ALPHA) * (1 / n_cal + 1 / _FRESH))
        print(
            f"{manifest.name}: realised FPR {rate:.4f} on {_FRESH} held-out images (target {ALPHA}, 3σ {3 * error:.4f})"
        )
        assert abs(rate - ALPHA) < 3 * error, (manifest.name, rate)
        p.append(p_value(scores, reference))
    _, _, is_ood = combined_verdict(
        p,
        ensemble.rule,
        ensemble.calibration.threshold,
        np.asarray(ensemble.calibration.reference_scores),
        ensemble.weights,
    )
    rate = float(np.mean(is_ood))
    error = math.sqrt(ALPHA * (1 - ALPHA) * (1 / n_comb + 1 / _FRESH))
    print(
        f"ensemble: realised FPR {rate:.4f} on {_FRESH} held-out images (target {ALPHA}, 3σ {3 * error:.4f})"
    )
    assert abs(rate - ALPHA) < 3 * error, rate


def test_ensemble_refuses_members_with_different_combination_images(
    calibrated_pair: dict[str, Path], tmp_path: Path
) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(calibrated_pair["fmnist-embedding-quick:run"], run)
    scores = dict(np.load(run / "scores" / "combination.npz"))
    scores["fingerprint"] = np.array("0" * 64)
    np.savez(run / "scores" / "combination.npz", **scores)
    members = [
        (calibrated_pair["fmnist-pixel-realnvp-quick:run"], calibrated_pair["fmnist-pixel-realnvp-quick"]),
        (run, calibrated_pair["fmnist-embedding-quick"]),
    ]
    with pytest.raises(ValueError, match="different combination images"):
        build_ensemble(members, tmp_path, "bad")
    (run / "scores" / "combination.npz").unlink()
    with pytest.raises(ValueError, match="no scores of the combination split"):
        build_ensemble(members, tmp_path, "bad")
