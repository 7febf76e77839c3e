"""OOD statistics, p-values and the combined verdict against hand computations; the
likelihood-ratio graph and an ensemble built from real quick runs."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from models.artifact import (
    ArtifactError,
    EnsembleManifest,
    ensemble_path,
    find_ensembles,
    load_ensemble,
    verify_artifact,
    write_ensemble,
)
from models.config import PixelFlowConfig
from models.flows import PixelFlow
from models.ratio import LikelihoodRatioModel
from models.scores import (
    LN2,
    combine_p_values,
    combined_verdict,
    leave_one_out_p_values,
    ood_score,
    p_value,
    png_bits_per_dim,
)
from training.background import perturb
from training.config import load_run_config
from training.data import load_dataset
from training.ensemble import build_ensemble, combine_members
from training.evaluate import ood_metrics
from training.export import check_parity, export_onnx, export_torchscript
from training.pipeline import build_run
from training.statistics import load_split_scores

D = 784


def _ll(bpd: np.ndarray | float) -> np.ndarray:
    """Log-likelihood (nats) of an image of D dims at `bpd` bits/dim."""
    return -np.asarray(bpd, dtype=np.float64) * D * LN2


# ------------------------------------------------------------------------ single-model statistics


def test_png_length_of_a_constant_image_is_far_below_that_of_noise() -> None:
    rng = np.random.default_rng(0)
    constant = np.full((1, 1, 28, 28), 128, dtype=np.uint8)
    noise = rng.integers(0, 256, size=(1, 1, 28, 28), dtype=np.uint8)
    bits = png_bits_per_dim(np.concatenate([constant, noise]))
    # noise is incompressible: 8 bits/dim plus the PNG container; a constant image is a few dozen bytes
    assert bits[1] > 8.0 and bits[0] < 1.2 and bits[0] * 8 < bits[1]


def test_png_length_is_the_byte_count_of_a_lossless_png() -> None:
    images = load_dataset("mnist", limit=3, seed=1).images
    bits = png_bits_per_dim(images)
    for image, b in zip(images, bits, strict=True):
        buffer = io.BytesIO()
        Image.fromarray(image[0]).save(buffer, format="PNG", compress_level=9)
        assert b == 8 * len(buffer.getvalue()) / D
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(buffer.getvalue()))), image[0])
    rgb = np.repeat(images, 3, axis=1)
    assert png_bits_per_dim(rgb).shape == (3,)
    with pytest.raises(ValueError):
        png_bits_per_dim(images.astype(np.float32))


def test_statistics_by_hand() -> None:
    bpd = np.array([2.0, 3.0, 4.0])
    ll = _ll(bpd)
    np.testing.assert_allclose(ood_score("nll", ll, num_dims=D), bpd)
    # typicality of the mean NLL is zero; two-sided distance otherwise
    np.testing.assert_allclose(
        ood_score("typicality", ll, num_dims=D, reference_nll_mean=3.0), [1.0, 0.0, 1.0], atol=1e-12
    )
    # input complexity: flow bits/dim minus PNG bits/dim
    np.testing.assert_allclose(
        ood_score("complexity", ll, num_dims=D, complexity_bits=np.array([1.0, 1.0, 5.0])), [1.0, 2.0, -1.0]
    )
    # likelihood ratio: −(log p − log p_bg) in bits/dim; a background that likes the image more → lower
    np.testing.assert_allclose(
        ood_score("likelihood_ratio", ll, num_dims=D, background_log_likelihood=_ll([1.0, 3.0, 6.0])),
        [1.0, 0.0, -2.0],
        atol=1e-12,
    )
    for statistic, missing in (("typicality", "reference"), ("complexity", "complexity_bits")):
        with pytest.raises(ValueError, match=missing):
            ood_score(statistic, ll, num_dims=D)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="background"):
        ood_score("likelihood_ratio", ll, num_dims=D)


def test_p_values_by_hand() -> None:
    ref = np.array([1.0, 2.0, 3.0])
    np.testing.assert_allclose(p_value(np.array([0.0, 2.0, 9.0]), ref), [1.0, 3 / 4, 1 / 4])
    # leave-one-out: each reference score against the other two
    np.testing.assert_allclose(leave_one_out_p_values(np.array([3.0, 1.0, 2.0])), [1 / 3, 1.0, 2 / 3])


def test_combination_rules_by_hand() -> None:
    p = np.array([[0.5, 1.0], [0.25, 1.0]])  # 2 models x 2 images
    np.testing.assert_allclose(combine_p_values(p, "fisher"), [2 * math.log(8), 0.0], atol=1e-12)
    np.testing.assert_allclose(combine_p_values(p, "min_p"), [-math.log(0.5), 0.0], atol=1e-12)
    score, p, flag = combined_verdict(
        [p[0], p[1]], "fisher", threshold=1.0, reference_sorted=np.array([0.5, 2.0])
    )
    np.testing.assert_allclose(score, [2 * math.log(8), 0.0], atol=1e-12)
    np.testing.assert_allclose(p, [1 / 3, 1.0])
    assert flag.tolist() == [True, False]
    with pytest.raises(ValueError):
        combine_p_values(np.array([[0.0, 0.5]]), "fisher")
    with pytest.raises(ValueError):
        combine_p_values(p, "mean")  # type: ignore[arg-type]


@pytest.mark.parametrize("rule", ["fisher", "min_p"])
def test_combined_verdict_catches_what_one_model_alone_misses(rule: str) -> None:
    """Model A sees OOD set 'low-level' and is blind to 'semantic'; model B the other way round.
    Each alone is at chance on the set it misses; the combination catches both and still flags
    about the target FPR of fresh in-distribution images."""
    rng = np.random.default_rng(0)
    n = 4000
    cal = [rng.normal(size=n), rng.normal(size=n)]
    comb = [rng.normal(size=n), rng.normal(size=n)]  # the ensemble's own held-out images
    test = [rng.normal(size=n), rng.normal(size=n)]
    low = [rng.normal(4.0, 1.0, size=500), rng.normal(size=500)]
    sem = [rng.normal(size=500), rng.normal(4.0, 1.0, size=500)]
    combined = combine_members(
        cal,
        {"test": test, "low": low, "sem": sem},
        rule,  # type: ignore[arg-type]
        target_fpr=0.05,
        combination=comb,
    )
    assert combined.threshold is not None
    assert ood_metrics(test[1], low[1])["auroc"] < 0.6  # B misses the low-level set
    assert ood_metrics(test[0], sem[0])["auroc"] < 0.6  # A misses the semantic set
    for split in ("low", "sem"):
        auroc = ood_metrics(combined.splits["test"], combined.splits[split])["auroc"]
        assert auroc > 0.95, (split, auroc)
        assert np.mean(combined.splits[split] > combined.threshold) > 0.7
    fpr = float(np.mean(combined.splits["test"] > combined.threshold))
    assert abs(fpr - 0.05) < 0.015, fpr


def test_perturbation_replaces_about_mu_of_the_pixels() -> None:
    images = np.full((50, 1, 28, 28), 7, dtype=np.uint8)
    out = perturb(images, 0.2, seed=3)
    changed = float(np.mean(out != images))
    assert abs(changed - 0.2 * 255 / 256) < 0.01
    np.testing.assert_array_equal(perturb(images, 0.2, seed=3), out)  # seeded
    assert images.max() == 7  # the input is not modified


# ------------------------------------------------------------------------ likelihood-ratio graph


def _tiny_flow(seed: int) -> PixelFlow:
    cfg = PixelFlowConfig(
        width=4,
        depth=0,
        num_scales=2,
        couplings_per_scale=1,
        channel_couplings=1,
        final_couplings=1,
        seed=seed,
    )
    model = PixelFlow(cfg).eval()
    with torch.no_grad():  # leave the identity initialisation, so the two flows differ
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model


def test_likelihood_ratio_graph_exports_both_flows_with_parity(tmp_path: Path) -> None:
    model = LikelihoodRatioModel(_tiny_flow(1), _tiny_flow(2)).eval()
    images = torch.from_numpy(load_dataset("fashion-mnist:test", limit=8, seed=2).images)
    export_onnx(model, images[:2], tmp_path / "m.onnx")
    export_torchscript(model, images[:2], tmp_path / "m.pt")
    worst = check_parity(model, tmp_path / "m.onnx", tmp_path / "m.pt", images)
    assert worst["onnxruntime"] < 1e-3
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == [
        "log_likelihood",
        "bits_per_dim",
        "background_log_likelihood",
    ]
    ll, bpd, bg = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(ll, model.main.log_likelihood(images).numpy(), rtol=1e-4)
        np.testing.assert_allclose(bg, model.background.log_likelihood(images).numpy(), rtol=1e-4)
    assert not np.allclose(ll, bg)
    score = ood_score("likelihood_ratio", ll, num_dims=D, background_log_likelihood=bg)
    np.testing.assert_allclose(score, (bg.astype(np.float64) - ll) / (D * LN2), rtol=1e-6)


def test_likelihood_ratio_run_end_to_end(tmp_path: Path) -> None:
    """train → background → calibrate → evaluate → export with the likelihood-ratio statistic."""
    config = load_run_config(
        "fmnist-pixel-realnvp-quick",
        [
            "train.max_steps=4",
            "calibration.statistic=likelihood_ratio",
            "calibration.background.max_steps=3",
            "data.calibration_size=64",
            "data.test_limit=32",
            "data.ood_limit=32",
        ],
    )
    path = build_run(config, tmp_path / "run", tmp_path / "repo", progress=False)
    manifest = verify_artifact(path)
    assert manifest.score.statistic == "likelihood_ratio"
    assert manifest.score.background is not None and manifest.score.background.perturbation_rate == 0.2
    assert manifest.export["outputs"][-1] == "background_log_likelihood"
    assert (tmp_path / "run" / "background" / "model.safetensors").is_file()
    # the graph's outputs reproduce the calibration's reference scores on the calibration split
    session = ort.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"])
    from training.runs import load_splits

    images = load_splits(config, with_eval_sets=False).calibration.images
    ll, _, bg = session.run(None, {"images": images})
    scores = np.sort(ood_score("likelihood_ratio", ll, num_dims=D, background_log_likelihood=bg))
    np.testing.assert_allclose(scores, manifest.calibration.reference_scores, rtol=1e-3, atol=1e-4)


def test_complexity_calibration_matches_png_of_the_images(
    tmp_path: Path, quick_repository: dict[str, Path]
) -> None:
    from training.calibrate import calibrate
    from training.runs import Run, load_splits

    run_dir = quick_repository["fmnist-pixel-realnvp-quick:run"]
    copy = tmp_path / "run"
    import shutil

    shutil.copytree(run_dir, copy)
    record = calibrate(str(copy), device="cpu", statistic="complexity")
    assert record.statistic == "complexity" and record.complexity is not None
    assert record.complexity.compress_level == 9
    run = Run(copy)
    images = load_splits(run.config, with_eval_sets=False).calibration.images
    with torch.no_grad():
        ll = run.load_model("cpu").log_likelihood(torch.from_numpy(images)).double().numpy()
    expected = np.sort(ll / (-D * LN2) - png_bits_per_dim(images))
    np.testing.assert_allclose(record.reference_scores, expected, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------ ensembles


def test_ensemble_of_the_quick_models(quick_repository: dict[str, Path], tmp_path: Path) -> None:
    members = [
        (quick_repository[p + ":run"], quick_repository[p])
        for p in ("fmnist-pixel-realnvp-quick", "fmnist-embedding-quick")
    ]
    path, ensemble = build_ensemble(members, tmp_path, "quick")
    assert path == ensemble_path(tmp_path, "quick") and find_ensembles(tmp_path) == [path]
    loaded = load_ensemble(path)
    assert loaded == ensemble
    assert [m.name for m in loaded.members] == ["fmnist-pixel-quick", "fmnist-embedding-quick"]
    # the quick presets hold out 256 images: 128 calibrate the members, the other 128 the ensemble,
    # halved: 64 choose its member weights, 64 set its threshold
    assert loaded.calibration.validation_size == 64 == loaded.calibration_images["size"]
    assert loaded.calibration_images["split"] == "combination (calibration half)"
    assert loaded.selection is not None and loaded.selection.images is not None
    assert loaded.selection.images.size == 64 and loaded.weights == loaded.selection.weights
    assert (
        loaded.calibration_images["fingerprint"]
        not in loaded.calibration_images["disjoint_from_member_calibration"].values()
    )
    assert loaded.calibration.validation_fpr <= 0.05 + 1e-9
    (mnist,) = loaded.metrics
    assert set(mnist.member_auroc) == {"fmnist-pixel-quick", "fmnist-embedding-quick"}
    assert 0.0 <= mnist.auroc <= 1.0
    assert "combined AUROC" in path.with_suffix(".md").read_text()
    # what the service does: member p-values from each manifest's calibration, then combined_verdict
    manifests = [verify_artifact(a) for _, a in members]
    p = [
        p_value(
            load_split_scores(run / "scores", "test")["ood_score"],  # type: ignore[arg-type]
            np.array(m.calibration.reference_scores),
        )
        for (run, _), m in zip(members, manifests, strict=True)
    ]
    _, combined_p, is_ood = combined_verdict(
        p,
        loaded.rule,
        loaded.calibration.threshold,
        np.array(loaded.calibration.reference_scores),
        loaded.weights,
    )
    assert float(np.mean(is_ood)) == pytest.approx(loaded.in_distribution_test["flagged_fraction"])
    assert np.all((combined_p > 0) & (combined_p <= 1))


def test_ensemble_manifest_validation(tmp_path: Path) -> None:
    good = {
        "name": "e",
        "rule": "fisher",
        "rule_definition": "x",
        "members": [
            {"name": "a", "version": 1, "kind": "pixel", "statistic": "nll"},
            {"name": "b", "version": 2, "kind": "embedding", "statistic": "nll"},
        ],
        "calibration": {
            "target_fpr": 0.05,
            "threshold": 1.0,
            "validation_set": "v",
            "validation_size": 2,
            "validation_fpr": 0.0,
            "reference_scores": [0.5, 1.0],
        },
    }
    write_ensemble(tmp_path, EnsembleManifest.model_validate(good))
    assert load_ensemble(ensemble_path(tmp_path, "e")).members[1].version == 2
    bad = {**good, "members": good["members"][:1]}
    with pytest.raises(ValueError):
        EnsembleManifest.model_validate(bad)
    ensemble_path(tmp_path, "broken").write_text("{}")
    with pytest.raises(ArtifactError, match="invalid ensemble"):
        load_ensemble(ensemble_path(tmp_path, "broken"))


def test_build_defaults_writes_and_reuses_the_default_ensemble(
    quick_repository: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    import training.defaults as defaults

    runs, repo = tmp_path / "runs", tmp_path / "repo"
    names = {
        "fmnist-pixel-quick": "fmnist-pixel-realnvp-quick",
        "fmnist-embedding-quick": "fmnist-embedding-quick",
    }
    for name, preset in names.items():
        shutil.copytree(quick_repository[preset + ":run"], runs / name)
        shutil.copytree(quick_repository[preset], repo / name / "1")
    monkeypatch.setattr(defaults, "DEFAULT_MODELS", names)
    path = defaults.build_default_ensemble(repo, runs)
    assert path is not None and path == ensemble_path(repo, defaults.DEFAULT_ENSEMBLE)
    first = path.stat().st_mtime_ns
    assert (
        defaults.build_default_ensemble(repo, runs) == path and path.stat().st_mtime_ns == first
    )  # up to date
    assert {(m.name, m.version) for m in load_ensemble(path).members} == {(n, 1) for n in names}
    assert defaults.build_default_ensemble(repo, tmp_path / "no-runs") is None
