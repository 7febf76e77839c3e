"""`oodflow benchmark` on real (tiny) exported models: the quick pixel and embedding flows built by
the training pipeline (tests/training/conftest.py) and an ensemble over them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from models.artifact import (
    EnsembleManifest,
    load_manifest,
    write_ensemble,
)
from models.scores import (
    combine_p_values,
    leave_one_out_p_values,
    ood_score,
    png_bits_per_dim,
    threshold_at_fpr,
)
from oodflow.cli import main
from tests.artifacts import write_test_ensemble
from training.benchmark import run_benchmark
from training.benchmark.metrics import conformal_flag_range, ood_metrics_with_ci
from training.benchmark.report import markdown, write_report
from training.data import DatasetError, load_dataset
from training.statistics import load_split_scores

PIXEL, EMBEDDING = "fmnist-pixel-realnvp-quick", "fmnist-embedding-quick"
ENSEMBLE = "quick-pair"
LIMIT = 96
FAST: dict[str, Any] = dict(limit=LIMIT, resamples=40, progress=False)


@pytest.fixture(scope="module")
def bench_repository(quick_repository: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the two quick models plus an ensemble over them, calibrated like the pipeline does:
    Fisher's method on leave-one-out p-values of the members' paired per-image calibration scores."""
    repository = tmp_path_factory.mktemp("bench") / "repository"
    manifests, calibration_scores = [], []
    for preset in (PIXEL, EMBEDDING):
        folder = quick_repository[preset]
        shutil.copytree(folder, repository / folder.parent.name / folder.name)
        manifests.append(load_manifest(folder))
        calibration_scores.append(
            np.asarray(
                load_split_scores(quick_repository[preset + ":run"] / "scores", "calibration")["ood_score"]
            )
        )
    combined = combine_p_values(np.stack([leave_one_out_p_values(s) for s in calibration_scores]), "fisher")
    reference = np.sort(combined)
    threshold = float(np.quantile(reference, 0.95, method="higher"))
    write_test_ensemble(
        repository,
        ENSEMBLE,
        manifests,
        reference,
        threshold,
    )
    return repository


@pytest.fixture(scope="module")
def ensemble_result(bench_repository: Path) -> dict[str, Any]:
    return run_benchmark(
        ENSEMBLE,
        bench_repository,
        near=["vflip", "rot90", "invert"],
        symmetries=["hflip"],
        far=["noise", "sklearn-digits"],
        **FAST,
    )


def _graph_scores(version_dir: Path, images: np.ndarray) -> tuple[np.ndarray, float]:
    """The shipped ood_score straight from ONNX Runtime and the manifest (no benchmark code)."""
    manifest = load_manifest(version_dir)
    session = ort.InferenceSession(str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    (log_likelihood,) = session.run(["log_likelihood"], {"images": images})
    scores = ood_score(
        manifest.score.statistic,
        log_likelihood.astype(np.float64),
        num_dims=manifest.num_dims,
        reference_nll_mean=manifest.score.reference_bits_per_dim,
        complexity_bits=png_bits_per_dim(images) if manifest.score.statistic == "complexity" else None,
    )
    return scores, manifest.calibration.threshold


def test_declared_symmetry_is_a_false_positive_check_not_an_ood_row(
    ensemble_result: dict[str, Any], bench_repository: Path
) -> None:
    result = ensemble_result
    families = {s["name"]: s["family"] for s in result["sets"]}
    assert families == {
        "vflip": "near",
        "rot90": "near",
        "invert": "near",
        "hflip": "symmetry",
        "noise": "far",
        "sklearn-digits": "far",
    }
    assert "hflip" not in {r["set"] for r in result["results"]}
    checks = {(c["set"], c["score"]): c for c in result["symmetry_checks"]}
    assert {s for s, _ in checks} == {"hflip"}
    # Every score is checked; thresholded ones (shipped ood_scores, the combined verdict) get a flagged
    # fraction with an exact binomial interval against their target FPR.
    assert {k for _, k in checks} == set(result["scores"])
    pixel_dir = bench_repository / "fmnist-pixel-quick" / "1"
    key = f"fmnist-pixel-quick/{load_manifest(pixel_dir).score.statistic}"
    check = checks[("hflip", key)]
    assert check["target_fpr"] == 0.05 and check["size"] == LIMIT
    low, high = check["flagged_ci"]
    assert 0.0 <= low <= check["flagged_fraction"] <= high <= 1.0
    # The flagged fraction is the service's verdict on the mirrored test images, recomputed here from
    # the graph alone: the same test images (the manifest's test set, seeded sample), mirrored.
    test = load_dataset("fashion-mnist:test", limit=256, seed=0)
    chosen = np.sort(np.random.default_rng(0).choice(len(test), size=LIMIT, replace=False))
    mirrored = np.ascontiguousarray(test.images[chosen][:, :, :, ::-1])
    scores, threshold = _graph_scores(pixel_dir, mirrored)
    assert check["flagged"] == int(np.sum(scores > threshold))
    assert ("hflip", "combined") in checks and "flagged_fraction" in checks[("hflip", "combined")]
    # ... and the report puts it in the false-positive section, never in an OOD table.
    text = markdown(result, [], "figures/benchmark")
    symmetry_section = text.split("## Declared symmetries")[1].split("\n## ")[0]
    assert "| hflip |" in symmetry_section
    ood_sections = text.split("## Near-OOD: transforms")[1]
    assert "| hflip |" not in ood_sections


def test_table_auroc_equals_sklearn_on_the_same_scores(ensemble_result: dict[str, Any]) -> None:
    result = ensemble_result
    scores = result["_arrays"]["scores"]
    assert set(result["scores"]) >= {"combined", "fmnist-pixel-quick/nll", "fmnist-embedding-quick/nll"}
    assert "fmnist-pixel-quick/complexity" in result["scores"]  # every statistic a pixel graph allows
    for row in result["results"]:
        id_scores, ood = scores["test"][row["score"]], scores[row["set"]][row["score"]]
        y = np.r_[np.zeros(len(id_scores)), np.ones(len(ood))]
        s = np.r_[id_scores, ood]
        assert row["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12), row
        assert row["aupr_out"] == pytest.approx(average_precision_score(y, s), abs=1e-12), row
        assert row["aupr_in"] == pytest.approx(average_precision_score(1 - y, -s), abs=1e-12), row
        low, high = row["auroc_ci"]
        assert low <= high
    # the Markdown summary prints the same numbers
    text = markdown(result, [], "figures/benchmark")
    vflip = next(r for r in result["results"] if r["set"] == "vflip" and r["score"] == "combined")
    assert (
        f"**{vflip['auroc']:.3f}**" in text.split("## Summary")[1].split("| near | vflip |")[1].split("\n")[0]
    )


def test_combined_score_is_the_ensemble_rule_over_the_graph_scores(
    ensemble_result: dict[str, Any], bench_repository: Path
) -> None:
    """The combined verdict on the test set, recomputed from ONNX Runtime outputs and p-values."""
    test = load_dataset("fashion-mnist:test", limit=256, seed=0)
    chosen = np.sort(np.random.default_rng(0).choice(len(test), size=LIMIT, replace=False))
    images = test.images[chosen]
    ps = []
    for name in ("fmnist-pixel-quick", "fmnist-embedding-quick"):
        folder = bench_repository / name / "1"
        scores, _ = _graph_scores(folder, images)
        reference = np.asarray(load_manifest(folder).calibration.reference_scores)
        ps.append(
            (1.0 + reference.size - np.searchsorted(reference, scores, side="left")) / (1.0 + reference.size)
        )
    expected = combine_p_values(np.stack(ps), "fisher")
    np.testing.assert_allclose(ensemble_result["_arrays"]["scores"]["test"]["combined"], expected, rtol=1e-6)


def test_bootstrap_interval_is_seeded_and_covers_the_point() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.normal(0, 1, 400), rng.normal(1, 1, 300)
    first = ood_metrics_with_ci(a, b, resamples=200, seed=5)
    assert first == ood_metrics_with_ci(a, b, resamples=200, seed=5)
    assert first != ood_metrics_with_ci(a, b, resamples=200, seed=6)
    for metric, (low, high) in first.interval.items():
        assert low <= first.point[metric] <= high, metric
    # tied scores (constant images) and a perfect separation
    perfect = ood_metrics_with_ci(np.zeros(50), np.ones(20), resamples=50)
    assert perfect.point == {"auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "fpr_at_95_tpr": 0.0}


def test_conformal_flag_range_covers_what_calibration_then_test_produce() -> None:
    # Simulate the whole chain: n calibration scores set the threshold (the service's own function),
    # then m fresh in-distribution scores are counted; the predicted 95% range must hold ~95% of the
    # counts. Discrete counts make the range slightly wider than 95%, never narrower.
    rng = np.random.default_rng(11)
    n, m, target, reps = 1250, 2000, 0.05, 4000
    low, high = conformal_flag_range(n, target, m)
    counts = np.empty(reps, dtype=np.int64)
    for i in range(reps):
        threshold = threshold_at_fpr(rng.random(n), target)
        counts[i] = int(np.sum(rng.random(m) > threshold))
    coverage = float(np.mean((counts >= low) & (counts <= high)))
    assert 0.94 <= coverage <= 0.975, coverage
    # the range is centred on the conformal rate and wider than the test images' binomial spread alone
    assert low < target * m < high
    binomial_half_width = 1.96 * np.sqrt(m * target * (1 - target))
    assert (high - low) / 2 > 1.5 * binomial_half_width
    # with very many calibration images it shrinks to the binomial spread
    big_low, big_high = conformal_flag_range(10**7, target, m)
    assert abs((big_high - big_low) / 2 - binomial_half_width) <= 2
    with pytest.raises(ValueError, match="at least 19 calibration images"):
        conformal_flag_range(10, target, m)


def test_single_model_report_files(
    bench_repository: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "out"
    rc = main(
        [
            "benchmark",
            "fmnist-embedding-quick",
            "--repository",
            str(bench_repository),
            "--near",
            "rot180,jigsaw",
            "--symmetries",
            "none",
            "--far",
            "constant",
            "--limit",
            "64",
            "--resamples",
            "20",
            "--output",
            str(output),
            "--no-progress",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "rot180" in printed and "jigsaw" in printed and "constant" in printed
    data = json.loads((output / "benchmark.json").read_text())
    assert data["headline"] == "fmnist-embedding-quick/nll" and data["ensemble"] is None
    assert data["symmetries"]["transforms"] == [] and not data["symmetry_checks"]
    # an embedding graph: nll and typicality, no complexity (per-feature bits/dim)
    assert data["members"][0]["statistics"] == ["nll", "typicality"]
    text = (output / "benchmark.md").read_text()
    assert "OOD is the positive class" in text
    for png in ("roc-near.png", "roc-far.png", "hist-near-fmnist-embedding-quick-nll.png"):
        assert (output / "figures" / "benchmark" / png).stat().st_size > 1000
        assert f"figures/benchmark/{png}" in text


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["no-such-model"], "unknown model or ensemble 'no-such-model'"),
        (["fmnist-embedding-quick", "--near", "upside-down"], "unknown near-OOD transform 'upside-down'"),
        (["fmnist-embedding-quick", "--symmetries", "rot45"], "unknown symmetry transform 'rot45'"),
        (["fmnist-embedding-quick", "--far", "nosuch-set"], "unknown dataset 'nosuch-set'"),
        (["fmnist-embedding-quick", "--test", "npz:/nonexistent/x.npz"], "does not exist"),
        (
            ["fmnist-embedding-quick", "--near", "hflip", "--symmetries", "hflip"],
            "both as near-OOD and as symmetries",
        ),
    ],
)
def test_bad_input_is_a_one_line_error(
    bench_repository: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    rc = main(["benchmark", *extra, "--repository", str(bench_repository), "--limit", "8", "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert message in err, err
    assert len(err.splitlines()) == 1 and err.startswith("oodflow: error:") and "Traceback" not in err


def test_write_report_without_figures(ensemble_result: dict[str, Any], tmp_path: Path) -> None:
    path = write_report(ensemble_result, tmp_path, figures=False)
    data = json.loads((tmp_path / "benchmark.json").read_text())
    assert "_arrays" not in data and data["ensemble"]["name"] == ENSEMBLE
    assert path.read_text().count("### combined verdict (fisher)") == 2  # near and far tables


def test_unknown_target_lists_what_exists(bench_repository: Path) -> None:
    with pytest.raises(
        DatasetError, match="models: fmnist-embedding-quick, fmnist-pixel-quick; ensembles: quick-pair"
    ):
        run_benchmark("nope", bench_repository, **FAST)


def test_stale_ensemble_is_a_one_line_error(bench_repository: Path, tmp_path: Path) -> None:
    repository = tmp_path / "repository"
    shutil.copytree(bench_repository, repository)
    ensemble = EnsembleManifest.model_validate_json(
        (repository / "_ensembles" / f"{ENSEMBLE}.json").read_text()
    )
    pixel = ensemble.members[0]
    other = "typicality" if pixel.statistic != "typicality" else "nll"
    for name, member, message in (
        (
            "missing",
            pixel.model_copy(update={"version": 7}),
            "needs fmnist-pixel-quick version 7, which is not in",
        ),
        (
            "wrong-statistic",
            pixel.model_copy(update={"statistic": other}),
            f"is stale: member 'fmnist-pixel-quick' is a pixel/{pixel.statistic} model, the ensemble needs pixel/{other}",
        ),
    ):
        write_ensemble(
            repository,
            ensemble.model_copy(update={"name": name, "members": [member, *ensemble.members[1:]]}),
        )
        with pytest.raises(DatasetError, match=message) as info:
            run_benchmark(name, repository, **FAST)
        assert "\n" not in str(info.value)


def test_far_set_sharing_test_images_is_marked(bench_repository: Path, tmp_path: Path) -> None:
    """A far-OOD set that holds in-distribution test images is no far-OOD set: the report says so."""
    test = load_dataset("fashion-mnist:test", limit=256, seed=0).images
    digits = load_dataset("mnist", limit=40, seed=1).images
    np.savez(tmp_path / "mixed.npz", images=np.concatenate([digits, test[:10]])[:, 0])
    result = run_benchmark(
        "fmnist-embedding-quick",
        bench_repository,
        far=[f"npz:{tmp_path / 'mixed.npz'}"],
        near=["vflip"],
        symmetries=["none"],
        limit=None,
        resamples=0,
        progress=False,
    )
    (mixed,) = [s for s in result["sets"] if s["family"] == "far"]
    assert mixed["size"] == 50 and "10 images also in the in-distribution test set" in mixed["description"]


def test_symmetries_declared_at_build_are_the_default(bench_repository: Path, tmp_path: Path) -> None:
    # A model built with `--symmetry vflip` records it in its manifest; the benchmark then checks
    # vflip as a symmetry (not as near-OOD) unless --symmetries says otherwise.
    repository = tmp_path / "repository"
    shutil.copytree(bench_repository / "fmnist-pixel-quick", repository / "fmnist-pixel-quick")
    path = repository / "fmnist-pixel-quick" / "1" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["training"].setdefault("data", {})["symmetries"] = ["vflip"]
    path.write_text(json.dumps(manifest))
    result = run_benchmark("fmnist-pixel-quick", repository, far=["noise"], **FAST)
    families = {s["name"]: s["family"] for s in result["sets"]}
    assert families["vflip"] == "symmetry" and families["hflip"] == "near"
    assert result["symmetries"] == {"transforms": ["vflip"], "source": "declared when the models were built"}
    overridden = run_benchmark("fmnist-pixel-quick", repository, far=["noise"], symmetries=["hflip"], **FAST)
    assert {s["name"]: s["family"] for s in overridden["sets"]}["vflip"] == "near"
